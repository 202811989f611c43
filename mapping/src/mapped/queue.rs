//! The per-thread queue of a mapped device: admits requests (or holds them while the
//! device is suspended), cuts them into pieces at segment and target boundaries, asks
//! each target's per-thread queue where a piece goes, and merges the pieces'
//! completions back into one per request.
//!
//! # Two paths
//! * Pass-through: a read or write that lies inside one segment whose target has a
//!   [`crate::target::Target::direct_remap`] (`linear`) goes straight to the child queue
//!   at the shifted sector, tagged with an index that keeps only the caller's tag; its
//!   completion goes straight into the caller's `poll` buffer. No slot, no pieces, no
//!   call to the target.
//! * General: everything else gets a slot and is cut into pieces, each mapped by its
//!   target's queue; the pieces' completions merge into one.
//!
//! Both count in the same admission (`active`), so a suspend waits for either.

use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;

use udm_drivers::validate::validate_request;
use udm_drivers::{Completion, IoError, IoOp, IoQueue, IoRequest, QueueFull, SgList, SECTOR_SIZE};

use crate::mapped::context::TargetContext;
use crate::mapped::io_core::{Child, IoCore, DIRECT, INTERNAL, NO_SEGMENT, PIECE_SEGMENT};
use crate::mapped::{DeviceShared, QueueShared, GEN_SHIFT, REMOVED, SUSPENDED};
use crate::table::{HotSegment, Table, NOT_DIRECT};
use crate::target::{DevIndex, MapOutcome, PartId, QueueSetup, TargetIo, TargetQueue};
use udm_drivers::fixed_ring::FixedRing;

/// Completions reaped from a child per call.
const REAP_BATCH: usize = 64;

const NO_TABLE: IoError = IoError::Rejected { reason: "the device has no live table: load a table and resume it" };
const REMOVED_ERR: IoError = IoError::DeviceGone { reason: "the mapped device was removed" };
/// `MappedQueue::last` before any pass-through request: holds no sector.
const NO_SEGMENT_YET: HotSegment = HotSegment { start: 0, end: 0, shift: 0, child: NOT_DIRECT, max_sectors: 0 };

/// An admission word no device state equals (it would take 2^62 table swaps).
const NEVER: u64 = u64::MAX;

const BROKEN: IoError =
    IoError::DeviceGone { reason: "a device below the table could not open a queue for this thread" };

/// `repr(C)`: the fields the pass-through path reads come first, so that with `io` and
/// `held` (the next two lines) it touches three cache lines of the queue.
#[repr(C)]
pub(crate) struct MappedQueue {
    /// A copy of the segment of the last read or write, so that the next one to the
    /// same segment reads nothing outside this queue (`end == 0`: none yet).
    last: HotSegment,
    /// The device state word under which requests may be started without further
    /// checks: `generation << GEN_SHIFT` (not suspended, not removed) once that table
    /// is loaded with queues open below, otherwise a value the state never takes.
    admit_state: u64,
    dev: Arc<DeviceShared>,
    /// Logical block size of the table in sectors, minus one (see [`Table`]).
    block_mask: u64,
    /// The table takes writes.
    writable: bool,
    io: IoCore,
    held: FixedRing<IoRequest>,
    depth: usize,
    /// The generation of `table`.
    generation: u64,
    /// Whether `generation` has been loaded at all (a fresh queue loads on first use).
    loaded: bool,
    table: Option<Arc<Table>>,
    /// Opening the table's queues failed on this thread: all I/O fails.
    broken: bool,
    targets: Vec<Box<dyn TargetQueue>>,
    /// Segments whose target queue wants every poll.
    polled: Vec<u32>,
    reaped: Box<[Completion]>,
}

impl MappedQueue {
    pub fn new(dev: Arc<DeviceShared>, shared: Arc<QueueShared>, depth: usize) -> Self {
        MappedQueue {
            dev,
            depth,
            generation: 0,
            loaded: false,
            admit_state: NEVER,
            last: NO_SEGMENT_YET,
            block_mask: u64::MAX,
            writable: false,
            table: None,
            broken: false,
            targets: Vec::new(),
            polled: Vec::new(),
            io: IoCore::new(depth, shared),
            held: FixedRing::new(depth, IoRequest::flush(0)),
            reaped: vec![Completion::EMPTY; REAP_BATCH].into_boxed_slice(),
        }
    }

