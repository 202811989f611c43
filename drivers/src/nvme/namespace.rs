//! An NVMe namespace as a udm [`BlockDevice`]: `nvme:0000:00:04.0/1`.

use std::sync::Arc;

use crate::device::{BlockDevice, DeviceInfo, IoQueue, MemoryRegion};
use crate::error::DeviceError;
use crate::nvme::controller::Controller;
use crate::nvme::identify::{NamespaceIdentity, ONCS_DSM, ONCS_WRITE_ZEROES};
use crate::nvme::io_queue::NvmeQueue;
use crate::request::SECTOR_SIZE;

/// One active namespace of a controller.
#[derive(Debug)]
pub struct NvmeNamespace {
    ctrl: Arc<Controller>,
    nsid: u32,
    identity: NamespaceIdentity,
    info: DeviceInfo,
}

impl NvmeNamespace {
    /// Namespace `nsid` of `ctrl`.
    pub fn new(ctrl: &Arc<Controller>, nsid: u32) -> Result<Self, DeviceError> {
        let Some((_, identity)) = ctrl.namespaces().iter().find(|(n, _)| *n == nsid).cloned() else {
            let active: Vec<String> = ctrl.namespaces().iter().map(|(n, _)| n.to_string()).collect();
            return Err(DeviceError::Config(format!(
                "NVMe controller {} has no active namespace {nsid}; active: {}",
                ctrl.bdf(),
                if active.is_empty() { "none".to_string() } else { active.join(", ") }
            )));
        };
        if !matches!(identity.block_size, 512 | 1024 | 2048 | 4096) || identity.metadata_size != 0 {
            return Err(DeviceError::Config(format!(
                "namespace {nsid} of {} is formatted with {}-byte blocks and {} metadata bytes; \
                 udm needs 512..4096-byte blocks without metadata (reformat it with `nvme format`)",
                ctrl.bdf(),
                identity.block_size,
                identity.metadata_size
            )));
        }
        let id = ctrl.identity();
        let bs = identity.block_size;
        let mut info = DeviceInfo::new(identity.size_blocks * u64::from(bs) / SECTOR_SIZE, bs);
        info.max_transfer = ctrl.max_transfer() as u32;
        info.read_only = identity.write_protected;
        info.volatile_cache = id.volatile_write_cache;
        info.supports_discard = id.oncs & ONCS_DSM != 0;
        info.supports_write_zeroes = id.oncs & ONCS_WRITE_ZEROES != 0;
        info.max_discard_sectors = u64::from(u32::MAX) * u64::from(bs) / SECTOR_SIZE;
        Ok(NvmeNamespace { ctrl: Arc::clone(ctrl), nsid, identity, info })
    }

    /// The controller.
    pub fn controller(&self) -> &Arc<Controller> {
        &self.ctrl
    }

    /// The namespace identifier.
    pub fn nsid(&self) -> u32 {
        self.nsid
    }

    /// What Identify Namespace said.
    pub fn identity(&self) -> &NamespaceIdentity {
        &self.identity
    }

    /// Opens a queue pair of this namespace (the concrete type, for callers that want
    /// static dispatch).
    pub fn open_nvme_queue(&self, depth: usize) -> Result<NvmeQueue, DeviceError> {
        NvmeQueue::open(&self.ctrl, self.nsid, self.info.clone(), depth)
    }
}

impl BlockDevice for NvmeNamespace {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(self.open_nvme_queue(depth)?))
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.ctrl.map(region).map(|_| ())
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.ctrl.dma_space().unmap(region)
    }
}
