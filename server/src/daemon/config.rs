//! `udm.toml`: what `udm serve` sets up at start-up, in order: backends, mapped devices
//! (dmsetup tables), snapshots, exports.
//!
//! ```toml
//! control = "./udm.ctl"
//! # Where every change is recorded (default: udm-state.json beside the control socket).
//! state = "./udm-state.json"
//! # Who may use the control socket (default 0600: udm's user only).
//! control_mode = "0660"
//! control_group = "udm"
//!
//! [[backend]]
//! name = "disk0"
//! spec = "mem:1G"
//!
//! [[device]]
//! name = "vol0"
//! table = "0 2097152 linear disk0 0"
//!
//! [[device]]
//! name = "vol1"
//! table = "0 1024 linear disk0 2097152"
//! inactive_table = "0 2048 linear disk0 2097152"   # loaded, not resumed
//! suspended = true
//!
//! [[snapshot]]
//! origin = "vol0"
//! name = "snap0"
//! cow = "mem:256M"
//! chunk = "4k"
//! reinit = false      # true: re-initialise a COW that cannot be re-attached
//!
//! [[export]]
//! name = "vol0"
//! device = "vol0"
//! socket = "./vol0.sock"
//! num_queues = 2
//! # For a QEMU running as another user in group kvm (default 0600, udm's group).
//! socket_mode = "0660"
//! socket_group = "kvm"
//! ```

//!
//! When a state file exists (see [`super::state`]), it is what `udm serve` rebuilds, and
//! this file's declarations are applied only for objects the state does not hold (by
//! name): a declaration added since the last run is picked up, and what was changed at
//! run time stays as it was changed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use udm_drivers::backend_spec::BackendSpec;
use udm_drivers::units::parse_size;
use udm_mapping::registry::validate_name;
use udm_mapping::table_text::parse_table_text;
use udm_mapping::targets::TargetTypes;

use super::state::StateFile;
use crate::control::socket_file::{SocketAccess, SocketMode};
use crate::vhost_blk::ExportConfig;

/// The whole file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control socket path.
    #[serde(default = "default_control")]
    pub control: PathBuf,
    /// Control socket permissions (default 0600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_mode: Option<SocketMode>,
    /// Control socket group (name or number; default: udm's group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_group: Option<String>,
    /// State file (default: `udm-state.json` beside the control socket).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<PathBuf>,
    /// Backends by name and specification (`null:1G`, `mem:64M`, `file:/path`).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Mapped devices with their tables.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Snapshots to take once the devices exist.
    #[serde(default, rename = "snapshot", skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotConfig>,
    /// vhost-user-blk exports.
    #[serde(default, rename = "export")]
    pub exports: Vec<ExportConfig>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Name tables use.
    pub name: String,
    /// Specification, as on the command line.
    pub spec: String,
}

/// One mapped device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceConfig {
    /// Its name.
    pub name: String,
    /// The live table, in dmsetup's format (several lines allowed; empty: created
    /// without a table).
    #[serde(default)]
    pub table: String,
    /// Optional UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// A table loaded and not resumed (`dmsetup load` without `resume`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inactive_table: Option<String>,
    /// Left suspended once everything is set up.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub suspended: bool,
}

impl DeviceConfig {
    /// A device with a live table only.
    pub fn new(name: &str, table: &str) -> Self {
        DeviceConfig { name: name.into(), table: table.into(), uuid: None, inactive_table: None, suspended: false }
    }
}

/// One snapshot (LVM style: `<origin>-real`, `<name>-cow` are created too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// The origin device.
    pub origin: String,
    /// The snapshot's name.
    pub name: String,
    /// Where the COW lives: a backend spec, a size (RAM), or a device name.
    pub cow: String,
    /// Chunk size (`4k` .. `512k`).
    #[serde(default = "default_chunk")]
    pub chunk: String,
    /// At every start the snapshot is re-attached from its COW when that holds a valid
    /// store of this chunk size (and merged again if a merge was cut short); a blank
    /// COW is initialised. Anything else (other data, another chunk size, a snapshot
    /// invalidated because it filled up) stops the start with a message, unless this
    /// is `true`: then such a COW is re-initialised and what it held is lost. A valid
    /// store is re-attached either way.
    #[serde(default)]
    pub reinit: bool,
}

fn default_control() -> PathBuf {
    PathBuf::from("udm.ctl")
}

fn default_chunk() -> String {
    "4k".into()
}

/// Why a config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The TOML is malformed or has unknown keys.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the parser said (with line and column).
        message: String,
    },
}

