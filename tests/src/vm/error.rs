//! Why a guest could not be built or run.

use std::path::PathBuf;

/// A failure of the VM harness (not of the code under test, which reports through the
/// guest's exit status).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The guest kernel, its modules or busybox are not in the cache.
    #[error("the guest kernel cache is incomplete ({missing} not found in {cache}): run `scripts/vm-prepare.sh` (as root) or set UDM_VM_CACHE")]
    CacheMissing {
        /// The cache directory.
        cache: PathBuf,
        /// What is missing.
        missing: String,
    },
    /// A kernel module asked for (or one it depends on) does not exist in the cache.
    #[error("kernel module `{0}` is not among the guest kernel's modules")]
    NoSuchModule(String),
    /// A host binary to carry into the guest could not be resolved.
    #[error("cannot carry `{path}` into the guest: {reason}")]
    Binary {
        /// The binary.
        path: PathBuf,
        /// What went wrong (not found, ldd failed).
        reason: String,
    },
    /// A host file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What the harness was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// QEMU could not be started (not installed?).
    #[error("cannot start {program}: {source} (install QEMU with scripts/vm-prepare.sh)")]
    Spawn {
        /// The QEMU binary.
        program: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not finish in time; QEMU was killed.
    #[error("the guest did not finish within {secs} s; console tail:\n{tail}")]
    Timeout {
        /// The timeout.
        secs: u64,
        /// The end of the console output.
        tail: String,
    },
    /// QEMU exited before the guest printed its end marker (crash, panic, bad option).
    #[error("the guest stopped before the script finished (QEMU exit {qemu_status}); console tail:\n{tail}")]
    NoEndMarker {
        /// QEMU's exit status.
        qemu_status: String,
        /// The end of the console output (and QEMU's stderr).
        tail: String,
    },
}

impl VmError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        VmError::Io { context: context.into(), source }
    }
}

/// The last `lines` lines of `text`, for error messages.
pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
