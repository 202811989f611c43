//! Owned, page-aligned I/O buffers that a request can point into: the exception stores'
//! metadata chunk and header reads, the snapshots' copy-out and merge buffers, and the
//! bounce buffer of [`crate::sync_io`] for callers' unaligned slices. This is the one
//! aligned-buffer type of the crate: a page is a multiple of every logical block size a
//! device may have (512 to 4096 bytes), so what an `O_DIRECT` file on ext4 or xfs, or an
//! NVMe namespace, asks of a buffer's address always holds.

use udm_drivers::dma::{DmaMemory, PagePolicy};
use udm_drivers::{DeviceError, IoSegment, MemoryRegion, SgList};

/// A buffer plus the one-segment list that describes it, both at stable addresses, so a
/// request made from it stays valid while the buffer is alive.
pub struct IoBuf {
    memory: DmaMemory,
    len: usize,
    segment: Box<IoSegment>,
}

// SAFETY: an IoBuf owns its memory and the segment describing it, like a Box<[u8]>;
// moving it to another thread moves the ownership. Requests built from `sg` follow the
// I/O contract (the buffer outlives them), whichever thread polls them.
unsafe impl Send for IoBuf {}
// SAFETY: `&IoBuf` only reads (`as_slice`, `sg`); writes need `&mut`.
unsafe impl Sync for IoBuf {}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBuf").field("len", &self.len).finish()
    }
}

impl IoBuf {
    /// A zero-filled buffer of `len` bytes in ordinary pages (page aligned, so it suits
    /// O_DIRECT files and NVMe once registered).
    pub fn new(len: usize) -> Result<Self, DeviceError> {
        let memory = DmaMemory::allocate(len.max(1), PagePolicy::Normal)?;
        // SAFETY: `memory` holds at least `len` bytes and lives as long as the segment
        // (both are owned by this IoBuf and dropped together).
        let segment = Box::new(unsafe { IoSegment::new(memory.as_ptr(), len) });
        Ok(IoBuf { memory, len, segment })
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region to register with DMA devices.
    pub fn region(&self) -> MemoryRegion {
        self.memory.region()
    }

    /// A list over `[offset, offset+len)` of the buffer. Requests made from it must
    /// complete before the buffer is dropped or changed through `as_mut_slice`.
    pub fn sg(&self, offset: usize, len: usize) -> SgList {
        // SAFETY: the segment is boxed inside `self` and describes memory `self` owns;
        // callers keep the buffer alive until their request completes (documented above).
        let whole = unsafe { SgList::from_segment(&self.segment) };
        whole.slice(offset, len)
    }

    /// The bytes, for reading. No request may be writing into the buffer meanwhile:
    /// the owners of IoBufs track their own requests.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes of initialised memory; the owner guarantees no device is
        // writing into it now (see above), and the borrow ties the slice to `self`.
        unsafe { &self.memory.as_slice()[..self.len] }
    }

    /// The bytes, for filling. No request may be using the buffer meanwhile.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as `as_slice`, and `&mut self` excludes every other borrow.
        unsafe { &mut self.memory.as_mut_slice()[..self.len] }
    }
}
