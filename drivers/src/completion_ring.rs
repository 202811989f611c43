//! A fixed-capacity FIFO of completions, for backends that finish work inside `submit`
//! or `kick` but must hand results out only from `poll`.

use crate::request::Completion;

/// Preallocated at queue open; never grows.
pub struct CompletionRing {
    slots: Box<[Completion]>,
    head: usize,
    len: usize,
}

impl CompletionRing {
    /// Room for `capacity` completions.
    pub fn new(capacity: usize) -> Self {
        CompletionRing { slots: vec![Completion::EMPTY; capacity.max(1)].into_boxed_slice(), head: 0, len: 0 }
    }

    /// Whether another completion fits.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == self.slots.len()
    }

    /// Completions waiting.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none are waiting.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Appends one; the caller checked `is_full` first.
    #[inline]
    pub fn push(&mut self, c: Completion) {
        debug_assert!(!self.is_full());
        let mut idx = self.head + self.len;
        if idx >= self.slots.len() {
            idx -= self.slots.len();
        }
        self.slots[idx] = c;
        self.len += 1;
    }

    /// Moves as many as fit into `out`, oldest first.
    #[inline]
    pub fn drain_into(&mut self, out: &mut [Completion]) -> usize {
        let n = self.len.min(out.len());
        for slot in out.iter_mut().take(n) {
            *slot = self.slots[self.head];
            self.head += 1;
            if self.head == self.slots.len() {
                self.head = 0;
            }
        }
        self.len -= n;
        n
    }
}
