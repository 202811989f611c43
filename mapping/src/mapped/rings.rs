//! A fixed-capacity FIFO, preallocated at queue open, for held requests and for the
//! slots waiting for room in a device queue.

/// Never grows; `push` on a full ring is a bug in the caller (callers bound the count
/// by the queue depth).
pub(crate) struct FixedRing<T: Copy> {
    items: Box<[Option<T>]>,
    head: usize,
    len: usize,
}

impl<T: Copy> FixedRing<T> {
    pub fn new(capacity: usize) -> Self {
        FixedRing { items: vec![None; capacity.max(1)].into_boxed_slice(), head: 0, len: 0 }
    }

    #[inline]
    pub fn len(&self) -> usize {
        self.len
    }

    #[inline]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    #[inline]
    pub fn push(&mut self, item: T) {
        assert!(self.len < self.items.len(), "FixedRing overflow: the queue depth bound was broken");
        let mut idx = self.head + self.len;
        if idx >= self.items.len() {
            idx -= self.items.len();
        }
        self.items[idx] = Some(item);
        self.len += 1;
    }

    #[inline]
    pub fn front(&self) -> Option<T> {
        if self.len == 0 {
            None
        } else {
            self.items[self.head]
        }
    }

    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        let item = self.front()?;
        self.items[self.head] = None;
        self.head += 1;
        if self.head == self.items.len() {
            self.head = 0;
        }
        self.len -= 1;
        Some(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifo_order_across_wraparound() {
        let mut r = FixedRing::new(3);
        for round in 0..5u32 {
            r.push(round);
            r.push(round + 100);
            assert_eq!(r.pop(), Some(round));
            assert_eq!(r.front(), Some(round + 100));
            assert_eq!(r.pop(), Some(round + 100));
            assert!(r.is_empty());
        }
        assert_eq!(r.pop(), None);
    }
}
