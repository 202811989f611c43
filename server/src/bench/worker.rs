//! One benchmark thread: its own queue, `qd` slots each with a preallocated buffer and
//! scatter-gather list, and a closed loop that keeps every slot busy. Nothing is
//! allocated and no lock is taken once the loop runs.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};

use hdrhistogram::Histogram;
use udm_drivers::dma::{DmaMemory, PagePolicy};
use udm_drivers::{BlockDevice, Completion, IoError, IoOp, IoQueue, IoRequest, IoSegment, QueueFull, SgList};

use super::clock::Clock;
use super::pattern::{self, Mismatch};
use super::progress::Counter;
use super::rng::Rng;
use super::{BenchError, RwMode};

/// What one thread does.
#[derive(Debug, Clone)]
pub struct Job {
    pub rw: RwMode,
    pub rwmixread: u8,
    /// Request size in sectors.
    pub bs_sectors: u64,
    pub qd: usize,
    /// Blocks (of `bs_sectors`) this thread may address.
    pub blocks: Range<u64>,
    pub verify: bool,
    /// Sleep in `IoQueue::wait` instead of spinning when nothing can be issued.
    pub wait: bool,
    pub seed: u64,
    pub duration_ticks: u64,
}

/// State shared by the threads of one run.
pub struct Shared {
    pub clock: Clock,
    pub stop: AtomicBool,
    pub start: Barrier,
    pub finished: AtomicUsize,
    pub progress: Box<[Counter]>,
}

/// The first failed request.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Failure {
    pub op: &'static str,
    pub sector: u64,
    #[serde(serialize_with = "display")]
    pub error: IoError,
}

fn display<S: serde::Serializer>(e: &IoError, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(e)
}

/// What a thread measured.
pub struct Outcome {
    pub reads: u64,
    pub writes: u64,
    pub read_lat: Histogram<u64>,
    pub write_lat: Histogram<u64>,
    pub failure: Option<Failure>,
    pub mismatch: Option<Mismatch>,
    /// Blocks whose content `--verify` checked.
    pub verified: u64,
    /// When the timed phase had drained.
    pub timed_end: Option<std::time::Instant>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// `--verify`: write generation 1 everywhere before the clock starts.
    Prefill,
    /// The measured workload.
    Timed { deadline: u64 },
    /// `--verify`: read every block back and check its latest generation.
    ReadBack,
}

struct Verifier {
    generation: Box<[u32]>,
    busy: Box<[bool]>,
}

struct Worker {
    job: Job,
    queue: Box<dyn IoQueue>,
    memory: DmaMemory,
    /// Keeps the segments the lists point into alive.
    _segments: Box<[IoSegment]>,
    lists: Box<[SgList]>,
    started: Box<[u64]>,
    slot_op: Box<[IoOp]>,
    slot_block: Box<[u64]>,
    slot_generation: Box<[u32]>,
    free: Vec<u32>,
    completions: Box<[Completion]>,
    rng: Rng,
    cursor: u64,
    issued_in_phase: u64,
    verifier: Option<Verifier>,
    out: Outcome,
}

/// Runs one thread's whole job: set-up, the start barrier, the timed loop, and the
/// read-back for `--verify`. Always reaches the barrier, so one failing thread cannot
/// hang the others.
pub fn run(index: usize, device: Arc<dyn BlockDevice>, job: Job, shared: Arc<Shared>) -> Result<Outcome, BenchError> {
    let prepared = Worker::new(&*device, job).and_then(|mut w| {
        if w.job.verify {
            w.pump(Phase::Prefill, &shared, index)?;
        }
        Ok(w)
    });
    if prepared.is_err() {
        shared.stop.store(true, Ordering::SeqCst);
    }
    shared.start.wait();
    let mut w = prepared?;
    let deadline = shared.clock.now() + w.job.duration_ticks;
    let timed = w.pump(Phase::Timed { deadline }, &shared, index);
    w.out.timed_end = Some(std::time::Instant::now());
    shared.finished.fetch_add(1, Ordering::AcqRel);
    timed?;
    if w.job.verify && w.out.failure.is_none() && w.out.mismatch.is_none() {
        w.pump(Phase::ReadBack, &shared, index)?;
    }
    device.unregister_memory(w.memory.region()).ok();
    Ok(w.out)
}

