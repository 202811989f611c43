//! One virtqueue's worker thread: pops descriptor chains, turns them into `IoRequest`s on
//! the thread's own `IoQueue`, and publishes completions to the used ring.
//!
//! Run to completion, no locks: the worker owns its `Queue`, its `IoQueue`, a slot per
//! possible in-flight chain (each with a preallocated segment vector, so nothing is
//! allocated per request) and its part of the inflight region. Two idle strategies:
//! [`PollMode::Event`] re-enables guest notifications and sleeps on the kick eventfd;
//! [`PollMode::Busy`] keeps polling the available ring (lowest latency, one core).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hdrhistogram::Histogram;
use udm_drivers::{Completion, IoError, IoQueue, IoRequest, IoSegment, QueueFull, SgList};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::chain::ChainWalk;
use super::config_space::Limits;
use super::idle::{IdlePolicy, IdleStep};
use super::inflight::InflightQueue;
use super::log_limit::LogLimit;
use super::request::{
    parse_chain, BlkOp, BlkRequest, Desc, GuestMem, Reason, Rejection, ID_BYTES, MAX_CHAIN, STATUS_IOERR, STATUS_OK,
    STATUS_UNSUPP,
};
use super::stats::{new_histogram, Kind, QueueStats};
use super::truncation_guard;

/// Chains parsed between two looks for finished requests while a batch is popped (in
/// the quiet-machine rounds of BENCHMARKS.md, 4 did better than 1, 2, 8 and the whole
/// batch).
const PUBLISH_EVERY: u32 = 4;

/// Least time between two merges of a worker's latency histogram into the shared one.
const MERGE_INTERVAL: Duration = Duration::from_millis(100);

/// How a worker waits when its queue is empty.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PollMode {
    /// Sleep on the guest's kick (low CPU use).
    #[default]
    Event,
    /// Spin on the available ring (lowest latency; burns one core per queue).
    Busy,
}

/// Everything a worker needs to run one virtqueue.
pub struct QueueSetup {
    /// Virtqueue index.
    pub index: u16,
    /// Ring size.
    pub size: u16,
    /// Guest physical addresses of the descriptor table, available and used rings.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Where to resume in the available ring (SET_VRING_BASE).
    pub next_avail: u16,
    /// VIRTIO_RING_F_EVENT_IDX negotiated.
    pub event_idx: bool,
    /// The guest's kick.
    pub kick: File,
    /// The interrupt to the guest; may change while the queue runs.
    pub call: Arc<ArcSwapOption<File>>,
    /// This queue's inflight window, when the front end set one up.
    pub inflight: Option<InflightQueue>,
    /// Called (from the worker thread) when the worker caught a fault: ends the connection.
    pub on_fault: FaultHook,
}

/// What a worker calls with the reason when it contained a fault (a panic): the owner
/// ends that front end's connection, and only it.
pub type FaultHook = Arc<dyn Fn(&str) + Send + Sync>;

/// What the export shares with all its workers.
pub struct Shared {
    /// Limits enforced on requests (capacity changes on resize).
    pub limits: ArcSwap<Limits>,
    /// Serial number returned by GET_ID.
    pub serial: [u8; ID_BYTES],
    /// Idle strategy.
    pub mode: PollMode,
    /// Longest an event-mode worker polls an empty queue before sleeping (0: never).
    pub idle_poll_max: Duration,
    /// Per-queue statistics, indexed by virtqueue.
    pub stats: Vec<Arc<QueueStats>>,
}

/// What a stopped worker hands back, so the ring can be restarted or reported.
pub struct QueueEnd {
    /// Next available index (for GET_VRING_BASE).
    pub next_avail: u16,
    /// The kick eventfd.
    pub kick: File,
    /// The inflight window.
    pub inflight: Option<InflightQueue>,
}

/// Handle to a running worker thread.
pub struct WorkerHandle {
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    /// The ring's kick, shared with the front end: signalled on stop too, in case the
    /// worker is in a read of it (the front end can make the kick blocking and drain it
    /// between the worker's epoll and its read).
    kick: Option<File>,
    thread: std::thread::JoinHandle<QueueEnd>,
}

