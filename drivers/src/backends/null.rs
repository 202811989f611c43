//! `null`: completes every request at once and reads return zeroes, like Linux null_blk
//! or SPDK's null bdev. It measures what the I/O contract itself costs.

use crate::completion_ring::{completion_ring, CompletionRing};
use crate::device::{BlockDevice, DeviceInfo, IoQueue};
use crate::error::DeviceError;
use crate::request::{Completion, IoOp, IoRequest, QueueFull};
use crate::validate::validate_request;

/// A device that stores nothing.
#[derive(Debug)]
pub struct NullDevice {
    info: DeviceInfo,
    read_zeroes: bool,
}

impl NullDevice {
    /// A null device of `bytes` bytes with `block_size`-byte logical blocks.
    pub fn new(bytes: u64, block_size: u32) -> Result<Self, DeviceError> {
        check_geometry(bytes, block_size)?;
        let mut info = DeviceInfo::new(bytes / crate::SECTOR_SIZE, block_size);
        info.max_transfer = 4 << 20;
        Ok(NullDevice { info, read_zeroes: true })
    }

    /// Whether reads fill the buffer with zeroes (the default) or leave it as it was,
    /// measuring the I/O path alone as SPDK's null bdev and Linux null_blk do.
    pub fn with_read_zeroes(mut self, on: bool) -> Self {
        self.read_zeroes = on;
        self
    }
}

/// Checks a size and block size given by a user for a backend.
pub(crate) fn check_geometry(bytes: u64, block_size: u32) -> Result<(), DeviceError> {
    if !matches!(block_size, 512 | 1024 | 2048 | 4096) {
        return Err(DeviceError::Config(format!(
            "block size {block_size} is not supported: use 512, 1024, 2048 or 4096"
        )));
    }
    if bytes == 0 || !bytes.is_multiple_of(u64::from(block_size)) {
        return Err(DeviceError::Config(format!(
            "size {bytes} bytes is not a positive multiple of the {block_size}-byte block size"
        )));
    }
    Ok(())
}

impl BlockDevice for NullDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(NullQueue {
            info: self.info.clone(),
            read_zeroes: self.read_zeroes,
            done: completion_ring(depth.max(1)),
        }))
    }
}

struct NullQueue {
    info: DeviceInfo,
    read_zeroes: bool,
    done: CompletionRing,
}

impl IoQueue for NullQueue {
    #[inline]
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.done.is_full() {
            return Err(QueueFull(req));
        }
        let result = validate_request(&self.info, &req);
        if result.is_ok() && req.op == IoOp::Read && self.read_zeroes {
            req.sg.fill_zero();
        }
        self.done.push(Completion { tag: req.tag, result });
        Ok(())
    }

    fn kick(&mut self) {}

    #[inline]
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.done.drain_into(out)
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }

    fn depth(&self) -> usize {
        self.done.capacity()
    }
}