impl Worker {
    fn new(device: &dyn BlockDevice, job: Job) -> Result<Self, BenchError> {
        let queue = device.open_queue(job.qd).map_err(|e| BenchError::Setup(format!("opening a queue: {e}")))?;
        let qd = job.qd.min(queue.depth());
        let bs = (job.bs_sectors * udm_drivers::SECTOR_SIZE) as usize;
        let memory = DmaMemory::allocate(qd * bs, PagePolicy::PreferHuge)
            .map_err(|e| BenchError::Setup(format!("I/O buffers: {e}")))?;
        device
            .register_memory(memory.region())
            .map_err(|e| BenchError::Setup(format!("registering I/O buffers: {e}")))?;
        let segments: Box<[IoSegment]> = (0..qd)
            // SAFETY: slot i's buffer is `bs` bytes inside `memory`, which the worker owns
            // and keeps until every request has completed.
            .map(|i| unsafe { IoSegment::new(memory.as_ptr().add(i * bs), bs) })
            .collect();
        // SAFETY: `segments` is never modified or moved (a boxed slice) while requests use it.
        let lists = (0..qd).map(|i| unsafe { SgList::from_segment(&segments[i]) }).collect();
        let verifier = job.verify.then(|| {
            let n = (job.blocks.end - job.blocks.start) as usize;
            Verifier { generation: vec![0; n].into_boxed_slice(), busy: vec![false; n].into_boxed_slice() }
        });
        let hist = || Histogram::new_with_bounds(1, 1 << 44, 3).expect("valid histogram bounds");
        Ok(Worker {
            rng: Rng::new(job.seed),
            job,
            queue,
            memory,
            _segments: segments,
            lists,
            started: vec![0; qd].into_boxed_slice(),
            slot_op: vec![IoOp::Read; qd].into_boxed_slice(),
            slot_block: vec![0; qd].into_boxed_slice(),
            slot_generation: vec![0; qd].into_boxed_slice(),
            free: (0..qd as u32).rev().collect(),
            completions: vec![Completion::EMPTY; qd].into_boxed_slice(),
            cursor: 0,
            issued_in_phase: 0,
            verifier,
            out: Outcome {
                reads: 0,
                writes: 0,
                read_lat: hist(),
                write_lat: hist(),
                failure: None,
                mismatch: None,
                verified: 0,
                timed_end: None,
            },
        })
    }

    /// The next operation and block offset (relative to the thread's range), or `None`
    /// when the phase has issued everything (or every block is busy).
    #[inline(always)]
    fn next_io(&mut self, phase: Phase) -> Option<(IoOp, u64)> {
        let nblocks = self.job.blocks.end - self.job.blocks.start;
        let (op, mut block) = match phase {
            Phase::Prefill | Phase::ReadBack => {
                if self.issued_in_phase == nblocks {
                    return None;
                }
                let op = if phase == Phase::Prefill { IoOp::Write } else { IoOp::Read };
                (op, self.issued_in_phase)
            }
            Phase::Timed { .. } => {
                let op = match self.job.rw {
                    RwMode::Read | RwMode::Randread => IoOp::Read,
                    RwMode::Write | RwMode::Randwrite => IoOp::Write,
                    RwMode::Randrw => {
                        if self.rng.below(100) < u64::from(self.job.rwmixread) {
                            IoOp::Read
                        } else {
                            IoOp::Write
                        }
                    }
                };
                let block = if self.job.rw.is_random() {
                    self.rng.below(nblocks)
                } else {
                    let b = self.cursor;
                    self.cursor = if b + 1 == nblocks { 0 } else { b + 1 };
                    b
                };
                (op, block)
            }
        };
        if let Some(v) = &mut self.verifier {
            // Two requests to one block at once would race; take the next idle block.
            // The caller keeps fewer requests in flight than there are blocks.
            while v.busy[block as usize] {
                block = if block + 1 == nblocks { 0 } else { block + 1 };
            }
            v.busy[block as usize] = true;
        }
        self.issued_in_phase += 1;
        Some((op, block))
    }

    /// Keeps the queue full until the phase ends, then drains it.
    fn pump(&mut self, phase: Phase, shared: &Shared, index: usize) -> Result<(), BenchError> {
        self.issued_in_phase = 0;
        self.cursor = 0;
        let timed = matches!(phase, Phase::Timed { .. });
        let clock = shared.clock;
        let mut issuing = true;
        let mut done: u64 = 0;
        // The first round is always issued, so even a thread descheduled past its
        // deadline measures something.
        let mut first = true;
        loop {
            let now = clock.now();
            if issuing
                && !first
                && (shared.stop.load(Ordering::Relaxed)
                    || matches!(phase, Phase::Timed { deadline } if now >= deadline))
            {
                issuing = false;
            }
            first = false;
            while issuing {
                let Some(&slot) = self.free.last() else { break };
                let Some((op, block)) = self.next_io(phase) else {
                    issuing = false;
                    break;
                };
                let slot = slot as usize;
                let req = self.prepare(slot, op, block);
                match self.queue.submit(req) {
                    Ok(()) => {
                        self.free.pop();
                        self.started[slot] = now;
                    }
                    Err(QueueFull(_)) => {
                        self.unprepare(op, block);
                        break;
                    }
                }
            }
            if self.job.wait && (self.free.is_empty() || !issuing) {
                // Nothing to do until a request completes: submit and sleep in one go.
                let left = match phase {
                    Phase::Timed { deadline } if issuing => deadline.saturating_sub(now),
                    _ => u64::MAX,
                };
                // Wake at the deadline at the latest, and at least every 10 ms.
                let nanos = (clock.nanos(left) as u64).clamp(1_000, 10_000_000);
                self.queue.wait(std::time::Duration::from_nanos(nanos));
            } else {
                self.queue.kick();
            }
            let n = self.queue.poll(&mut self.completions);
            if n > 0 {
                let end = clock.now();
                for i in 0..n {
                    let c = self.completions[i];
                    self.complete(c, end, timed, shared);
                }
                done += n as u64;
                if timed {
                    shared.progress[index].set(done);
                }
            }
            if !issuing && self.queue.in_flight() == 0 {
                return Ok(());
            }
        }
    }