impl WorkerHandle {
    /// Stops the worker after it has completed every request it took; returns its state,
    /// or `None` when the thread died (a fault the worker could not contain: logged here,
    /// never passed on to the caller, which is the connection's message loop).
    pub fn stop(self) -> Option<QueueEnd> {
        self.stop.store(true, Ordering::Release);
        let _ = self.wake.write(1);
        if let Some(kick) = &self.kick {
            signal_eventfd(kick);
        }
        let name = self.thread.thread().name().unwrap_or("queue worker").to_owned();
        match self.thread.join() {
            Ok(end) => Some(end),
            Err(panic) => {
                tracing::error!(worker = %name, "queue worker died: {}; its ring stays stopped", panic_message(&*panic));
                None
            }
        }
    }
}

/// The text of a panic payload.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The ring addresses or size are invalid for the guest's memory.
    #[error("virtqueue {0} is not valid in guest memory (size or ring addresses)")]
    InvalidQueue(u16),
    /// The device refused a queue.
    #[error("opening a device queue: {0}")]
    Device(#[from] udm_drivers::DeviceError),
    /// A host resource (eventfd, epoll, thread) failed.
    #[error("{0}: {1}")]
    Host(&'static str, std::io::Error),
}

/// Starts a worker thread for `setup`, submitting to `ioq`, optionally pinned to `cpu`.
pub fn spawn(
    setup: QueueSetup,
    memory: GuestMemoryAtomic<GuestMem>,
    ioq: Box<dyn IoQueue>,
    shared: Arc<Shared>,
    cpu: Option<usize>,
    name: String,
) -> Result<WorkerHandle, StartError> {
    let mem = memory.memory().into_inner();
    let mut queue = Queue::new(setup.size).map_err(|_| StartError::InvalidQueue(setup.index))?;
    queue.set_size(setup.size);
    queue
        .try_set_desc_table_address(GuestAddress(setup.desc))
        .and_then(|_| queue.try_set_avail_ring_address(GuestAddress(setup.avail)))
        .and_then(|_| queue.try_set_used_ring_address(GuestAddress(setup.used)))
        .map_err(|_| StartError::InvalidQueue(setup.index))?;
    queue.set_event_idx(setup.event_idx);
    queue.set_ready(true);
    if !queue.is_valid(&*mem) {
        return Err(StartError::InvalidQueue(setup.index));
    }
    let ring_used = queue.used_idx(&*mem, Ordering::Acquire).map_err(|_| StartError::InvalidQueue(setup.index))?.0;
    queue.set_next_used(ring_used);
    queue.set_next_avail(setup.next_avail);
    let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).map_err(|e| StartError::Host("eventfd", e))?);
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::clone(&shared.stats[usize::from(setup.index)]);
    let shared_idle_max = shared.idle_poll_max;
    let size = usize::from(setup.size);
    let mut worker = Worker {
        index: setup.index,
        queue,
        memory,
        mem,
        retired: Vec::new(),
        kick: setup.kick,
        call: setup.call,
        inflight: setup.inflight,
        on_fault: setup.on_fault,
        truncations_seen: truncation_guard::absorbed(),
        current: None,
        ioq,
        slots: (0..size).map(|_| Slot::new()).collect(),
        free: (0..size as u16).rev().collect(),
        backlog: VecDeque::with_capacity(size),
        completions: vec![Completion::EMPTY; size.max(32)],
        descs: Vec::with_capacity(MAX_CHAIN),
        now: Instant::now(),
        idle: IdlePolicy::new(shared_idle_max),
        in_flight: 0,
        need_notify: false,
        shared,
        stats,
        latency: new_histogram(),
        unmerged: 0,
        last_merge: Instant::now(),
        log: LogLimit::new(Duration::from_secs(1)),
        stop: Arc::clone(&stop),
        wake: Arc::clone(&wake),
        desc_table: setup.desc,
        avail_ring: setup.avail,
        size: setup.size,
    };
    let resubmit = worker.recover(ring_used);
    let kick = worker.kick.try_clone().ok();
    let thread = std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            if let Some(cpu) = cpu {
                crate::cpu::pin_current_thread(cpu);
            }
            crate::cpu::set_timer_slack(1_000);
            worker.run(resubmit)
        })
        .map_err(|e| StartError::Host("spawning a queue worker", e))?;
    Ok(WorkerHandle { stop, wake, kick, thread })
}

