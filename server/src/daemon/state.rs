//! The state file: what the daemon holds (backends, mapped devices with their tables,
//! exports), written after every successful change through the control socket and read
//! back by `udm serve` at start-up, so a crash, an upgrade or a reboot brings it all
//! back (see `Daemon::restore`).
//!
//! Pretty-printed JSON, diffable and readable:
//!
//! ```json
//! {
//!   "version": 1,
//!   "udm": "0.1.0",
//!   "backends": [ { "name": "disk0", "spec": "file:/var/lib/udm/disk0", "sectors": 2097152 } ],
//!   "devices": [
//!     { "name": "vol0", "uuid": null, "table": "0 2097152 linear disk0 0",
//!       "inactive_table": null, "suspended": false }
//!   ],
//!   "exports": [ { "name": "vol0", "socket": "/run/udm/vol0.sock", "device": "vol0", ... } ]
//! }
//! ```
//!
//! Snapshots are kept as what the kernel keeps: their device tables (`<origin>-real`,
//! `<name>-cow`, the `snapshot` and `snapshot-origin` or `snapshot-merge` tables), in
//! dependency order. A `snapshot` table over a COW holding a valid store re-attaches it
//! (a valid store is never re-initialised) and a `snapshot-merge` table resumes its
//! merge, exactly as `dmsetup` reloading LVM's tables does; `udm dm table` after a
//! restart prints what it printed before.
//!
//! Written atomically: `<path>.tmp` is written and fsynced, renamed over `<path>`, and
//! the directory fsynced, so the file is always either the old state or the new one.
//! A file that does not parse, or that a newer udm wrote (a higher `version`), is refused
//! and never overwritten.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::vhost_blk::ExportConfig;

/// The format version this udm writes and reads.
pub const STATE_VERSION: u32 = 1;

/// The state file's name beside the control socket.
pub const DEFAULT_STATE_NAME: &str = "udm-state.json";

/// The whole file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateFile {
    /// [`STATE_VERSION`] when written.
    pub version: u32,
    /// The udm that wrote it (for people reading the file).
    pub udm: String,
    /// Backends, first (tables name them).
    #[serde(default)]
    pub backends: Vec<BackendState>,
    /// Mapped devices, each after the devices its tables use.
    #[serde(default)]
    pub devices: Vec<DeviceState>,
    /// Exports, once every device exists.
    #[serde(default)]
    pub exports: Vec<ExportConfig>,
}

/// One backend.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendState {
    /// Name tables use.
    pub name: String,
    /// What it was opened from (`None`: registered without one, it cannot come back).
    pub spec: Option<String>,
    /// Its size, so that a backend that cannot be opened at start can stand in as an
    /// `error` device of the same size (its users' tables still load).
    pub sectors: u64,
}

/// One mapped device, as `dmsetup info` and `dmsetup table [--inactive]` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceState {
    /// Its name.
    pub name: String,
    /// Its UUID.
    #[serde(default)]
    pub uuid: Option<String>,
    /// The live table (`None`: created without one).
    #[serde(default)]
    pub table: Option<String>,
    /// A table loaded and not resumed.
    #[serde(default)]
    pub inactive_table: Option<String>,
    /// Left suspended.
    #[serde(default)]
    pub suspended: bool,
}

/// Why a state file was refused, or could not be written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading failed.
    #[error("cannot read the state file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file this udm understands.
    #[error(
        "state file {path} is corrupt ({reason}): udm will not start over it and leaves it as it is. Repair it, or \
         move it away to start empty (`udm config save` of a running daemon, or the udm.toml you keep, recreate \
         a state)"
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Written by a newer udm.
    #[error(
        "state file {path} has version {found} (written by udm {writer}); this udm {ours} reads version \
         {STATE_VERSION} only: run the newer udm, or move the file away to start empty. The file is left as it is"
    )]
    Newer {
        /// The file.
        path: PathBuf,
        /// Its version.
        found: u64,
        /// Its `udm` field.
        writer: String,
        /// This udm's version.
        ours: &'static str,
    },
    /// Writing failed.
    #[error("cannot write the state file {path}: {during}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The step.
        during: &'static str,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

impl StateFile {
    /// An empty state written by this udm.
    pub fn new() -> StateFile {
        StateFile {
            version: STATE_VERSION,
            udm: env!("CARGO_PKG_VERSION").into(),
            backends: Vec::new(),
            devices: Vec::new(),
            exports: Vec::new(),
        }
    }