    /// Callers' requests this queue holds, until `poll` returns them.
    fn requests_held(&self) -> usize {
        self.io.requests_in_use() + self.held.len() + self.io.done.len()
    }

    /// Whether a target of this queue still carries internal work that only this queue's
    /// polls advance, and that other queues may wait for: a snapshot store's metadata
    /// commit is handed to whichever queue finished the previous one, and it covers other
    /// writers' exceptions. `in_flight` counts it so a caller keeps polling (the
    /// contract's "poll until `in_flight()` reaches zero") instead of going to sleep
    /// while another thread's write waits on it.
    fn carries_internal_work(&self) -> bool {
        self.polled.iter().any(|&i| !self.targets[i as usize].is_idle())
    }

    /// Whether nothing is in flight for the current table, so it may be replaced.
    fn idle(&self) -> bool {
        self.io.active() == 0 && self.io.blocked.is_empty() && self.targets.iter().all(|t| t.is_idle())
    }

    /// Loads the live table published with `generation`, reusing the child queues of
    /// devices that stay. Runs only when idle; allocates (once per table change).
    fn switch_table(&mut self, generation: u64) {
        self.open_table(generation);
        self.admit_state = if self.table.is_some() && !self.broken { generation << GEN_SHIFT } else { NEVER };
    }

    /// [`MappedQueue::switch_table`] without the admission word.
    fn open_table(&mut self, generation: u64) {
        self.generation = generation;
        self.loaded = true;
        self.last = NO_SEGMENT_YET;
        self.table = self.dev.live.load_full();
        if let Some(t) = self.table.as_deref() {
            self.block_mask = t.block_mask;
            self.writable = !t.info.read_only;
        }
        self.targets.clear();
        self.polled.clear();
        self.broken = false;
        let mut old: Vec<Child> = std::mem::take(&mut self.io.children);
        let Some(table) = self.table.clone() else { return };
        for d in table.devices.iter() {
            if let Some(pos) = old.iter().position(|c| c.id == d.id && Arc::ptr_eq(&c.device, &d.device)) {
                self.io.children.push(old.swap_remove(pos));
                continue;
            }
            match d.device.open_queue(self.depth) {
                Ok(queue) => self.io.children.push(Child {
                    id: d.id,
                    device: Arc::clone(&d.device),
                    queue,
                    outstanding: 0,
                    raw: 0,
                    want_tagged: false,
                    dirty: false,
                }),
                Err(e) => {
                    tracing::error!(device = %d.name.get(), error = %e, "cannot open a queue below a mapped device");
                    self.broken = true;
                    return;
                }
            }
        }
        for (i, seg) in table.segments.iter().enumerate() {
            let infos: Vec<_> = seg.devices.iter().map(|d| d.device().info()).collect();
            match seg.target.open_queue(&QueueSetup { depth: self.depth, devices: &infos }) {
                Ok(q) => {
                    if q.needs_poll() {
                        self.polled.push(i as u32);
                    }
                    self.targets.push(q);
                }
                Err(e) => {
                    tracing::error!(error = %e, "a target could not open its per-thread queue");
                    self.broken = true;
                    return;
                }
            }
        }
    }

    /// Admits `req` or hands it back to be held (suspended, or a new table not yet
    /// switched to because work for the old one is in flight).
    fn try_admit(&mut self, req: IoRequest) -> Result<(), IoRequest> {
        loop {
            // Only the 0 -> 1 step of `active` needs the Dekker fence: while this queue's
            // published count stays above 0, a suspend cannot finish draining, so a
            // slightly stale view of the state admits nothing it should not (the suspend
            // keeps waiting until this queue sees the flag and its count falls to 0).
            let was_idle = self.io.active() == 0;
            self.io.enter();
            if was_idle {
                fence(Ordering::SeqCst);
            }
            let state = self.dev.state.load(Ordering::Acquire);
            let generation = state >> GEN_SHIFT;
            if state & REMOVED != 0 {
                self.io.fail_unslotted(req.tag, REMOVED_ERR);
                return Ok(());
            }
            if state & SUSPENDED != 0 {
                self.io.leave();
                return Err(req);
            }
            if !self.loaded || generation != self.generation {
                self.io.leave();
                if !self.idle() {
                    return Err(req);
                }
                self.switch_table(generation);
                continue;
            }
            return {
                self.start(req);
                Ok(())
            };
        }
    }

