//! One IOMMU domain (a VFIO container) that one or more controllers share: udm's IOVA
//! allocator and the registry that translates any registered process address into its
//! IOVA.
//!
//! Mappings are few and large (the kernel allows about 65535 per container): each
//! queue's memory is one mapping, each region registered from above (a buffer pool,
//! a VM's memory) is one mapping. The registry is read on every I/O, so it is an
//! immutable sorted table behind an atomic pointer: readers take no lock; registering
//! builds a new table.

use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use vfio_ioctls::VfioContainer;

use crate::device::MemoryRegion;
use crate::error::DeviceError;
use crate::nvme::iova::IovaAllocator;
use crate::nvme::vfio::{iommu_info, IommuInfo};

/// One mapping: `len` bytes at process address `addr` are visible to devices at `iova`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// Process address (page aligned).
    pub addr: u64,
    /// Length (page multiple).
    pub len: u64,
    /// Device address.
    pub iova: u64,
    /// How many times the same region was registered.
    refs: u32,
}

/// The translation table: mappings sorted by address.
#[derive(Debug, Default)]
pub struct Translations {
    maps: Vec<Mapping>,
}

impl Translations {
    /// The IOVA of `addr`, if `addr..addr+len` lies inside one mapping.
    #[inline]
    pub fn translate(&self, addr: u64, len: u64) -> Option<u64> {
        let i = self.maps.partition_point(|m| m.addr <= addr);
        // Mappings may nest (the same memory registered twice, differently); look at the
        // candidates that start at or before `addr`, nearest first.
        self.maps[..i].iter().rev().find(|m| addr + len <= m.addr + m.len).map(|m| m.iova + (addr - m.addr))
    }

    /// Number of mappings.
    pub fn len(&self) -> usize {
        self.maps.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.maps.is_empty()
    }
}

const PAGE: u64 = 4096;

/// A VFIO container with udm's IOVA allocation and address translation.
pub struct DmaSpace {
    container: Arc<VfioContainer>,
    state: Mutex<SpaceState>,
    table: ArcSwap<Translations>,
}

struct SpaceState {
    /// Known once the first device is attached (the kernel sets the IOMMU type then).
    allocator: Option<IovaAllocator>,
    info: Option<IommuInfo>,
}

impl std::fmt::Debug for DmaSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DmaSpace").field("mappings", &self.table.load().len()).finish()
    }
}

impl DmaSpace {
    /// Opens a new VFIO container.
    pub fn new() -> Result<Arc<Self>, DeviceError> {
        if !std::path::Path::new("/dev/vfio/vfio").exists() {
            return Err(DeviceError::Unavailable {
                what: "VFIO",
                hint: "load the vfio-pci module (`modprobe vfio-pci`) or run `udm setup`".into(),
            });
        }
        let container = VfioContainer::new(None)
            .map_err(|e| DeviceError::Driver(format!("cannot open the VFIO container /dev/vfio/vfio: {e}")))?;
        Ok(Arc::new(DmaSpace {
            container: Arc::new(container),
            state: Mutex::new(SpaceState { allocator: None, info: None }),
            table: ArcSwap::from_pointee(Translations::default()),
        }))
    }

    /// The container, to attach devices to.
    pub fn container(&self) -> &Arc<VfioContainer> {
        &self.container
    }

    /// The IOMMU's geometry (after a device is attached).
    pub fn iommu_info(&self) -> Result<IommuInfo, DeviceError> {
        let mut st = self.state.lock().expect("DmaSpace lock");
        Self::ensure_info(&self.container, &mut st)?;
        Ok(st.info.clone().expect("filled by ensure_info"))
    }

    fn ensure_info(container: &VfioContainer, st: &mut SpaceState) -> Result<(), DeviceError> {
        if st.allocator.is_none() {
            let info = iommu_info(container)?;
            tracing::debug!(?info, "IOMMU geometry");
            st.allocator = Some(IovaAllocator::new(&info.iova_ranges));
            st.info = Some(info);
        }
        Ok(())
    }

    /// The current translation table (lock-free; hold it only briefly).
    #[inline]
    pub fn translations(&self) -> arc_swap::Guard<Arc<Translations>> {
        self.table.load()
    }