    /// The request for `slot`; under `--verify` a write gets the pattern of the block's
    /// next generation.
    #[inline(always)]
    fn prepare(&mut self, slot: usize, op: IoOp, block: u64) -> IoRequest {
        let sector = (self.job.blocks.start + block) * self.job.bs_sectors;
        self.slot_op[slot] = op;
        self.slot_block[slot] = block;
        if let Some(v) = &mut self.verifier {
            let g = &mut v.generation[block as usize];
            if op == IoOp::Write {
                *g = g.wrapping_add(1).max(1);
                pattern::fill(slot_buffer(&self.memory, slot, self.job.bs_sectors), sector, *g);
            }
            self.slot_generation[slot] = *g;
        }
        IoRequest { op, sector, sectors: self.job.bs_sectors, sg: self.lists[slot], fua: false, tag: slot as u64 }
    }

    /// Takes back what `prepare` and `next_io` marked for a request the queue refused.
    fn unprepare(&mut self, op: IoOp, block: u64) {
        self.issued_in_phase -= 1;
        if let Some(v) = &mut self.verifier {
            v.busy[block as usize] = false;
            if op == IoOp::Write {
                v.generation[block as usize] -= 1;
            }
        }
    }

    #[inline(always)]
    fn complete(&mut self, c: Completion, end: u64, timed: bool, shared: &Shared) {
        let slot = c.tag as usize;
        let op = self.slot_op[slot];
        self.free.push(slot as u32);
        if let Err(error) = c.result {
            if self.out.failure.is_none() {
                let sector = self.sector_of(slot);
                self.out.failure = Some(Failure { op: op_name(op), sector, error });
            }
            shared.stop.store(true, Ordering::Relaxed);
            return;
        }
        if timed {
            let lat = end.wrapping_sub(self.started[slot]).max(1);
            if op == IoOp::Read {
                self.out.reads += 1;
                self.out.read_lat.saturating_record(lat);
            } else {
                self.out.writes += 1;
                self.out.write_lat.saturating_record(lat);
            }
        }
        if let Some(v) = &mut self.verifier {
            let block = self.slot_block[slot];
            v.busy[block as usize] = false;
            if op == IoOp::Read && v.generation[block as usize] != 0 {
                let sector = (self.job.blocks.start + block) * self.job.bs_sectors;
                let buf = slot_buffer(&self.memory, slot, self.job.bs_sectors);
                self.out.verified += 1;
                if let Some(m) = pattern::check(buf, sector, self.slot_generation[slot]) {
                    if self.out.mismatch.is_none() {
                        self.out.mismatch = Some(m);
                    }
                    shared.stop.store(true, Ordering::Relaxed);
                }
            }
        }
    }

    fn sector_of(&self, slot: usize) -> u64 {
        (self.job.blocks.start + self.slot_block[slot]) * self.job.bs_sectors
    }
}

/// Slot `slot`'s buffer. Only called for a slot with no request in flight.
#[allow(clippy::mut_from_ref)]
fn slot_buffer(memory: &DmaMemory, slot: usize, bs_sectors: u64) -> &mut [u8] {
    let bs = (bs_sectors * udm_drivers::SECTOR_SIZE) as usize;
    // SAFETY: slot buffers are disjoint `bs`-byte pieces of `memory`; the slot is free
    // (no request reads or writes its buffer), and the worker is single-threaded.
    unsafe { std::slice::from_raw_parts_mut(memory.as_ptr().add(slot * bs), bs) }
}

fn op_name(op: IoOp) -> &'static str {
    match op {
        IoOp::Read => "read",
        IoOp::Write => "write",
        IoOp::Flush => "flush",
        IoOp::Discard => "discard",
        IoOp::WriteZeroes => "write-zeroes",
    }
}