    /// Reads `path`; `Ok(None)` when there is no such file (a first start).
    pub fn load(path: &Path) -> Result<Option<StateFile>, StateError> {
        match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes, path).map(Some),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StateError::Read { path: path.to_path_buf(), source }),
        }
    }

    /// Parses the file's bytes (`path` names it in errors). The version is checked
    /// before the rest, so a newer file is refused as newer, not as corrupt.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<StateFile, StateError> {
        let corrupt = |reason: String| StateError::Corrupt { path: path.to_path_buf(), reason };
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not JSON: {e}")))?;
        let version = value
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| corrupt("no numeric `version` field".into()))?;
        if version > u64::from(STATE_VERSION) {
            let writer = value.get("udm").and_then(serde_json::Value::as_str).unwrap_or("(unknown)").to_string();
            return Err(StateError::Newer {
                path: path.to_path_buf(),
                found: version,
                writer,
                ours: env!("CARGO_PKG_VERSION"),
            });
        }
        if version < u64::from(STATE_VERSION) {
            return Err(corrupt(format!("version {version} was never written by any udm")));
        }
        serde_json::from_value(value).map_err(|e| corrupt(e.to_string()))
    }

    /// The file's text: pretty-printed JSON with a final newline.
    pub fn to_text(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_else(|e| {
            // Every field is a string, number, bool or list of them: this cannot fail.
            format!("{{\"version\": {STATE_VERSION}, \"error\": \"cannot encode the state: {e}\"}}")
        });
        text.push('\n');
        text
    }

    /// Writes the state to `path` atomically (see the module documentation).
    pub fn write(&self, path: &Path) -> Result<(), StateError> {
        write_atomic(path, self.to_text().as_bytes())
    }
}

impl Default for StateFile {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the state lives by default: beside the control socket.
pub fn default_path(control: &Path) -> PathBuf {
    control.parent().unwrap_or(Path::new("")).join(DEFAULT_STATE_NAME)
}

/// `<path>.tmp`.
fn temporary_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".tmp");
    PathBuf::from(name)
}

/// Replaces `path` with `bytes` so that a crash at any point leaves the old file or the
/// new one: write and fsync `<path>.tmp`, rename it over `path`, fsync the directory
/// (which makes the rename durable).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |during: &'static str| move |source| StateError::Write { path: path.to_path_buf(), during, source };
    let tmp = temporary_path(path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(fail("creating the temporary file"))?;
    file.write_all(bytes).map_err(fail("writing the temporary file"))?;
    file.sync_all().map_err(fail("fsyncing the temporary file"))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(fail("renaming the temporary file over it"))?;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail("fsyncing its directory"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StateFile {
        let mut s = StateFile::new();
        s.backends.push(BackendState { name: "disk0".into(), spec: Some("mem:1M".into()), sectors: 2048 });
        s.devices.push(DeviceState {
            name: "vol0".into(),
            uuid: Some("u-1".into()),
            table: Some("0 2048 linear disk0 0".into()),
            inactive_table: Some("0 1024 linear disk0 0".into()),
            suspended: true,
        });
        s
    }

    #[test]
    fn round_trips_and_is_pretty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(DEFAULT_STATE_NAME);
        assert!(StateFile::load(&path).unwrap().is_none(), "no file: a first start");
        sample().write(&path).unwrap();
        assert_eq!(StateFile::load(&path).unwrap(), Some(sample()));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\n  \"version\": 1,\n"), "{text}");
        assert!(!dir.path().join("udm-state.json.tmp").exists(), "the temporary file is renamed away");
    }

    #[test]
    fn write_replaces_and_leaves_no_partial_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.json");
        StateFile::new().write(&path).unwrap();
        // A stale temporary file from a crash mid-write does not matter.
        std::fs::write(dir.path().join("s.json.tmp"), b"{half").unwrap();
        sample().write(&path).unwrap();
        assert_eq!(StateFile::load(&path).unwrap(), Some(sample()));
        // A directory that cannot be written: the old file stays as it was.
        let ro = dir.path().join("missing-dir").join("s.json");
        let e = sample().write(&ro).unwrap_err();
        assert!(e.to_string().contains("creating the temporary file"), "{e}");
    }

    #[test]
    fn corrupt_and_newer_files_are_refused_naming_the_file() {
        let p = Path::new("/var/lib/udm/udm-state.json");
        for (bytes, says) in [
            (&b"{\"version\": 1, \"udm\": \"0.1.0\", \"backends\": [{\"nam"[..], "not JSON"),
            (b"[]", "no numeric `version`"),
            (b"{\"version\": 1, \"udm\": \"x\", \"devices\": 3}", "expected a sequence"),
            (b"{\"version\": 1, \"udm\": \"x\", \"extra\": 3}", "extra"),
            (b"{\"version\": 0, \"udm\": \"x\"}", "never written"),
        ] {
            let e = StateFile::parse(bytes, p).unwrap_err();
            assert!(matches!(e, StateError::Corrupt { .. }), "{e}");
            let text = e.to_string();
            assert!(text.contains("/var/lib/udm/udm-state.json") && text.contains(says), "{text}");
        }
        let e = StateFile::parse(b"{\"version\": 2, \"udm\": \"9.0.0\", \"new_thing\": []}", p).unwrap_err();
        assert!(matches!(e, StateError::Newer { found: 2, .. }), "{e}");
        assert!(e.to_string().contains("udm 9.0.0") && e.to_string().contains("udm-state.json"), "{e}");
    }

    #[test]
    fn default_path_is_beside_the_control_socket() {
        assert_eq!(default_path(Path::new("/run/udm/udm.ctl")), PathBuf::from("/run/udm/udm-state.json"));
        assert_eq!(default_path(Path::new("udm.ctl")), PathBuf::from("udm-state.json"));
    }
}
