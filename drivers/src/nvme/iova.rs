//! I/O virtual addresses: udm hands them out itself from the ranges the IOMMU reports
//! (VFIO_IOMMU_GET_INFO, capability IOVA_RANGE). Using a buffer's virtual address as its
//! IOVA fails on IOMMUs narrower than the process's address space, such as QEMU's
//! intel-iommu with 39 bits.

/// A first-fit allocator over free IOVA ranges (inclusive ends, as VFIO reports them).
#[derive(Debug, Clone)]
pub struct IovaAllocator {
    /// Free ranges `[start, end]`, sorted and disjoint.
    free: Vec<(u64, u64)>,
}

/// IOVAs below this are never handed out: a zero or tiny IOVA in a trace is then
/// recognisably a bug, not a buffer.
const FLOOR: u64 = 1 << 20;

impl IovaAllocator {
    /// An allocator over `ranges` (`[start, end]`, inclusive).
    pub fn new(ranges: &[(u64, u64)]) -> Self {
        let mut free: Vec<(u64, u64)> =
            ranges.iter().filter(|&&(_, end)| end >= FLOOR).map(|&(start, end)| (start.max(FLOOR), end)).collect();
        free.sort_unstable();
        IovaAllocator { free }
    }

    /// `size` bytes aligned to `align` (a power of two), or `None` when no free range
    /// has room.
    pub fn allocate(&mut self, size: u64, align: u64) -> Option<u64> {
        debug_assert!(align.is_power_of_two() && size > 0);
        for i in 0..self.free.len() {
            let (start, end) = self.free[i];
            let at = start.checked_next_multiple_of(align)?;
            let Some(last) = at.checked_add(size - 1) else { continue };
            if last > end {
                continue;
            }
            // Split the free range into what lies before and after the allocation.
            let mut replacement = Vec::with_capacity(2);
            if at > start {
                replacement.push((start, at - 1));
            }
            if last < end {
                replacement.push((last + 1, end));
            }
            self.free.splice(i..=i, replacement);
            return Some(at);
        }
        None
    }

    /// Returns `size` bytes at `iova` (from [`IovaAllocator::allocate`]).
    pub fn release(&mut self, iova: u64, size: u64) {
        let end = iova + size - 1;
        let pos = self.free.partition_point(|&(s, _)| s < iova);
        self.free.insert(pos, (iova, end));
        // Merge with the neighbours where they touch.
        if pos + 1 < self.free.len() && self.free[pos].1.checked_add(1) == Some(self.free[pos + 1].0) {
            self.free[pos].1 = self.free[pos + 1].1;
            self.free.remove(pos + 1);
        }
        if pos > 0 && self.free[pos - 1].1.checked_add(1) == Some(self.free[pos].0) {
            self.free[pos - 1].1 = self.free[pos].1;
            self.free.remove(pos);
        }
    }

    /// Free bytes left.
    pub fn free_bytes(&self) -> u64 {
        self.free.iter().map(|&(s, e)| e - s + 1).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// QEMU's intel-iommu as VFIO reports it (39-bit, a hole for the interrupt window).
    const QEMU: &[(u64, u64)] = &[(0, 0xfedf_ffff), (0xfef0_0000, 0x7f_ffff_ffff)];

    #[test]
    fn allocations_stay_inside_the_reported_ranges() {
        let mut a = IovaAllocator::new(QEMU);
        let x = a.allocate(2 << 20, 2 << 20).unwrap();
        assert_eq!(x % (2 << 20), 0);
        assert!(x >= FLOOR);
        // Larger than what is left below the hole: it must go above it.
        let big = a.allocate(0xff00_0000, 4096).unwrap();
        assert!(big >= 0xfef0_0000 && big + 0xff00_0000 - 1 <= 0x7f_ffff_ffff);
        assert!(a.allocate(1 << 40, 4096).is_none());
    }

    proptest! {
        /// Allocations never overlap each other or leave the ranges, and releasing
        /// everything restores every free byte.
        #[test]
        fn never_overlaps_and_releases_fully(sizes in prop::collection::vec((1u64..64, 0u32..4), 1..40)) {
            let mut a = IovaAllocator::new(QEMU);
            let before = a.free_bytes();
            let mut got: Vec<(u64, u64)> = Vec::new();
            for (pages, align_shift) in sizes {
                let size = pages * 4096 * 1024;
                let align = 4096u64 << (align_shift * 3);
                if let Some(at) = a.allocate(size, align) {
                    prop_assert_eq!(at % align, 0);
                    prop_assert!(QEMU.iter().any(|&(s, e)| at >= s && at + size - 1 <= e));
                    for &(o, osz) in &got {
                        prop_assert!(at + size <= o || o + osz <= at);
                    }
                    got.push((at, size));
                }
            }
            for (at, size) in got.into_iter().rev() {
                a.release(at, size);
            }
            prop_assert_eq!(a.free_bytes(), before);
        }
    }
}
