//! Tokens for a target queue's own submissions: a slab mapping each 32-bit token to
//! what the completion must do.

/// A slab of `T` addressed by `u32` tokens. Grows on demand (bounded by the queue
/// depth in practice) and reuses freed slots.
pub struct Tokens<T> {
    slots: Vec<Option<T>>,
    free: Vec<u32>,
}

impl<T> Default for Tokens<T> {
    fn default() -> Self {
        Tokens { slots: Vec::new(), free: Vec::new() }
    }
}

impl<T> Tokens<T> {
    /// Room for `n` entries before growing.
    pub fn with_capacity(n: usize) -> Self {
        Tokens { slots: Vec::with_capacity(n), free: Vec::with_capacity(n) }
    }

    /// Stores `v` and returns its token.
    pub fn insert(&mut self, v: T) -> u32 {
        match self.free.pop() {
            Some(t) => {
                self.slots[t as usize] = Some(v);
                t
            }
            None => {
                self.slots.push(Some(v));
                (self.slots.len() - 1) as u32
            }
        }
    }

    /// Takes the entry of `token` back.
    pub fn remove(&mut self, token: u32) -> Option<T> {
        let v = self.slots.get_mut(token as usize)?.take();
        if v.is_some() {
            self.free.push(token);
        }
        v
    }

    /// Whether no entry is stored.
    pub fn is_empty(&self) -> bool {
        self.free.len() == self.slots.len()
    }
}
