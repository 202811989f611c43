//! `snapshot <origin> <cow> <P|PO|N> <chunk_size>`: a point-in-time view of `origin`
//! (the real origin, LVM's `-real`), its changed chunks kept on `cow`
//! (spec/device-mapper.md §3.2, §3.4, §3.5, §4).
//!
//! * Reads: from the COW where the chunk has an exception, else from the origin (such
//!   reads are tracked so that a racing origin write waits for them).
//! * Writes: to the COW chunk; a chunk without an exception gets one first: a whole-chunk
//!   write is itself the chunk's data, a partial one copies the origin chunk first.
//! * Flushes go to the COW; discards complete at once (no features).
//! * Full COW: `P` invalidates (`Invalid`, all I/O fails), `PO` overflows (`Overflow`,
//!   writes fail, reads work).
//!
//! Table: `<origin> <cow> <P|PO|N> <chunk>` (the header's chunk for an existing store).

use std::num::NonZeroU64;
use std::sync::Arc;

use udm_drivers::{IoError, IoOp, IoRequest};

use crate::error::TargetError;
use crate::exception_store::format::{check_chunk_for_devices, DEFAULT_CHUNK_SECTORS};
use crate::exception_store::{ExceptionStore, Persistence, PersistentStore, TransientStore};
use crate::snapshot::engine::Engine;
use crate::snapshot::origins::Origins;
use crate::snapshot::shared::{Lookup, SnapshotParams, SnapshotShared, ACTIVE, INVALID, MERGING, OVERFLOW};
use crate::snapshot::tokens::Tokens;
use crate::snapshot::waits::{poll_all, Outcome, Wait};
use crate::target::{
    ConstructCtx, DevIndex, FlushPolicy, MapOutcome, PartId, QueueSetup, Target, TargetCaps, TargetContext,
    TargetDevice, TargetIo, TargetQueue, TargetType,
};
use crate::targets::number_arg;

/// Why I/O to an invalid snapshot fails.
pub const SNAPSHOT_INVALID: IoError =
    IoError::Rejected { reason: "the snapshot is invalid (its COW filled up or failed)" };
/// Why a write to an overflowed `PO` snapshot fails.
pub const SNAPSHOT_OVERFLOW: IoError = IoError::Rejected { reason: "the snapshot's COW store is full (overflow)" };
/// Why I/O to a snapshot being merged fails.
pub const SNAPSHOT_MERGING: IoError = IoError::Rejected { reason: "the snapshot is being merged into its origin" };

/// The `snapshot` target type.
pub struct SnapshotType;

/// What the `snapshot` and `snapshot-merge` constructors share.
pub(crate) struct Parsed {
    pub origin: TargetDevice,
    pub cow: TargetDevice,
    pub persistence: Persistence,
    pub shared: Arc<SnapshotShared>,
}

