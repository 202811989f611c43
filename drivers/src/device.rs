//! The contract every block device implements: backends and mapped devices alike, so
//! they stack.

use crate::error::DeviceError;
use crate::request::{Completion, IoRequest, QueueFull};

/// What a device is and what it can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Smallest addressable unit in bytes (512 or 4096); requests must be aligned to it.
    pub logical_block_size: u32,
    /// Unit the device writes atomically and efficiently, in bytes.
    pub physical_block_size: u32,
    /// Largest single request in bytes the device takes; larger ones are split above.
    pub max_transfer: u32,
    /// Most scatter-gather segments in one request.
    pub max_segments: u32,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// The device has a volatile cache, so Flush matters.
    pub volatile_cache: bool,
    /// Discard is implemented.
    pub supports_discard: bool,
    /// Write-zeroes is implemented.
    pub supports_write_zeroes: bool,
    /// Largest discard or write-zeroes request, in sectors.
    pub max_discard_sectors: u64,
}

impl DeviceInfo {
    /// A writable device of `sectors` sectors with `block_size`-byte blocks and every
    /// operation supported; backends adjust the rest.
    pub fn new(sectors: u64, block_size: u32) -> Self {
        DeviceInfo {
            sectors,
            logical_block_size: block_size,
            physical_block_size: block_size,
            max_transfer: 1 << 20,
            max_segments: 256,
            read_only: false,
            volatile_cache: false,
            supports_discard: true,
            supports_write_zeroes: true,
            max_discard_sectors: u32::MAX as u64,
        }
    }

    /// Size in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.sectors * crate::SECTOR_SIZE
    }
}

/// A range of process memory that requests may point into. DMA devices (NVMe) map it
/// into their IOMMU domain once, so that requests into it need no per-I/O mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MemoryRegion {
    /// Start address in this process.
    pub addr: u64,
    /// Length in bytes.
    pub len: u64,
}

/// A block device: shared by every thread that does I/O to it.
pub trait BlockDevice: Send + Sync {
    /// Current geometry and capabilities (the size may change on resize).
    fn info(&self) -> DeviceInfo;

    /// Opens a queue for the calling thread, with room for at least `depth` requests in
    /// flight where the device allows it (see [`IoQueue::depth`]).
    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError>;

    /// Makes `region` usable for I/O buffers. A no-op except for DMA devices.
    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        let _ = region;
        Ok(())
    }

    /// Undoes [`BlockDevice::register_memory`]; no request may still use the region.
    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        let _ = region;
        Ok(())
    }
}

/// A queue owned by one thread. Requests go in with `submit`, reach the device at the
/// latest on `kick`, and come back only through `poll` (never from inside `submit`), so
/// a caller can submit a batch without re-entrancy.
pub trait IoQueue: Send {
    /// Queues a request. A request the device rejects (out of range, misaligned,
    /// read-only) is accepted here and completes with the error through `poll`.
    /// Returns the request when the queue has no room.
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull>;

    /// Sends every submitted request to the device (rings a doorbell, enters io_uring).
    fn kick(&mut self);

    /// Fills `out` with finished requests and returns how many; never blocks. Also makes
    /// progress on work in flight, so callers poll until `in_flight()` reaches zero.
    fn poll(&mut self, out: &mut [Completion]) -> usize;

    /// Does what `kick` does, then sleeps until a request has completed or `timeout`
    /// has passed, for callers that would rather sleep than spin while everything is in
    /// flight (an event-driven reactor, `udm bench --wait`). Completions are still
    /// collected with `poll`. May return early. The default only kicks: for queues that
    /// complete without interrupts (in memory, polled NVMe) polling is the only way
    /// forward.
    fn wait(&mut self, timeout: std::time::Duration) {
        let _ = timeout;
        self.kick();
    }

    /// Requests submitted and not yet returned by `poll`, plus one while the queue
    /// carries internal work that only its polls advance (a stacked device's metadata
    /// commit other queues wait for). Zero means the queue may be left unpolled.
    fn in_flight(&self) -> usize;

    /// Most requests this queue holds at once.
    fn depth(&self) -> usize;
}
