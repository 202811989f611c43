//! Counts of I/O in flight per chunk (hashed into buckets), so that one side can wait
//! for the other to drain without a lock:
//!
//! * snapshot reads served from the origin, which an origin write may overwrite only
//!   once they have finished (the kernel's `track_chunk`);
//! * writes through a merging origin to COW chunks, which the merge may copy back only
//!   once they have finished.
//!
//! Both are Dekker handshakes with a [`crate::snapshot::chunk_bitmap::ChunkBitmap`] bit
//! or a merge range: the I/O side enters, then checks; the other side changes the state,
//! then waits for the count. All accesses are `SeqCst`.

use std::sync::atomic::{AtomicU32, Ordering};

const BUCKETS: usize = 1024;

/// In-flight counts by chunk bucket. A bucket shared by two chunks only makes a waiter
/// wait a little longer, never less.
pub struct ChunkTracker {
    buckets: Box<[AtomicU32]>,
}

impl Default for ChunkTracker {
    fn default() -> Self {
        ChunkTracker { buckets: (0..BUCKETS).map(|_| AtomicU32::new(0)).collect() }
    }
}

impl ChunkTracker {
    #[inline]
    fn bucket(&self, chunk: u64) -> &AtomicU32 {
        &self.buckets[(chunk.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 54) as usize % BUCKETS]
    }

    /// An I/O on `chunk` starts.
    #[inline]
    pub fn enter(&self, chunk: u64) {
        self.bucket(chunk).fetch_add(1, Ordering::SeqCst);
    }

    /// An I/O on `chunk` finished.
    #[inline]
    pub fn leave(&self, chunk: u64) {
        self.bucket(chunk).fetch_sub(1, Ordering::SeqCst);
    }

    /// Whether any I/O on `chunk` (or a chunk sharing its bucket) is in flight.
    #[inline]
    pub fn busy(&self, chunk: u64) -> bool {
        self.bucket(chunk).load(Ordering::SeqCst) != 0
    }
}
