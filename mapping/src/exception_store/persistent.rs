//! The persistent exception store (`P`/`PO`): Linux's on-disk format, byte for byte
//! (spec/device-mapper.md §4), with the kernel's commit protocol:
//!
//! 1. the caller writes an exception's data chunk, then calls `commit`;
//! 2. entries join the in-memory area in allocation order;
//! 3. while other exceptions are still being copied and the area has room, nothing is
//!    written (batching);
//! 4. otherwise: if the area is full, zero the next area; flush (PREFLUSH: every data
//!    chunk is durable first); write the whole area chunk with FUA;
//! 5. only then are the exceptions reported committed, so the caller may release the
//!    origin writes they protect.
//!
//! Stricter than the kernel: activation refuses duplicate origin or COW chunks and
//! entries pointing outside the COW or at metadata, and an invalidation is written with
//! FUA and reported only once durable.

use std::collections::{HashSet, VecDeque};

use udm_drivers::{DeviceInfo, IoError, IoQueue, IoRequest, SECTOR_SIZE};

use crate::exception_store::error::StoreError;
use crate::exception_store::format::{self, Header, Layout, DEFAULT_CHUNK_SECTORS, DISK_VERSION, SNAP_MAGIC};
use crate::exception_store::sync_io;
use crate::exception_store::{Exception, ExceptionStore, MergeBatch, PrepareError, StoreEvent, Usage};
use crate::io_buf::IoBuf;

/// A prepared exception waiting for its data, in allocation order.
#[derive(Debug)]
struct Prepared {
    new_chunk: u64,
    outcome: Option<(Exception, bool)>,
}

/// The steps of one area write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    ZeroNext,
    Flush,
    WriteArea,
}

/// The metadata operation under way (one at a time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaOp {
    /// Make `log[..upto]` durable by writing area `area`.
    Commit { area: u64, upto: usize, step: Step },
    /// Write the header with valid = 0.
    Invalidate,
    /// Write area `area` after the merged entries were dropped from the log.
    Merge { area: u64, step: Step },
}

/// What activation found, besides the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Activation {
    /// The COW was blank (magic 0) and has been initialised.
    pub initialised: bool,
    /// The header's chunk size overrode the table's `(table, header)`.
    pub chunk_overridden: Option<(u64, u64)>,
}

/// A persistent store. See the module documentation.
#[derive(Debug)]
pub struct PersistentStore {
    layout: Layout,
    valid: bool,
    /// Every exception in on-disk order: area `i` holds `log[i*E .. (i+1)*E]`. Entries
    /// past `durable` are in memory only.
    log: Vec<Exception>,
    durable: usize,
    /// The area new entries go to (the kernel's `current_area`).
    current_area: u64,
    next_free: u64,
    in_order: VecDeque<Prepared>,
    op: Option<MetaOp>,
    io_in_flight: bool,
    /// A merge batch dropped from the log, waiting for its area write.
    merge_pending: bool,
    /// Failures held back until the invalidation is on disk.
    deferred: Vec<(Exception, bool)>,
    invalidation_done: bool,
    events: Vec<StoreEvent>,
    buf: IoBuf,
}

fn io_err(during: &'static str) -> impl Fn(IoError) -> StoreError {
    move |source| StoreError::Io { during, source }
}

