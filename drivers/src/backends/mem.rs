//! `mem`: a RAM disk in [`DmaMemory`] (hugepages when reserved). Every queue copies
//! straight between the request's buffers and the disk's memory; discard and
//! write-zeroes zero the range (and give whole pages back to the kernel).

use std::sync::Arc;

use crate::backends::null::check_geometry;
use crate::completion_ring::{completion_ring, CompletionRing};
use crate::device::{BlockDevice, DeviceInfo, IoQueue};
use crate::dma::{DmaMemory, PageKind, PagePolicy};
use crate::error::DeviceError;
use crate::request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
use crate::validate::validate_request;

/// A RAM disk.
#[derive(Debug)]
pub struct MemDevice {
    info: DeviceInfo,
    memory: Arc<DmaMemory>,
}

impl MemDevice {
    /// A zero-filled RAM disk of `bytes` bytes with `block_size`-byte blocks.
    pub fn new(bytes: u64, block_size: u32) -> Result<Self, DeviceError> {
        Self::with_policy(bytes, block_size, PagePolicy::PreferHuge)
    }

    /// As [`MemDevice::new`], choosing the pages explicitly.
    pub fn with_policy(bytes: u64, block_size: u32, policy: PagePolicy) -> Result<Self, DeviceError> {
        check_geometry(bytes, block_size)?;
        let len =
            usize::try_from(bytes).map_err(|_| DeviceError::Config(format!("{bytes} bytes do not fit in memory")))?;
        let memory = Arc::new(DmaMemory::allocate(len, policy)?);
        let mut info = DeviceInfo::new(bytes / SECTOR_SIZE, block_size);
        info.max_transfer = 4 << 20;
        Ok(MemDevice { info, memory })
    }

    /// Which pages hold the data.
    pub fn page_kind(&self) -> PageKind {
        self.memory.kind()
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(MemQueue {
            info: self.info.clone(),
            memory: Arc::clone(&self.memory),
            done: completion_ring(depth.max(1)),
        }))
    }
}

struct MemQueue {
    info: DeviceInfo,
    memory: Arc<DmaMemory>,
    done: CompletionRing,
}

impl MemQueue {
    fn execute(&self, req: &IoRequest) {
        let offset = (req.sector * SECTOR_SIZE) as usize;
        let len = req.bytes() as usize;
        // Several queues may touch the same bytes at once; like a real disk, the result
        // of racing writes to one block is one of them (racing is the submitters' choice).
        // SAFETY: validation put `offset..offset+len` inside the `info.sectors * 512`
        // bytes of `memory`.
        let disk = unsafe { self.memory.as_ptr().add(offset) };
        match req.op {
            // SAFETY: `disk..disk+len` is inside `memory` (above); the request's buffers are valid by the SgList contract.
            IoOp::Read => unsafe { req.sg.copy_from_raw(disk) },
            // SAFETY: as for reads.
            IoOp::Write => unsafe { req.sg.copy_to_raw(disk) },
            IoOp::Discard | IoOp::WriteZeroes => zero_range(&self.memory, disk, len),
            IoOp::Flush => {}
        }
    }
}

/// Zeroes `len` bytes at `start`; whole ordinary pages inside the range are handed back
/// to the kernel instead (they read back as zeroes and stop using RAM).
fn zero_range(memory: &DmaMemory, start: *mut u8, len: usize) {
    const PAGE: usize = 4096;
    let begin = start as usize;
    let end = begin + len;
    let inner_begin = begin.next_multiple_of(PAGE);
    let inner_end = end / PAGE * PAGE;
    if memory.kind() == PageKind::Normal && inner_end > inner_begin + 16 * PAGE {
        // SAFETY: both pieces lie inside the range validated by the caller.
        unsafe {
            std::ptr::write_bytes(start, 0, inner_begin - begin);
            std::ptr::write_bytes(inner_end as *mut u8, 0, end - inner_end);
        }
        // SAFETY: a private anonymous mapping refills dropped pages with zeroes; the
        // range is page aligned and inside the mapping.
        let rc =
            unsafe { libc::madvise(inner_begin as *mut libc::c_void, inner_end - inner_begin, libc::MADV_DONTNEED) };
        if rc == 0 {
            return;
        }
    }
    // SAFETY: inside the validated range.
    unsafe { std::ptr::write_bytes(start, 0, len) };
}

impl IoQueue for MemQueue {
    #[inline]
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.done.is_full() {
            return Err(QueueFull(req));
        }
        let result = validate_request(&self.info, &req);
        if result.is_ok() {
            self.execute(&req);
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