/// Parses `<origin> <cow> <P|PO|N> <chunk>`, opens the devices and activates the store.
pub(crate) fn construct_snapshot(
    ctx: &mut ConstructCtx<'_>,
    args: &[String],
    type_name: &str,
) -> Result<Parsed, TargetError> {
    if args.len() != 4 {
        let hint = if args.len() > 4 {
            " (the discard_zeroes_cow and discard_passdown_origin features are not supported by udm)"
        } else {
            ""
        };
        return Err(TargetError::ArgCount {
            expected: format!("exactly 4 arguments: <origin> <cow> <P|PO|N> <chunk_size>{hint}"),
            found: args.len(),
        });
    }
    let persistence = Persistence::parse(&args[2]).ok_or_else(|| TargetError::BadArg {
        position: 3,
        name: "persistence",
        value: args[2].clone(),
        expected: "P (persistent), PO (persistent, overflow aware) or N (transient)".into(),
    })?;
    if type_name == "snapshot-merge" && !persistence.is_persistent() {
        return Err(TargetError::BadArg {
            position: 3,
            name: "persistence",
            value: args[2].clone(),
            expected: "P: a merge needs a persistent store".into(),
        });
    }
    let chunk = number_arg(args, 3, "chunk_size")?;
    let origin = ctx.open_device(&args[0], 0, ctx.start() + ctx.length())?;
    let cow = ctx.open_device(&args[1], 0, 0)?;
    if origin.id() == cow.id() {
        return Err(TargetError::Invalid("the COW device must not be the origin device".into()));
    }
    let origins = ctx.extension::<Origins>();
    if let Some(old) = origins.by_cow(cow.id()) {
        // The kernel's handover (spec §5.6): a new table over the COW of a live snapshot
        // does not read the COW; it takes the live snapshot's state over when resumed.
        if old.origin.id() != origin.id() {
            return Err(TargetError::Invalid(format!(
                "COW device `{}` is in use by snapshot `{}` of another origin",
                cow.name(),
                old.name
            )));
        }
        if old.owners() >= 2 {
            return Err(TargetError::Invalid(format!(
                "a table taking over snapshot `{}` is already staged: only one handover at a time",
                old.name
            )));
        }
        return Ok(Parsed { origin, cow, persistence, shared: old });
    }
    let block_sectors = u64::from(origin.info().logical_block_size.max(cow.info().logical_block_size) / 512).max(1);
    let chunk = if chunk == 0 { DEFAULT_CHUNK_SECTORS.max(block_sectors) } else { chunk };
    // Both devices, as the kernel checks: the origin's block size matters as much as the
    // COW's (a copy-out reads whole chunks of the origin).
    let check_chunk = |chunk| {
        let devices =
            [(args[0].as_str(), origin.info().logical_block_size), (args[1].as_str(), cow.info().logical_block_size)];
        check_chunk_for_devices(chunk, &devices).map_err(TargetError::Invalid)
    };
    check_chunk(chunk)?;
    let bad_store = |e: crate::exception_store::StoreError| TargetError::Invalid(format!("COW `{}`: {e}", cow.name()));
    let store: Box<dyn ExceptionStore> = if persistence.is_persistent() {
        let mut q = cow
            .device()
            .open_queue(4)
            .map_err(|e| TargetError::QueueOpen { device: cow.name(), reason: e.to_string() })?;
        let (store, _) =
            PersistentStore::activate(q.as_mut(), cow.info(), chunk, origin.info().sectors).map_err(bad_store)?;
        // The header's chunk size wins over the table's: it must pass the same checks.
        check_chunk(store.chunk_sectors())?;
        Box::new(store)
    } else {
        Box::new(TransientStore::new(chunk, cow.info().sectors))
    };
    let chunk_bytes = store.chunk_sectors() * 512;
    for dev in [&origin, &cow] {
        if chunk_bytes > u64::from(dev.info().max_transfer) {
            return Err(TargetError::Invalid(format!(
                "chunk of {chunk_bytes} bytes exceeds the {}-byte largest transfer of `{}`: use a smaller chunk",
                dev.info().max_transfer,
                dev.name()
            )));
        }
    }
    let shared = Arc::new(SnapshotShared::new(SnapshotParams {
        id: origins.new_snapshot_id(),
        name: ctx.device_name().to_string(),
        origin: origin.clone(),
        cow: cow.clone(),
        persistence,
        length: ctx.start() + ctx.length(),
        store,
        events: ctx.events(),
    }));
    Ok(Parsed { origin, cow, persistence, shared })
}

impl TargetType for SnapshotType {
    fn name(&self) -> &'static str {
        "snapshot"
    }

    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError> {
        let p = construct_snapshot(ctx, args, "snapshot")?;
        let origins = ctx.extension::<Origins>();
        origins.attach(&p.shared);
        Ok(Arc::new(Snapshot { origin: p.origin, cow: p.cow, persistence: p.persistence, shared: p.shared, origins }))
    }
}

/// One snapshot table line.
pub struct Snapshot {
    origin: TargetDevice,
    cow: TargetDevice,
    persistence: Persistence,
    shared: Arc<SnapshotShared>,
    origins: Arc<Origins>,
}

impl Snapshot {
    /// The shared state (for reports and the LVM-style operations).
    pub fn shared(&self) -> &Arc<SnapshotShared> {
        &self.shared
    }
}

