//! # udm-mapping: a userspace device-mapper
//!
//! ```text
//!  Registry (control plane, one mutex)            data path (per thread, no locks)
//!  ─────────────────────────────────              ───────────────────────────────
//!  register_backend("disk0", Arc<dyn BlockDevice>)
//!  create("vol", None, Some("0 2048 linear disk0 0"))
//!     └─ table text ─► targets (linear, striped,   MappedDevice::open_queue()
//!        zero, error, ...) ─► Table ──(ArcSwap)──►  MappedQueue: lookup (binary search)
//!  load / suspend / resume / clear / remove          split at segment and chunk bounds
//!  info / table / status / ls / deps                 TargetQueue::map ─► child IoQueues
//! ```
//!
//! * [`table_text`]: the dmsetup table format (parse and print).
//! * [`target`]: the target API (constructors, per-thread queues, hooks).
//! * [`targets`]: `linear`, `striped`, `zero`, `error`, `snapshot-origin`, `snapshot`,
//!   `snapshot-merge`.
//! * [`exception_store`], [`snapshot`]: the COW stores (Linux's on-disk format) and the
//!   machinery the snapshot targets share.
//! * [`registry`]: names, lifecycle and reports.
//! * [`MappedDevice`]: a mapped device is a [`udm_drivers::BlockDevice`], so mapped
//!   devices stack and export like backends.

pub mod bounce;
pub mod error;
pub mod exception_store;
pub mod io_buf;
pub mod mapped;
pub mod registry;
mod segment_index;
pub mod snapshot;
pub mod snapshot_ops;
pub mod sync_io;
pub mod table;
pub mod table_text;
pub mod target;
pub mod targets;

pub use error::{MappingError, TableError, TargetError};
pub use mapped::MappedDevice;
pub use registry::{DeviceKind, DeviceReport, DeviceState, OpenDevice, Registry, SuspendFlags, TableSlot};
pub use table::Table;

#[cfg(test)]
pub(crate) mod test_fixtures;
