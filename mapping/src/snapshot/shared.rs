//! The state of one snapshot that every thread shares: its exception store, the table of
//! completed exceptions, the exceptions being copied, and its flags.
//!
//! Exactly-once copy-out: the first writer (origin or snapshot, any thread) that finds
//! no exception for a chunk prepares one under the lock and becomes its copier; every
//! later writer finds the [`Pending`] and waits on it alone. The copier's thread runs the
//! copy and the metadata commit on its own queues; the store reports the exception
//! durable, and the state flips to [`PendingState::Committed`] for every waiter.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use udm_drivers::{IoError, IoRequest};

use crate::exception_store::{
    Exception, ExceptionStore, MergeBatch, Persistence, PrepareError, StoreError, StoreEvent, Usage,
};
use crate::snapshot::chunk_bitmap::ChunkBitmap;
use crate::snapshot::tracker::ChunkTracker;
use crate::target::{EventCounter, TargetDevice};

/// Invalid: all I/O to the snapshot fails; origin writes skip it.
pub const INVALID: u8 = 1;
/// The invalidation is on disk (or the store is transient): origin writes that needed a
/// copy for this snapshot may go ahead.
pub const INVALID_DURABLE: u8 = 2;
/// `PO` snapshot whose COW filled through a snapshot write: writes fail, reads work.
pub const OVERFLOW: u8 = 4;
/// A merge failed on an I/O error.
pub const MERGE_FAILED: u8 = 8;
/// Resumed: origin writes copy out to it.
pub const ACTIVE: u8 = 16;
/// Being merged: origin writes do not copy out to it; its own device fails I/O.
pub const MERGING: u8 = 32;

/// Where one exception being prepared stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PendingState {
    /// The data is being copied, or the metadata committed.
    Copying,
    /// Durable: the COW chunk holds the data and the metadata points at it.
    Committed,
    /// Lost: the snapshot was invalidated (and that is durable).
    Failed,
}

/// An exception being made, shared by its copier and every writer waiting for it.
#[derive(Debug)]
pub struct Pending {
    /// The exception.
    pub exception: Exception,
    state: AtomicU8,
}

impl Pending {
    /// Where it stands.
    #[inline]
    pub fn state(&self) -> PendingState {
        match self.state.load(Ordering::Acquire) {
            0 => PendingState::Copying,
            1 => PendingState::Committed,
            _ => PendingState::Failed,
        }
    }

    fn finish(&self, ok: bool) {
        self.state.store(if ok { 1 } else { 2 }, Ordering::Release);
    }
}

/// What a writer found for a chunk.
#[derive(Debug)]
pub enum Lookup {
    /// A completed exception: the data lives at this COW chunk.
    Complete(u64),
    /// Another writer is making the exception: wait for it.
    Pending(Arc<Pending>),
    /// This writer must copy (or write) the chunk's data, then call
    /// [`SnapshotShared::copy_done`].
    Prepared(Arc<Pending>),
    /// The snapshot is invalid (or was just invalidated by this lookup).
    Invalid,
    /// `PO` only: no room left; the snapshot is now overflowed.
    Overflow,
}

/// Completed exceptions by origin chunk, in shards so readers on different threads
/// rarely meet on a lock.
struct ExceptionTable {
    shards: Box<[Mutex<HashMap<u64, u64>>]>,
}

impl ExceptionTable {
    fn new() -> Self {
        ExceptionTable { shards: (0..64).map(|_| Mutex::new(HashMap::new())).collect() }
    }

