//! Errors of the driver layer.
//!
//! [`IoError`] is the per-request status carried in a [`crate::Completion`]: it is `Copy`
//! and allocation-free so that failing a request costs no more than completing it.
//! [`DeviceError`] is returned by control-plane operations (opening a backend, a queue,
//! registering memory) and carries owned context for the user.

use crate::request::IoOp;

/// Why one I/O request failed. Every variant names what was wrong; none needs a heap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IoError {
    /// The request names a byte count or segment list the device cannot take.
    #[error("bad request buffer: {reason}")]
    BadBuffer {
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The device (or the path to it) is gone: removed, reset failed, controller fatal.
    #[error("device unavailable: {reason}")]
    DeviceGone {
        /// What happened to it.
        reason: &'static str,
    },
    /// A target of the mapping layer failed the request on purpose (an `error` target,
    /// an invalid snapshot, a device without a live table).
    #[error("I/O rejected by the mapping: {reason}")]
    Rejected {
        /// Which rule rejected it.
        reason: &'static str,
    },
    /// The operating system failed the request (io_uring / read / write), with its errno.
    #[error("host I/O error: {}", std::io::Error::from_raw_os_error(*errno))]
    Host {
        /// The positive errno value.
        errno: i32,
    },
    /// The start sector or length is not a multiple of the device's logical block size.
    #[error("misaligned {op:?} at sector {sector} (+{sectors}): the logical block size is {block_size} bytes")]
    Misaligned {
        /// The operation.
        op: IoOp,
        /// First 512-byte sector of the request.
        sector: u64,
        /// Length in 512-byte sectors.
        sectors: u64,
        /// The device's logical block size in bytes.
        block_size: u32,
    },
    /// An NVMe command completed with an error status (status code type and code).
    #[error("NVMe command failed: {} (status code type {sct:#x}, status code {sc:#x})", crate::nvme::status::status_name(*sct, *sc))]
    Nvme {
        /// Status Code Type (NVMe base specification, Completion Queue Entry DW3).
        sct: u8,
        /// Status Code.
        sc: u8,
    },
    /// The request reaches past the end of the device.
    #[error("{op:?} of sectors {sector}..{} is beyond the device's {capacity} sectors", sector + sectors)]
    OutOfRange {
        /// The operation.
        op: IoOp,
        /// First 512-byte sector of the request.
        sector: u64,
        /// Length in 512-byte sectors.
        sectors: u64,
        /// Device size in 512-byte sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes to a read-only device.
    #[error("{op:?} refused: the device is read-only")]
    ReadOnly {
        /// The operation.
        op: IoOp,
    },
    /// The command did not complete in time and was aborted.
    #[error("command timed out and was aborted")]
    TimedOut,
    /// The device does not implement this operation.
    #[error("{op:?} is not supported by this device")]
    Unsupported {
        /// The operation.
        op: IoOp,
    },
}

impl IoError {
    /// An errno that best describes this error, for front ends that speak POSIX.
    pub fn errno(&self) -> i32 {
        match self {
            IoError::BadBuffer { .. } | IoError::Misaligned { .. } => libc::EINVAL,
            IoError::DeviceGone { .. } => libc::ENODEV,
            IoError::Host { errno } => *errno,
            IoError::OutOfRange { .. } => libc::ERANGE,
            IoError::ReadOnly { .. } => libc::EROFS,
            IoError::TimedOut => libc::ETIMEDOUT,
            IoError::Unsupported { .. } => libc::EOPNOTSUPP,
            IoError::Rejected { .. } | IoError::Nvme { .. } => libc::EIO,
        }
    }
}

/// Why a control-plane operation on a device failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// A device specification string (`null:1G`, `file:/path`) could not be understood.
    #[error("bad device specification `{spec}`: {reason}")]
    BadSpec {
        /// The text given.
        spec: String,
        /// What was expected.
        reason: String,
    },
    /// A configuration value is invalid (size, block size, queue depth).
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The host lacks a facility the backend needs.
    #[error("{what} is not available: {hint}")]
    Unavailable {
        /// The missing facility (io_uring, hugepages, VFIO).
        what: &'static str,
        /// What the user can do about it.
        hint: String,
    },
    /// A host call failed.
    #[error("{context}: {source}")]
    Io {
        /// What udm was doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Memory for DMA or a RAM disk could not be obtained.
    #[error("cannot allocate {bytes} bytes of {kind} memory: {hint}")]
    OutOfMemory {
        /// Requested size.
        bytes: usize,
        /// Which kind of memory.
        kind: &'static str,
        /// What to do.
        hint: &'static str,
    },
    /// A driver-specific failure (NVMe bring-up, VFIO).
    #[error("{0}")]
    Driver(String),
}

impl DeviceError {
    /// Wraps an OS error with what udm was doing when it happened.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        DeviceError::Io { context: context.into(), source }
    }
}