/// One chain in flight.
struct Slot {
    head: u16,
    req: Option<BlkRequest>,
    segs: Vec<IoSegment>,
    started: Instant,
}

// SAFETY: a slot's segments describe guest memory the worker keeps mapped (through its
// `Arc<GuestMem>`); the slot moves into the worker thread once, before any request uses
// it, and is only touched by that thread afterwards.
unsafe impl Send for Slot {}

impl Slot {
    fn new() -> Self {
        Slot { head: 0, req: None, segs: Vec::with_capacity(MAX_CHAIN), started: Instant::now() }
    }
}

struct Worker {
    index: u16,
    queue: Queue,
    memory: GuestMemoryAtomic<GuestMem>,
    /// The memory in use; replaced only when nothing is in flight, so every segment of
    /// every in-flight request stays mapped.
    mem: Arc<GuestMem>,
    /// Earlier memory tables still used by requests in flight.
    retired: Vec<Arc<GuestMem>>,
    kick: File,
    call: Arc<ArcSwapOption<File>>,
    inflight: Option<InflightQueue>,
    on_fault: FaultHook,
    /// Truncated-file faults absorbed process-wide when this worker last looked.
    truncations_seen: u64,
    /// The chain being parsed or submitted (slot, head): the one a fault is blamed on.
    current: Option<(u16, u16)>,
    ioq: Box<dyn IoQueue>,
    slots: Vec<Slot>,
    free: Vec<u16>,
    backlog: VecDeque<IoRequest>,
    completions: Vec<Completion>,
    /// Scratch for the descriptors of the chain being parsed.
    descs: Vec<Desc>,
    /// Time at the start of the current pass: requests started in one pass share it.
    now: Instant,
    /// What an idle event-mode worker does before it sleeps on the kick.
    idle: IdlePolicy,
    in_flight: usize,
    need_notify: bool,
    shared: Arc<Shared>,
    stats: Arc<QueueStats>,
    latency: Histogram<u64>,
    unmerged: u32,
    last_merge: Instant,
    log: LogLimit,
    stop: Arc<AtomicBool>,
    wake: Arc<EventFd>,
    desc_table: u64,
    avail_ring: u64,
    size: u16,
}

impl Worker {
    /// Reads the inflight window; returns the heads to resubmit and moves the available
    /// index past them.
    fn recover(&mut self, ring_used: u16) -> Vec<u16> {
        let Some(inflight) = self.inflight.as_mut() else { return Vec::new() };
        let r = inflight.recover(ring_used, self.size);
        if !r.resubmit.is_empty() {
            tracing::info!(queue = self.index, count = r.resubmit.len(), "resubmitting requests left in flight");
            self.queue.set_next_avail(r.next_avail);
        }
        r.resubmit
    }

