//! `file`: a regular file or a block device driven through io_uring.
//!
//! * Opened with `O_DIRECT` where the file system allows it, so reads and writes bypass
//!   the page cache like a real disk; without it (the file system refuses, or the user
//!   asked `direct=off`) the page cache sits in between and `Flush` makes data durable.
//! * Each [`IoQueue`] owns one io_uring with the file registered, so a queue is
//!   lock-free and many requests are in flight at once. `kick` submits the whole batch
//!   in one `io_uring_enter`; `poll` reaps the completion ring without blocking.
//! * Read/Write map to read/write (one segment; the fixed-buffer variants when the
//!   buffer lies in memory given to `register_memory`) or readv/writev; Flush to fdatasync;
//!   FUA writes carry `RWF_DSYNC`; Discard punches a hole (a real discard on block
//!   devices, through BLOCK_URING_CMD_DISCARD where the kernel has it); WriteZeroes uses `FALLOC_FL_ZERO_RANGE`, falling back to punching a hole.

mod buffers;
mod geometry;
mod open;
mod queue;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::device::{BlockDevice, DeviceInfo, IoQueue, MemoryRegion};
use crate::error::DeviceError;

pub use geometry::FileKind;

/// How to open a [`FileDevice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileOptions {
    /// Open read-only: writes, discards and write-zeroes fail with `ReadOnly`.
    pub read_only: bool,
    /// Try `O_DIRECT` (the default); `false` always goes through the page cache.
    pub direct: bool,
    /// Logical block size to expose; `None` takes it from the file system or device.
    pub block_size: Option<u32>,
}

impl Default for FileOptions {
    fn default() -> Self {
        FileOptions { read_only: false, direct: true, block_size: None }
    }
}

/// A file or block device as a [`BlockDevice`].
#[derive(Debug)]
pub struct FileDevice {
    info: DeviceInfo,
    file: Arc<File>,
    path: PathBuf,
    direct: bool,
    kind: FileKind,
    buffers: Arc<buffers::BufferRegistry>,
}

impl FileDevice {
    /// Opens `path` (which must exist) and works out its size and block size.
    /// Fails with [`DeviceError::Unavailable`] when the host has no usable io_uring.
    pub fn open(path: impl AsRef<Path>, options: &FileOptions) -> Result<Self, DeviceError> {
        let path = path.as_ref().to_path_buf();
        queue::check_io_uring()?;
        let (file, mut direct) = open::open_file(&path, options)?;
        let geometry = geometry::Geometry::probe(&file, &path, options, &mut direct)?;
        let info = geometry.device_info(options.read_only);
        tracing::debug!(
            path = %path.display(),
            direct,
            kind = ?geometry.kind,
            sectors = info.sectors,
            block_size = info.logical_block_size,
            "opened file backend"
        );
        Ok(FileDevice { info, file: Arc::new(file), path, direct, kind: geometry.kind, buffers: Arc::default() })
    }

    /// Whether I/O bypasses the page cache.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// Regular file or block device.
    pub fn kind(&self) -> FileKind {
        self.kind
    }

    /// The path opened.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(queue::FileQueue::new(
            Arc::clone(&self.file),
            self.info.clone(),
            self.kind,
            self.direct,
            Arc::clone(&self.buffers),
            depth,
        )?))
    }

    /// Registers `region` with every queue's io_uring (queues pick it up before their
    /// next request), so requests into it skip per-I/O page pinning.
    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.buffers.add(region)
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.buffers.remove(region)
    }
}
