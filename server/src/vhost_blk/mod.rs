//! vhost-user-blk exports of any [`udm_drivers::BlockDevice`].
//!
//! ```text
//!  front end (QEMU, libblkio)
//!     │ unix socket: vhost-user messages ──► export (listener) ─► handler (protocol state)
//!     │ shared guest memory, kick/call eventfds                     │ starts/stops
//!     ▼                                                             ▼
//!  virtqueue 0..N ◄──────────── worker thread per queue: parse chain (request) ─► IoQueue
//!                                 used ring + inflight region ◄── completions (poll)
//! ```
//!
//! * `config_space`, `features`: what the device looks like to the driver.
//! * `request`: descriptor chain -> request, robust against any chain a guest builds.
//! * `worker`: the data path (event or busy-poll mode), zero copy into guest memory.
//! * `inflight`, `chain`: reconnect without losing or repeating requests.
//! * `handler`, `guest_memory`, `backend_channel`, `export`: the protocol and the socket.

pub mod backend_channel;
pub mod chain;
pub mod config_space;
pub mod export;
pub mod features;
pub mod guest_access;
pub mod guest_memory;
pub mod handler;
pub mod idle;
pub mod inflight;
pub mod log_limit;
pub mod request;
pub mod stats;
pub mod truncation_guard;
pub mod worker;

pub use export::{Export, ExportConfig, ExportError, ExportInfo};
pub use worker::PollMode;