impl PersistentStore {
    /// Activates the store on a COW device, as the kernel's constructor does: reads the
    /// header, initialises a blank COW (magic 0), or reads every area back.
    ///
    /// `table_chunk` is the table's chunk size (0 = default); the header's wins.
    /// `origin_sectors` bounds the origin chunks entries may name. `queue` is an idle
    /// queue on the COW device.
    pub fn activate(
        queue: &mut dyn IoQueue,
        cow: &DeviceInfo,
        table_chunk: u64,
        origin_sectors: u64,
    ) -> Result<(Self, Activation), StoreError> {
        let block_sectors = u64::from(cow.logical_block_size) / SECTOR_SIZE;
        let table_chunk = if table_chunk == 0 { DEFAULT_CHUNK_SECTORS.max(block_sectors) } else { table_chunk };
        format::check_chunk_sectors(table_chunk, block_sectors)?;

        let probe = IoBuf::new(cow.logical_block_size.max(512) as usize).map_err(|_| StoreError::Io {
            during: "allocating the header buffer",
            source: IoError::BadBuffer { reason: "out of memory" },
        })?;
        if cow.sectors < probe.len() as u64 / SECTOR_SIZE {
            return Err(StoreError::CowTooSmall {
                cow_sectors: cow.sectors,
                chunk_sectors: table_chunk,
                needed: 2 * table_chunk,
            });
        }
        sync_io::run(queue, IoRequest::read(0, probe.sg(0, probe.len()), 0)).map_err(io_err("reading the header"))?;
        let header = Header::decode(probe.as_slice());

        if header.magic == 0 {
            let store = Self::blank(table_chunk, cow.sectors)?;
            store.initialise(queue)?;
            return Ok((store, Activation { initialised: true, chunk_overridden: None }));
        }
        if header.magic != SNAP_MAGIC {
            return Err(StoreError::BadMagic { found: header.magic });
        }
        if header.version != DISK_VERSION {
            return Err(StoreError::BadVersion { found: header.version });
        }
        let chunk = u64::from(header.chunk_sectors);
        let mut chunk_overridden = None;
        if chunk != table_chunk {
            format::check_chunk_sectors(chunk, block_sectors)?;
            tracing::warn!(
                "chunk size {chunk} in the COW header overrides the table's chunk size {table_chunk} (as Linux does)"
            );
            chunk_overridden = Some((table_chunk, chunk));
        }
        let mut store = Self::blank(chunk, cow.sectors)?;
        if header.valid == 0 {
            // As the kernel: an invalidated store loads, reports Invalid, and its areas
            // are never read or written again.
            store.valid = false;
            store.invalidation_done = true;
            return Ok((store, Activation { initialised: false, chunk_overridden }));
        }
        store.read_areas(queue, origin_sectors.div_ceil(chunk))?;
        Ok((store, Activation { initialised: false, chunk_overridden }))
    }

    /// An empty store in memory (nothing read or written).
    fn blank(chunk_sectors: u64, cow_sectors: u64) -> Result<Self, StoreError> {
        let layout = Layout { chunk_sectors, cow_sectors };
        if layout.cow_chunks() < 2 {
            return Err(StoreError::CowTooSmall { cow_sectors, chunk_sectors, needed: 2 * chunk_sectors });
        }
        let buf = IoBuf::new(layout.chunk_bytes()).map_err(|_| StoreError::Io {
            during: "allocating the metadata buffer",
            source: IoError::BadBuffer { reason: "out of memory" },
        })?;
        Ok(PersistentStore {
            layout,
            valid: true,
            log: Vec::new(),
            durable: 0,
            current_area: 0,
            next_free: 2,
            in_order: VecDeque::new(),
            op: None,
            io_in_flight: false,
            merge_pending: false,
            deferred: Vec::new(),
            invalidation_done: false,
            events: Vec::new(),
            buf,
        })
    }

    /// Zeroes area 0, then writes a new header, durably (the kernel's new-snapshot path,
    /// in the crash-safe order: a header that reaches the disk always finds area 0
    /// zeroed, whatever a power cut in between keeps).
    fn initialise(&self, queue: &mut dyn IoQueue) -> Result<(), StoreError> {
        let mut buf = IoBuf::new(self.layout.chunk_bytes()).map_err(|_| StoreError::Io {
            during: "allocating the header buffer",
            source: IoError::BadBuffer { reason: "out of memory" },
        })?;
        let len = buf.len();
        let area0 = self.layout.chunk_to_sector(self.layout.area_location(0));
        sync_io::run(queue, IoRequest::write(area0, buf.sg(0, len), 0)).map_err(io_err("zeroing metadata area 0"))?;
        sync_io::run(queue, IoRequest::flush(0)).map_err(io_err("flushing the zeroed metadata area 0"))?;
        Header::new(self.layout.chunk_sectors, true).encode_chunk(buf.as_mut_slice());
        sync_io::run(queue, IoRequest::write(0, buf.sg(0, len), 0).with_fua())
            .map_err(io_err("writing the new header"))?;
        Ok(())
    }

