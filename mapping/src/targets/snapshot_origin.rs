//! `snapshot-origin <origin_dev>`: maps 1:1 onto the real origin; every write first
//! copies the chunk it touches out to each active snapshot that has no exception for it
//! yet (spec/device-mapper.md §3.1, §3.3). Writes are split at the smallest chunk of the
//! origin's snapshots. Table: `<origin_dev>`; status: empty.

use std::num::NonZeroU64;
use std::sync::Arc;

use udm_drivers::{IoOp, IoRequest};

use crate::error::TargetError;
use crate::snapshot::engine::Engine;
use crate::snapshot::origins::{OriginEntry, Origins};
use crate::snapshot::shared::{Lookup, SnapshotShared, INVALID_DURABLE};
use crate::snapshot::tokens::Tokens;
use crate::snapshot::waits::{poll_all, Outcome, Wait};
use crate::target::{
    ConstructCtx, DevIndex, MapOutcome, PartId, QueueSetup, Target, TargetCaps, TargetContext, TargetDevice, TargetIo,
    TargetQueue, TargetType,
};

/// The `snapshot-origin` target type.
pub struct SnapshotOriginType;

impl TargetType for SnapshotOriginType {
    fn name(&self) -> &'static str {
        "snapshot-origin"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        if args.len() != 1 {
            return Err(TargetError::ArgCount {
                expected: "exactly 1 argument: <origin_dev>".into(),
                found: args.len(),
            });
        }
        let dev = ctx.open_device(&args[0], ctx.start(), ctx.length())?;
        let entry = ctx.extension::<Origins>().entry(dev.id());
        let caps = TargetCaps { discard: dev.info().supports_discard, write_zeroes: dev.info().supports_write_zeroes };
        Ok(Arc::new(SnapshotOrigin { dev, entry, start: ctx.start(), caps }))
    }
}

/// One snapshot-origin table line.
pub struct SnapshotOrigin {
    dev: TargetDevice,
    entry: Arc<OriginEntry>,
    start: u64,
    caps: TargetCaps,
}

impl Target for SnapshotOrigin {
    fn type_name(&self) -> &'static str {
        "snapshot-origin"
    }

    fn table_args(&self) -> String {
        self.dev.table_name()
    }

    fn split_boundary(&self) -> Option<NonZeroU64> {
        self.entry.min_chunk()
    }

    fn caps(&self) -> TargetCaps {
        self.caps
    }

    fn open_queue(&self, setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(OriginQueue {
            start: self.start,
            writes: OriginWrites::new(Arc::clone(&self.entry), setup.depth, None),
        }))
    }
}

/// A write held until the copies it needs are durable.
struct Held {
    io: TargetIo,
    sector: u64,
    waits: Vec<Wait>,
}

/// The origin-write half shared by `snapshot-origin` and `snapshot-merge`: copy-out to
/// every snapshot of the origin (except `skip`, the one being merged), holding the write
/// until the copies are durable, then sending it to device 0.
pub(crate) struct OriginWrites {
    entry: Arc<OriginEntry>,
    skip: Option<Arc<SnapshotShared>>,
    generation: u64,
    snapshots: Arc<Vec<Arc<SnapshotShared>>>,
    pub(crate) engine: Engine,
    held: Vec<Held>,
    ready: Vec<(TargetIo, u64)>,
    parts: Tokens<PartId>,
}

impl OriginWrites {
    pub(crate) fn new(entry: Arc<OriginEntry>, depth: usize, skip: Option<Arc<SnapshotShared>>) -> Self {
        OriginWrites {
            generation: entry.generation(),
            snapshots: entry.snapshots(),
            entry,
            skip,
            engine: Engine::new(depth),
            held: Vec::with_capacity(depth),
            ready: Vec::with_capacity(depth),
            parts: Tokens::with_capacity(depth),
        }
    }

    fn refresh(&mut self) {
        let generation = self.entry.generation();
        if generation != self.generation {
            self.generation = generation;
            self.snapshots = self.entry.snapshots();
            self.engine.retain_ports(&self.snapshots);
        }
    }

