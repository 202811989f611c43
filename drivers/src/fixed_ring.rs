//! A fixed-capacity FIFO of `Copy` items, preallocated when a queue opens and never
//! grown: completions waiting for `poll`, requests held while a device is suspended,
//! slots waiting for room below.

/// Never grows; `push` on a full ring is a bug in the caller (callers bound the count by
/// the queue depth and check `is_full` where it is not bounded).
pub struct FixedRing<T: Copy> {
    items: Box<[T]>,
    head: usize,
    len: usize,
}

impl<T: Copy> FixedRing<T> {
    /// Room for `capacity` items (at least one); `fill` initialises the unused slots.
    pub fn new(capacity: usize, fill: T) -> Self {
        FixedRing { items: vec![fill; capacity.max(1)].into_boxed_slice(), head: 0, len: 0 }
    }

    /// Items waiting.
    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether none are waiting.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether another item fits.
    #[inline]
    pub fn is_full(&self) -> bool {
        self.len == self.items.len()
    }

    /// Capacity.
    pub fn capacity(&self) -> usize {
        self.items.len()
    }

    /// Appends one.
    #[inline]
    pub fn push(&mut self, item: T) {
        assert!(!self.is_full(), "FixedRing overflow: the queue depth bound was broken");
        let mut idx = self.head + self.len;
        if idx >= self.items.len() {
            idx -= self.items.len();
        }
        self.items[idx] = item;
        self.len += 1;
    }

    /// The oldest item.
    #[inline]
    pub fn front(&self) -> Option<T> {
        (self.len != 0).then(|| self.items[self.head])
    }

    /// Removes and returns the oldest item.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        let item = self.front()?;
        self.head += 1;
        if self.head == self.items.len() {
            self.head = 0;
        }
        self.len -= 1;
        Some(item)
    }

    /// Moves as many as fit into `out`, oldest first; returns how many.
    #[inline]
    pub fn drain_into(&mut self, out: &mut [T]) -> usize {
        let n = self.len.min(out.len());
        for slot in out.iter_mut().take(n) {
            *slot = self.items[self.head];
            self.head += 1;
            if self.head == self.items.len() {
                self.head = 0;
            }
        }
        self.len -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_across_wraparound() {
        let mut r = FixedRing::new(3, 0u32);
        for round in 0..5u32 {
            r.push(round);
            r.push(round + 100);
            assert_eq!(r.pop(), Some(round));
            assert_eq!(r.front(), Some(round + 100));
            assert_eq!(r.pop(), Some(round + 100));
            assert!(r.is_empty());
        }
        assert_eq!(r.pop(), None);
        for i in 0..3 {
            r.push(i);
        }
        assert!(r.is_full());
        let mut out = [0u32; 2];
        assert_eq!(r.drain_into(&mut out), 2);
        assert_eq!(out, [0, 1]);
        assert_eq!(r.pop(), Some(2));
    }
}
