//! How an origin finds its snapshots: a registry extension keyed by the real origin
//! device (the `-real` device every snapshot and the snapshot-origin name). Snapshots
//! register when constructed and leave when their table is destroyed; origin queues
//! read the list without a lock (one atomic load) and notice changes by its generation.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::snapshot::shared::{SnapshotShared, MERGING};
use crate::target::DeviceId;

/// The snapshots of one origin.
#[derive(Default)]
pub struct OriginEntry {
    snapshots: ArcSwap<Vec<Arc<SnapshotShared>>>,
    generation: AtomicU64,
}

impl OriginEntry {
    /// The current list (registered snapshots, active or not, merging included).
    #[inline]
    pub fn snapshots(&self) -> Arc<Vec<Arc<SnapshotShared>>> {
        self.snapshots.load_full()
    }

    /// Bumped on every change of the list.
    #[inline]
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The smallest chunk among the snapshots (origin writes are split at it), as the
    /// kernel's `get_origin_minimum_chunksize`; `None` without snapshots.
    pub fn min_chunk(&self) -> Option<NonZeroU64> {
        self.snapshots.load().iter().map(|s| s.chunk_sectors).min().and_then(NonZeroU64::new)
    }

    /// The snapshot being merged into this origin, if any.
    pub fn merging(&self) -> Option<Arc<SnapshotShared>> {
        self.snapshots.load().iter().find(|s| s.flags() & MERGING != 0).cloned()
    }
}

/// Every origin with snapshots, in one registry. Obtained with
/// [`crate::target::ConstructCtx::extension`].
#[derive(Default)]
pub struct Origins {
    by_device: Mutex<HashMap<DeviceId, Arc<OriginEntry>>>,
    next_id: AtomicU64,
}

impl Origins {
    /// The entry of origin device `id` (made on first use).
    pub fn entry(&self, id: DeviceId) -> Arc<OriginEntry> {
        let mut map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        Arc::clone(map.entry(id).or_default())
    }

    /// A number no other snapshot of this registry has.
    pub fn new_snapshot_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// The registered snapshot whose COW is device `cow`, if any (one COW serves one
    /// snapshot at a time).
    pub fn by_cow(&self, cow: DeviceId) -> Option<Arc<SnapshotShared>> {
        let map = self.by_device.lock().unwrap_or_else(|e| e.into_inner());
        map.values().flat_map(|e| e.snapshots().iter().cloned().collect::<Vec<_>>()).find(|s| s.cow.id() == cow)
    }

    /// A table starts using `snap`: the first one puts it on its origin's list.
    pub fn attach(&self, snap: &Arc<SnapshotShared>) {
        if snap.acquire() == 1 {
            self.register(snap);
        }
    }

    /// A table stops using `snap`: the last one takes it off the list.
    pub fn detach(&self, snap: &Arc<SnapshotShared>) {
        if snap.release() == 0 {
            snap.clear_flags(crate::snapshot::shared::ACTIVE);
            self.unregister(snap);
        }
    }

    /// Adds `snap` to its origin's list.
    fn register(&self, snap: &Arc<SnapshotShared>) {
        let entry = self.entry(snap.origin.id());
        let mut list = (*entry.snapshots()).clone();
        list.push(Arc::clone(snap));
        entry.snapshots.store(Arc::new(list));
        entry.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Removes `snap` from its origin's list.
    fn unregister(&self, snap: &Arc<SnapshotShared>) {
        let entry = self.entry(snap.origin.id());
        let mut list = (*entry.snapshots()).clone();
        list.retain(|s| !Arc::ptr_eq(s, snap));
        entry.snapshots.store(Arc::new(list));
        entry.generation.fetch_add(1, Ordering::AcqRel);
    }
}
