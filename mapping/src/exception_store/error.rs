//! Why an exception store could not be activated or used.

use udm_drivers::IoError;

/// Errors of the exception stores. A COW that fails a check is left exactly as it was:
/// udm never overwrites a store it does not understand.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The chunk size breaks the kernel's rules.
    #[error("chunk size {chunk_sectors} sectors is invalid: {reason}")]
    BadChunkSize {
        /// The chunk size given (table or header).
        chunk_sectors: u64,
        /// Which rule it breaks.
        reason: &'static str,
    },
    /// A read or write of the COW device failed.
    #[error("I/O error on the COW device while {during}: {source}")]
    Io {
        /// What the store was doing.
        during: &'static str,
        /// The device's error.
        source: IoError,
    },
    /// An on-disk exception breaks the format (duplicate, out of range, pointing at the
    /// header or a metadata area).
    #[error(
        "corrupt COW store: area {area} entry {index} ({old_chunk} -> {new_chunk}) {reason}; the store was left \
         untouched: restore it or create a new snapshot"
    )]
    BadEntry {
        /// Metadata area number.
        area: u64,
        /// Entry index inside the area.
        index: usize,
        /// The entry's origin chunk.
        old_chunk: u64,
        /// The entry's COW chunk.
        new_chunk: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Chunk 0 does not start with `SnAp` (and is not zero, which would mean "new").
    #[error(
        "invalid or corrupt snapshot: COW header magic is {found:#010x}, expected 0x70416e53 (`SnAp`); the store was \
         left untouched (zero its first chunk to start a new snapshot on it)"
    )]
    BadMagic {
        /// The magic read.
        found: u32,
    },
    /// The header names an on-disk version other than 1.
    #[error("unable to handle snapshot disk version {found} (only version 1 exists); the store was left untouched")]
    BadVersion {
        /// The version read.
        found: u32,
    },
    /// The COW device is too small to hold even the header and the first area.
    #[error("COW device of {cow_sectors} sectors is too small for chunk size {chunk_sectors}: it needs at least {needed} sectors")]
    CowTooSmall {
        /// COW size.
        cow_sectors: u64,
        /// Chunk size.
        chunk_sectors: u64,
        /// The minimum size.
        needed: u64,
    },
    /// The last area read is full but the next one would lie past the COW's end.
    #[error("COW store is truncated: metadata area {area} (chunk {chunk}) lies beyond the {cow_sectors}-sector COW device; was the COW shrunk?")]
    Truncated {
        /// The missing area.
        area: u64,
        /// Its chunk number.
        chunk: u64,
        /// COW size.
        cow_sectors: u64,
    },
    /// The operation does not exist for this kind of store (merging a transient one).
    #[error("{0}")]
    Unsupported(&'static str),
}
