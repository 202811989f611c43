//! A polled I/O queue pair: turns `IoRequest`s into NVMe commands (split at MDTS and
//! wherever PRPs cannot express the scatter-gather layout), rings one doorbell per
//! batch, reaps completions by phase tag, and recovers from timeouts and controller
//! resets.
//!
//! Per request a slot records the tag and how many commands are still out; per command
//! identifier a slot records its request, its submission entry (for retry after a
//! reset) and its bounce buffer. All of it is allocated when the queue opens.

use std::ptr::NonNull;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::completion_ring::{completion_ring, CompletionRing};
use crate::device::{DeviceInfo, IoQueue};
use crate::dma::{DmaMemory, PagePolicy};
use crate::error::{DeviceError, IoError};
use crate::nvme::cmd::{io, Command, CompletionEntry};
use crate::nvme::controller::Controller;
use crate::nvme::dma_space::{DmaSpace, Translations};
use crate::nvme::hybrid_poll::HybridPoll;
use crate::nvme::prp::{self, PAGE};
use crate::nvme::ring::{QueueRing, RingLayout};
use crate::request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
use crate::sg::SgList;
use crate::validate::validate_request;

/// Bounce buffers per queue, for layouts PRPs cannot express and unregistered memory.
const BOUNCE_SLOTS: usize = 16;
/// Bytes per bounce buffer.
const BOUNCE_SIZE: usize = 128 << 10;
/// Most blocks one Write Zeroes command covers (16-bit 0-based count).
const WRITE_ZEROES_MAX_BLOCKS: u64 = 1 << 16;
/// Most blocks in one Dataset Management range (32-bit count).
const DSM_RANGE_MAX_BLOCKS: u64 = u32::MAX as u64;
/// Ranges in one Dataset Management command (256 x 16 bytes = one page).
const DSM_MAX_RANGES: u64 = 256;
/// Times a command is resubmitted after controller resets before it fails.
const MAX_ATTEMPTS: u8 = 3;
/// Polls between health checks (timeouts, CSTS.CFS): a clock read and an MMIO read
/// are too dear for every poll (in a TCG guest whose clock source is the emulated HPET
/// both are trips into the device model).
const HEALTH_CHECK_POLLS: u32 = 4096;
/// Polls a nap in `wait` counts for towards the next health check.
const NAP_POLLS: u32 = 64;
/// How long an aborted command may take to come back before the controller is reset.
const ABORT_GRACE: Duration = Duration::from_secs(1);
const NO_BOUNCE: u32 = u32::MAX;
const ALL_BOUNCE: u32 = ((1u64 << BOUNCE_SLOTS) - 1) as u32;

#[derive(Clone, Copy)]
struct CmdSlot {
    active: bool,
    req: u16,
    sqe: Command,
    /// Offset of this command's bytes in the bounce area, or NO_BOUNCE.
    bounce: u32,
    /// Byte offset of this command's data in its request, and length (bounce copies).
    offset: u32,
    len: u32,
    /// When a health check first saw the command at the device (rung): it was
    /// submitted no later than this, so a timeout counted from here never fires early.
    /// Stamping at health checks keeps clock reads off the per-batch path.
    seen: Option<Instant>,
    aborted_at: Option<Instant>,
    timed_out: bool,
    attempts: u8,
}

const IDLE_CMD: CmdSlot = CmdSlot {
    active: false,
    req: 0,
    sqe: Command {
        cdw0: 0,
        nsid: 0,
        cdw2: 0,
        cdw3: 0,
        mptr: 0,
        prp1: 0,
        prp2: 0,
        cdw10: 0,
        cdw11: 0,
        cdw12: 0,
        cdw13: 0,
        cdw14: 0,
        cdw15: 0,
    },
    bounce: NO_BOUNCE,
    offset: 0,
    len: 0,
    seen: None,
    aborted_at: None,
    timed_out: false,
    attempts: 0,
};

#[derive(Clone, Copy)]
struct ReqSlot {
    tag: u64,
    op: IoOp,
    sg: SgList,
    pending: u32,
    error: Option<IoError>,
    /// Bounce buffers held (bit n: buffer n), given back when the request completes.
    bounce_mask: u32,
}

/// Offsets of the parts of a queue's DMA memory.
#[derive(Debug, Clone, Copy)]
struct Layout {
    sq: usize,
    cq: usize,
    prp: usize,
    bounce: usize,
    total: usize,
}

