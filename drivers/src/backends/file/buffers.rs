//! Registered buffers: memory given to [`crate::BlockDevice::register_memory`] is
//! registered with every queue's io_uring, so reads and writes into it skip pinning
//! the pages on each request (`IORING_OP_READ_FIXED` / `WRITE_FIXED`). That pays for
//! long-lived I/O memory: guest RAM behind a vhost-user export, benchmark buffers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::device::MemoryRegion;
use crate::error::DeviceError;

/// io_uring refuses single buffers above 1 GiB; larger regions are registered in pieces.
const MAX_PIECE: u64 = 1 << 30;

/// The regions registered with one device; queues pick up changes by generation.
#[derive(Debug, Default)]
pub(super) struct BufferRegistry {
    regions: Mutex<Vec<MemoryRegion>>,
    generation: AtomicU64,
}

impl BufferRegistry {
    pub fn add(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        if region.len == 0 {
            return Err(DeviceError::Config("cannot register an empty memory region".into()));
        }
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        if !regions.contains(&region) {
            regions.push(region);
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        Ok(())
    }

    pub fn remove(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        let mut regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        let before = regions.len();
        regions.retain(|r| *r != region);
        if regions.len() == before {
            return Err(DeviceError::Config(format!(
                "memory region {:#x}+{:#x} was never registered with this device",
                region.addr, region.len
            )));
        }
        self.generation.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    /// Changes whenever the set of regions does.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The current regions cut into registrable pieces, and their generation.
    pub fn pieces(&self) -> (u64, Vec<libc::iovec>) {
        let regions = self.regions.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        for r in regions.iter() {
            let mut at = r.addr;
            while at < r.addr + r.len {
                let len = (r.addr + r.len - at).min(MAX_PIECE);
                out.push(libc::iovec { iov_base: at as *mut libc::c_void, iov_len: len as usize });
                at += len;
            }
        }
        (self.generation(), out)
    }
}

/// One queue's copy of the registration: piece `i` is io_uring buffer index `i`.
#[derive(Debug, Default)]
pub(super) struct FixedBuffers {
    /// Generation the table reflects.
    pub seen: u64,
    /// `(start, end)` address of each registered piece.
    pub table: Vec<(usize, usize)>,
    /// Whether the ring holds a registration to drop before the next one.
    pub in_kernel: bool,
    /// A registration failed once; said so, and stopped trying for this generation.
    pub warned: bool,
}

impl FixedBuffers {
    /// The buffer index holding `len` bytes at `ptr`, if one does.
    #[inline]
    pub fn lookup(&self, ptr: *mut u8, len: usize) -> Option<u16> {
        let p = ptr as usize;
        self.table.iter().position(|&(s, e)| p >= s && p + len <= e).map(|i| i as u16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_cut_into_pieces_and_versioned() {
        let r = BufferRegistry::default();
        let g0 = r.generation();
        r.add(MemoryRegion { addr: 1 << 32, len: (5 << 29) + 4096 }).unwrap();
        r.add(MemoryRegion { addr: 1 << 32, len: (5 << 29) + 4096 }).unwrap();
        let (g1, pieces) = r.pieces();
        assert_eq!(g1, g0 + 1, "registering twice is one change");
        assert_eq!(pieces.iter().map(|p| p.iov_len as u64).collect::<Vec<_>>(), [1 << 30, 1 << 30, (1 << 29) + 4096]);
        assert!(r.remove(MemoryRegion { addr: 4096, len: 4096 }).is_err());
        r.remove(MemoryRegion { addr: 1 << 32, len: (5 << 29) + 4096 }).unwrap();
        assert!(r.pieces().1.is_empty());
        assert!(r.add(MemoryRegion { addr: 4096, len: 0 }).is_err());
        let f = FixedBuffers { table: vec![(4096, 8192), (65536, 131072)], ..Default::default() };
        assert_eq!(f.lookup(65536 as *mut u8, 4096), Some(1));
        assert_eq!(f.lookup(8000 as *mut u8, 512), None, "straddles the end");
    }
}
