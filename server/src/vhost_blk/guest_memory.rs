//! The guest's memory as the front end shares it (SET_MEM_TABLE, ADD/REM_MEM_REGION):
//! mapped into udm, published to the queue workers through an atomic pointer, and
//! registered with the device below the export so DMA devices can move data straight
//! between their hardware and the guest (zero copy).
//!
//! Everything here comes from the front end and is treated as hostile: each region's
//! file is checked with fstat before it is mapped (a region past the end of its file
//! would raise SIGBUS on first access), and a region is unregistered from the device
//! only when the last memory table that names it is gone, i.e. when no queue worker can
//! have a request in flight on it (a freed IOVA could otherwise be reused while a DMA
//! still targets it).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::Arc;

use udm_drivers::{BlockDevice, MemoryRegion};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestRegionMmap};

use super::request::GuestMem;
use super::truncation_guard::TruncationGuard;

/// Most regions one SET_MEM_TABLE or a run of ADD_MEM_REG may map (what udm answers to
/// GET_MAX_MEM_SLOTS; libblkio adds one per mapped buffer area).
pub const MAX_MEM_SLOTS: usize = 256;

/// One region of guest memory mapped into udm.
struct Mapped {
    /// Absorbs accesses past the end of a file the front end truncated after handing
    /// it over; shared with every table that uses the region (declared first: dropped
    /// before the mapping).
    guard: Arc<TruncationGuard>,
    guest_phys_addr: u64,
    size: u64,
    /// Where the front end (QEMU) has it: vring addresses arrive in this space.
    user_addr: u64,
    region: Arc<GuestRegionMmap<()>>,
    /// Set once the device accepted the region; shared with every memory table (and so
    /// every worker) that uses it.
    registration: Option<Arc<Registration>>,
}

impl Mapped {
    fn host_region(&self) -> MemoryRegion {
        MemoryRegion { addr: self.region.as_ptr() as u64, len: self.size }
    }
}

/// A region registered with the device; unregistered when the last holder drops it.
struct Registration {
    device: Arc<dyn BlockDevice>,
    region: MemoryRegion,
    guest_phys_addr: u64,
    /// Keeps the mapping alive at least as long as the registration.
    _mapping: Arc<GuestRegionMmap<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Err(e) = self.device.unregister_memory(self.region) {
            tracing::warn!("unregistering guest memory at {:#x}: {e}", self.guest_phys_addr);
        }
    }
}

/// Why a memory table update failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// mmap of the front end's file failed.
    #[error("cannot map guest memory region at {gpa:#x} (+{size:#x}): {reason}")]
    Map {
        /// Guest physical address.
        gpa: u64,
        /// Size.
        size: u64,
        /// What failed.
        reason: String,
    },
    /// Regions overlap or are empty, or there are too many.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
    /// REM_MEM_REGION named a region udm does not have.
    #[error("no guest memory region at {0:#x} to remove")]
    NoSuchRegion(u64),
}

/// The mapped guest memory of one front-end connection.
pub struct MemoryTable {
    regions: Vec<Mapped>,
    atomic: GuestMemoryAtomic<GuestMem>,
    device: Arc<dyn BlockDevice>,
}

impl MemoryTable {
    /// An empty table for an export of `device`.
    pub fn new(device: Arc<dyn BlockDevice>) -> Self {
        MemoryTable { regions: Vec::new(), atomic: GuestMemoryAtomic::new(GuestMem::default()), device }
    }

    /// The memory workers read; they reload it whenever they are idle.
    pub fn atomic(&self) -> GuestMemoryAtomic<GuestMem> {
        self.atomic.clone()
    }

