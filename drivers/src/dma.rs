//! Memory for I/O buffers and RAM disks: 2 MiB hugepages when the host has them reserved
//! (physically contiguous per page, never swapped, few IOMMU mappings), ordinary pages
//! otherwise, with one warning saying how to reserve hugepages.

use std::alloc::Layout;
use std::sync::Once;

use crate::error::DeviceError;

/// Which pages back a [`DmaMemory`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 2 MiB hugepages from the kernel's reserved pool (hugepage-rs).
    Huge,
    /// Ordinary 4 KiB anonymous pages.
    Normal,
}

/// How to choose pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PagePolicy {
    /// Hugepages when reserved, else ordinary pages with a warning.
    PreferHuge,
    /// Hugepages or fail.
    RequireHuge,
    /// Ordinary pages (for tests and tools that never DMA).
    Normal,
}

/// Hugepage size assumed when rounding sizes up.
pub const HUGEPAGE_SIZE: usize = 2 << 20;

static FALLBACK_WARNING: Once = Once::new();

/// A zero-filled, page-aligned allocation that never moves.
#[derive(Debug)]
pub struct DmaMemory {
    ptr: *mut u8,
    len: usize,
    kind: PageKind,
}

// SAFETY: DmaMemory owns its mapping exclusively (like a Box<[u8]>); sending it to or
// sharing it with another thread is as safe as sending a Box. Shared mutation through
// `as_ptr` is the users' contract (the I/O contract's "caller owns the buffer").
unsafe impl Send for DmaMemory {}
// SAFETY: see Send; `&DmaMemory` only exposes the address and length.
unsafe impl Sync for DmaMemory {}

impl DmaMemory {
    /// Allocates at least `len` bytes (rounded up to whole pages) under `policy`.
    pub fn allocate(len: usize, policy: PagePolicy) -> Result<Self, DeviceError> {
        if len == 0 {
            return Err(DeviceError::Config("cannot allocate 0 bytes of I/O memory".into()));
        }
        if policy != PagePolicy::Normal {
            let rounded = len.div_ceil(HUGEPAGE_SIZE) * HUGEPAGE_SIZE;
            if let Ok(layout) = Layout::from_size_align(rounded, HUGEPAGE_SIZE) {
                // SAFETY: the layout has a non-zero size.
                let ptr = unsafe { hugepage_rs::alloc(layout) };
                if !ptr.is_null() {
                    return Ok(DmaMemory { ptr, len: rounded, kind: PageKind::Huge });
                }
            }
            if policy == PagePolicy::RequireHuge {
                return Err(DeviceError::OutOfMemory {
                    bytes: rounded,
                    kind: "hugepage",
                    hint: "reserve 2 MiB hugepages first: `udm setup --hugepages N` or `echo N > /proc/sys/vm/nr_hugepages`",
                });
            }
            FALLBACK_WARNING.call_once(|| {
                tracing::warn!(
                    "no free 2 MiB hugepages for {len} bytes of I/O memory: using ordinary pages \
                     (slower, and NVMe needs more IOMMU mappings). Reserve some with \
                     `echo N > /proc/sys/vm/nr_hugepages`"
                );
            });
        }
        Self::allocate_normal(len)
    }

