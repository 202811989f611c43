//! The guest's memory as the front end shares it (SET_MEM_TABLE, ADD/REM_MEM_REGION):
//! mapped into udm, published to the queue workers through an atomic pointer, and
//! registered with the device below the export so DMA devices can move data straight
//! between their hardware and the guest (zero copy).

use std::fs::File;
use std::sync::Arc;

use udm_drivers::{BlockDevice, MemoryRegion};
use vhost::vhost_user::message::VhostUserMemoryRegion;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestRegionMmap};

use super::request::GuestMem;

/// One region of guest memory mapped into udm.
struct Mapped {
    guest_phys_addr: u64,
    size: u64,
    /// Where the front end (QEMU) has it: vring addresses arrive in this space.
    user_addr: u64,
    region: Arc<GuestRegionMmap<()>>,
}

impl Mapped {
    fn host_region(&self) -> MemoryRegion {
        MemoryRegion { addr: self.region.as_ptr() as u64, len: self.size }
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
    /// Regions overlap or are empty.
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
        let mut mapped = Vec::with_capacity(regions.len());
        for (r, file) in regions.iter().zip(files) {
            mapped.push(map(r, file)?);
        }
        self.unregister_all();
        self.regions = mapped;
        self.publish()
    }

    /// Adds one region (ADD_MEM_REGION).
    pub fn add(&mut self, region: &VhostUserMemoryRegion, file: File) -> Result<(), MemoryError> {
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
        self.publish()?;
        if let Err(e) = self.device.unregister_memory(m.host_region()) {
            tracing::warn!("unregistering guest memory at {:#x}: {e}", m.guest_phys_addr);
        }
        Ok(())
    }

    /// Drops every region (the front end went away).
    pub fn clear(&mut self) {
        self.unregister_all();
        self.regions.clear();
        self.atomic.lock().expect("memory lock").replace(GuestMem::default());
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

    fn unregister_all(&self) {
        for m in &self.regions {
            if let Err(e) = self.device.unregister_memory(m.host_region()) {
                tracing::warn!("unregistering guest memory at {:#x}: {e}", m.guest_phys_addr);
            }
        }
    }

    fn publish(&mut self) -> Result<(), MemoryError> {
        // vm-memory wants regions sorted by guest address; front ends add them in any order.
        self.regions.sort_by_key(|m| m.guest_phys_addr);
        let mem = GuestMem::from_arc_regions(self.regions.iter().map(|m| Arc::clone(&m.region)).collect())
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        for m in &self.regions {
            // Registering twice is harmless for DMA devices (they look the range up first).
            self.device.register_memory(m.host_region()).map_err(|e| MemoryError::Map {
                gpa: m.guest_phys_addr,
                size: m.size,
                reason: format!("the device refused it: {e}"),
            })?;
        }
        self.atomic.lock().expect("memory lock").replace(mem);
        Ok(())
    }
}

impl Drop for MemoryTable {
    fn drop(&mut self) {
        self.unregister_all();
    }
}

fn map(r: &VhostUserMemoryRegion, file: File) -> Result<Mapped, MemoryError> {
    let err = |reason: String| MemoryError::Map { gpa: r.guest_phys_addr, size: r.memory_size, reason };
    if r.memory_size == 0 {
        return Err(err("empty region".into()));
    }
    let mmap = r.mmap_region::<()>(file).map_err(|e| err(e.to_string()))?;
    let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_phys_addr))
        .ok_or_else(|| err("region wraps around the address space".into()))?;
    Ok(Mapped {
        guest_phys_addr: r.guest_phys_addr,
        size: r.memory_size,
        user_addr: r.user_addr,
        region: Arc::new(region),
    })
}