impl Layout {
    fn new(entries: usize) -> Self {
        let sq = 0;
        let cq = (entries * 64).next_multiple_of(PAGE);
        let prp = cq + (entries * 16).next_multiple_of(PAGE);
        let bounce = prp + entries * PAGE;
        Layout { sq, cq, prp, bounce, total: bounce + BOUNCE_SLOTS * BOUNCE_SIZE }
    }
}

/// How a read or write goes to the device.
#[derive(Clone, Copy)]
enum DataPlan {
    /// PRPs straight to the caller's memory, in `pieces` commands.
    Direct,
    /// Through `n` bounce buffers.
    Bounce(usize),
}

/// One queue pair, owned by one thread.
pub struct NvmeQueue {
    ctrl: Arc<Controller>,
    space: Arc<DmaSpace>,
    nsid: u32,
    /// The namespace's geometry without the size limit: the controller judges the range and answers
    /// LBA Out of Range itself.
    check_info: DeviceInfo,
    block_shift: u32,
    max_cmd: usize,
    qid: u16,
    ring: QueueRing,
    memory: DmaMemory,
    iova: u64,
    layout: Layout,
    cmds: Box<[CmdSlot]>,
    free_cids: Vec<u16>,
    reqs: Box<[ReqSlot]>,
    free_reqs: Vec<u16>,
    /// Free bounce buffers (bit n: buffer n).
    free_bounce: u32,
    pieces: Vec<(usize, usize)>,
    done: CompletionRing,
    in_flight: usize,
    generation: u64,
    /// Polls left until the next health check.
    health_countdown: u32,
    /// When `wait` sleeps instead of spinning.
    hybrid: HybridPoll,
    dead: bool,
}

static UNREGISTERED_WARNING: std::sync::Once = std::sync::Once::new();

impl std::fmt::Debug for NvmeQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmeQueue").field("qid", &self.qid).field("nsid", &self.nsid).finish()
    }
}

impl NvmeQueue {
    /// Opens a queue pair for namespace `nsid` with room for `depth` requests.
    pub fn open(ctrl: &Arc<Controller>, nsid: u32, info: DeviceInfo, depth: usize) -> Result<Self, DeviceError> {
        let depth = depth.max(1);
        let limit = (ctrl.capabilities().max_queue_entries as usize).clamp(2, 1024);
        // Requests split into several commands: leave room for that.
        let entries = (depth * 4).next_power_of_two().max(64).min(limit);
        let depth = depth.min(entries - 1);
        let layout = Layout::new(entries);
        let memory = DmaMemory::allocate(layout.total, PagePolicy::PreferHuge)?;
        let space = Arc::clone(ctrl.dma_space());
        let iova = space.map(memory.region())?;
        let qid = match ctrl.take_qid() {
            Ok(q) => q,
            Err(e) => {
                let _ = space.unmap(memory.region());
                return Err(e);
            }
        };
        let (sq_db, cq_db, shadow) = ctrl.doorbells(qid);
        let base = memory.as_ptr();
        let ring_layout = RingLayout {
            qid,
            entries: entries as u16,
            // SAFETY: the offsets lie inside `memory` (Layout::new sized it).
            sq: unsafe { NonNull::new_unchecked(base.add(layout.sq).cast()) },
            // SAFETY: as above.
            cq: unsafe { NonNull::new_unchecked(base.add(layout.cq).cast()) },
            sq_doorbell: sq_db,
            cq_doorbell: cq_db,
            shadow,
        };
        // SAFETY: the SQ and CQ areas of `memory` (zero-filled) belong to this ring only;
        // `memory` and the controller's registers outlive it (fields of the same queue,
        // an Arc to the controller).
        let mut ring = unsafe { QueueRing::new(ring_layout) };
        ring.restart();
        let generation = ctrl.generation();
        if let Err(e) = ctrl.create_queue_pair(qid, entries as u16, iova + layout.sq as u64, iova + layout.cq as u64) {
            ctrl.release_qid(qid);
            let _ = space.unmap(memory.region());
            return Err(e);
        }
        let block_shift = info.logical_block_size.trailing_zeros();
        let mut check_info = info;
        check_info.sectors = u64::MAX / 2;
        let sg_placeholder = SgList::empty();
        Ok(NvmeQueue {
            max_cmd: ctrl.max_transfer(),
            ctrl: Arc::clone(ctrl),
            space,
            nsid,
            check_info,
            block_shift,
            qid,
            ring,
            memory,
            iova,
            layout,
            cmds: vec![IDLE_CMD; entries].into_boxed_slice(),
            // CID entries-1 is never used: at most entries-1 commands are outstanding.
            free_cids: (0..(entries - 1) as u16).rev().collect(),
            reqs: vec![
                ReqSlot { tag: 0, op: IoOp::Flush, sg: sg_placeholder, pending: 0, error: None, bounce_mask: 0 };
                depth
            ]
            .into_boxed_slice(),
            free_reqs: (0..depth as u16).rev().collect(),
            free_bounce: ALL_BOUNCE,
            pieces: Vec::with_capacity(entries),
            done: completion_ring(2 * depth),
            in_flight: 0,
            generation,
            health_countdown: HEALTH_CHECK_POLLS,
            hybrid: HybridPoll::default(),
            dead: false,
        })
    }