/// The table arguments of a snapshot or snapshot-merge line.
pub(crate) fn snapshot_table_args(origin: &TargetDevice, cow: &TargetDevice, p: Persistence, chunk: u64) -> String {
    format!("{} {} {} {}", origin.table_name(), cow.table_name(), p.as_str(), chunk)
}

impl Target for Snapshot {
    fn type_name(&self) -> &'static str {
        "snapshot"
    }

    fn table_args(&self) -> String {
        snapshot_table_args(&self.origin, &self.cow, self.persistence, self.shared.chunk_sectors)
    }

    fn status_args(&self) -> String {
        self.shared.status()
    }

    fn split_boundary(&self) -> Option<NonZeroU64> {
        NonZeroU64::new(self.shared.chunk_sectors)
    }

    fn flush_policy(&self) -> FlushPolicy {
        FlushPolicy::Map(1)
    }

    fn caps(&self) -> TargetCaps {
        TargetCaps { discard: true, write_zeroes: false }
    }

    fn open_queue(&self, setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
        Ok(Box::new(SnapshotQueue::new(Arc::clone(&self.shared), setup.depth)))
    }

    fn resume(&self) {
        self.shared.set_flags(ACTIVE);
    }

    fn destroy(&self) {
        self.origins.detach(&self.shared);
    }
}

/// What a completion of this queue's own submission must do.
enum Token {
    /// A read from the origin that was tracked against origin writes.
    OriginRead { part: PartId, chunk: u64 },
    /// A write to the COW.
    Plain(PartId),
}

/// A snapshot write held until its chunk's exception commits.
struct Held {
    io: TargetIo,
    /// The write's data is the exception's data: nothing is left to write.
    done_on_commit: bool,
    new_chunk: u64,
    waits: Vec<Wait>,
}

struct SnapshotQueue {
    snap: Arc<SnapshotShared>,
    engine: Engine,
    tokens: Tokens<Token>,
    held: Vec<Held>,
    /// Submissions the device queue had no room for: (request, token).
    retry: Vec<(DevIndex, IoRequest, u32)>,
}

impl SnapshotQueue {
    fn new(snap: Arc<SnapshotShared>, depth: usize) -> Self {
        SnapshotQueue {
            snap,
            engine: Engine::new(depth),
            tokens: Tokens::with_capacity(depth),
            held: Vec::with_capacity(depth),
            retry: Vec::new(),
        }
    }

    fn cow_sector(&self, new_chunk: u64, sector: u64) -> u64 {
        (new_chunk << self.snap.chunk_shift) + (sector & (self.snap.chunk_sectors - 1))
    }

    fn submit(&mut self, dev: DevIndex, req: IoRequest, token: Token, ctx: &mut TargetContext<'_>) {
        let t = self.tokens.insert(token);
        if let Err(full) = ctx.submit(dev, req, t) {
            self.retry.push((dev, full.0, t));
        }
    }

    fn map_read(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        let sector = io.offset;
        let chunk = self.snap.chunk_of(sector);
        if let Some(new) = self.snap.lookup(chunk) {
            return MapOutcome::Remap { dev: DevIndex(1), sector: self.cow_sector(new, sector) };
        }
        // Enter first, then look again: an origin write commits the exception, then
        // waits for tracked reads, so one of the two sides sees the other.
        self.snap.origin_reads.enter(chunk);
        if let Some(new) = self.snap.lookup(chunk) {
            self.snap.origin_reads.leave(chunk);
            return MapOutcome::Remap { dev: DevIndex(1), sector: self.cow_sector(new, sector) };
        }
        let req = IoRequest { op: IoOp::Read, sector, sectors: io.sectors, sg: io.sg, fua: false, tag: 0 };
        self.submit(DevIndex(0), req, Token::OriginRead { part: io.part, chunk }, ctx);
        MapOutcome::Accepted
    }

