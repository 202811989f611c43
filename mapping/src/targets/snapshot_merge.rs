//! `snapshot-merge <origin> <cow> P <chunk_size>`: replaces the `snapshot-origin` table
//! of an origin device and rolls the origin back to the snapshot, online
//! (spec/device-mapper.md §5). While it merges:
//!
//! | I/O   | chunk still has an exception                  | otherwise                      |
//! |-------|-----------------------------------------------|--------------------------------|
//! | read  | from the COW chunk                            | from the origin                |
//! | write | to the COW chunk (waits if that chunk is in the batch being merged) | to the origin, after copy-out to the other snapshots |
//!
//! Status: `<allocated>/<total> <metadata>` shrinking to `2*cs/<total> 2*cs` when done,
//! or `Merge failed` / `Invalid`. Table: as `snapshot`.

use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use udm_drivers::{IoError, IoOp, IoRequest};

use crate::error::TargetError;
use crate::exception_store::Persistence;
use crate::snapshot::merge::MergeWorker;
use crate::snapshot::origins::{OriginEntry, Origins};
use crate::snapshot::shared::{SnapshotShared, ACTIVE, INVALID, MERGE_FAILED, MERGING};
use crate::snapshot::tokens::Tokens;
use crate::target::{
    ConstructCtx, DevIndex, MapOutcome, PartId, QueueSetup, Target, TargetCaps, TargetContext, TargetDevice, TargetIo,
    TargetQueue, TargetType,
};
use crate::targets::snapshot::{construct_snapshot, snapshot_table_args, SNAPSHOT_INVALID};
use crate::targets::snapshot_origin::OriginWrites;

/// Why I/O fails after a merge error.
pub const MERGE_FAILED_IO: IoError = IoError::Rejected { reason: "the snapshot merge failed" };

/// The `snapshot-merge` target type.
pub struct SnapshotMergeType;

impl TargetType for SnapshotMergeType {
    fn name(&self) -> &'static str {
        "snapshot-merge"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        let p = construct_snapshot(ctx, args, "snapshot-merge")?;
        let origins = ctx.extension::<Origins>();
        let entry = origins.entry(p.origin.id());
        if let Some(other) = entry.merging() {
            return Err(TargetError::Invalid(format!(
                "origin `{}` is already merging snapshot `{}`: only one merge per origin",
                p.origin.name(),
                other.name
            )));
        }
        origins.attach(&p.shared);
        Ok(Arc::new(SnapshotMerge {
            origin: p.origin,
            cow: p.cow,
            shared: p.shared,
            entry,
            origins,
            worker: Mutex::new(None),
        }))
    }
}

/// One snapshot-merge table line.
pub struct SnapshotMerge {
    origin: TargetDevice,
    cow: TargetDevice,
    shared: Arc<SnapshotShared>,
    entry: Arc<OriginEntry>,
    origins: Arc<Origins>,
    worker: Mutex<Option<MergeWorker>>,
}

impl SnapshotMerge {
    fn stop_worker(&self) {
        let w = self.worker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(w) = w {
            w.stop();
        }
    }
}

impl Target for SnapshotMerge {
    fn type_name(&self) -> &'static str {
        "snapshot-merge"
    }

    fn table_args(&self) -> String {
        snapshot_table_args(&self.origin, &self.cow, Persistence::Persistent, self.shared.chunk_sectors)
    }

    fn status_args(&self) -> String {
        self.shared.status()
    }

    fn split_boundary(&self) -> Option<NonZeroU64> {
        self.entry.min_chunk()
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps { discard: true, write_zeroes: false }
    }

    fn open_queue(&self, setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(MergeQueue {
            snap: Arc::clone(&self.shared),
            writes: OriginWrites::new(Arc::clone(&self.entry), setup.depth, Some(Arc::clone(&self.shared))),
            tokens: Tokens::with_capacity(setup.depth),
            waiting: Vec::new(),
            retry: Vec::new(),
        }))
    }

    fn presuspend(&self) {
        self.stop_worker();
    }

    fn resume(&self) {
        // From here the snapshot's own device (if its table is still live) fails I/O,
        // and origin writes stop copying out to it.
        self.shared.set_flags(ACTIVE | MERGING);
        let mut w = self.worker.lock().unwrap_or_else(|e| e.into_inner());
        let idle = w.as_ref().is_none_or(MergeWorker::finished);
        if idle && self.shared.flags() & (INVALID | MERGE_FAILED) == 0 {
            *w = Some(MergeWorker::start(Arc::clone(&self.shared), Arc::clone(&self.entry)));
        }
    }

    fn destroy(&self) {
        self.stop_worker();
        self.shared.clear_flags(MERGING);
        self.origins.detach(&self.shared);
    }
}