    /// Starts an admitted request (counted by `enter`): on the pass-through path when it
    /// can, else on the general one.
    #[inline(always)]
    fn start(&mut self, req: IoRequest) {
        let sector = req.sector;
        // Inside one segment with a direct remap, aligned, and what `validate_request`
        // would accept (the child checks the buffer length against the sectors).
        if req.op.has_data()
            && (self.writable || req.op == IoOp::Read)
            && ((self.last.start <= sector && sector < self.last.end) || self.find_segment(sector))
            && self.last.child != NOT_DIRECT
            && req.sectors != 0
            && req.sectors <= self.last.end - sector
            && req.sectors <= u64::from(self.last.max_sectors)
            && (sector | req.sectors) & self.block_mask == 0
        {
            let creq = IoRequest { sector: sector.wrapping_add(self.last.shift), ..req };
            if self.io.submit_raw(self.last.child, creq).is_err() {
                self.start_translated(req);
            }
            return;
        }
        self.start_general(req);
    }

    /// The pass-through path when the child has core-tagged requests out: the caller's
    /// tag waits in an index, and the child gets the index.
    #[inline(never)]
    fn start_translated(&mut self, req: IoRequest) {
        let idx = self.io.take_direct(req.tag);
        let creq = IoRequest { sector: req.sector.wrapping_add(self.last.shift), tag: DIRECT | u64::from(idx), ..req };
        if self.io.submit_child(self.last.child, creq).is_err() {
            // The child queue is full: the general path holds the request until it has
            // room.
            self.io.put_index(idx);
            self.start_general(req);
        }
    }

    /// Makes the segment holding `sector` the one `start` checks first; false when
    /// there is none (no table, a broken queue, or `sector` past the end).
    #[inline(never)]
    fn find_segment(&mut self, sector: u64) -> bool {
        let Some(table) = self.table.as_deref() else { return false };
        if self.broken || sector >= table.info.sectors {
            return false;
        }
        self.last = table.hot[table.lookup(sector)];
        true
    }

    /// Starts an admitted request on the general path: a slot, pieces, targets' `map`.
    #[inline(never)]
    fn start_general(&mut self, req: IoRequest) {
        let Some(table) = self.table.as_ref() else {
            self.io.fail_unslotted(req.tag, NO_TABLE);
            return;
        };
        if self.broken {
            self.io.fail_unslotted(req.tag, BROKEN);
            return;
        }
        if let Err(e) = validate_request(&table.info, &req) {
            self.io.fail_unslotted(req.tag, e);
            return;
        }
        let slot = self.io.alloc(req);
        issue(table, &mut self.targets, &mut self.io, slot);
    }

    /// Submission when the one-compare admission of `submit` does not apply: the queue
    /// is idle (the Dekker fence), holds requests, or the device state changed.
    #[cold]
    #[inline(never)]
    fn submit_slow(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.requests_held() >= self.depth {
            return Err(QueueFull(req));
        }
        if !self.held.is_empty() {
            self.release_held();
            if !self.held.is_empty() {
                self.held.push(req);
                return Ok(());
            }
        }
        if let Err(req) = self.try_admit(req) {
            self.held.push(req);
        }
        Ok(())
    }

    /// Admits held requests in order while the device admits.
    fn release_held(&mut self) {
        while let Some(req) = self.held.front() {
            if self.try_admit(req).is_err() {
                return;
            }
            self.held.pop();
        }
    }
}

/// Reaps every child with requests out. Pass-through completions go straight into
/// `out` (children poll into it, and the caller's tags are put back in place) while it
/// has room, else into the completion ring; the others are routed to their pieces and
/// targets. Returns how many completions it left at the front of `out`.
fn reap_children(
    table: &Table,
    io: &mut IoCore,
    targets: &mut [Box<dyn TargetQueue>],
    reaped: &mut [Completion],
    out: &mut [Completion],
) -> usize {
    let mut filled = 0;
    for ci in 0..io.children.len() {
        while io.children[ci].outstanding != 0 {
            let direct_room = filled < out.len();
            let buf: &mut [Completion] = if direct_room { &mut out[filled..] } else { &mut *reaped };
            let raw = io.children[ci].raw != 0;
            let n = io.children[ci].queue.poll(buf);
            if n == 0 {
                break;
            }
            if raw {
                // Every completion of this child carries its caller's tag.
                io.raw_done(ci, n);
                if direct_room {
                    filled += n;
                } else {
                    for &c in &buf[..n] {
                        io.done.push(c);
                    }
                }
                if n < buf.len() {
                    break;
                }
                continue;
            }
            io.children[ci].outstanding -= n;
            let mut kept = 0;
            for i in 0..n {
                let tag = buf[i].tag;
                if tag >> 62 != DIRECT >> 62 {
                    route(table, io, targets, ci as u32, buf[i]);
                    continue;
                }
                let caller_tag = io.direct_done(tag as u32);
                if direct_room {
                    // In place: only the tag changes (no copy of the result through the
                    // stack). `kept <= i`: only entries already read are overwritten.
                    if kept != i {
                        buf[kept] = buf[i];
                    }
                    buf[kept].tag = caller_tag;
                    kept += 1;
                } else {
                    io.done.push(Completion { tag: caller_tag, result: buf[i].result });
                }
            }
            filled += kept;
            if n < buf.len() {
                break;
            }
        }
    }
    filled
}

