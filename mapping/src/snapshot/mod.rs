//! The machinery the snapshot targets share (spec/device-mapper.md §3, §5):
//!
//! ```text
//!  snapshot-origin <real>          snapshot <real> <cow> P 8        snapshot-merge ...
//!        │ writes                        │ reads/writes                  │
//!        ▼                               ▼                               ▼
//!  Origins (registry extension) ──► SnapshotShared (per snapshot: store, exception
//!   real device -> snapshots         table, pending copies, flags)
//!        │                               ▲
//!        └──── per-thread Engine ────────┘  copies chunks, carries metadata I/O
//! ```
//!
//! * [`origins`]: origin device -> its snapshots.
//! * [`shared`]: one snapshot's state, shared by every thread.
//! * [`engine`]: a thread's copy engine (bounce buffers, its own queues).
//! * [`chunk_bitmap`], [`tracker`]: lock-free fast paths and drain handshakes.
//! * [`merge`]: the background merge of `snapshot-merge`.
//! * [`waits`]: writes held until the exceptions they need are durable.

pub mod chunk_bitmap;
pub mod engine;
pub mod merge;
pub mod origins;
pub mod shared;
pub mod tokens;
pub mod tracker;
pub mod waits;