    /// Starts the copies a write at absolute `sector` needs. `None`: nothing to wait
    /// for, the write may go to the origin now; otherwise the write is held.
    pub(crate) fn map_write(&mut self, io: &TargetIo, sector: u64) -> MapOutcome {
        self.refresh();
        let mut waits = Vec::new();
        for snap in self.snapshots.iter() {
            if !snap.takes_copies() || snap.length <= sector || self.skip.as_ref().is_some_and(|s| Arc::ptr_eq(s, snap))
            {
                continue;
            }
            let chunk = snap.chunk_of(sector);
            // Already copied: only snapshot reads that started before the copy was
            // committed may still be reading this chunk from the origin; wait for them.
            if snap.copied.get(chunk) {
                if snap.origin_reads.busy(chunk) {
                    waits.push(Wait::Reads(Arc::clone(snap), chunk));
                }
                continue;
            }
            let mut meta = None;
            match snap.lookup_or_prepare(chunk, false, &mut meta) {
                Lookup::Complete(_) => {
                    if snap.origin_reads.busy(chunk) {
                        waits.push(Wait::Reads(Arc::clone(snap), chunk));
                    }
                }
                Lookup::Pending(p) => waits.push(Wait::Pending(Arc::clone(snap), p)),
                Lookup::Prepared(p) => {
                    self.engine.start_copy(snap, Arc::clone(&p));
                    waits.push(Wait::Pending(Arc::clone(snap), p));
                }
                Lookup::Invalid | Lookup::Overflow => {
                    if snap.flags() & INVALID_DURABLE == 0 {
                        waits.push(Wait::Invalidation(Arc::clone(snap)));
                    }
                }
            }
            if let Some(req) = meta {
                self.engine.submit_meta(snap, req);
            }
        }
        if waits.is_empty() {
            return MapOutcome::Remap { dev: DevIndex(0), sector };
        }
        self.held.push(Held { io: *io, sector, waits });
        MapOutcome::Accepted
    }

    /// Moves copies along and sends the writes whose copies are durable.
    pub(crate) fn poll(&mut self, ctx: &mut TargetContext<'_>) {
        // The common case (every chunk already copied) leaves nothing to do here: keep
        // the per-poll cost at a few loads.
        if self.held.is_empty() && self.ready.is_empty() && self.engine.is_idle() {
            return;
        }
        self.engine.poll();
        let mut i = 0;
        while i < self.held.len() {
            let mut lost = false;
            // A lost exception means the snapshot is invalid (durably): the origin write
            // goes ahead either way, as in the kernel.
            if poll_all(&mut self.held[i].waits, true, &mut lost) == Outcome::Waiting {
                i += 1;
                continue;
            }
            let h = self.held.swap_remove(i);
            self.ready.push((h.io, h.sector));
        }
        while let Some((io, sector)) = self.ready.pop() {
            let token = self.parts.insert(io.part);
            let req = IoRequest { op: io.op, sector, sectors: io.sectors, sg: io.sg, fua: io.fua, tag: 0 };
            if ctx.submit(DevIndex(0), req, token).is_err() {
                self.parts.remove(token);
                self.ready.push((io, sector));
                break;
            }
        }
    }

    /// A released write finished on the origin.
    pub(crate) fn child_done(
        &mut self,
        token: u32,
        result: Result<(), udm_drivers::IoError>,
        ctx: &mut TargetContext<'_>,
    ) {
        if let Some(part) = self.parts.remove(token) {
            ctx.complete(part, result);
        }
    }

    pub(crate) fn is_idle(&self) -> bool {
        self.held.is_empty() && self.ready.is_empty() && self.parts.is_empty() && self.engine.is_idle()
    }
}

struct OriginQueue {
    start: u64,
    writes: OriginWrites,
}

impl TargetQueue for OriginQueue {
    fn map(&mut self, io: &TargetIo, _ctx: &mut TargetContext<'_>) -> MapOutcome {
        let sector = self.start + io.offset;
        match io.op {
            IoOp::Read | IoOp::Flush => MapOutcome::Remap { dev: DevIndex(0), sector },
            IoOp::Write | IoOp::Discard | IoOp::WriteZeroes => self.writes.map_write(io, sector),
        }
    }

    fn child_done(&mut self, token: u32, result: Result<(), udm_drivers::IoError>, ctx: &mut TargetContext<'_>) {
        self.writes.child_done(token, result, ctx);
    }

    fn needs_poll(&self) -> bool {
        true
    }

    fn poll(&mut self, ctx: &mut TargetContext<'_>) {
        self.writes.poll(ctx);
    }

    fn is_idle(&self) -> bool {
        self.writes.is_idle()
    }
}