impl Config {
    /// Reads and parses a file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        Self::parse(&text, path)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: origin.to_path_buf(), message: e.to_string() })
    }

    /// Who may connect to the control socket.
    pub fn control_access(&self) -> SocketAccess {
        SocketAccess { mode: self.control_mode.unwrap_or_default(), group: self.control_group.clone() }
    }

    /// The embedded default: a 1 GiB RAM volume `vol0` (a linear table over a mem
    /// backend) exported at `./vol0.sock`.
    pub fn embedded_default() -> Config {
        Config {
            control: default_control(),
            control_mode: None,
            control_group: None,
            state: None,
            backends: vec![BackendConfig { name: "ram0".into(), spec: "mem:1G".into() }],
            devices: vec![DeviceConfig::new("vol0", "0 2097152 linear ram0 0")],
            snapshots: vec![],
            exports: vec![ExportConfig {
                name: "vol0".into(),
                socket: PathBuf::from("vol0.sock"),
                device: "vol0".into(),
                num_queues: 1,
                queue_size: crate::vhost_blk::export::default_queue_size(),
                read_only: false,
                poll: Default::default(),
                idle_poll_us: crate::vhost_blk::export::default_idle_poll_us(),
                cpus: vec![],
                serial: None,
                socket_mode: None,
                socket_group: None,
            }],
        }
    }
}

impl Config {
    /// The state file's path: `state`, or `udm-state.json` beside the control socket.
    pub fn state_path(&self) -> PathBuf {
        self.state.clone().unwrap_or_else(|| super::state::default_path(&self.control))
    }

    /// What `state` holds, as a udm.toml that recreates it (`udm config save`): the
    /// devices as their tables, snapshots included (a `snapshot` table over a COW that
    /// holds a store re-attaches it). Control settings are taken from `self`.
    pub fn from_state(&self, state: &StateFile) -> Config {
        let mut out = Config {
            backends: Vec::new(),
            devices: Vec::new(),
            snapshots: Vec::new(),
            exports: Vec::new(),
            ..self.clone()
        };
        out.backends = state
            .backends
            .iter()
            .map(|b| BackendConfig { name: b.name.clone(), spec: b.spec.clone().unwrap_or_default() })
            .collect();
        out.devices = state
            .devices
            .iter()
            .map(|d| DeviceConfig {
                name: d.name.clone(),
                table: d.table.clone().unwrap_or_default(),
                uuid: d.uuid.clone(),
                inactive_table: d.inactive_table.clone(),
                suspended: d.suspended,
            })
            .collect();
        out.exports.clone_from(&state.exports);
        out
    }

    /// The declarations for objects `state` does not hold (by name; a snapshot counts as
    /// held when a device of its name is).
    pub fn missing_from(&self, state: &StateFile) -> Config {
        let held: BTreeSet<&str> = state
            .backends
            .iter()
            .map(|b| b.name.as_str())
            .chain(state.devices.iter().map(|d| d.name.as_str()))
            .collect();
        let exported: BTreeSet<&str> = state.exports.iter().map(|e| e.name.as_str()).collect();
        let mut out = self.clone();
        out.backends.retain(|b| !held.contains(b.name.as_str()));
        out.devices.retain(|d| !held.contains(d.name.as_str()));
        out.snapshots.retain(|s| !held.contains(s.name.as_str()));
        out.exports.retain(|e| !exported.contains(e.name.as_str()));
        out
    }

    /// The file's text.
    pub fn to_toml(&self) -> Result<String, String> {
        toml::to_string_pretty(self).map_err(|e| format!("cannot write the configuration as TOML: {e}"))
    }

