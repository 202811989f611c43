//! Preallocated bounce buffers for targets that copy data (snapshot copy-out): one
//! allocation per target queue at open, `count` equal buffers, each usable as an
//! [`SgList`] for internal I/O. Nothing is allocated per I/O.

use udm_drivers::dma::{DmaMemory, PagePolicy};
use udm_drivers::{BlockDevice, DeviceError, IoSegment, MemoryRegion, SgList};

/// `count` buffers of `buf_bytes` bytes each, in DMA-capable memory.
pub struct BouncePool {
    memory: DmaMemory,
    segments: Box<[IoSegment]>,
    buf_bytes: usize,
}

// SAFETY: the pool owns its memory (DmaMemory is Send) and the segments only point into
// that memory; moving the pool to another thread moves the memory's sole owner with it.
// The raw pointers in `IoSegment` are what keeps it from being Send automatically.
unsafe impl Send for BouncePool {}

impl BouncePool {
    /// Allocates `count` buffers of `buf_bytes` bytes (hugepages when reserved).
    pub fn new(count: usize, buf_bytes: usize) -> Result<Self, DeviceError> {
        Self::with_policy(count, buf_bytes, PagePolicy::PreferHuge)
    }

    /// As [`BouncePool::new`], choosing the pages.
    pub fn with_policy(count: usize, buf_bytes: usize, policy: PagePolicy) -> Result<Self, DeviceError> {
        let total = count
            .checked_mul(buf_bytes)
            .filter(|&t| t > 0)
            .ok_or_else(|| DeviceError::Config(format!("bounce pool of {count} x {buf_bytes} bytes")))?;
        let memory = DmaMemory::allocate(total, policy)?;
        let segments = (0..count)
            // SAFETY: buffer `i` is `buf_bytes` bytes inside `memory`, which the pool owns
            // and keeps mapped (and unmoved) for as long as the segments exist.
            .map(|i| unsafe { IoSegment::new(memory.as_ptr().add(i * buf_bytes), buf_bytes) })
            .collect();
        Ok(BouncePool { memory, segments, buf_bytes })
    }

    /// Number of buffers.
    pub fn count(&self) -> usize {
        self.segments.len()
    }

    /// Bytes per buffer.
    pub fn buf_bytes(&self) -> usize {
        self.buf_bytes
    }

    /// The first `bytes` bytes of buffer `idx` as a scatter-gather list. The list stays
    /// valid while the pool lives; the target must not drop the pool with I/O in flight.
    pub fn sg(&self, idx: usize, bytes: usize) -> SgList {
        assert!(bytes <= self.buf_bytes, "bounce buffer overrun");
        // SAFETY: the segment describes pool memory that outlives any request using it
        // (the caller keeps the pool until its I/O completes, as documented above).
        let whole = unsafe { SgList::from_segment(&self.segments[idx]) };
        whole.slice(0, bytes)
    }

    /// Buffer `idx`, to inspect or fill from the CPU (no I/O may be using it).
    pub fn bytes_mut(&mut self, idx: usize) -> &mut [u8] {
        let seg = self.segments[idx];
        // SAFETY: inside the pool's memory; `&mut self` excludes other CPU access, and the
        // caller guarantees no device I/O targets the buffer meanwhile.
        unsafe { std::slice::from_raw_parts_mut(seg.base(), seg.len()) }
    }

    /// The pool's memory region (register it with DMA devices below).
    pub fn region(&self) -> MemoryRegion {
        MemoryRegion { addr: self.memory.as_ptr() as u64, len: self.memory.len() as u64 }
    }

    /// Registers the pool with `dev` (a no-op for non-DMA devices).
    pub fn register_with(&self, dev: &dyn BlockDevice) -> Result<(), DeviceError> {
        dev.register_memory(self.region())
    }
}