    /// Reads areas 0, 1, … until one is not full, checking every entry.
    fn read_areas(&mut self, queue: &mut dyn IoQueue, origin_chunks: u64) -> Result<(), StoreError> {
        let l = self.layout;
        let mut seen_old = HashSet::new();
        let mut seen_new = HashSet::new();
        let mut max_new = 1;
        let mut area = 0u64;
        loop {
            let chunk = l.area_location(area);
            if !l.chunk_fits(chunk) {
                return Err(StoreError::Truncated { area, chunk, cow_sectors: l.cow_sectors });
            }
            let len = self.buf.len();
            sync_io::run(queue, IoRequest::read(l.chunk_to_sector(chunk), self.buf.sg(0, len), 0))
                .map_err(io_err("reading a metadata area"))?;
            let first = self.log.len();
            let full = format::decode_area(self.buf.as_slice(), &mut self.log);
            for (index, e) in self.log[first..].iter().enumerate() {
                let bad = |reason| StoreError::BadEntry {
                    area,
                    index,
                    old_chunk: e.old_chunk,
                    new_chunk: e.new_chunk,
                    reason,
                };
                if e.new_chunk == 1 || l.is_area_chunk(e.new_chunk) {
                    return Err(bad("points at a metadata area"));
                }
                if !l.chunk_fits(e.new_chunk) {
                    return Err(bad("points beyond the end of the COW device"));
                }
                if e.old_chunk >= origin_chunks {
                    return Err(bad("names a chunk beyond the end of the origin"));
                }
                if !seen_old.insert(e.old_chunk) {
                    return Err(bad("repeats an origin chunk"));
                }
                if !seen_new.insert(e.new_chunk) {
                    return Err(bad("shares its COW chunk with another entry"));
                }
                max_new = max_new.max(e.new_chunk);
            }
            if !full {
                break;
            }
            area += 1;
        }
        self.current_area = area;
        self.durable = self.log.len();
        self.next_free = l.skip_metadata(max_new + 1);
        Ok(())
    }

    /// The layout in use.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Entries in the current area (the kernel's `current_committed`).
    fn area_count(&self) -> usize {
        self.log.len().saturating_sub(self.area_start(self.current_area))
    }

    fn area_start(&self, area: u64) -> usize {
        (area * self.layout.exceptions_per_area()) as usize
    }

    fn area_end(&self, area: u64) -> usize {
        self.area_start(area + 1)
    }

    /// Moves copied exceptions, in allocation order, into the current area.
    fn drain_ready(&mut self) {
        while let Some(front) = self.in_order.front() {
            let Some((e, ok)) = front.outcome else { break };
            if !self.valid || !ok {
                self.in_order.pop_front();
                self.fail(e);
                if self.valid {
                    self.invalidate();
                }
                continue;
            }
            if self.log.len() >= self.area_end(self.current_area) {
                break;
            }
            self.in_order.pop_front();
            self.log.push(e);
        }
    }

    /// Reports `e` lost, after the invalidation is durable.
    fn fail(&mut self, e: Exception) {
        if self.invalidation_done {
            self.events.push(StoreEvent::Committed(e, false));
        } else {
            self.deferred.push((e, false));
        }
    }

    /// Picks the next metadata operation when none is under way.
    fn schedule(&mut self) {
        if self.op.is_some() {
            return;
        }
        if !self.valid {
            if !self.invalidation_done {
                self.op = Some(MetaOp::Invalidate);
            }
            return;
        }
        if self.merge_pending {
            self.op = Some(MetaOp::Merge { area: self.current_area, step: Step::Flush });
            return;
        }
        let area_full = self.log.len() == self.area_end(self.current_area);
        if self.log.len() > self.durable && (self.in_order.is_empty() || area_full) {
            let step = if area_full { Step::ZeroNext } else { Step::Flush };
            self.op = Some(MetaOp::Commit { area: self.current_area, upto: self.log.len(), step });
        }
    }

    /// Fills the buffer with area `area`'s image from `log[..upto]`. A commit passes the
    /// length it had when its flush went out: entries copied after that may have data
    /// the flush did not cover, so they wait for the next commit.
    fn fill_area(&mut self, area: u64, upto: usize) {
        let upto = upto.min(self.log.len());
        let start = self.area_start(area).min(upto);
        let end = self.area_end(area).min(upto);
        let entries = &self.log[start..end];
        format::encode_area(entries, self.buf.as_mut_slice());
    }