/// Sends one child completion of the general path to the piece or target it belongs to.
#[inline]
fn route(table: &Table, io: &mut IoCore, targets: &mut [Box<dyn TargetQueue>], child: u32, c: Completion) {
    if c.tag & INTERNAL != 0 {
        let segment = ((c.tag >> 32) & 0x7fff_ffff) as u32;
        io.leave();
        let seg = &table.segments[segment as usize];
        let mut ctx = TargetContext { io, dev_map: &seg.dev_map, segment };
        targets[segment as usize].child_done(c.tag as u32, c.result, &mut ctx);
        return;
    }
    let segment = ((c.tag >> 32) & PIECE_SEGMENT) as u32;
    if let Err(e) = c.result {
        if segment != NO_SEGMENT {
            let seg = &table.segments[segment as usize];
            if let Some(pos) = seg.dev_map.iter().position(|&x| x == child) {
                seg.target.remap_error(DevIndex(pos as u16), e);
            }
        }
    }
    io.part_done(c.tag as u32, c.result);
}

/// Lets every target queue that asked for it make progress.
fn poll_targets(table: &Table, io: &mut IoCore, targets: &mut [Box<dyn TargetQueue>], polled: &[u32]) {
    for &segment in polled {
        let seg = &table.segments[segment as usize];
        let mut ctx = TargetContext { io, dev_map: &seg.dev_map, segment };
        targets[segment as usize].poll(&mut ctx);
    }
}

/// Continues requests that found a child queue full.
fn retry_blocked(table: &Table, io: &mut IoCore, targets: &mut [Box<dyn TargetQueue>]) {
    for _ in 0..io.blocked.len() {
        let Some(slot) = io.blocked.pop() else { break };
        issue(table, targets, io, slot);
    }
}

/// Issues pieces of request `slot` until it is fully issued or a child queue is full
/// (then the slot waits in `io.blocked` and continues from `poll`).
#[inline]
fn issue(table: &Table, targets: &mut [Box<dyn TargetQueue>], io: &mut IoCore, slot: u32) {
    loop {
        if let Some((child, creq)) = io.slots[slot as usize].pending.take() {
            if let Err(QueueFull(r)) = io.submit_child(child, creq) {
                io.slots[slot as usize].pending = Some((child, r));
                io.blocked.push(slot);
                return;
            }
        }
        let Some((segment, io_piece)) = next_piece(table, &io.slots[slot as usize], slot) else { break };
        let step = {
            let s = &mut io.slots[slot as usize];
            let step = s.cursor;
            s.cursor += if io_piece.op == IoOp::Flush { 1 } else { io_piece.sectors };
            if segment != NO_SEGMENT {
                s.seg_hint = segment;
            }
            s.outstanding += 1;
            step
        };
        if segment == NO_SEGMENT {
            // A table-wide flush of one distinct device below.
            let child = table.flush_children[step as usize];
            let creq = IoRequest { tag: (u64::from(NO_SEGMENT) << 32) | u64::from(slot), ..IoRequest::flush(0) };
            if let Err(QueueFull(r)) = io.submit_child(child, creq) {
                io.slots[slot as usize].pending = Some((child, r));
                io.blocked.push(slot);
                return;
            }
            continue;
        }
        let seg = &table.segments[segment as usize];
        let mut ctx = TargetContext { io, dev_map: &seg.dev_map, segment };
        match targets[segment as usize].map(&io_piece, &mut ctx) {
            MapOutcome::Remap { dev, sector } => {
                let child = seg.dev_map[dev.0 as usize];
                let creq = IoRequest {
                    op: io_piece.op,
                    sector: if io_piece.op == IoOp::Flush { 0 } else { sector },
                    sectors: io_piece.sectors,
                    sg: io_piece.sg,
                    fua: io_piece.fua,
                    tag: (u64::from(segment) << 32) | u64::from(slot),
                };
                if let Err(QueueFull(r)) = io.submit_child(child, creq) {
                    io.slots[slot as usize].pending = Some((child, r));
                    io.blocked.push(slot);
                    return;
                }
            }
            MapOutcome::Done(result) => io.part_done(slot, result),
            MapOutcome::Accepted => {}
        }
    }
    let s = &mut io.slots[slot as usize];
    s.issued = true;
    if s.outstanding == 0 {
        io.finish(slot);
    }
}

