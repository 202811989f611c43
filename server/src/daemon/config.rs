//! `udm.toml`: what `udm serve` sets up at start-up, in order: backends, mapped devices
//! (dmsetup tables), snapshots, exports.
//!
//! ```toml
//! control = "./udm.ctl"
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

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

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
    /// Backends by name and specification (`null:1G`, `mem:64M`, `file:/path`).
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendConfig>,
    /// Mapped devices with their tables.
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceConfig>,
    /// Snapshots to take once the devices exist.
    #[serde(default, rename = "snapshot")]
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
    /// The table, in dmsetup's format (several lines allowed).
    pub table: String,
    /// Optional UUID.
    #[serde(default)]
    pub uuid: Option<String>,
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
            backends: vec![BackendConfig { name: "ram0".into(), spec: "mem:1G".into() }],
            devices: vec![DeviceConfig { name: "vol0".into(), table: "0 2097152 linear ram0 0".into(), uuid: None }],
            snapshots: vec![],
            exports: vec![ExportConfig {
                name: "vol0".into(),
                socket: PathBuf::from("vol0.sock"),
                device: "vol0".into(),
                num_queues: 1,
                queue_size: 256,
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
        assert_eq!(c.exports[0].queue_size, 256);
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
