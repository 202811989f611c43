//! # udm-drivers: the bottom of the udm stack
//!
//! ```text
//!  mapping / server / bench
//!        │  BlockDevice::open_queue() ─► IoQueue (one per thread)
//!        ▼        submit(IoRequest) … kick() … poll(&mut [Completion])
//!  ┌──────────┬──────────┬──────────────┬─────────────────┐
//!  │  null    │  mem     │ file         │ nvme            │
//!  │ (zeroes) │ (RAM)    │ (io_uring)   │ (VFIO, polled)  │
//!  └──────────┴──────────┴──────────────┴─────────────────┘
//! ```
//!
//! * [`BlockDevice`] is shared by all threads; each thread opens its own [`IoQueue`] and
//!   is the only one to touch it, so the data path needs no locks.
//! * An [`IoRequest`] carries an [`SgList`], a window over segments the submitter owns;
//!   nothing is allocated or copied per request.
//! * Completions come only out of [`IoQueue::poll`], never from inside `submit`.
//! * Sectors are always 512 bytes; backends enforce their own logical block size.
//! * [`backends::fault::FaultDevice`] wraps any device to fail, tear, drop or corrupt
//!   I/O on command, or to give it a volatile write cache that loses, tears and reorders
//!   unflushed writes at a power cut, for crash and verification tests.
//! * [`backend_spec::open_backend`] opens a device from text: `null:1G`, `mem:1G`,
//!   `file:/path[,ro][,direct=off][,bs=N]`, `fault:<faults>@<spec>`.

pub mod backend_spec;
pub mod backends;
pub mod completion_ring;
pub mod device;
pub mod dma;
pub mod error;
pub mod fixed_ring;
pub mod nvme;
pub mod request;
pub mod sg;
pub mod units;
pub mod validate;

pub use device::{BlockDevice, DeviceInfo, IoQueue, MemoryRegion};
pub use error::{DeviceError, IoError};
pub use request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
pub use sg::{IoSegment, SgList, SgTooLarge};