    fn request_for(&mut self, op: MetaOp) -> IoRequest {
        let l = self.layout;
        let len = self.buf.len();
        match op {
            MetaOp::Commit { step: Step::ZeroNext, area, .. } => {
                self.buf.as_mut_slice().fill(0);
                IoRequest::write(l.chunk_to_sector(l.area_location(area + 1)), self.buf.sg(0, len), 0)
            }
            MetaOp::Commit { step: Step::Flush, .. } | MetaOp::Merge { step: Step::Flush, .. } => IoRequest::flush(0),
            MetaOp::Commit { step: Step::WriteArea, area, upto } => {
                self.fill_area(area, upto);
                IoRequest::write(l.chunk_to_sector(l.area_location(area)), self.buf.sg(0, len), 0).with_fua()
            }
            MetaOp::Merge { step: Step::WriteArea, area } => {
                self.fill_area(area, self.log.len());
                IoRequest::write(l.chunk_to_sector(l.area_location(area)), self.buf.sg(0, len), 0).with_fua()
            }
            MetaOp::Merge { step: Step::ZeroNext, .. } => unreachable!("merges never zero an area"),
            MetaOp::Invalidate => {
                Header::new(l.chunk_sectors, false).encode_chunk(self.buf.as_mut_slice());
                IoRequest::write(0, self.buf.sg(0, len), 0).with_fua()
            }
        }
    }

    fn finish_invalidation(&mut self) {
        self.invalidation_done = true;
        self.events.push(StoreEvent::Invalidated);
        for (e, ok) in self.deferred.drain(..) {
            self.events.push(StoreEvent::Committed(e, ok));
        }
    }
}

impl ExceptionStore for PersistentStore {
    fn chunk_sectors(&self) -> u64 {
        self.layout.chunk_sectors
    }

    fn is_valid(&self) -> bool {
        self.valid
    }

    fn exceptions(&self) -> &[Exception] {
        &self.log
    }

    fn prepare(&mut self, _old_chunk: u64) -> Result<u64, PrepareError> {
        if !self.valid {
            return Err(PrepareError::Invalid);
        }
        if (self.next_free + 1) * self.layout.chunk_sectors > self.layout.cow_sectors {
            return Err(PrepareError::Full);
        }
        let new_chunk = self.next_free;
        self.next_free = self.layout.skip_metadata(self.next_free + 1);
        self.in_order.push_back(Prepared { new_chunk, outcome: None });
        Ok(new_chunk)
    }

    fn commit(&mut self, exception: Exception, data_ok: bool) {
        match self.in_order.binary_search_by_key(&exception.new_chunk, |p| p.new_chunk) {
            Ok(i) => self.in_order[i].outcome = Some((exception, data_ok)),
            Err(_) => {
                debug_assert!(false, "commit of an exception that was never prepared: {exception:?}");
                return;
            }
        }
        self.drain_ready();
    }

    fn invalidate(&mut self) {
        if !self.valid {
            return;
        }
        self.valid = false;
        if !self.io_in_flight {
            self.op = None;
        }
        // Exceptions not yet durable are lost with the snapshot.
        let lost: Vec<Exception> = self.log.drain(self.durable..).collect();
        for e in lost {
            self.fail(e);
        }
        while let Some(p) = self.in_order.front() {
            match p.outcome {
                Some((e, _)) => {
                    self.in_order.pop_front();
                    self.fail(e);
                }
                None => break,
            }
        }
        if self.merge_pending {
            self.merge_pending = false;
            self.events.push(StoreEvent::MergeCommitted(Err(IoError::Rejected { reason: "snapshot invalidated" })));
        }
    }

    fn next_io(&mut self) -> Option<IoRequest> {
        if self.io_in_flight {
            return None;
        }
        self.schedule();
        let mut op = self.op?;
        if let MetaOp::Commit { area, step: Step::ZeroNext, .. } = op {
            if !self.layout.chunk_fits(self.layout.area_location(area + 1)) {
                // No room for the next area: the kernel's zeroing write fails here and
                // the snapshot is invalidated.
                tracing::warn!("COW full: no room for metadata area {}; invalidating the snapshot", area + 1);
                self.op = None;
                self.invalidate();
                self.schedule();
                op = self.op?;
            }
        }
        self.io_in_flight = true;
        Some(self.request_for(op))
    }