    /// The queue identifier on the controller.
    pub fn qid(&self) -> u16 {
        self.qid
    }

    /// How many times `wait` has slept rather than returned to polling at once.
    pub fn naps(&self) -> u64 {
        self.hybrid.naps()
    }

    fn prp_page(&self, cid: u16) -> (*mut u64, u64) {
        let off = self.layout.prp + cid as usize * PAGE;
        // SAFETY: cid < entries: inside the PRP area of `memory`.
        (unsafe { self.memory.as_ptr().add(off).cast() }, self.iova + off as u64)
    }

    /// The bounce area at `offset` (from a bounce buffer's start plus a position in it).
    fn bounce_buffer(&self, offset: u32) -> (*mut u8, u64) {
        let off = self.layout.bounce + offset as usize;
        // SAFETY: offset < BOUNCE_SLOTS * BOUNCE_SIZE: inside the bounce area of `memory`.
        (unsafe { self.memory.as_ptr().add(off) }, self.iova + off as u64)
    }

    /// How a data transfer can go: PRPs straight to the caller's memory (pieces in
    /// `self.pieces`), or bounce buffers.
    fn plan_data(&mut self, sg: &SgList, table: &Translations) -> DataPlan {
        self.pieces.clear();
        let mapped = sg.chunks().all(|(p, l)| table.translate(p as u64, l as u64).is_some());
        if mapped {
            let pieces = &mut self.pieces;
            let block = 1usize << self.block_shift;
            let fits =
                prp::plan(sg.chunks().map(|(p, l)| (p as u64, l)), block, self.max_cmd, |o, l| pieces.push((o, l)));
            // A layout that needs more commands than the queue has identifiers (many
            // small unaligned pieces) is cheaper through a bounce buffer anyway.
            if fits && pieces.len() < self.cmds.len() {
                return DataPlan::Direct;
            }
        } else {
            UNREGISTERED_WARNING.call_once(|| {
                tracing::warn!(
                    "NVMe I/O into memory that was not registered (BlockDevice::register_memory): \
                 copying through bounce buffers, which is slower"
                )
            });
        }
        self.pieces.clear();
        DataPlan::Bounce(sg.len().div_ceil(BOUNCE_SIZE))
    }

    fn fail_now(&mut self, req: IoRequest, error: IoError) -> Result<(), QueueFull> {
        if self.done.is_full() {
            return Err(QueueFull(req));
        }
        self.done.push(Completion { tag: req.tag, result: Err(error) });
        Ok(())
    }

    fn start_command(&mut self, req_slot: u16, mut sqe: Command, bounce: u32, offset: usize, len: usize) {
        let cid = self.free_cids.pop().expect("caller reserved command identifiers");
        sqe.set_cid(cid);
        self.cmds[cid as usize] = CmdSlot {
            active: true,
            req: req_slot,
            sqe,
            bounce,
            offset: offset as u32,
            len: len as u32,
            seen: None,
            aborted_at: None,
            timed_out: false,
            attempts: 1,
        };
        self.ring.push(&sqe);
    }

    /// The next command identifier's PRP page; it is the one `start_command` takes.
    fn next_prp_page(&self) -> (*mut u64, u64) {
        self.prp_page(*self.free_cids.last().expect("caller reserved command identifiers"))
    }