    fn allocate_normal(len: usize) -> Result<Self, DeviceError> {
        let page = 4096;
        let rounded = len.div_ceil(page) * page;
        // Large allocations are placed on a 2 MiB boundary and offered to transparent
        // hugepages: the kernel may then back them with 2 MiB pages after all, which
        // spares a RAM disk's random reads most of their TLB misses.
        let align = if rounded >= HUGEPAGE_SIZE { HUGEPAGE_SIZE } else { page };
        let span = rounded + align - page;
        // SAFETY: an anonymous private mapping with no address hint has no preconditions.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                span,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DeviceError::OutOfMemory {
                bytes: rounded,
                kind: "anonymous",
                hint: "free memory or ask for a smaller device",
            });
        }
        let start = (ptr as usize).next_multiple_of(align);
        let head = start - ptr as usize;
        let tail = span - head - rounded;
        // SAFETY: the head and tail are page-aligned pieces of the mapping just made,
        // outside `start..start + rounded`, which is all that is kept.
        unsafe {
            if head > 0 {
                libc::munmap(ptr, head);
            }
            if tail > 0 {
                libc::munmap((start + rounded) as *mut libc::c_void, tail);
            }
        }
        if align == HUGEPAGE_SIZE {
            // SAFETY: advice on our own mapping; failure (THP disabled) changes nothing.
            unsafe { libc::madvise(start as *mut libc::c_void, rounded, libc::MADV_HUGEPAGE) };
        }
        // Fault every page in now, as reserved hugepages are: no page faults on the data
        // path later, and a RAM disk that holds the memory it promised (reads of a
        // never-touched mapping would otherwise all hit the kernel's shared zero page).
        // SAFETY: advice on our own mapping; on kernels before 5.14 it fails harmlessly
        // and pages arrive on first touch instead.
        unsafe { libc::madvise(start as *mut libc::c_void, rounded, libc::MADV_POPULATE_WRITE) };
        Ok(DmaMemory { ptr: start as *mut u8, len: rounded, kind: PageKind::Normal })
    }

    /// Start address (page aligned; 2 MiB aligned for hugepages).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes (the request rounded up to whole pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Never true: allocations are at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Which pages back it.
    pub fn kind(&self) -> PageKind {
        self.kind
    }

    /// The region to register with DMA devices.
    pub fn region(&self) -> crate::MemoryRegion {
        crate::MemoryRegion { addr: self.ptr as u64, len: self.len as u64 }
    }

    /// The memory as a byte slice.
    ///
    /// # Safety
    /// No request may be writing into the memory while the slice lives.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, initialised (zero-filled) by the kernel;
        // the caller excludes concurrent writers.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// The memory as a mutable byte slice.
    ///
    /// # Safety
    /// No request may be using the memory while the slice lives.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn as_mut_slice(&self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and the caller excludes every other access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for DmaMemory {
    fn drop(&mut self) {
        match self.kind {
            PageKind::Huge => {
                let layout = Layout::from_size_align(self.len, HUGEPAGE_SIZE).expect("layout was valid at allocation");
                // SAFETY: `ptr` came from hugepage_rs::alloc with this layout.
                unsafe { hugepage_rs::dealloc(self.ptr, layout) };
            }
            PageKind::Normal => {
                // SAFETY: `ptr..ptr+len` is exactly the mapping made in allocate_normal.
                unsafe { libc::munmap(self.ptr.cast(), self.len) };
            }
        }
    }
}

/// 2 MiB hugepages the kernel has free right now (from /proc/meminfo).
pub fn free_hugepages() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("HugePages_Free:").and_then(|v| v.trim().parse().ok())))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn falls_back_to_normal_pages_when_no_hugepages_are_free() {
        let m = DmaMemory::allocate(3 << 20, PagePolicy::PreferHuge).unwrap();
        if free_hugepages() < 2 {
            assert_eq!(m.kind(), PageKind::Normal);
            assert!(DmaMemory::allocate(3 << 20, PagePolicy::RequireHuge).is_err());
        } else {
            assert_eq!(m.kind(), PageKind::Huge);
            assert_eq!(m.as_ptr() as usize % HUGEPAGE_SIZE, 0);
        }
        assert!(m.len() >= 3 << 20);
        // SAFETY: no I/O uses the memory.
        let s = unsafe { m.as_mut_slice() };
        assert!(s.iter().all(|&b| b == 0));
        s[s.len() - 1] = 7;
    }

    /// Large ordinary allocations sit on a 2 MiB boundary (so transparent hugepages can
    /// back them) and are faulted in up front.
    #[test]
    fn large_normal_allocations_are_aligned_and_resident() {
        let m = DmaMemory::allocate(5 << 20, PagePolicy::Normal).unwrap();
        assert_eq!(m.as_ptr() as usize % HUGEPAGE_SIZE, 0);
        assert_eq!(m.len(), 5 << 20);
        let mut resident = vec![0u8; m.len() / 4096];
        // SAFETY: mincore reads the page table of our own mapping into a vector with one
        // byte per page.
        let rc = unsafe { libc::mincore(m.as_ptr().cast(), m.len(), resident.as_mut_ptr()) };
        assert_eq!(rc, 0);
        assert!(resident.iter().all(|&r| r & 1 == 1), "every page is resident before first use");
        // SAFETY: no I/O uses the memory.
        assert!(unsafe { m.as_slice() }.iter().all(|&b| b == 0));
    }

    #[test]
    fn normal_policy_never_uses_hugepages() {
        let m = DmaMemory::allocate(4097, PagePolicy::Normal).unwrap();
        assert_eq!(m.kind(), PageKind::Normal);
        assert_eq!(m.len(), 8192);
    }
}
