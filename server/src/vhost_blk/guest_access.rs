//! Guest memory as the queue workers access it: vm-memory's regions plus a flat array of
//! (guest address, length, host address) that turns a guest range into a host pointer
//! with one or two compares.
//!
//! Every virtqueue access (available ring, descriptors, request header, status byte,
//! used ring) goes through [`GuestMemory::get_slices`]. vm-memory's region collection
//! answers it with a general iterator whose cost dominated the server's profile (about a
//! third of a queue worker's time at QD32); this type implements the same trait, so
//! virtio-queue and vm-memory's `Bytes` work unchanged on top of it, with a lookup built
//! for the few large regions front ends share.

use std::iter::FusedIterator;
use std::sync::Arc;

use vm_memory::guest_memory::{Error, GuestMemorySliceIterator, Result as MemResult};
use vm_memory::{
    GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap, Permissions,
    VolatileSlice,
};

/// One mapped region, flattened for lookup.
#[derive(Debug, Clone, Copy)]
struct HostRange {
    guest: u64,
    len: u64,
    host: *mut u8,
}

/// The guest's memory: the regions a front end shared, mapped into udm.
#[derive(Default)]
pub struct GuestMem {
    /// Kept alive as long as this table: the regions' truncation guards and their
    /// registrations with the device, so a region is unregistered (DMA unmapped) only
    /// once no worker can still use it. Declared first: dropped before the mappings.
    pins: Vec<Arc<dyn Send + Sync>>,
    /// Owns the mappings the host pointers below point into.
    backend: Option<GuestMemoryMmap<()>>,
    /// Sorted by guest address, non-overlapping.
    ranges: Vec<HostRange>,
}

impl std::fmt::Debug for GuestMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestMem").field("ranges", &self.ranges).field("pins", &self.pins.len()).finish()
    }
}

// SAFETY: the host pointers point into mappings owned by `backend`, which lives exactly
// as long as this value; the pointers are only turned into `VolatileSlice`s (volatile
// access, as vm-memory itself does for the same mappings), never into references.
unsafe impl Send for GuestMem {}
// SAFETY: as above; nothing in `GuestMem` is mutated after construction.
unsafe impl Sync for GuestMem {}

impl GuestMem {
    /// Builds the view over `regions` (any order; they must not overlap).
    pub fn from_arc_regions(regions: Vec<Arc<GuestRegionMmap<()>>>) -> Result<Self, String> {
        Self::from_arc_regions_pinning(regions, Vec::new())
    }

    /// As [`GuestMem::from_arc_regions`], keeping `pins` alive as long as the table.
    pub fn from_arc_regions_pinning(
        mut regions: Vec<Arc<GuestRegionMmap<()>>>,
        pins: Vec<Arc<dyn Send + Sync>>,
    ) -> Result<Self, String> {
        regions.sort_by_key(|r| r.start_addr());
        let ranges =
            regions.iter().map(|r| HostRange { guest: r.start_addr().0, len: r.len(), host: r.as_ptr() }).collect();
        let backend = GuestMemoryMmap::from_arc_regions(regions).map_err(|e| e.to_string())?;
        Ok(GuestMem { backend: Some(backend), ranges, pins })
    }

    /// Anonymous memory at the given guest ranges (tests and fuzzing).
    pub fn from_ranges(ranges: &[(GuestAddress, usize)]) -> Result<Self, String> {
        let backend = GuestMemoryMmap::<()>::from_ranges(ranges).map_err(|e| e.to_string())?;
        let ranges =
            backend.iter().map(|r| HostRange { guest: r.start_addr().0, len: r.len(), host: r.as_ptr() }).collect();
        Ok(GuestMem { backend: Some(backend), ranges, pins: Vec::new() })
    }

    /// The guest address of a region whose file the front end truncated under udm (see
    /// [`super::truncation_guard`]), if any.
    pub fn truncated_region(&self) -> Option<u64> {
        self.ranges.iter().find(|r| super::truncation_guard::was_hit_at(r.host)).map(|r| r.guest)
    }

    /// The region holding guest address `addr`.
    #[inline]
    fn range_of(&self, addr: u64) -> Option<&HostRange> {
        // Front ends share few regions (QEMU: below and above 4 GiB; libblkio: one per
        // buffer allocation), so a scan beats a binary search for the usual counts.
        if self.ranges.len() <= 8 {
            return self.ranges.iter().find(|r| addr.wrapping_sub(r.guest) < r.len);
        }
        let i = self.ranges.partition_point(|r| r.guest <= addr).checked_sub(1)?;
        let r = &self.ranges[i];
        (addr - r.guest < r.len).then_some(r)
    }

    /// Host address of `len` bytes at `addr`, when they lie inside one region.
    #[inline]
    pub fn host_range(&self, addr: u64, len: u64) -> Option<*mut u8> {
        let r = self.range_of(addr)?;
        let off = addr - r.guest;
        if len > r.len - off {
            return None;
        }
        // SAFETY: `off` is inside the region's mapping, so the result stays inside it.
        Some(unsafe { r.host.add(off as usize) })
    }

    /// Copies `N` bytes at `addr` out of guest memory in one volatile read (the guest may
    /// change them at any time: the copy is what udm trusts); `None` when they do not lie
    /// inside one region.
    #[inline]
    pub fn read_array<const N: usize>(&self, addr: u64) -> Option<[u8; N]> {
        let p = self.host_range(addr, N as u64)?;
        // SAFETY: `host_range` checked that the N bytes lie inside one mapped region, kept
        // alive by `self`; `[u8; N]` has alignment 1 and every bit pattern is valid.
        Some(unsafe { std::ptr::read_volatile(p as *const [u8; N]) })
    }