    /// Replaces every region (SET_MEM_TABLE).
    pub fn set(&mut self, regions: &[VhostUserMemoryRegion], files: Vec<File>) -> Result<(), MemoryError> {
        if regions.len() != files.len() {
            return Err(MemoryError::Layout(format!(
                "{} regions came with {} file descriptors; each region needs its own",
                regions.len(),
                files.len()
            )));
        }
        if regions.len() > MAX_MEM_SLOTS {
            return Err(MemoryError::Layout(format!("{} regions; udm maps at most {MAX_MEM_SLOTS}", regions.len())));
        }
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            mapped.push(map(r, file)?);
        }
        // The old regions stay registered until the workers' last reference to the old
        // table goes (their requests in flight on it have completed).
        let old = std::mem::replace(&mut self.regions, mapped);
        if let Err(e) = self.publish() {
            self.regions = old;
            return Err(e);
        }
        Ok(())
    }

    /// Adds one region (ADD_MEM_REGION).
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
        if self.regions.len() >= MAX_MEM_SLOTS {
            return Err(MemoryError::Layout(format!("all {MAX_MEM_SLOTS} memory slots are in use")));
        }
        let m = map(region, file)?;
        let gpa = m.guest_phys_addr;
        self.regions.push(m);
        if let Err(e) = self.publish() {
            self.regions.retain(|r| r.guest_phys_addr != gpa);
            return Err(e);
        }
        Ok(())
    }

    /// Removes the region starting at `guest_phys_addr` (REM_MEM_REGION).
    pub fn remove(&mut self, guest_phys_addr: u64, size: u64) -> Result<(), MemoryError> {
        let idx = self
            .regions
            .iter()
            .position(|m| m.guest_phys_addr == guest_phys_addr && m.size == size)
            .ok_or(MemoryError::NoSuchRegion(guest_phys_addr))?;
        let m = self.regions.remove(idx);
        if let Err(e) = self.publish() {
            self.regions.insert(idx, m);
            return Err(e);
        }
        // `m` goes here; its registration lives on in the tables workers still use.
        Ok(())
    }

    /// Drops every region (the front end went away; its workers are stopped).
    pub fn clear(&mut self) {
        self.regions.clear();
        self.atomic.lock().unwrap_or_else(|e| e.into_inner()).replace(GuestMem::default());
    }

    /// Translates a front-end virtual address (vring addresses) to a guest physical one.
    pub fn vmm_to_gpa(&self, vmm_addr: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|m| vmm_addr >= m.user_addr && vmm_addr - m.user_addr < m.size)
            .map(|m| vmm_addr - m.user_addr + m.guest_phys_addr)
    }

    /// Number of regions mapped.
    pub fn len(&self) -> usize {
        self.regions.len()
    }

    /// Whether no memory is mapped.
    pub fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    fn publish(&mut self) -> Result<(), MemoryError> {
        // vm-memory wants regions sorted by guest address; front ends add them in any order.
        self.regions.sort_by_key(|m| m.guest_phys_addr);
        let mem = GuestMem::from_arc_regions(self.regions.iter().map(|m| Arc::clone(&m.region)).collect())
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        drop(mem);
        for m in self.regions.iter_mut().filter(|m| m.registration.is_none()) {
            self.device.register_memory(m.host_region()).map_err(|e| MemoryError::Map {
                gpa: m.guest_phys_addr,
                size: m.size,
                reason: format!("the device refused it: {e}"),
            })?;
            m.registration = Some(Arc::new(Registration {
                device: Arc::clone(&self.device),
                region: m.host_region(),
                guest_phys_addr: m.guest_phys_addr,
                _mapping: Arc::clone(&m.region),
            }));
        }
        let registrations =
            self.regions.iter().filter_map(|m| m.registration.clone()).map(|r| r as Arc<dyn Send + Sync>);
        let guards = self.regions.iter().map(|m| Arc::clone(&m.guard) as Arc<dyn Send + Sync>);
        let pins = guards.chain(registrations).collect();
        let mem =
            GuestMem::from_arc_regions_pinning(self.regions.iter().map(|m| Arc::clone(&m.region)).collect(), pins)
                .map_err(|e| MemoryError::Layout(e.to_string()))?;
        self.atomic.lock().unwrap_or_else(|e| e.into_inner()).replace(mem);
        Ok(())
    }
}

fn map(r: &VhostUserMemoryRegion, file: File) -> Result<Mapped, MemoryError> {
    let err = |reason: String| MemoryError::Map { gpa: r.guest_phys_addr, size: r.memory_size, reason };
    if r.memory_size == 0 {
        return Err(err("empty region".into()));
    }
    check_file_covers(&file, r.mmap_offset, r.memory_size).map_err(err)?;
    let granule = file.metadata().map(|m| m.blksize()).unwrap_or(0);
    let mmap = r.mmap_region::<()>(file).map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
        .ok_or_else(|| err("region wraps around the address space".into()))?;
    let guard = TruncationGuard::new(region.as_ptr(), r.memory_size as usize, granule as usize)
        .map_err(|e| err(e.to_string()))?;
    Ok(Mapped {
        guard: Arc::new(guard),
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        region: Arc::new(region),
        registration: None,
    })
}

/// Refuses a file shorter than `offset + size` (mapping past its end would raise SIGBUS
/// at the first access: the whole daemon would die) and anything that is not a regular
/// file or shared memory object.
pub fn check_file_covers(file: &File, offset: u64, size: u64) -> Result<(), String> {
    let meta = file.metadata().map_err(|e| format!("fstat of the region's file failed: {e}"))?;
    if !meta.file_type().is_file() {
        return Err(format!(
            "the region's file descriptor is not a regular file or memfd ({:?}); share guest memory from a memfd, \
             hugetlbfs or tmpfs file",
            meta.file_type()
        ));
    }
    let end = offset.checked_add(size).ok_or_else(|| format!("offset {offset:#x} + size {size:#x} overflows"))?;
    if end > meta.len() {
        return Err(format!(
            "the file is {:#x} bytes, shorter than offset {offset:#x} + size {size:#x}; refusing to map past its end",
            meta.len()
        ));
    }
    Ok(())
}
