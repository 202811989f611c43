//! Exception stores: where a snapshot keeps its `origin chunk -> COW chunk` table.
//!
//! The shape mirrors Linux's `dm-exception-store.h`: `prepare` allocates a COW chunk for
//! an origin chunk, `commit` records that the chunk's data is on the COW, and the store
//! makes it durable (batched) before reporting it committed; `invalidate` drops the
//! snapshot; `prepare_merge`/`commit_merge` walk the table backwards for
//! `snapshot-merge`; `usage` feeds the status line.
//!
//! The stores do no I/O themselves ("sans I/O"): [`ExceptionStore::next_io`] hands the
//! caller the next metadata request for the COW device, and the caller reports its
//! completion with [`ExceptionStore::io_done`]. So the polled data path drives commits on
//! its own queues, while activation uses the synchronous helper in [`sync_io`].
//! Outcomes come back as [`StoreEvent`]s.

pub mod dump;
pub mod error;
pub mod format;
pub mod persistent;
pub mod probe;
pub mod sync_io;
pub mod transient;

#[cfg(test)]
mod commit_tests;
#[cfg(test)]
mod fixture_tests;

use udm_drivers::{IoError, IoRequest};

pub use error::StoreError;
pub use persistent::PersistentStore;
pub use transient::TransientStore;

/// One exception: origin chunk `old_chunk` is kept at COW chunk `new_chunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Exception {
    /// Chunk number on the origin.
    pub old_chunk: u64,
    /// Chunk number on the COW device (absolute; chunk 0 is the header when persistent).
    pub new_chunk: u64,
}

/// The third argument of a `snapshot` table line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Persistence {
    /// `P`: on-disk metadata; a full COW invalidates the snapshot.
    Persistent,
    /// `PO`: as `P`, but a snapshot write that finds the COW full only marks the
    /// snapshot overflowed (reads keep working).
    PersistentOverflow,
    /// `N`: metadata in memory only.
    Transient,
}

impl Persistence {
    /// Parses `P`, `PO` or `N` (any case), as the kernel does.
    pub fn parse(text: &str) -> Option<Self> {
        match text.to_ascii_uppercase().as_str() {
            "P" => Some(Persistence::Persistent),
            "PO" => Some(Persistence::PersistentOverflow),
            "N" => Some(Persistence::Transient),
            _ => None,
        }
    }

    /// The letters `dmsetup table` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Persistence::Persistent => "P",
            Persistence::PersistentOverflow => "PO",
            Persistence::Transient => "N",
        }
    }

    /// Whether the store is on disk.
    pub fn is_persistent(self) -> bool {
        self != Persistence::Transient
    }
}

/// What the status line reports, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Usage {
    /// Sectors handed out (data and metadata).
    pub sectors_allocated: u64,
    /// The COW device's size.
    pub total_sectors: u64,
    /// Sectors holding the header and metadata areas (0 for a transient store).
    pub metadata_sectors: u64,
}

impl Usage {
    /// `<allocated>/<total> <metadata>`, the kernel's status text.
    pub fn status(&self) -> String {
        format!("{}/{} {}", self.sectors_allocated, self.total_sectors, self.metadata_sectors)
    }

    /// Per-mille of the COW used, as lvs' Data% (times 10) computes it.
    pub fn permille(&self) -> u64 {
        (self.sectors_allocated * 1000).checked_div(self.total_sectors).unwrap_or(0)
    }
}

/// `prepare` found no room on the COW.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PrepareError {
    /// Every chunk is allocated.
    #[error("the COW store is full")]
    Full,
    /// The store was invalidated and takes no more exceptions.
    #[error("the snapshot is invalid")]
    Invalid,
}

/// A run of exceptions to merge back into the origin in one copy: COW chunks
/// `new_chunk .. new_chunk+count` go to origin chunks `old_chunk .. old_chunk+count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeBatch {
    /// First origin chunk.
    pub old_chunk: u64,
    /// First COW chunk.
    pub new_chunk: u64,
    /// Chunks in the run.
    pub count: u64,
}

/// Something the store finished, reported by [`ExceptionStore::take_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreEvent {
    /// The exception is durable (`true`), or was lost because the store was invalidated
    /// (`false`; reported only once the invalidation itself is durable).
    Committed(Exception, bool),
    /// The store is invalid and the header says so on disk (or could not be written).
    Invalidated,
    /// A `commit_merge` finished: the merged entries are gone from disk (`Ok`) or the
    /// metadata write failed.
    MergeCommitted(Result<(), IoError>),
}

/// An exception store. Owned by one snapshot; callers serialise access.
pub trait ExceptionStore: Send {
    /// Chunk size in sectors (the header's, for an existing persistent store).
    fn chunk_sectors(&self) -> u64;

    /// Whether the store is usable (not invalidated).
    fn is_valid(&self) -> bool;

    /// Every exception the store holds, in commit order (the activation's table plus
    /// the exceptions committed since).
    fn exceptions(&self) -> &[Exception];

    /// Allocates a COW chunk for origin chunk `old_chunk`.
    fn prepare(&mut self, old_chunk: u64) -> Result<u64, PrepareError>;

    /// Reports that the data for a prepared exception has been written (`data_ok`) or
    /// failed. Any order; the store records them in allocation order.
    fn commit(&mut self, exception: Exception, data_ok: bool);

    /// Drops the snapshot: marks the store invalid (on disk too, for persistent stores).
    fn invalidate(&mut self);

    /// The next metadata request to submit to the COW device, if one is due. At most one
    /// is in flight at a time; the caller sets the tag and reports it via `io_done`.
    fn next_io(&mut self) -> Option<IoRequest>;

    /// The request from `next_io` finished.
    fn io_done(&mut self, result: Result<(), IoError>);

    /// Whether a metadata request is in flight or due.
    fn io_pending(&self) -> bool;

    /// Moves finished work into `out`.
    fn take_events(&mut self, out: &mut Vec<StoreEvent>);

    /// Numbers for the status line.
    fn usage(&self) -> Usage;

    /// The COW device changed size (an online extend); allocation uses the new size.
    fn set_cow_sectors(&mut self, sectors: u64);

    /// The next run to merge, walking backwards from the last exception; `None` when
    /// nothing is left.
    fn prepare_merge(&mut self) -> Result<Option<MergeBatch>, StoreError>;

    /// Removes the last `count` exceptions (the batch from `prepare_merge`, now copied
    /// to the origin) and makes that durable; completion is a
    /// [`StoreEvent::MergeCommitted`].
    fn commit_merge(&mut self, count: u64) -> Result<(), StoreError>;
}