    fn map_write(&mut self, io: &TargetIo) -> MapOutcome {
        let sector = io.offset;
        if self.snap.flags() & OVERFLOW != 0 {
            return MapOutcome::Done(Err(SNAPSHOT_OVERFLOW));
        }
        let chunk = self.snap.chunk_of(sector);
        let mut meta = None;
        let outcome = match self.snap.lookup_or_prepare(chunk, true, &mut meta) {
            Lookup::Complete(new) => MapOutcome::Remap { dev: DevIndex(1), sector: self.cow_sector(new, sector) },
            Lookup::Pending(p) => {
                let new_chunk = p.exception.new_chunk;
                let waits = vec![Wait::Pending(Arc::clone(&self.snap), p)];
                self.held.push(Held { io: *io, done_on_commit: false, new_chunk, waits });
                MapOutcome::Accepted
            }
            Lookup::Prepared(p) => {
                let whole = io.op == IoOp::Write
                    && io.sectors == self.snap.chunk_sectors
                    && sector & (self.snap.chunk_sectors - 1) == 0;
                if whole {
                    self.engine.start_direct(&self.snap, Arc::clone(&p), io.sg);
                } else {
                    self.engine.start_copy(&self.snap, Arc::clone(&p));
                }
                let new_chunk = p.exception.new_chunk;
                let waits = vec![Wait::Pending(Arc::clone(&self.snap), p)];
                self.held.push(Held { io: *io, done_on_commit: whole, new_chunk, waits });
                MapOutcome::Accepted
            }
            Lookup::Invalid => MapOutcome::Done(Err(SNAPSHOT_INVALID)),
            Lookup::Overflow => MapOutcome::Done(Err(SNAPSHOT_OVERFLOW)),
        };
        if let Some(req) = meta {
            self.engine.submit_meta(&self.snap, req);
        }
        outcome
    }
}

impl TargetQueue for SnapshotQueue {
    fn map(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome {
        let flags = self.snap.flags();
        if flags & INVALID != 0 {
            return MapOutcome::Done(Err(SNAPSHOT_INVALID));
        }
        if flags & MERGING != 0 {
            return MapOutcome::Done(Err(SNAPSHOT_MERGING));
        }
        match io.op {
            IoOp::Flush => MapOutcome::Remap { dev: DevIndex(1), sector: 0 },
            IoOp::Discard | IoOp::WriteZeroes => MapOutcome::Done(Ok(())),
            IoOp::Read => self.map_read(io, ctx),
            IoOp::Write => self.map_write(io),
        }
    }

    fn child_done(&mut self, token: u32, result: Result<(), IoError>, ctx: &mut TargetContext<'_>) {
        match self.tokens.remove(token) {
            Some(Token::OriginRead { part, chunk }) => {
                self.snap.origin_reads.leave(chunk);
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
        if self.held.is_empty() && self.retry.is_empty() && self.engine.is_idle() {
            return;
        }
        self.engine.poll();
        for (dev, req, t) in std::mem::take(&mut self.retry) {
            if let Err(full) = ctx.submit(dev, req, t) {
                self.retry.push((dev, full.0, t));
            }
        }
        let mut i = 0;
        while i < self.held.len() {
            let mut lost = false;
            match poll_all(&mut self.held[i].waits, false, &mut lost) {
                Outcome::Waiting => {
                    i += 1;
                    continue;
                }
                Outcome::Lost => {
                    let h = self.held.swap_remove(i);
                    ctx.complete(h.io.part, Err(SNAPSHOT_INVALID));
                }
                Outcome::Ready => {
                    let h = self.held.swap_remove(i);
                    if h.done_on_commit {
                        ctx.complete(h.io.part, Ok(()));
                    } else {
                        let sector = self.cow_sector(h.new_chunk, h.io.offset);
                        let req = IoRequest {
                            op: IoOp::Write,
                            sector,
                            sectors: h.io.sectors,
                            sg: h.io.sg,
                            fua: h.io.fua,
                            tag: 0,
                        };
                        self.submit(DevIndex(1), req, Token::Plain(h.io.part), ctx);
                    }
                }
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.held.is_empty() && self.retry.is_empty() && self.tokens.is_empty() && self.engine.is_idle()
    }
}
