//! One bit per origin chunk, set once the chunk has a completed exception: the lock-free
//! fast path of origin writes ("already copied, nothing to do") and snapshot reads.

use std::sync::atomic::{AtomicU64, Ordering};

/// A fixed-size atomic bitmap. Every access is `SeqCst`, because the bit takes part in
/// a Dekker handshake with [`crate::snapshot::tracker::ChunkTracker`].
pub struct ChunkBitmap {
    words: Box<[AtomicU64]>,
}

impl ChunkBitmap {
    /// `bits` bits, all clear.
    pub fn new(bits: u64) -> Self {
        let words = (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect();
        ChunkBitmap { words }
    }

    /// Whether bit `i` is set (false beyond the end).
    #[inline]
    pub fn get(&self, i: u64) -> bool {
        self.words.get((i / 64) as usize).is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (i % 64)) != 0)
    }

    /// Sets bit `i` (ignored beyond the end).
    #[inline]
    pub fn set(&self, i: u64) {
        if let Some(w) = self.words.get((i / 64) as usize) {
            w.fetch_or(1 << (i % 64), Ordering::SeqCst);
        }
    }

    /// Clears bit `i` (a merged exception).
    #[inline]
    pub fn clear(&self, i: u64) {
        if let Some(w) = self.words.get((i / 64) as usize) {
            w.fetch_and(!(1 << (i % 64)), Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_independent() {
        let b = ChunkBitmap::new(130);
        b.set(0);
        b.set(129);
        assert!(b.get(0) && b.get(129) && !b.get(1) && !b.get(128));
        b.clear(0);
        assert!(!b.get(0));
        assert!(!b.get(1000));
        b.set(1000);
    }
}