    fn finish_command(&mut self, cid: u16, result: Result<(), IoError>) {
        let slot = self.cmds[cid as usize];
        self.cmds[cid as usize].active = false;
        self.free_cids.push(cid);
        let req = self.reqs[slot.req as usize];
        if slot.bounce != NO_BOUNCE && req.op == IoOp::Read && result.is_ok() {
            let (ptr, _) = self.bounce_buffer(slot.bounce);
            // SAFETY: the device finished writing `len` bytes into the bounce buffer; the
            // window belongs to the request (SgList contract).
            unsafe { req.sg.slice(slot.offset as usize, slot.len as usize).copy_from_raw(ptr) };
        }
        let r = &mut self.reqs[slot.req as usize];
        if let Err(e) = result {
            r.error.get_or_insert(e);
        }
        r.pending -= 1;
        if r.pending == 0 {
            self.free_bounce |= r.bounce_mask;
            let completion = Completion { tag: r.tag, result: r.error.map_or(Ok(()), Err) };
            self.free_reqs.push(slot.req);
            self.in_flight -= 1;
            self.done.push(completion);
        }
    }

    fn status_to_result(e: &CompletionEntry) -> Result<(), IoError> {
        match e.status_code() {
            (0, 0) => Ok(()),
            // Command Abort Requested: udm aborted it because it took too long.
            (0, 0x07) => Err(IoError::TimedOut),
            (sct, sc) => Err(IoError::Nvme { sct, sc }),
        }
    }

    /// Recreates the queue after a controller reset and resubmits (or fails) what was
    /// outstanding.
    fn recover(&mut self) {
        self.generation = self.ctrl.generation();
        self.ring.restart();
        let recreated = !self.ctrl.is_dead()
            && self
                .ctrl
                .create_queue_pair(
                    self.qid,
                    self.ring.entries(),
                    self.iova + self.layout.sq as u64,
                    self.iova + self.layout.cq as u64,
                )
                .map_err(|e| tracing::error!(qid = self.qid, error = %e, "recreating the I/O queue after reset"))
                .is_ok();
        if !recreated {
            self.dead = true;
        }
        let now = Instant::now();
        for cid in 0..self.cmds.len() as u16 {
            let c = self.cmds[cid as usize];
            if !c.active {
                continue;
            }
            if !recreated {
                self.finish_command(cid, Err(IoError::DeviceGone { reason: "NVMe controller reset failed" }));
            } else if c.timed_out {
                self.finish_command(cid, Err(IoError::TimedOut));
            } else if c.attempts >= MAX_ATTEMPTS {
                self.finish_command(cid, Err(IoError::DeviceGone { reason: "NVMe controller keeps being reset" }));
            } else {
                let slot = &mut self.cmds[cid as usize];
                slot.attempts += 1;
                slot.seen = Some(now);
                slot.aborted_at = None;
                let sqe = slot.sqe;
                self.ring.push(&sqe);
            }
        }
        self.ring.ring_sq();
    }

    #[inline]
    fn check_generation(&mut self) {
        if !self.dead && self.ctrl.generation() != self.generation {
            self.recover();
        }
    }

    /// Timeouts (abort, then reset) and controller fatal status (reset).
    fn check_health(&mut self) {
        let mut reset = self.ctrl.is_fatal();
        if reset {
            tracing::error!(bdf = %self.ctrl.bdf(), "controller fatal status (CSTS.CFS): resetting");
        }
        let now = Instant::now();
        let timeout = self.ctrl.options().io_timeout;
        // Commands pushed but not rung yet are not at the device: no clock runs for them.
        let all_rung = !self.ring.unrung();
        for cid in 0..self.cmds.len() as u16 {
            let c = self.cmds[cid as usize];
            if !c.active {
                continue;
            }
            let Some(sent) = c.seen else {
                if all_rung {
                    self.cmds[cid as usize].seen = Some(now);
                }
                continue;
            };
            match c.aborted_at {
                None if now.duration_since(sent) > timeout => {
                    tracing::warn!(qid = self.qid, cid, "NVMe command timed out: aborting it");
                    let aborted = self.ctrl.abort(self.qid, cid);
                    self.cmds[cid as usize].aborted_at = Some(now);
                    if !aborted {
                        self.cmds[cid as usize].timed_out = true;
                        reset = true;
                    }
                }
                Some(at) if now.duration_since(at) > ABORT_GRACE => {
                    self.cmds[cid as usize].timed_out = true;
                    reset = true;
                }
                _ => {}
            }
        }
        if reset {
            if let Err(e) = self.ctrl.reset(self.generation) {
                tracing::error!(error = %e, "NVMe controller reset failed");
            }
            self.recover();
        }
    }

    /// The Read or Write command for bytes `off..off + len` of `req`.
    #[inline]
    fn data_command(&self, req: &IoRequest, off: usize, len: usize, prps: (u64, u64)) -> Command {
        let opcode = if req.op == IoOp::Read { io::READ } else { io::WRITE };
        let lba = ((req.sector * SECTOR_SIZE) >> self.block_shift) + (off >> self.block_shift) as u64;
        Command::read_write(opcode, self.nsid, lba, (len >> self.block_shift) as u32, req.fua, prps)
    }