    /// Runs the queue until stopped. A panic (a bug; no guest input should cause one) is
    /// contained here: the request being handled completes with IOERR and leaves the
    /// inflight region (so it is not replayed as a poison pill after a reconnect), the
    /// requests already at the device are drained, and the connection is ended.
    fn run(mut self, resubmit: Vec<u16>) -> QueueEnd {
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(resubmit)));
        if let Err(panic) = caught {
            let reason = panic_message(&*panic);
            self.contain_fault(&reason);
            self.stop.store(true, Ordering::Release);
            let drained = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.serve(Vec::new())));
            if let Err(again) = drained {
                tracing::error!(
                    queue = self.index,
                    in_flight = self.in_flight,
                    "queue worker faulted again while draining: {}; giving up on its requests",
                    panic_message(&*again)
                );
            }
        }
        self.publish_latency(true);
        QueueEnd { next_avail: self.queue.next_avail(), kick: self.kick, inflight: self.inflight }
    }

    fn contain_fault(&mut self, reason: &str) {
        let current = self.current.take();
        tracing::error!(
            queue = self.index,
            head = current.map(|(_, head)| head),
            "queue worker fault: {reason}; failing that request and ending the connection"
        );
        if let Some((slot_idx, head)) = current {
            let slot = &mut self.slots[usize::from(slot_idx)];
            slot.head = head;
            if !self.free.contains(&slot_idx) {
                self.finish(slot_idx, STATUS_IOERR);
                self.notify();
            }
        }
        (self.on_fault)(reason);
    }

    fn serve(&mut self, resubmit: Vec<u16>) {
        let epoll = self.make_epoll();
        {
            // Scoped: a table held here for the whole run would keep its regions mapped
            // and registered after the front end replaced them.
            let mem = Arc::clone(&self.mem);
            for head in resubmit {
                if let Some(slot) = self.free.pop() {
                    let walk = ChainWalk::new(&mem, self.desc_table, self.size, head);
                    self.start(&mem, slot, head, walk);
                }
            }
        }
        if self.shared.mode == PollMode::Busy || epoll.is_some() {
            let _ = self.queue.disable_notification(&*self.mem);
        }
        let mut events = [EpollEvent::default(); 2];
        let mut idle_spins = 0u32;
        let mut idle_since = Instant::now();
        // The queue ran empty and the worker stayed awake (polled or napped) since.
        let mut idle_awake = false;
        loop {
            self.now = Instant::now();
            self.check_truncation();
            let stopping = self.stop.load(Ordering::Acquire);
            let mut progress = false;
            if !stopping {
                progress |= self.pop_all();
            }
            self.flush_backlog();
            self.ioq.kick();
            progress |= self.reap();
            self.notify();
            if progress {
                if idle_awake {
                    self.idle.on_request(self.now.duration_since(idle_since));
                    idle_awake = false;
                }
                idle_spins = 0;
                idle_since = self.now;
                continue;
            }
            if self.in_flight > 0 || !self.backlog.is_empty() || self.ioq.in_flight() > 0 {
                // Waiting for the device: keep polling it (completions only come from poll,
                // and a stacked queue may carry work another queue waits for).
                std::hint::spin_loop();
                idle_spins = idle_spins.saturating_add(1);
                if idle_spins > 4096 {
                    std::thread::yield_now();
                }
                continue;
            }
            if stopping {
                return;
            }
            self.publish_latency(false);
            self.retired.clear();
            match (&epoll, self.shared.mode) {
                (Some(ep), PollMode::Event) => {
                    idle_awake = true;
                    match self.idle.step(self.now.duration_since(idle_since)) {
                        IdleStep::Poll => {
                            std::hint::spin_loop();
                            continue;
                        }
                        IdleStep::Nap(d) => {
                            let napped = Instant::now();
                            std::thread::sleep(d);
                            self.idle.on_nap(d, napped.elapsed());
                            continue;
                        }
                        IdleStep::Sleep => {}
                    }
                    match self.queue.enable_notification(&*self.mem) {
                        Ok(true) => {
                            let _ = self.queue.disable_notification(&*self.mem);
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => self.log_error(format_args!("enabling notifications: {e:?}")),
                    }
                    let slept = Instant::now();
                    let n = ep.wait(-1, &mut events).unwrap_or(0);
                    self.idle.on_wake(slept.elapsed());
                    idle_awake = false;
                    let kicked = events[..n].iter().any(|e| e.data() == 0);
                    let woken = events[..n].iter().any(|e| e.data() == 1);
                    self.drain_kick(kicked, woken);
                    let _ = self.queue.disable_notification(&*self.mem);
                    idle_since = Instant::now();
                }
                _ => std::hint::spin_loop(),
            }
        }
    }

    /// Ends the connection when the front end truncated a file under this queue's guest
    /// memory or inflight window (the access was absorbed: see `truncation_guard`).
    /// One relaxed load when nothing happened.
    fn check_truncation(&mut self) {
        let absorbed = truncation_guard::absorbed();
        if absorbed == self.truncations_seen {
            return;
        }
        self.truncations_seen = absorbed;
        let what = match self.mem.truncated_region() {
            Some(gpa) => format!("the guest memory region at {gpa:#x}"),
            None if self.inflight.as_ref().is_some_and(InflightQueue::truncated) => "the inflight region".to_string(),
            None => return,
        };
        let reason = format!(
            "the front end truncated the file behind {what} while udm had it mapped; \
             its accesses past the new end read zeroes, and the connection is ended"
        );
        tracing::error!(queue = self.index, "{reason}");
        (self.on_fault)(&reason);
        self.stop.store(true, Ordering::Release);
    }

    fn make_epoll(&self) -> Option<Epoll> {
        let ep = Epoll::new().ok()?;
        ep.ctl(ControlOperation::Add, self.kick.as_raw_fd(), EpollEvent::new(EventSet::IN, 0)).ok()?;
        ep.ctl(ControlOperation::Add, self.wake.as_raw_fd(), EpollEvent::new(EventSet::IN, 1)).ok()?;
        Some(ep)
    }

    fn drain_kick(&mut self, kicked: bool, woken: bool) {
        // Read each eventfd only when epoll said it is readable: front ends (libblkio) may
        // hand over a blocking eventfd, and a read that finds nothing is a wasted syscall.
        if kicked {
            let mut buf = [0u8; 8];
            let _ = self.kick.read(&mut buf);
        }
        if woken {
            let _ = self.wake.read();
        }
    }

    /// Picks up a new memory table (front ends add regions while queues run). Requests
    /// in flight may point into the old one, so it is kept until the queue is idle.
    fn reload_memory(&mut self) {
        let guard = self.memory.memory();
        if std::ptr::eq(&*guard, &*self.mem) {
            return;
        }
        let old = std::mem::replace(&mut self.mem, guard.into_inner());
        if self.in_flight > 0 || !self.backlog.is_empty() {
            self.retired.push(old);
        }
    }

    /// Reloads the memory table and tells whether it differs from `seen`, the table a
    /// chain was just parsed in.
    fn memory_moved_on(&mut self, seen: &GuestMem) -> bool {
        self.reload_memory();
        !std::ptr::eq(seen, &*self.mem)
    }

    /// Pops every available chain there is room for.
    fn pop_all(&mut self) -> bool {
        self.reload_memory();
        let mem = Arc::clone(&self.mem);
        let mut progress = false;
        let mut started = 0u32;
        while let Some(slot) = self.free.pop() {
            let Some(chain) = self.queue.pop_descriptor_chain(&*mem) else {
                self.free.push(slot);
                break;
            };
            progress = true;
            let head = chain.head_index();
            self.prefetch_next_chain(&mem);
            if let Some(inf) = self.inflight.as_mut() {
                inf.take(head);
            }
            // Walked by udm's own walker (the one reconnect uses for chains it did not
            // pop), which reads each descriptor with one copy.
            let walk = ChainWalk::new(&mem, self.desc_table, self.size, head);
            self.start(&mem, slot, head, walk);
            started += 1;
            if started.is_multiple_of(PUBLISH_EVERY) {
                // What the device already finished (in-memory devices finish on submit) goes
                // back to the guest while the rest of the batch is parsed: the guest works
                // on it in parallel instead of waiting for the whole batch. The device is
                // kicked once, after the batch, so submissions still go out together.
                self.reap();
                self.notify();
            }
        }
        progress
    }

    /// Starts loading the descriptor of the chain after the one just popped, so it
    /// arrives while this one is parsed. The ring entry read may be stale (not yet
    /// published by the guest): a wrong guess costs one useless prefetch.
    fn prefetch_next_chain(&self, mem: &GuestMem) {
        let slot = u64::from(self.queue.next_avail() % self.size);
        if let Some(entry) = mem.read_array::<2>(self.avail_ring + 4 + 2 * slot) {
            let head = u16::from_le_bytes(entry) % self.size;
            mem.prefetch(self.desc_table + u64::from(head) * 16);
        }
    }

    /// Parses one chain and submits it (or answers it at once).
    fn start(&mut self, mem: &GuestMem, slot_idx: u16, head: u16, walk: ChainWalk<'_>) {
        self.current = Some((slot_idx, head));
        self.start_current(mem, slot_idx, head, walk);
        self.current = None;
    }

    fn start_current(&mut self, mem: &GuestMem, slot_idx: u16, head: u16, mut walk: ChainWalk<'_>) {
        let limits = self.shared.limits.load();
        let slot = &mut self.slots[usize::from(slot_idx)];
        slot.head = head;
        slot.req = None;
        let parsed = parse_chain(mem, walk.by_ref(), &limits, &mut slot.segs, &mut self.descs);
        // A broken chain fails whatever its first descriptors looked like; its status
        // byte is unknown (the chain has no trustworthy end), so none is written.
        let parsed = match walk.broken() {
            Some(why) => Err(Rejection { status_addr: None, reason: Reason::BrokenChain(why) }),
            None => parsed,
        };
        let req = match parsed {
            Ok(r) => r,
            Err(rej)
                if matches!(rej.reason, Reason::OutsideMemory { .. } | Reason::BrokenChain(_))
                    && self.memory_moved_on(mem) =>
            {
                // The front end added a region (acknowledged) after this pass loaded the
                // memory table and before it popped this chain: walk it again in the
                // current table rather than fail a valid request.
                let current = Arc::clone(&self.mem);
                let walk = ChainWalk::new(&current, self.desc_table, self.size, head);
                self.start(&current, slot_idx, head, walk);
                return;
            }
            Err(rej) => {
                self.stats.reject();
                self.log_rejection(head, &rej);
                self.finish_rejected(slot_idx, rej);
                return;
            }
        };
        slot.req = Some(req);
        slot.started = self.now;
        let tag = u64::from(slot_idx);
        // SAFETY: the segments live in the slot, which is not reused (nor its vector
        // grown) until this request completes; they point into guest memory that `self.mem`
        // keeps mapped until then.
        let sg = match unsafe { SgList::try_from_raw(slot.segs.as_ptr(), slot.segs.len()) } {
            Ok(sg) => sg,
            Err(e) => {
                // parse_chain caps every request below this; refuse rather than trust that.
                self.log_error(format_args!("refused the request at head {head}: {e}"));
                self.finish(slot_idx, STATUS_IOERR);
                return;
            }
        };
        let io = match req.op {
            BlkOp::Read => IoRequest::read(req.sector, sg, tag),
            BlkOp::Write => IoRequest::write(req.sector, sg, tag),
            BlkOp::Flush => IoRequest::flush(tag),
            BlkOp::Discard => IoRequest::discard(req.sector, req.sectors, tag),
            BlkOp::WriteZeroes => IoRequest::write_zeroes(req.sector, req.sectors, tag),
            BlkOp::GetId => {
                let mut id = [0u8; ID_BYTES];
                let n = sg.len().min(ID_BYTES);
                id[..n].copy_from_slice(&self.shared.serial[..n]);
                sg.copy_from_slice(&id[..n]);
                self.finish(slot_idx, STATUS_OK);
                return;
            }
        };
        if self.backlog.is_empty() {
            match self.ioq.submit(io) {
                Ok(()) => self.in_flight += 1,
                Err(QueueFull(back)) => self.backlog.push_back(back),
            }
        } else {
            self.backlog.push_back(io);
        }
    }

    fn flush_backlog(&mut self) {
        while let Some(io) = self.backlog.pop_front() {
            match self.ioq.submit(io) {
                Ok(()) => self.in_flight += 1,
                Err(QueueFull(back)) => {
                    self.backlog.push_front(back);
                    break;
                }
            }
        }
    }

    fn reap(&mut self) -> bool {
        let mut any = false;
        loop {
            let n = self.ioq.poll(&mut self.completions);
            if n == 0 {
                return any;
            }
            any = true;
            self.in_flight -= n;
            let now = Instant::now();
            for i in 0..n {
                let c = self.completions[i];
                let slot_idx = c.tag as u16;
                let status = match c.result {
                    Ok(()) => STATUS_OK,
                    Err(IoError::Unsupported { .. }) => STATUS_UNSUPP,
                    Err(e) => {
                        let q = self.index;
                        self.log_error(format_args!("request on queue {q} failed: {e}"));
                        STATUS_IOERR
                    }
                };
                let slot = &self.slots[usize::from(slot_idx)];
                if let Some(req) = slot.req {
                    let ns = now.saturating_duration_since(slot.started).as_nanos() as u64;
                    let _ = self.latency.record(ns.max(1));
                    self.unmerged += 1;
                    let (kind, bytes) = match req.op {
                        BlkOp::Read => (Kind::Read, req.sectors * 512),
                        BlkOp::Write => (Kind::Write, req.sectors * 512),
                        BlkOp::Flush => (Kind::Flush, 0),
                        BlkOp::Discard => (Kind::Discard, 0),
                        BlkOp::WriteZeroes => (Kind::WriteZeroes, 0),
                        BlkOp::GetId => (Kind::Other, 0),
                    };
                    self.stats.complete(kind, bytes, status == STATUS_OK);
                }
                self.finish(slot_idx, status);
            }
            if self.unmerged >= 65536 {
                self.publish_latency(false);
            }
        }
    }

    /// Writes the status byte and publishes the chain in the used ring.
    fn finish(&mut self, slot_idx: u16, status: u8) {
        let slot = &self.slots[usize::from(slot_idx)];
        let head = slot.head;
        let (addr, len) = match slot.req {
            Some(req) => (Some(req.status), req.used_len(status)),
            None => (None, 0),
        };
        if let Some(addr) = addr {
            if !self.mem.write_byte(addr.0, status) {
                self.log_error(format_args!("status byte at {:#x} is no longer in guest memory", addr.0));
            }
        }
        self.publish_used(head, len);
        self.free.push(slot_idx);
    }

    fn finish_rejected(&mut self, slot_idx: u16, rej: Rejection) {
        let head = self.slots[usize::from(slot_idx)].head;
        let len = match rej.status_addr {
            Some(addr) => {
                let _ = self.mem.write_obj(rej.reason.status(), addr);
                1
            }
            None => 0,
        };
        self.publish_used(head, len);
        self.free.push(slot_idx);
    }

    fn publish_used(&mut self, head: u16, len: u32) {
        if let Some(inf) = self.inflight.as_mut() {
            inf.pre_put(head);
        }
        if let Err(e) = self.queue.add_used(&*self.mem, head, len) {
            self.log_error(format_args!("adding head {head} to the used ring: {e:?}"));
            return;
        }
        if let Some(inf) = self.inflight.as_mut() {
            inf.post_put(head, self.queue.next_used());
        }
        self.need_notify = true;
    }

    fn notify(&mut self) {
        if !self.need_notify {
            return;
        }
        self.need_notify = false;
        if !self.queue.needs_notification(&*self.mem).unwrap_or(true) {
            return;
        }
        if let Some(call) = self.call.load().as_ref() {
            signal_eventfd(call);
        }
    }

    /// Merges the local latency histogram into the shared one at most every 100 ms
    /// (merging walks every bucket, so doing it per batch would cost more than the I/O).
    fn publish_latency(&mut self, force: bool) {
        if self.unmerged == 0 {
            return;
        }
        let now = Instant::now();
        if !force && now.duration_since(self.last_merge) < MERGE_INTERVAL {
            return;
        }
        if self.stats.try_merge(&self.latency) {
            self.latency.reset();
            self.unmerged = 0;
            self.last_merge = now;
        }
    }

    fn log_rejection(&mut self, head: u16, rej: &Rejection) {
        if let Some(dropped) = self.log.allow() {
            tracing::debug!(
                queue = self.index,
                head,
                status = rej.reason.status(),
                suppressed = dropped,
                "refused a request from the guest: {}",
                rej.reason
            );
        }
    }

    fn log_error(&mut self, msg: std::fmt::Arguments<'_>) {
        if let Some(dropped) = self.log.allow() {
            tracing::warn!(queue = self.index, suppressed = dropped, "{msg}");
        }
    }
}

/// Adds 1 to the front end's eventfd without ever blocking. The handler made the file
/// non-blocking when it got it; a front end can undo that (the flag belongs to the open
/// file, which it shares), so a counter that cannot take another 1 is also checked for
/// first. Either way a saturated counter means the front end has a signal pending: it
/// loses nothing when this one is dropped.
fn signal_eventfd(file: &File) {
    let mut pfd = libc::pollfd { fd: file.as_raw_fd(), events: libc::POLLOUT, revents: 0 };
    // SAFETY: one valid pollfd, zero timeout.
    let ready = unsafe { libc::poll(&mut pfd, 1, 0) };
    if ready == 1 && pfd.revents & libc::POLLOUT != 0 {
        let _ = (&*file).write(&1u64.to_ne_bytes());
    }
}