    fn io_done(&mut self, result: Result<(), IoError>) {
        debug_assert!(self.io_in_flight);
        self.io_in_flight = false;
        let Some(op) = self.op else { return };
        if let Err(e) = result {
            self.op = None;
            match op {
                MetaOp::Invalidate => {
                    tracing::error!("could not write the invalidated header to the COW: {e}");
                    self.finish_invalidation();
                }
                MetaOp::Merge { .. } => {
                    tracing::error!("merge: metadata write failed: {e}");
                    self.merge_pending = false;
                    self.events.push(StoreEvent::MergeCommitted(Err(e)));
                }
                MetaOp::Commit { .. } => {
                    tracing::error!("snapshot metadata write failed, invalidating the snapshot: {e}");
                    self.invalidate();
                }
            }
            return;
        }
        if !self.valid && op != MetaOp::Invalidate {
            // Invalidated meanwhile: the rest of this operation is moot.
            self.op = None;
            return;
        }
        match op {
            MetaOp::Commit { area, upto, step: Step::ZeroNext } => {
                self.op = Some(MetaOp::Commit { area, upto, step: Step::Flush })
            }
            MetaOp::Commit { area, upto, step: Step::Flush } => {
                self.op = Some(MetaOp::Commit { area, upto, step: Step::WriteArea })
            }
            MetaOp::Commit { area, upto, step: Step::WriteArea } => {
                self.op = None;
                for e in &self.log[self.durable..upto] {
                    self.events.push(StoreEvent::Committed(*e, true));
                }
                self.durable = upto;
                if upto == self.area_end(area) {
                    self.current_area = area + 1;
                }
                self.drain_ready();
            }
            MetaOp::Merge { area, step: Step::Flush } => self.op = Some(MetaOp::Merge { area, step: Step::WriteArea }),
            MetaOp::Merge { step: _, .. } => {
                self.op = None;
                self.merge_pending = false;
                self.durable = self.log.len();
                self.next_free = self.layout.area_location(self.current_area) + self.area_count() as u64 + 1;
                self.events.push(StoreEvent::MergeCommitted(Ok(())));
            }
            MetaOp::Invalidate => {
                self.op = None;
                self.finish_invalidation();
            }
        }
    }

    fn io_pending(&self) -> bool {
        if self.io_in_flight || self.op.is_some() || self.merge_pending {
            return true;
        }
        if !self.valid {
            return !self.invalidation_done;
        }
        let area_full = self.log.len() == self.area_end(self.current_area);
        self.log.len() > self.durable && (self.in_order.is_empty() || area_full)
    }

    fn take_events(&mut self, out: &mut Vec<StoreEvent>) {
        out.append(&mut self.events);
    }

    fn usage(&self) -> Usage {
        let cs = self.layout.chunk_sectors;
        Usage {
            sectors_allocated: self.next_free * cs,
            total_sectors: self.layout.cow_sectors,
            metadata_sectors: (self.current_area + 2) * cs,
        }
    }

    fn set_cow_sectors(&mut self, sectors: u64) {
        self.layout.cow_sectors = sectors;
    }

    fn prepare_merge(&mut self) -> Result<Option<MergeBatch>, StoreError> {
        if !self.valid {
            return Err(StoreError::Unsupported("cannot merge an invalid snapshot"));
        }
        if !self.in_order.is_empty() || self.log.len() > self.durable || self.merge_pending {
            return Err(StoreError::Unsupported("cannot merge while exceptions are being committed"));
        }
        if self.area_count() == 0 {
            if self.current_area == 0 {
                return Ok(None);
            }
            self.current_area -= 1;
        }
        let start = self.area_start(self.current_area);
        let area = &self.log[start..];
        let last = *area.last().expect("the current area has entries");
        let mut count = 1u64;
        while (count as usize) < area.len() {
            let e = area[area.len() - 1 - count as usize];
            if e.old_chunk != last.old_chunk.wrapping_sub(count) || e.new_chunk != last.new_chunk.wrapping_sub(count) {
                break;
            }
            count += 1;
        }
        Ok(Some(MergeBatch { old_chunk: last.old_chunk + 1 - count, new_chunk: last.new_chunk + 1 - count, count }))
    }

    fn commit_merge(&mut self, count: u64) -> Result<(), StoreError> {
        if count as usize > self.area_count() {
            return Err(StoreError::Unsupported("commit_merge of more exceptions than the current area holds"));
        }
        if self.merge_pending || !self.valid {
            return Err(StoreError::Unsupported("a merge commit is already under way or the snapshot is invalid"));
        }
        let keep = self.log.len() - count as usize;
        self.log.truncate(keep);
        self.durable = self.durable.min(keep);
        self.merge_pending = true;
        Ok(())
    }
}