/// The next piece of a request: its segment (or `NO_SEGMENT` for a table-wide device
/// flush) and what to hand the target; `None` once everything is issued.
#[inline]
fn next_piece(table: &Table, s: &crate::mapped::io_core::Slot, slot: u32) -> Option<(u32, TargetIo)> {
    let req = &s.req;
    if req.op == IoOp::Flush {
        let step = s.cursor as usize;
        let devices = table.flush_children.len();
        let flush = |flush_index| TargetIo {
            op: IoOp::Flush,
            offset: 0,
            sectors: 0,
            sg: SgList::empty(),
            fua: req.fua,
            part: PartId(slot),
            flush_index,
        };
        if step < devices {
            return Some((NO_SEGMENT, flush(0)));
        }
        let &(segment, index) = table.flush_maps.get(step - devices)?;
        return Some((segment, flush(index)));
    }
    if s.cursor >= req.sectors {
        return None;
    }
    let sector = req.sector + s.cursor;
    let hint = s.seg_hint as usize;
    let segment = match table.segments.get(hint) {
        Some(seg) if seg.start <= sector && sector < seg.start + seg.length => hint,
        _ => match table.segments.get(hint + 1) {
            Some(seg) if seg.start <= sector && sector < seg.start + seg.length => hint + 1,
            _ => table.lookup(sector),
        },
    };
    let seg = &table.segments[segment];
    let offset = sector - seg.start;
    let mut len = (req.sectors - s.cursor).min(seg.length - offset);
    let boundary = seg.boundary.load(Ordering::Relaxed);
    if boundary != 0 {
        len = len.min(boundary - offset % boundary);
    }
    if req.op.has_data() {
        len = len.min(seg.max_sectors);
    }
    let sg = if !req.op.has_data() {
        SgList::empty()
    } else if len == req.sectors {
        // The whole request in one piece (the common case): no window to compute.
        req.sg
    } else {
        req.sg.slice((s.cursor * SECTOR_SIZE) as usize, (len * SECTOR_SIZE) as usize)
    };
    let io = TargetIo { op: req.op, offset, sectors: len, sg, fua: req.fua, part: PartId(slot), flush_index: 0 };
    Some((segment as u32, io))
}

impl IoQueue for MappedQueue {
    #[inline]
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        // The common case needs no fence: this queue's published count is already
        // non-zero (a suspend cannot finish draining before this request completes),
        // nothing is held (order), and the state is the one the loaded table was
        // published under (one load, one compare); with nothing held, `has_room` is
        // `in_flight() < depth`.
        if self.io.active() != 0
            && self.held.is_empty()
            && self.io.has_room(self.io.done.len())
            && self.dev.state.load(Ordering::Acquire) == self.admit_state
        {
            self.io.enter();
            self.start(req);
            return Ok(());
        }
        self.submit_slow(req)
    }

    fn kick(&mut self) {
        self.io.kick_dirty();
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        // Completions already waiting first, then what the children finished.
        let mut n = self.io.done.drain_into(out);
        if let Some(table) = self.table.as_deref() {
            n += reap_children(table, &mut self.io, &mut self.targets, &mut self.reaped, &mut out[n..]);
            if !self.polled.is_empty() {
                poll_targets(table, &mut self.io, &mut self.targets, &self.polled);
            }
            if !self.io.blocked.is_empty() {
                retry_blocked(table, &mut self.io, &mut self.targets);
            }
        }
        if !self.held.is_empty() {
            self.release_held();
        }
        self.io.kick_dirty();
        n + self.io.done.drain_into(&mut out[n..])
    }

    fn in_flight(&self) -> usize {
        self.requests_held() + usize::from(self.carries_internal_work())
    }

    fn depth(&self) -> usize {
        self.depth
    }
}