enum Token {
    /// A write to a COW chunk, tracked against the merge.
    CowWrite { part: PartId, chunk: u64 },
    /// Any other submission of this queue.
    Plain(PartId),
}

struct MergeQueue {
    snap: Arc<SnapshotShared>,
    writes: OriginWrites,
    tokens: Tokens<Token>,
    /// Writes to chunks in the batch being merged, retried when it is done.
    waiting: Vec<TargetIo>,
    retry: Vec<(DevIndex, IoRequest, u32)>,
}

/// Bit 31 of a token marks this queue's own submissions; the origin-write half uses the
/// rest.
const OWN: u32 = 1 << 31;

impl MergeQueue {
    fn cow_sector(&self, new_chunk: u64, sector: u64) -> u64 {
        (new_chunk << self.snap.chunk_shift) + (sector & (self.snap.chunk_sectors - 1))
    }

    fn submit(&mut self, dev: DevIndex, req: IoRequest, token: Token, ctx: &mut TargetContext<'_>) {
        let t = self.tokens.insert(token) | OWN;
        if let Err(full) = ctx.submit(dev, req, t) {
            self.retry.push((dev, full.0, t));
        }
    }

    fn map_write(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        let sector = io.offset;
        let chunk = self.snap.chunk_of(sector);
        // Enter, then check the merge range: the merge sets the range, then waits for
        // the count, so one side sees the other.
        self.snap.cow_writes.enter(chunk);
        if self.snap.in_merge_range(chunk) {
            self.snap.cow_writes.leave(chunk);
            self.waiting.push(*io);
            return MapOutcome::Accepted;
        }
        match self.snap.lookup(chunk) {
            Some(new) => {
                let req = IoRequest {
                    op: IoOp::Write,
                    sector: self.cow_sector(new, sector),
                    sectors: io.sectors,
                    sg: io.sg,
                    fua: io.fua,
                    tag: 0,
                };
                self.submit(DevIndex(1), req, Token::CowWrite { part: io.part, chunk }, ctx);
                MapOutcome::Accepted
            }
            None => {
                self.snap.cow_writes.leave(chunk);
                self.writes.map_write(io, sector)
            }
        }
    }

    fn map_any(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        let flags = self.snap.flags();
        if flags & INVALID != 0 {
            return MapOutcome::Done(Err(SNAPSHOT_INVALID));
        }
        if flags & MERGE_FAILED != 0 {
            return MapOutcome::Done(Err(MERGE_FAILED_IO));
        }
        match io.op {
            IoOp::Flush => MapOutcome::Remap { dev: DevIndex(0), sector: 0 },
            IoOp::Discard | IoOp::WriteZeroes => MapOutcome::Done(Ok(())),
            IoOp::Read => match self.snap.lookup(self.snap.chunk_of(io.offset)) {
                Some(new) => MapOutcome::Remap { dev: DevIndex(1), sector: self.cow_sector(new, io.offset) },
                None => MapOutcome::Remap { dev: DevIndex(0), sector: io.offset },
            },
            IoOp::Write => self.map_write(io, ctx),
        }
    }
}

impl TargetQueue for MergeQueue {
    fn map(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        self.map_any(io, ctx)
    }

    fn child_done(&mut self, token: u32, result: Result<(), IoError>, ctx: &mut TargetContext<'_>) {
        if token & OWN == 0 {
            self.writes.child_done(token, result, ctx);
            return;
        }
        match self.tokens.remove(token & !OWN) {
            Some(Token::CowWrite { part, chunk }) => {
                self.snap.cow_writes.leave(chunk);
                ctx.complete(part, result);
            }
            Some(Token::Plain(part)) => ctx.complete(part, result),
            None => {}
        }
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn poll(&mut self, ctx: &mut TargetContext<'_>) {
        self.writes.poll(ctx);
        for (dev, req, t) in std::mem::take(&mut self.retry) {
            if let Err(full) = ctx.submit(dev, req, t) {
                self.retry.push((dev, full.0, t));
            }
        }
        for io in std::mem::take(&mut self.waiting) {
            match self.map_any(&io, ctx) {
                MapOutcome::Accepted => {}
                MapOutcome::Done(r) => ctx.complete(io.part, r),
                MapOutcome::Remap { dev, sector } => {
                    let req = IoRequest { op: io.op, sector, sectors: io.sectors, sg: io.sg, fua: io.fua, tag: 0 };
                    self.submit(dev, req, Token::Plain(io.part), ctx);
                }
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.writes.is_idle() && self.tokens.is_empty() && self.waiting.is_empty() && self.retry.is_empty()
    }
}