    /// Structural problems (nothing is opened or applied): names valid and unique,
    /// backend specs and tables that parse, devices named by tables, snapshots and
    /// exports declared before use (in the order `udm serve` sets them up).
    pub fn check(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let mut known: BTreeSet<String> = BTreeSet::new();
        let claim = |what: &str, name: &str, problems: &mut Vec<String>, known: &mut BTreeSet<String>| {
            if let Err(e) = validate_name(name) {
                problems.push(format!("{what} `{name}`: {e}"));
            }
            if !known.insert(name.to_string()) {
                problems.push(format!("{what} `{name}`: the name is already used by another backend or device"));
            }
        };
        for b in &self.backends {
            claim("backend", &b.name, &mut problems, &mut known);
            if let Err(e) = BackendSpec::parse(&b.spec) {
                problems.push(format!("backend `{}`: spec `{}`: {e}", b.name, b.spec));
            }
        }
        let check_table =
            |owner: &str, which: &str, text: &str, known: &BTreeSet<String>, problems: &mut Vec<String>| {
                match parse_table_text(text) {
                    Err(e) => problems.push(format!("device `{owner}`: {which}: {e}")),
                    Ok(lines) => {
                        let types = TargetTypes::builtin();
                        for line in lines {
                            if types.get(&line.target).is_none() {
                                problems.push(format!(
                                    "device `{owner}`: {which} line {}: target `{}` is not one udm knows (expected \
                                     one of {})",
                                    line.line,
                                    line.target,
                                    types.names()
                                ));
                                continue;
                            }
                            for dev in device_args(&line.target, &line.args) {
                                if !known.contains(dev) {
                                    problems.push(format!(
                                    "device `{owner}`: {which} line {} ({}) uses `{dev}`, which is not a backend or \
                                     device declared before it",
                                    line.line, line.target
                                ));
                                }
                            }
                        }
                    }
                }
            };
        for d in &self.devices {
            if !d.table.trim().is_empty() {
                check_table(&d.name, "table", &d.table, &known, &mut problems);
            }
            claim("device", &d.name, &mut problems, &mut known);
        }
        for d in &self.devices {
            if let Some(t) = &d.inactive_table {
                check_table(&d.name, "inactive_table", t, &known, &mut problems);
            }
        }
        let mut exportable = known.clone();
        for s in &self.snapshots {
            if !known.contains(&s.origin) {
                problems.push(format!("snapshot `{}`: origin `{}` is not a declared device", s.name, s.origin));
            }
            match parse_size(&s.chunk) {
                Ok(b) if b % 512 == 0 && (8..=1024).contains(&(b / 512)) && (b / 512).is_power_of_two() => {}
                _ => problems
                    .push(format!("snapshot `{}`: chunk `{}`: use a power of two from 4k to 512k", s.name, s.chunk)),
            }
            let cow_ok = BackendSpec::parse(&s.cow).is_ok() || parse_size(&s.cow).is_ok() || known.contains(&s.cow);
            if !cow_ok {
                problems.push(format!(
                    "snapshot `{}`: cow `{}` is not a backend spec, a size or a declared device",
                    s.name, s.cow
                ));
            }
            for n in [s.name.clone(), format!("{}-cow", s.name)] {
                claim("snapshot", &n, &mut problems, &mut exportable);
            }
        }
        let mut export_names = BTreeSet::new();
        let mut sockets = BTreeSet::new();
        for e in &self.exports {
            if !export_names.insert(e.name.as_str()) {
                problems.push(format!("export `{}`: the name is used by another export", e.name));
            }
            if !sockets.insert(e.socket.clone()) {
                problems.push(format!("export `{}`: socket {} is used by another export", e.name, e.socket.display()));
            }
            if !exportable.contains(&e.device) {
                problems.push(format!("export `{}`: device `{}` is not declared", e.name, e.device));
            }
            if e.num_queues == 0 || e.num_queues > 64 {
                problems.push(format!("export `{}`: num_queues {} is out of range: use 1 to 64", e.name, e.num_queues));
            }
            if let Some(problem) = e.queue_size_problem() {
                problems.push(format!("export `{}`: {problem}", e.name));
            }
        }
        problems
    }
}

/// The arguments of a table line that name devices, for the target types udm has.
fn device_args<'a>(target: &str, args: &'a [String]) -> Vec<&'a str> {
    match target {
        "linear" | "snapshot-origin" => args.first().map(String::as_str).into_iter().collect(),
        "snapshot" | "snapshot-merge" => args.iter().take(2).map(String::as_str).collect(),
        // striped <stripes> <chunk> (<dev> <offset>)...
        "striped" => args.iter().skip(2).step_by(2).map(String::as_str).collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_example_and_names_bad_keys() {
        let doc = include_str!("config.rs");
        let example: String = doc
            .lines()
            .skip_while(|l| !l.starts_with("//! ```toml"))
            .skip(1)
            .take_while(|l| !l.starts_with("//! ```"))
            .map(|l| l.trim_start_matches("//!").trim_start())
            .collect::<Vec<_>>()
            .join("\n");
        let c = Config::parse(&example, Path::new("example")).unwrap();
        assert_eq!(c.backends[0].spec, "mem:1G");
        assert_eq!(c.snapshots[0].chunk, "4k");
        assert_eq!(c.exports[0].num_queues, 2);
        assert_eq!(c.exports[0].queue_size, 1024);
        assert_eq!(c.exports[0].socket_access().mode.bits(), 0o660);
        assert_eq!(c.exports[0].socket_group.as_deref(), Some("kvm"));
        assert_eq!(c.control_access().mode.bits(), 0o660);
        let octal = Config::parse("control_mode = 0o640\n", Path::new("x.toml")).unwrap();
        assert_eq!(octal.control_access().mode.bits(), 0o640);
        let e = Config::parse("control_mode = \"0666x\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("octal"), "{e}");
        let e = Config::parse("[[backend]]\nname = \"a\"\nspek = \"mem:1G\"\n", Path::new("x.toml")).unwrap_err();
        assert!(e.to_string().contains("spek"), "{e}");
        assert_eq!(Config::embedded_default().exports[0].socket, PathBuf::from("vol0.sock"));
    }
}