    fn submit_data(&mut self, req: IoRequest, slot: u16, plan: DataPlan, table: &Translations) {
        match plan {
            DataPlan::Direct => {
                for i in 0..self.pieces.len() {
                    let (off, len) = self.pieces[i];
                    let (list, list_iova) = self.next_prp_page();
                    let window = req.sg.slice(off, len);
                    let chunks = window
                        .chunks()
                        .map(|(p, l)| (table.translate(p as u64, l as u64).expect("checked by plan_data"), l));
                    // SAFETY: the PRP page of the command identifier start_command takes,
                    // idle until the command is pushed; the pieces come from prp::plan.
                    let prps = unsafe { prp::build(chunks, list, list_iova) };
                    let sqe = self.data_command(&req, off, len, prps);
                    self.start_command(slot, sqe, NO_BOUNCE, off, len);
                }
            }
            DataPlan::Bounce(_) => {
                // Each BOUNCE_SIZE part of the request gets a bounce buffer; commands of
                // at most the MDTS carry it.
                let piece = BOUNCE_SIZE.min(self.max_cmd);
                let mut mask = 0u32;
                let mut buffer = 0u32;
                let mut off = 0;
                while off < req.sg.len() {
                    if off % BOUNCE_SIZE == 0 {
                        buffer = self.free_bounce.trailing_zeros();
                        self.free_bounce &= !(1 << buffer);
                        mask |= 1 << buffer;
                    }
                    let len = piece.min(req.sg.len() - off);
                    let at = buffer * BOUNCE_SIZE as u32 + (off % BOUNCE_SIZE) as u32;
                    let (ptr, biova) = self.bounce_buffer(at);
                    if req.op == IoOp::Write {
                        // SAFETY: `len` bytes fit in the rest of the bounce buffer (pieces
                        // divide BOUNCE_SIZE), which this request holds.
                        unsafe { req.sg.slice(off, len).copy_to_raw(ptr) };
                    }
                    let (list, list_iova) = self.next_prp_page();
                    // SAFETY: one contiguous chunk; the list page is idle.
                    let prps = unsafe { prp::build([(biova, len)].into_iter(), list, list_iova) };
                    let sqe = self.data_command(&req, off, len, prps);
                    self.start_command(slot, sqe, at, off, len);
                    off += len;
                }
                self.reqs[slot as usize].bounce_mask = mask;
            }
        }
    }

    fn commands_for(&self, req: &IoRequest) -> usize {
        let blocks = (req.sectors * SECTOR_SIZE) >> self.block_shift;
        match req.op {
            IoOp::Flush => 1,
            IoOp::WriteZeroes => blocks.div_ceil(WRITE_ZEROES_MAX_BLOCKS) as usize,
            IoOp::Discard => blocks.div_ceil(DSM_RANGE_MAX_BLOCKS).div_ceil(DSM_MAX_RANGES) as usize,
            IoOp::Read | IoOp::Write => unreachable!("data commands are planned"),
        }
    }

    fn submit_no_data(&mut self, req: IoRequest, slot: u16) {
        let mut lba = (req.sector * SECTOR_SIZE) >> self.block_shift;
        let mut blocks = (req.sectors * SECTOR_SIZE) >> self.block_shift;
        match req.op {
            IoOp::Flush => self.start_command(slot, Command::flush(self.nsid), NO_BOUNCE, 0, 0),
            IoOp::WriteZeroes => {
                while blocks > 0 {
                    let n = blocks.min(WRITE_ZEROES_MAX_BLOCKS);
                    self.start_command(slot, Command::write_zeroes(self.nsid, lba, n as u32), NO_BOUNCE, 0, 0);
                    lba += n;
                    blocks -= n;
                }
            }
            IoOp::Discard => {
                while blocks > 0 {
                    let (page, page_iova) = self.next_prp_page();
                    let mut ranges = 0u32;
                    while blocks > 0 && u64::from(ranges) < DSM_MAX_RANGES {
                        let n = blocks.min(DSM_RANGE_MAX_BLOCKS);
                        // Range entry: context attributes, length in blocks, starting LBA.
                        let entry: [u32; 4] = [0, n as u32, lba as u32, (lba >> 32) as u32];
                        // SAFETY: ranges < 256: 16-byte entries inside the idle PRP page.
                        unsafe { page.cast::<[u32; 4]>().add(ranges as usize).write(entry) };
                        ranges += 1;
                        lba += n;
                        blocks -= n;
                    }
                    self.start_command(slot, Command::deallocate(self.nsid, ranges, page_iova), NO_BOUNCE, 0, 0);
                }
            }
            IoOp::Read | IoOp::Write => unreachable!("data commands go through submit_data"),
        }
    }
}