    fn shard(&self, chunk: u64) -> MutexGuard<'_, HashMap<u64, u64>> {
        lock(&self.shards[(chunk % 64) as usize])
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serialised state: the store and the exceptions in the making.
pub struct Core {
    store: Box<dyn ExceptionStore>,
    pending: HashMap<u64, Arc<Pending>>,
    merge_results: Vec<Result<(), IoError>>,
}

/// COW usage levels at which a warning is logged, in per-mille.
const WARN_LEVELS: [u64; 2] = [800, 950];

/// One snapshot (or merging snapshot), shared by all threads and by the origin.
pub struct SnapshotShared {
    /// Registry-unique number (to tell snapshots apart in per-thread caches).
    pub id: u64,
    /// The device the table line belongs to (for log messages).
    pub name: String,
    /// The real origin.
    pub origin: TargetDevice,
    /// The COW device.
    pub cow: TargetDevice,
    /// `P`, `PO` or `N`.
    pub persistence: Persistence,
    /// Chunk size in sectors (the header's for an existing store).
    pub chunk_sectors: u64,
    /// log2 of `chunk_sectors`.
    pub chunk_shift: u32,
    /// The snapshot's length: origin writes at or beyond it do not copy out.
    pub length: u64,
    /// The origin's size when the snapshot was made (the last chunk is copied only up
    /// to it).
    pub origin_sectors: u64,
    /// Chunks with a completed exception.
    pub copied: ChunkBitmap,
    /// Snapshot reads in flight against the origin.
    pub origin_reads: ChunkTracker,
    /// Writes in flight to COW chunks (watched by a merge).
    pub cow_writes: ChunkTracker,
    table: ExceptionTable,
    core: Mutex<Core>,
    flags: AtomicU8,
    /// First and last (exclusive) origin chunk of the batch a merge is copying; writes
    /// there wait.
    merge_range: (AtomicU64, AtomicU64),
    warned: AtomicU8,
    events: EventCounter,
    /// Tables using this state: 2 while a new table that took it over (the kernel's
    /// handover) is staged beside the old one.
    owners: AtomicUsize,
}

/// The parameters of a new [`SnapshotShared`].
pub struct SnapshotParams {
    /// See [`SnapshotShared::id`].
    pub id: u64,
    /// See [`SnapshotShared::name`].
    pub name: String,
    /// See [`SnapshotShared::origin`].
    pub origin: TargetDevice,
    /// See [`SnapshotShared::cow`].
    pub cow: TargetDevice,
    /// See [`SnapshotShared::persistence`].
    pub persistence: Persistence,
    /// See [`SnapshotShared::length`].
    pub length: u64,
    /// The activated store.
    pub store: Box<dyn ExceptionStore>,
    /// The table event counter of the snapshot's device.
    pub events: EventCounter,
}

impl SnapshotShared {
    /// Builds the shared state around an activated store, loading its exceptions.
    pub fn new(p: SnapshotParams) -> Self {
        let chunk_sectors = p.store.chunk_sectors();
        let origin_sectors = p.origin.info().sectors;
        let copied = ChunkBitmap::new(origin_sectors.div_ceil(chunk_sectors));
        let table = ExceptionTable::new();
        for e in p.store.exceptions() {
            table.shard(e.old_chunk).insert(e.old_chunk, e.new_chunk);
            copied.set(e.old_chunk);
        }
        let flags = if p.store.is_valid() { 0 } else { INVALID | INVALID_DURABLE };
        SnapshotShared {
            id: p.id,
            name: p.name,
            origin: p.origin,
            cow: p.cow,
            persistence: p.persistence,
            chunk_sectors,
            chunk_shift: chunk_sectors.trailing_zeros(),
            length: p.length,
            origin_sectors,
            copied,
            origin_reads: ChunkTracker::default(),
            cow_writes: ChunkTracker::default(),
            table,
            core: Mutex::new(Core { store: p.store, pending: HashMap::new(), merge_results: Vec::new() }),
            flags: AtomicU8::new(flags),
            merge_range: (AtomicU64::new(0), AtomicU64::new(0)),
            warned: AtomicU8::new(0),
            events: p.events,
            owners: AtomicUsize::new(0),
        }
    }

