//! # NVMe over VFIO: a polled userspace driver
//!
//! ```text
//!  NvmeNamespace (BlockDevice, `nvme:0000:00:04.0/1`)
//!      │ open_queue() ─► NvmeQueue: one I/O SQ/CQ pair per thread, polled, no locks
//!      ▼
//!  Controller: bring-up, admin queue (mutex, control path only), reset, shutdown
//!      │
//!  VfioPci (BAR0 registers, bus master, no interrupts) ── DmaSpace (VFIO container:
//!                                                          IOVA allocator, translations)
//! ```
//!
//! * Memory: queues and bounce buffers live in hugepages mapped once per queue; memory
//!   registered from above ([`crate::BlockDevice::register_memory`]) is mapped once and
//!   translated per request without locks, so data moves straight between the device
//!   and the caller's (or a VM's) buffers. IOVAs come from the ranges the IOMMU reports.
//! * Commands: Read and Write split at MDTS and wherever PRPs cannot express the
//!   scatter-gather layout ([`prp`]); layouts that would need a cut inside a block, and
//!   unregistered memory, go through bounce buffers. Flush, Write Zeroes and Dataset
//!   Management (deallocate) for the other operations.
//! * Polling: `poll` never blocks; one SQ doorbell per `kick` and one CQ doorbell per
//!   poll that reaped something, no MMIO read and no clock read per command. `wait`
//!   naps for part of the outstanding commands' service time, then the caller polls
//!   ([`hybrid_poll`]): for owners that would rather not hold a CPU spinning.
//! * Failures: each status becomes `IoError::Nvme { sct, sc }` (names in [`status`]);
//!   the controller is the judge of LBA ranges. A command that outlives the timeout is
//!   aborted, and if the abort does not bring it back the controller is reset; queues
//!   then recreate themselves and resubmit what they had outstanding (the timed-out
//!   command fails with `TimedOut`). CSTS.CFS also triggers a reset. Dropping the last
//!   handle shuts the controller down (CC.SHN).
//! * Controllers are shared per process ([`open_controller`]): a VFIO group can be open
//!   only once, and every namespace of a controller uses the same one.

pub mod cmd;
pub mod controller;
pub mod dma_space;
pub mod hybrid_poll;
pub mod identify;
pub mod io_queue;
pub mod iova;
pub mod namespace;
pub mod prp;
pub mod regs;
pub mod ring;
pub mod status;
pub mod vfio;

use std::sync::{Arc, Mutex, Weak};

pub use controller::{Controller, ControllerOptions};
pub use dma_space::DmaSpace;
pub use io_queue::NvmeQueue;
pub use namespace::NvmeNamespace;

use crate::error::DeviceError;

/// Controllers open in this process, by PCI address, and the DMA space they share.
/// A VFIO group can be opened only once at a time, so two namespaces of one controller
/// (or two specs naming it) must share the controller rather than open it twice. Weak
/// references: the last user's drop still shuts the controller down.
struct OpenControllers {
    space: Weak<DmaSpace>,
    controllers: Vec<(String, Weak<Controller>)>,
}

static OPEN: Mutex<OpenControllers> = Mutex::new(OpenControllers { space: Weak::new(), controllers: Vec::new() });

/// The controller at `bdf`, opened with `options` unless this process has it open
/// already (then the existing one, whatever its options).
pub fn open_controller(bdf: &str, options: ControllerOptions) -> Result<Arc<Controller>, DeviceError> {
    let bdf = vfio::normalize_bdf(bdf)?;
    let mut open = OPEN.lock().expect("controller registry lock");
    open.controllers.retain(|(_, c)| c.strong_count() > 0);
    if let Some(c) = open.controllers.iter().find(|(b, _)| *b == bdf).and_then(|(_, c)| c.upgrade()) {
        return Ok(c);
    }
    let space = match open.space.upgrade() {
        Some(s) => s,
        None => {
            let s = DmaSpace::new()?;
            open.space = Arc::downgrade(&s);
            s
        }
    };
    let ctrl = Controller::open(&space, &bdf, options)?;
    open.controllers.push((bdf, Arc::downgrade(&ctrl)));
    Ok(ctrl)
}

/// Namespace `nsid` of the controller at `bdf`.
pub fn open_namespace(bdf: &str, nsid: u32, options: ControllerOptions) -> Result<NvmeNamespace, DeviceError> {
    NvmeNamespace::new(&open_controller(bdf, options)?, nsid)
}

/// NVMe controllers (PCI class 01:08:02) on this machine: (address, bound driver).
pub fn list_controllers() -> Vec<(String, Option<String>)> {
    let mut out: Vec<(String, Option<String>)> = std::fs::read_dir(vfio::SYSFS_PCI)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|bdf| {
                    std::fs::read_to_string(format!("{}/{bdf}/class", vfio::SYSFS_PCI))
                        .map(|c| c.trim() == "0x010802")
                        .unwrap_or(false)
                })
                .map(|bdf| {
                    let driver = vfio::bound_driver(&bdf);
                    (bdf, driver)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}
