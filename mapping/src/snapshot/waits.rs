//! Writes held until the exceptions they depend on are durable.
//!
//! An origin write waits, per snapshot that needed a copy, for the exception to commit,
//! then for snapshot reads still reading that chunk from the origin to finish (they
//! must see the old data). A snapshot write waits for its chunk's exception to commit.
//! Nothing here blocks: target queues poll their held writes.

use std::sync::Arc;

use crate::snapshot::shared::{Pending, PendingState, SnapshotShared, INVALID_DURABLE};

/// One condition a held write waits for.
pub enum Wait {
    /// An exception being copied and committed.
    Pending(Arc<SnapshotShared>, Arc<Pending>),
    /// Snapshot reads of origin chunk `.1` in flight against the origin.
    Reads(Arc<SnapshotShared>, u64),
    /// The snapshot's invalidation being written to its COW.
    Invalidation(Arc<SnapshotShared>),
}

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Still waiting.
    Waiting,
    /// Satisfied.
    Ready,
    /// The exception was lost (the snapshot is invalid now).
    Lost,
}

impl Wait {
    /// Re-checks the condition. `then_reads`: after a commit, also wait for snapshot
    /// reads of the chunk (origin writes do; snapshot writes go to the COW instead).
    pub fn poll(&mut self, then_reads: bool) -> Outcome {
        match self {
            Wait::Pending(snap, p) => match p.state() {
                PendingState::Copying => Outcome::Waiting,
                PendingState::Failed => Outcome::Lost,
                PendingState::Committed if then_reads => {
                    let chunk = p.exception.old_chunk;
                    *self = Wait::Reads(Arc::clone(snap), chunk);
                    self.poll(then_reads)
                }
                PendingState::Committed => Outcome::Ready,
            },
            Wait::Reads(snap, chunk) => {
                if snap.origin_reads.busy(*chunk) {
                    Outcome::Waiting
                } else {
                    Outcome::Ready
                }
            }
            Wait::Invalidation(snap) => {
                if snap.flags() & INVALID_DURABLE != 0 {
                    Outcome::Lost
                } else {
                    Outcome::Waiting
                }
            }
        }
    }
}

/// Polls every wait of one held write: `Ready` when all are satisfied, `Lost` when all
/// are settled and one was lost, else `Waiting`. Settled waits are removed.
pub fn poll_all(waits: &mut Vec<Wait>, then_reads: bool, lost: &mut bool) -> Outcome {
    waits.retain_mut(|w| match w.poll(then_reads) {
        Outcome::Waiting => true,
        Outcome::Ready => false,
        Outcome::Lost => {
            *lost = true;
            false
        }
    });
    if !waits.is_empty() {
        Outcome::Waiting
    } else if *lost {
        Outcome::Lost
    } else {
        Outcome::Ready
    }
}