    /// One more table uses this state; returns how many do now.
    pub fn acquire(&self) -> usize {
        self.owners.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// One table less; returns how many remain.
    pub fn release(&self) -> usize {
        self.owners.fetch_sub(1, Ordering::AcqRel) - 1
    }

    /// Tables using this state.
    pub fn owners(&self) -> usize {
        self.owners.load(Ordering::Acquire)
    }

    /// Whether no exception is being made and no metadata is being written (a merge
    /// starts only then).
    pub fn quiescent(&self) -> bool {
        let core = lock(&self.core);
        core.pending.is_empty() && !core.store.io_pending()
    }

    /// The flags word ([`INVALID`], [`OVERFLOW`], ...).
    #[inline]
    pub fn flags(&self) -> u8 {
        self.flags.load(Ordering::Acquire)
    }

    /// Sets flag bits.
    pub fn set_flags(&self, bits: u8) {
        self.flags.fetch_or(bits, Ordering::AcqRel);
    }

    /// Clears flag bits.
    pub fn clear_flags(&self, bits: u8) {
        self.flags.fetch_and(!bits, Ordering::AcqRel);
    }

    /// Whether origin writes must copy out to this snapshot.
    #[inline]
    pub fn takes_copies(&self) -> bool {
        self.flags() & (ACTIVE | INVALID | MERGING) == ACTIVE
    }

    /// The chunk holding sector `sector`.
    #[inline]
    pub fn chunk_of(&self, sector: u64) -> u64 {
        sector >> self.chunk_shift
    }

    /// Sectors a copy of `chunk` covers (the last chunk stops at the origin's end).
    pub fn copy_sectors(&self, chunk: u64) -> u64 {
        let start = chunk << self.chunk_shift;
        self.chunk_sectors.min(self.origin_sectors.saturating_sub(start))
    }

    /// The COW chunk of a completed exception for `chunk`.
    #[inline]
    pub fn lookup(&self, chunk: u64) -> Option<u64> {
        if !self.copied.get(chunk) {
            return None;
        }
        self.table.shard(chunk).get(&chunk).copied()
    }

    /// Finds or starts the exception for `chunk`. `snapshot_write`: the caller is a
    /// write to the snapshot itself (a full `PO` store then overflows instead of
    /// invalidating). When the store must be invalidated, the metadata request that
    /// says so is returned in `meta` for the caller to submit.
    pub fn lookup_or_prepare(&self, chunk: u64, snapshot_write: bool, meta: &mut Option<IoRequest>) -> Lookup {
        if let Some(new) = self.lookup(chunk) {
            return Lookup::Complete(new);
        }
        let mut core = lock(&self.core);
        if self.flags() & INVALID != 0 {
            return Lookup::Invalid;
        }
        if let Some(new) = self.table.shard(chunk).get(&chunk).copied() {
            return Lookup::Complete(new);
        }
        if let Some(p) = core.pending.get(&chunk) {
            return Lookup::Pending(Arc::clone(p));
        }
        let mut prepared = core.store.prepare(chunk);
        if prepared == Err(PrepareError::Full) {
            // The COW may have grown (an online extend): look again before giving up.
            core.store.set_cow_sectors(self.cow.device().info().sectors);
            prepared = core.store.prepare(chunk);
        }
        match prepared {
            Ok(new_chunk) => {
                let p =
                    Arc::new(Pending { exception: Exception { old_chunk: chunk, new_chunk }, state: AtomicU8::new(0) });
                core.pending.insert(chunk, Arc::clone(&p));
                self.warn_on_usage(core.store.usage());
                Lookup::Prepared(p)
            }
            Err(PrepareError::Full) if snapshot_write && self.persistence == Persistence::PersistentOverflow => {
                if self.flags() & OVERFLOW == 0 {
                    tracing::error!("snapshot {}: COW full, snapshot overflowed (writes fail, reads work)", self.name);
                    self.set_flags(OVERFLOW);
                    self.events.raise();
                }
                Lookup::Overflow
            }
            Err(PrepareError::Full) => {
                tracing::error!("snapshot {}: COW full, invalidating the snapshot", self.name);
                self.invalidate_locked(&mut core, meta);
                Lookup::Invalid
            }
            Err(PrepareError::Invalid) => Lookup::Invalid,
        }
    }

    fn warn_on_usage(&self, usage: Usage) {
        let permille = usage.permille();
        let level = WARN_LEVELS.iter().filter(|&&l| permille >= l).count() as u8;
        if level > self.warned.load(Ordering::Relaxed) {
            self.warned.store(level, Ordering::Relaxed);
            tracing::warn!(
                "snapshot {} is {}.{}% full ({}): extend its COW store (udm snapshot extend) before it fills and \
                 the snapshot is invalidated",
                self.name,
                permille / 10,
                permille % 10,
                usage.status()
            );
        }
    }

    fn invalidate_locked(&self, core: &mut Core, meta: &mut Option<IoRequest>) {
        self.set_flags(INVALID);
        self.events.raise();
        core.store.invalidate();
        self.apply_events(core);
        if meta.is_none() {
            *meta = core.store.next_io();
        }
    }

    /// Invalidates the snapshot (a copy or I/O error); returns a metadata request to
    /// submit, if one is due.
    pub fn invalidate(&self) -> Option<IoRequest> {
        let mut core = lock(&self.core);
        let mut meta = None;
        if self.flags() & INVALID == 0 {
            self.invalidate_locked(&mut core, &mut meta);
        }
        meta
    }

    /// The data of a prepared exception is on the COW (or failed). Returns a metadata
    /// request to submit, if one is due.
    pub fn copy_done(&self, e: Exception, ok: bool) -> Option<IoRequest> {
        let mut core = lock(&self.core);
        if !ok {
            tracing::error!("snapshot {}: copying chunk {} failed, invalidating the snapshot", self.name, e.old_chunk);
            self.set_flags(INVALID);
            self.events.raise();
        }
        core.store.commit(e, ok);
        self.apply_events(&mut core);
        core.store.next_io()
    }

    /// A metadata request finished. Returns the next one to submit, if any.
    pub fn meta_done(&self, result: Result<(), IoError>) -> Option<IoRequest> {
        let mut core = lock(&self.core);
        core.store.io_done(result);
        self.apply_events(&mut core);
        core.store.next_io()
    }

    /// Whether metadata I/O is in flight or due (a suspend waits for it).
    pub fn meta_pending(&self) -> bool {
        lock(&self.core).store.io_pending()
    }

    fn apply_events(&self, core: &mut Core) {
        let mut events = Vec::new();
        core.store.take_events(&mut events);
        for ev in events {
            match ev {
                StoreEvent::Committed(e, ok) => {
                    if ok {
                        self.table.shard(e.old_chunk).insert(e.old_chunk, e.new_chunk);
                        self.copied.set(e.old_chunk);
                    }
                    if let Some(p) = core.pending.remove(&e.old_chunk) {
                        p.finish(ok);
                    }
                }
                StoreEvent::Invalidated => {
                    self.set_flags(INVALID | INVALID_DURABLE);
                }
                StoreEvent::MergeCommitted(r) => core.merge_results.push(r),
            }
        }
    }

    /// The `dmsetup status` text.
    pub fn status(&self) -> String {
        let flags = self.flags();
        if flags & INVALID != 0 {
            "Invalid".into()
        } else if flags & MERGE_FAILED != 0 {
            "Merge failed".into()
        } else if flags & OVERFLOW != 0 {
            "Overflow".into()
        } else {
            self.usage().status()
        }
    }

    /// The store's usage numbers (the total follows an online extend of the COW, as
    /// the kernel reads the COW's size at status time).
    pub fn usage(&self) -> Usage {
        let mut core = lock(&self.core);
        let now = self.cow.device().info().sectors;
        if now > core.store.usage().total_sectors {
            core.store.set_cow_sectors(now);
        }
        core.store.usage()
    }

    /// Exceptions the snapshot holds.
    pub fn exception_count(&self) -> usize {
        lock(&self.core).store.exceptions().len()
    }

    /// The next merge batch (see [`ExceptionStore::prepare_merge`]).
    pub fn prepare_merge(&self) -> Result<Option<MergeBatch>, StoreError> {
        lock(&self.core).store.prepare_merge()
    }

    /// Sets the origin chunks a merge is about to copy back; writes there wait.
    pub fn set_merge_range(&self, start: u64, end: u64) {
        self.merge_range.0.store(start, Ordering::SeqCst);
        self.merge_range.1.store(end, Ordering::SeqCst);
    }

    /// Whether `chunk` is in the batch being merged.
    #[inline]
    pub fn in_merge_range(&self, chunk: u64) -> bool {
        chunk >= self.merge_range.0.load(Ordering::SeqCst) && chunk < self.merge_range.1.load(Ordering::SeqCst)
    }

    /// Drops a merged batch from the store and returns the metadata request to submit.
    pub fn commit_merge(&self, batch: MergeBatch) -> Result<Option<IoRequest>, StoreError> {
        let mut core = lock(&self.core);
        core.store.commit_merge(batch.count)?;
        Ok(core.store.next_io())
    }

    /// Takes the outcome of a finished merge commit, if any; on success the batch's
    /// exceptions leave the table.
    pub fn take_merge_result(&self, batch: MergeBatch) -> Option<Result<(), IoError>> {
        let mut core = lock(&self.core);
        let r = core.merge_results.pop()?;
        if r.is_ok() {
            for c in batch.old_chunk..batch.old_chunk + batch.count {
                self.copied.clear(c);
                self.table.shard(c).remove(&c);
            }
        }
        Some(r)
    }
}
