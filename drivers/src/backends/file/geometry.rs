//! Size, block size and capabilities of a file or block device.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::FileOptions;
use crate::backends::null::check_geometry;
use crate::device::DeviceInfo;
use crate::dma::{DmaMemory, PagePolicy};
use crate::error::DeviceError;
use crate::request::SECTOR_SIZE;

/// What kind of file backs a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    /// A regular file (a disk image).
    Regular,
    /// A block device node (`/dev/sdX`, `/dev/loopN`, `/dev/nvme0n1`).
    BlockDevice,
}

/// What the backend learned about the file when opening it.
#[derive(Debug)]
pub(super) struct Geometry {
    pub kind: FileKind,
    /// Usable size in bytes: a whole number of logical blocks.
    pub bytes: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub discard: bool,
}

impl Geometry {
    /// Inspects `file`. May turn `direct` off when `O_DIRECT` opened but cannot read.
    pub fn probe(file: &File, path: &Path, options: &FileOptions, direct: &mut bool) -> Result<Self, DeviceError> {
        let meta = file.metadata().map_err(|e| DeviceError::io(format!("cannot stat {}", path.display()), e))?;
        let ft = meta.file_type();
        let (kind, raw_bytes, native_block, physical, discard) = if ft.is_file() {
            let native = if *direct { direct_io_block_size(file, path, direct) } else { 512 };
            let fs_block = u32::try_from(meta.blksize()).unwrap_or(4096).clamp(512, 4096);
            // Punching holes is how files discard; a file system that cannot reports
            // EOPNOTSUPP per request and the request fails as Unsupported.
            (FileKind::Regular, meta.len(), native, fs_block.max(native), true)
        } else if ft.is_block_device() {
            let logical = block_ioctl(file, libc::BLKSSZGET, path, "BLKSSZGET")?;
            let physical = block_ioctl(file, libc::BLKPBSZGET, path, "BLKPBSZGET")?.max(logical);
            let bytes = block_device_bytes(file, path)?;
            (FileKind::BlockDevice, bytes, logical, physical, block_device_discards(meta.rdev()))
        } else {
            return Err(DeviceError::Config(format!(
                "{} is neither a regular file nor a block device: give a disk image or a /dev node",
                path.display()
            )));
        };
        let logical = match options.block_size {
            None => native_block,
            Some(bs) if bs < native_block => {
                return Err(DeviceError::Config(format!(
                    "bs={bs} is smaller than {}'s {native_block}-byte blocks: use bs={native_block} or larger",
                    path.display()
                )));
            }
            Some(bs) => bs,
        };
        let bytes = raw_bytes / u64::from(logical) * u64::from(logical);
        if bytes == 0 {
            return Err(DeviceError::Config(format!(
                "{} holds {raw_bytes} bytes, less than one {logical}-byte block: size it first, e.g. `truncate -s 1G {}`",
                path.display(),
                path.display()
            )));
        }
        check_geometry(bytes, logical)?;
        if bytes != raw_bytes {
            tracing::warn!(
                path = %path.display(),
                "ignoring the last {} bytes: not a whole {logical}-byte block",
                raw_bytes - bytes
            );
        }
        Ok(Geometry { kind, bytes, logical_block_size: logical, physical_block_size: physical.max(logical), discard })
    }

    /// The device description these facts make.
    pub fn device_info(&self, read_only: bool) -> DeviceInfo {
        let mut info = DeviceInfo::new(self.bytes / SECTOR_SIZE, self.logical_block_size);
        info.physical_block_size = self.physical_block_size;
        info.max_segments = super::queue::SLOT_IOVECS as u32;
        info.read_only = read_only;
        // The page cache, the file system journal or the disk's own cache hold writes
        // until a flush.
        info.volatile_cache = true;
        info.supports_discard = self.discard;
        info.supports_write_zeroes = true;
        info.max_discard_sectors = 1 << 30;
        info
    }
}

/// The smallest transfer `O_DIRECT` accepts on this file, found by reading the first
/// block at each size (reads change nothing). The file system's answer to the question
/// "what is your block size" for direct I/O, whatever sits below it.
fn direct_io_block_size(file: &File, path: &Path, direct: &mut bool) -> u32 {
    let Ok(buf) = DmaMemory::allocate(4096, PagePolicy::Normal) else { return 4096 };
    for size in [512u32, 1024, 2048, 4096] {
        // SAFETY: `buf` is 4096 writable, page-aligned bytes and `size <= 4096`.
        let n = unsafe { libc::pread(file.as_raw_fd(), buf.as_ptr().cast(), size as usize, 0) };
        if n >= 0 {
            return size;
        }
    }
    tracing::info!(
        path = %path.display(),
        "O_DIRECT reads fail on this file system: using buffered I/O through the page cache"
    );
    // SAFETY: F_SETFL on our own open descriptor; clearing O_DIRECT has no memory effects.
    let flags = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags >= 0 && unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETFL, flags & !libc::O_DIRECT) } == 0 {
        *direct = false;
    }
    512
}

fn block_ioctl(file: &File, request: libc::Ioctl, path: &Path, name: &str) -> Result<u32, DeviceError> {
    let mut value: libc::c_int = 0;
    // SAFETY: BLKSSZGET and BLKPBSZGET write one int through the pointer.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request, &mut value as *mut libc::c_int) };
    if rc != 0 {
        return Err(DeviceError::io(format!("{name} on {}", path.display()), std::io::Error::last_os_error()));
    }
    u32::try_from(value)
        .ok()
        .filter(|v| v.is_power_of_two() && *v >= 512)
        .ok_or_else(|| DeviceError::Config(format!("{} reports a block size of {value} bytes", path.display())))
}

/// A block device's size: seeking to its end needs no ioctl number.
fn block_device_bytes(file: &File, path: &Path) -> Result<u64, DeviceError> {
    // SAFETY: lseek on our own descriptor. Offsets of positional I/O are unaffected.
    let end = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    u64::try_from(end)
        .map_err(|_| DeviceError::io(format!("cannot size {}", path.display()), std::io::Error::last_os_error()))
}

/// Whether the block device `rdev` discards, from sysfs (a partition's queue is its
/// disk's).
fn block_device_discards(rdev: u64) -> bool {
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let base = format!("/sys/dev/block/{major}:{minor}");
    [format!("{base}/queue/discard_max_bytes"), format!("{base}/../queue/discard_max_bytes")]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0)
}
