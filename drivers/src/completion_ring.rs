//! Completions finished inside `submit` or `kick` but handed out only from `poll`.

use crate::fixed_ring::FixedRing;
use crate::request::Completion;

/// A [`FixedRing`] of completions.
pub type CompletionRing = FixedRing<Completion>;

/// A completion ring with room for `capacity` completions.
pub fn completion_ring(capacity: usize) -> CompletionRing {
    FixedRing::new(capacity, Completion::EMPTY)
}