    /// Maps `region` (rounded out to whole pages) and returns the IOVA of its first
    /// byte. Registering the same region again only counts a reference.
    pub fn map(&self, region: MemoryRegion) -> Result<u64, DeviceError> {
        if region.len == 0 {
            return Err(DeviceError::Config("cannot register an empty memory region".into()));
        }
        let addr = region.addr & !(PAGE - 1);
        let end = (region.addr + region.len).next_multiple_of(PAGE);
        let len = end - addr;
        let mut st = self.state.lock().expect("DmaSpace lock");
        Self::ensure_info(&self.container, &mut st)?;
        let current = self.table.load();
        if let Some(m) = current.maps.iter().find(|m| m.addr == addr && m.len == len) {
            let iova = m.iova + (region.addr - addr);
            let maps = current
                .maps
                .iter()
                .map(|x| if x.addr == addr && x.len == len { Mapping { refs: x.refs + 1, ..*x } } else { *x })
                .collect();
            self.table.store(Arc::new(Translations { maps }));
            return Ok(iova);
        }
        // Large regions get 2 MiB-aligned IOVAs so the IOMMU can use large pages.
        let align = if len >= 2 << 20 { 2 << 20 } else { PAGE };
        let allocator = st.allocator.as_mut().expect("filled by ensure_info");
        let iova = allocator.allocate(len, align).ok_or_else(|| {
            DeviceError::Driver(format!(
                "the IOMMU has no free IOVA range of {len} bytes left: unregister memory first"
            ))
        })?;
        // SAFETY: udm's contract for registered memory: the region stays allocated until it
        // is unregistered, and the process accesses it only through raw pointers while
        // devices may DMA into it (buffers are handed to I/O requests, never borrowed as
        // Rust references during I/O).
        let mapped = unsafe { self.container.vfio_dma_map(iova, len as usize, addr as *mut u8) };
        if let Err(e) = mapped {
            allocator.release(iova, len);
            let hint = if st.info.as_ref().and_then(|i| i.dma_mappings_available) == Some(0) {
                "the container has no DMA mappings left: register fewer, larger regions"
            } else {
                "is the memory locked-page limit too low? (`ulimit -l unlimited`)"
            };
            return Err(DeviceError::Driver(format!(
                "cannot map {len} bytes at {addr:#x} for DMA (IOVA {iova:#x}): {e}; {hint}"
            )));
        }
        let mut maps = current.maps.clone();
        let pos = maps.partition_point(|m| m.addr <= addr);
        maps.insert(pos, Mapping { addr, len, iova, refs: 1 });
        self.table.store(Arc::new(Translations { maps }));
        Ok(iova + (region.addr - addr))
    }

    /// Drops one reference to `region`, unmapping it with the last one. No request may
    /// still use it.
    pub fn unmap(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        let addr = region.addr & !(PAGE - 1);
        let len = (region.addr + region.len).next_multiple_of(PAGE) - addr;
        let mut st = self.state.lock().expect("DmaSpace lock");
        let current = self.table.load();
        let Some(pos) = current.maps.iter().position(|m| m.addr == addr && m.len == len) else {
            return Err(DeviceError::Config(format!(
                "memory region {:#x}+{} was never registered",
                region.addr, region.len
            )));
        };
        let mut maps = current.maps.clone();
        let m = maps[pos];
        if m.refs > 1 {
            maps[pos].refs -= 1;
        } else {
            maps.remove(pos);
            // Stop translating before unmapping, so no new request uses the IOVA.
            self.table.store(Arc::new(Translations { maps }));
            self.container
                .vfio_dma_unmap(m.iova, m.len as usize)
                .map_err(|e| DeviceError::Driver(format!("cannot unmap IOVA {:#x}: {e}", m.iova)))?;
            if let Some(a) = st.allocator.as_mut() {
                a.release(m.iova, m.len);
            }
            return Ok(());
        }
        self.table.store(Arc::new(Translations { maps }));
        Ok(())
    }
}

impl Drop for DmaSpace {
    fn drop(&mut self) {
        for m in self.table.load().maps.iter() {
            let _ = self.container.vfio_dma_unmap(m.iova, m.len as usize);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn translates_only_inside_a_mapping() {
        let t = Translations {
            maps: vec![
                Mapping { addr: 0x10000, len: 0x4000, iova: 0x100000, refs: 1 },
                Mapping { addr: 0x20000, len: 0x1000, iova: 0x900000, refs: 1 },
            ],
        };
        assert_eq!(t.translate(0x10000, 512), Some(0x100000));
        assert_eq!(t.translate(0x13e00, 512), Some(0x103e00));
        assert_eq!(t.translate(0x13e00, 1024), None);
        assert_eq!(t.translate(0x20800, 0x800), Some(0x900800));
        assert_eq!(t.translate(0xf000, 16), None);
        assert_eq!(t.translate(0x30000, 16), None);
    }
}