    /// Asks the CPU to start loading the cache line holding `addr` (nothing when it is not
    /// guest memory): the guest wrote it on another CPU, so the first read misses.
    #[inline]
    pub fn prefetch(&self, addr: u64) {
        #[cfg(target_arch = "x86_64")]
        if let Some(p) = self.host_range(addr, 1) {
            // SAFETY: a prefetch is a hint that never faults; `p` points into a mapped region.
            unsafe { core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(p as *const i8) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = addr;
    }

    /// Stores one byte at `addr` (a status byte); false when it is not guest memory.
    #[inline]
    pub fn write_byte(&self, addr: u64, value: u8) -> bool {
        match self.host_range(addr, 1) {
            Some(p) => {
                // SAFETY: `host_range` checked that the byte lies inside a mapped region,
                // kept alive by `self`.
                unsafe { std::ptr::write_volatile(p, value) };
                true
            }
            None => false,
        }
    }

    /// Calls `f(host, len)` for each region-contiguous piece of `len` bytes at `addr`;
    /// `None` when part of the range is not guest memory.
    #[inline]
    pub fn for_each_piece(&self, mut addr: u64, mut len: u64, mut f: impl FnMut(*mut u8, u64) -> bool) -> Option<()> {
        while len > 0 {
            let r = self.range_of(addr)?;
            let off = addr - r.guest;
            let n = len.min(r.len - off);
            // SAFETY: `off` is inside the region's mapping and `n` does not pass its end.
            if !f(unsafe { r.host.add(off as usize) }, n) {
                return None;
            }
            addr += n;
            len -= n;
        }
        Some(())
    }
}

/// The pieces of one guest range, region by region.
pub struct Pieces<'a> {
    mem: &'a GuestMem,
    addr: u64,
    left: u64,
    failed: bool,
}

impl<'a> Iterator for Pieces<'a> {
    type Item = MemResult<VolatileSlice<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 || self.failed {
            return None;
        }
        let Some(r) = self.mem.range_of(self.addr) else {
            self.failed = true;
            return Some(Err(Error::InvalidGuestAddress(GuestAddress(self.addr))));
        };
        let off = self.addr - r.guest;
        let n = self.left.min(r.len - off);
        self.addr += n;
        self.left -= n;
        // SAFETY: `off..off + n` lies inside the region's mapping, which `self.mem` keeps
        // alive for `'a`; the slice is only accessed with volatile operations.
        Some(Ok(unsafe { VolatileSlice::new(r.host.add(off as usize), n as usize) }))
    }
}

impl FusedIterator for Pieces<'_> {}
impl<'a> GuestMemorySliceIterator<'a, ()> for Pieces<'a> {}

impl GuestMemory for GuestMem {
    type PhysicalMemory = GuestMemoryMmap<()>;
    type Bitmap = ();

    fn check_range(&self, addr: GuestAddress, count: usize, _access: Permissions) -> bool {
        self.for_each_piece(addr.0, count as u64, |_, _| true).is_some()
    }

    fn get_slices<'a>(
        &'a self,
        addr: GuestAddress,
        count: usize,
        _access: Permissions,
    ) -> MemResult<impl GuestMemorySliceIterator<'a, vm_memory::bitmap::BS<'a, ()>>> {
        Ok(Pieces { mem: self, addr: addr.0, left: count as u64, failed: false })
    }

    fn physical_memory(&self) -> Option<&Self::PhysicalMemory> {
        self.backend.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn reads_and_writes_land_in_the_right_region_and_spanning_ranges_split() {
        let mem = GuestMem::from_ranges(&[(GuestAddress(0), 0x1000), (GuestAddress(0x1000), 0x1000)]).unwrap();
        mem.write_slice(&[7u8; 32], GuestAddress(0xff0)).unwrap();
        let mut back = [0u8; 32];
        mem.read_slice(&mut back, GuestAddress(0xff0)).unwrap();
        assert_eq!(back, [7u8; 32]);
        assert!(mem.host_range(0xff0, 16).is_some());
        assert!(mem.host_range(0xff0, 32).is_none(), "crosses into the next region");
        let mut pieces = Vec::new();
        mem.for_each_piece(0xff0, 32, |_, n| {
            pieces.push(n);
            true
        })
        .unwrap();
        assert_eq!(pieces, vec![16, 16]);
        assert!(mem.check_range(GuestAddress(0x1ff0), 16, Permissions::Read));
        assert!(!mem.check_range(GuestAddress(0x1ff0), 17, Permissions::Read));
        assert!(mem.read_slice(&mut back, GuestAddress(0x1ff0)).is_err());
        assert!(mem.write_obj(1u8, GuestAddress(0x2000)).is_err());
    }

    #[test]
    fn many_regions_use_the_sorted_lookup() {
        let ranges: Vec<_> = (0..20u64).map(|i| (GuestAddress(i * 0x10000), 0x1000)).collect();
        let mem = GuestMem::from_ranges(&ranges).unwrap();
        for i in 0..20u64 {
            mem.write_obj(i as u8, GuestAddress(i * 0x10000 + 0xfff)).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(i * 0x10000 + 0xfff)).unwrap(), i as u8);
            assert!(mem.host_range(i * 0x10000 + 0x1000, 1).is_none(), "gap after region {i}");
        }
    }
}