impl IoQueue for NvmeQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        self.check_generation();
        if self.dead {
            return self.fail_now(req, IoError::DeviceGone { reason: "NVMe controller failed and could not be reset" });
        }
        if let Err(e) = validate_request(&self.check_info, &req) {
            return self.fail_now(req, e);
        }
        let Some(&slot) = self.free_reqs.last() else { return Err(QueueFull(req)) };
        let table = self.space.translations();
        let plan = req.op.has_data().then(|| self.plan_data(&req.sg, &table));
        let (commands, bounces) = match plan {
            Some(DataPlan::Direct) => (self.pieces.len(), 0),
            Some(DataPlan::Bounce(n)) => (req.sg.len().div_ceil(BOUNCE_SIZE.min(self.max_cmd)), n),
            None => (self.commands_for(&req), 0),
        };
        if commands > self.cmds.len() - 1 || bounces > BOUNCE_SLOTS {
            return self.fail_now(
                req,
                IoError::BadBuffer {
                    reason: "request needs more NVMe commands or bounce buffers than a queue holds: \
                             split it at the device's max_transfer",
                },
            );
        }
        if commands > self.free_cids.len() || bounces > self.free_bounce.count_ones() as usize {
            return Err(QueueFull(req));
        }
        self.free_reqs.pop();
        self.reqs[slot as usize] =
            ReqSlot { tag: req.tag, op: req.op, sg: req.sg, pending: commands as u32, error: None, bounce_mask: 0 };
        self.in_flight += 1;
        if let Some(plan) = plan {
            self.submit_data(req, slot, plan, &table);
        } else {
            self.submit_no_data(req, slot);
        }
        Ok(())
    }

    fn kick(&mut self) {
        self.ring.ring_sq();
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.check_generation();
        let mut reaped = 0;
        while let Some(e) = self.ring.pop() {
            reaped += 1;
            let cid = e.cid;
            if (cid as usize) < self.cmds.len() && self.cmds[cid as usize].active {
                self.finish_command(cid, Self::status_to_result(&e));
            } else {
                tracing::debug!(qid = self.qid, cid, "completion for no outstanding command ignored");
            }
        }
        if reaped > 0 {
            self.ring.ring_cq();
        }
        self.hybrid.polled(reaped);
        self.health_countdown = self.health_countdown.saturating_sub(1);
        if self.health_countdown == 0 {
            self.health_countdown = HEALTH_CHECK_POLLS;
            if self.in_flight > 0 && !self.dead {
                self.check_health();
            }
        }
        self.done.drain_into(out)
    }

    /// Kicks, then, unless something has completed already, sleeps through part of
    /// the time the outstanding commands take (hybrid polling, see `hybrid_poll`): at
    /// most one nap between completions, so callers that keep calling `wait` and `poll`
    /// spin after it. Interrupts stay off: the caller polls after this returns.
    fn wait(&mut self, timeout: Duration) {
        self.kick();
        if !self.done.is_empty() || self.ring.has_completion() {
            return;
        }
        let outstanding = self.cmds.len() - 1 - self.free_cids.len();
        if let Some(nap) = self.hybrid.nap(outstanding, timeout) {
            self.health_countdown = self.health_countdown.saturating_sub(NAP_POLLS).max(1);
            std::thread::sleep(nap);
        }
    }

    fn in_flight(&self) -> usize {
        self.in_flight + self.done.len()
    }

    fn depth(&self) -> usize {
        self.reqs.len()
    }
}

impl Drop for NvmeQueue {
    fn drop(&mut self) {
        tracing::debug!(qid = self.qid, naps = self.hybrid.naps(), "closing NVMe queue");
        let exists = !self.dead && !self.ctrl.is_dead() && self.ctrl.generation() == self.generation;
        if exists {
            if let Err(e) = self.ctrl.delete_queue_pair(self.qid) {
                tracing::warn!(qid = self.qid, error = %e, "deleting the I/O queue pair");
            }
        }
        self.ctrl.release_qid(self.qid);
        if let Err(e) = self.space.unmap(self.memory.region()) {
            tracing::warn!(error = %e, "unmapping queue memory");
        }
    }
}
