//! The guest's root file system: an uncompressed `newc` cpio archive (the kernel unpacks
//! it into a tmpfs; no compression, because decompressing under TCG is slow).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::error::VmError;

/// One entry of the archive.
#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { data: Vec<u8>, mode: u32 },
    Symlink(String),
}

/// Files, directories and symlinks by guest path (absolute, without the leading `/`).
#[derive(Debug, Default, Clone)]
pub struct Initramfs {
    entries: BTreeMap<String, Entry>,
}

impl Initramfs {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory and its parents.
    pub fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        let mut acc = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.entries.entry(acc.clone()).or_insert(Entry::Dir);
        }
    }

    fn parent_dirs(&mut self, path: &str) {
        if let Some((parent, _)) = path.trim_matches('/').rsplit_once('/') {
            self.dir(parent);
        }
    }

    /// Adds a file with `data` and permission bits `mode` (e.g. 0o755).
    pub fn file(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent_dirs(path);
        self.entries.insert(path.trim_matches('/').to_string(), Entry::File { data, mode });
    }

    /// Adds a symlink at `path` pointing to `target`.
    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parent_dirs(path);
        self.entries.insert(path.trim_matches('/').to_string(), Entry::Symlink(target.to_string()));
    }

    /// Copies a host file (following symlinks) to `guest_path`, keeping its mode.
    pub fn host_file(&mut self, host: &Path, guest_path: &str) -> Result<(), VmError> {
        use std::os::unix::fs::PermissionsExt;
        let data = std::fs::read(host).map_err(|e| VmError::io(format!("reading {}", host.display()), e))?;
        let mode = std::fs::metadata(host).map(|m| m.permissions().mode() & 0o7777).unwrap_or(0o644);
        self.file(guest_path, data, mode);
        Ok(())
    }

    /// Carries a dynamically linked host executable to `guest_path` together with every
    /// shared library `ldd` lists for it (at the same paths as on the host).
    pub fn host_binary(&mut self, host: &Path, guest_path: &str) -> Result<(), VmError> {
        if !host.is_file() {
            return Err(VmError::Binary { path: host.into(), reason: "no such file".into() });
        }
        self.host_file(host, guest_path)?;
        for lib in shared_libraries(host)? {
            let guest = lib.to_string_lossy().into_owned();
            if !self.entries.contains_key(guest.trim_start_matches('/')) {
                self.host_file(&lib, &guest)?;
            }
        }
        Ok(())
    }

    /// Whether `path` is in the archive.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(path.trim_matches('/'))
    }

    /// The archive in `newc` format.
    pub fn to_cpio(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (ino, (path, entry)) in self.entries.iter().enumerate() {
            let (mode, data): (u32, &[u8]) = match entry {
                Entry::Dir => (0o040755, &[]),
                Entry::File { data, mode } => (0o100000 | mode, data),
                Entry::Symlink(target) => (0o120777, target.as_bytes()),
            };
            push_entry(&mut out, ino as u32 + 1, mode, path, data);
        }
        push_entry(&mut out, 0, 0, "TRAILER!!!", &[]);
        out
    }
}

/// One `newc` header, name and data, each padded to 4 bytes.
fn push_entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
    let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
    let header = format!(
        "070701{ino:08x}{mode:08x}{uid:08x}{gid:08x}{nlink:08x}{mtime:08x}{size:08x}{maj:08x}{min:08x}{rmaj:08x}{rmin:08x}{namesize:08x}{check:08x}",
        uid = 0,
        gid = 0,
        mtime = 0,
        size = data.len(),
        maj = 0,
        min = 0,
        rmaj = 0,
        rmin = 0,
        namesize = name.len() + 1,
        check = 0,
    );
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

/// The shared libraries (and the dynamic loader) `ldd` lists for `binary`; empty for a
/// static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, VmError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| VmError::Binary { path: binary.into(), reason: format!("cannot run ldd: {e}") })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // "not a dynamic executable": nothing to carry.
        return Ok(Vec::new());
    }
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("=> not found") {
            return Err(VmError::Binary { path: binary.into(), reason: format!("ldd: {line}") });
        }
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` or `/lib64/ld-linux-x86-64.so.2 (0x...)`
        let candidate = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = candidate.split_whitespace().next().unwrap_or("");
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    Ok(libs)
}
