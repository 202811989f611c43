//! A mapped device: the `BlockDevice` the registry creates, and its control-plane side
//! of suspend/resume.
//!
//! # Admission and drain without a global lock
//! The device's shared state is one atomic word: `generation << 2 | removed | suspended`.
//! Every per-thread queue publishes its `active` count (requests admitted and not
//! finished, plus targets' internal I/O), in its own cache line, with a plain store
//! whenever it changes (what matters for the drain is whether it is zero; the number is
//! what a suspend that timed out reports). Admission from idle is a Dekker
//! handshake:
//!
//! ```text
//!  queue (data path)                       control (suspend)
//!  published = 1 (store)                   state |= SUSPENDED
//!  fence(SeqCst)                           fence(SeqCst)
//!  read state: suspended? undo, hold       wait until every queue's published == 0
//! ```
//!
//! With both fences, either the queue sees the suspension (and holds the request, in
//! order) or the control plane sees the queue's count (and waits for it). A queue that
//! is already busy admits with one load of the state compared with the word its table
//! was loaded under: its published count is non-zero, so a suspend it has not seen yet
//! keeps waiting until the queue sees it and drains. A table swap
//! happens only while suspended and drained: `live` is stored first, then the state's
//! generation is bumped; a queue that sees a new generation reloads `live` (its child
//! queues and target queues) when it has nothing in flight, before admitting anything.

pub(crate) mod context;
pub(crate) mod io_core;
pub(crate) mod queue;

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use udm_drivers::{BlockDevice, DeviceError, DeviceInfo, IoQueue, MemoryRegion};

use crate::table::Table;

pub(crate) const SUSPENDED: u64 = 1;
pub(crate) const REMOVED: u64 = 2;
pub(crate) const GEN_SHIFT: u32 = 2;

/// State shared by the device handle and all its queues.
pub(crate) struct DeviceShared {
    pub state: AtomicU64,
    pub live: ArcSwapOption<Table>,
    queues: Mutex<Vec<Weak<QueueShared>>>,
    regions: Mutex<Vec<MemoryRegion>>,
    /// The lifecycle operation draining the device without the registry lock, if any
    /// ("suspended", "removed"): others on the same device are refused meanwhile.
    transition: Mutex<Option<&'static str>>,
    /// Set to make the drain of the transition in progress give up (`dm resume` of a
    /// device still draining, like a signal interrupting the kernel's suspend).
    cancel_drain: AtomicBool,
}

/// A lifecycle operation in progress on one device (see
/// [`MappedDevice::begin_transition`]); dropping it ends it.
pub(crate) struct Transition {
    shared: Arc<DeviceShared>,
}

impl Drop for Transition {
    fn drop(&mut self) {
        *self.shared.transition.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Why a drain gave up, with what it was still waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DrainStopped {
    /// The deadline passed.
    TimedOut(InFlight),
    /// [`MappedDevice::cancel_drain`] was called.
    Cancelled(InFlight),
}

/// I/O a drain was still waiting for when it gave up: the published count of each
/// queue open on the device, in the order they were opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InFlight {
    /// Per queue.
    pub per_queue: Vec<usize>,
}

impl InFlight {
    /// All queues together.
    pub fn total(&self) -> usize {
        self.per_queue.iter().sum()
    }
}

impl std::fmt::Display for InFlight {
    /// `3 request(s) in flight (queue 0: 1, queue 2: 2)`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} request(s) in flight", self.total())?;
        let busy: Vec<String> = self
            .per_queue
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(q, n)| format!("queue {q}: {n}"))
            .collect();
        if !busy.is_empty() {
            write!(f, " ({})", busy.join(", "))?;
        }
        Ok(())
    }
}

/// One queue's published in-flight count, alone in its cache lines so that the owner's
/// stores do not slow other queues down.
#[repr(align(128))]
pub(crate) struct QueueShared {
    pub active: AtomicUsize,
}

/// A device whose sectors a table maps onto other devices. Cheap to clone (a handle).
#[derive(Clone)]
pub struct MappedDevice {
    shared: Arc<DeviceShared>,
}

impl Default for MappedDevice {
    fn default() -> Self {
        Self::new()
    }
}

impl MappedDevice {
    /// A device with no table: I/O to it fails until a table is loaded and resumed.
    pub fn new() -> Self {
        MappedDevice {
            shared: Arc::new(DeviceShared {
                state: AtomicU64::new(0),
                live: ArcSwapOption::empty(),
                queues: Mutex::new(Vec::new()),
                regions: Mutex::new(Vec::new()),
                transition: Mutex::new(None),
                cancel_drain: AtomicBool::new(false),
            }),
        }
    }

    /// The live table, if any.
    pub fn live_table(&self) -> Option<Arc<Table>> {
        self.shared.live.load_full()
    }

    /// Whether the device is suspended.
    pub fn is_suspended(&self) -> bool {
        self.shared.state.load(Ordering::Acquire) & SUSPENDED != 0
    }

    /// How many times the live table was replaced.
    pub fn generation(&self) -> u64 {
        self.shared.state.load(Ordering::Acquire) >> GEN_SHIFT
    }

    /// Stops admitting I/O: from now on new requests are held by their queues.
    pub(crate) fn stop_admission(&self) {
        self.shared.state.fetch_or(SUSPENDED, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }

    /// Starts a lifecycle operation `op` that drains without the registry lock; while
    /// the returned guard lives, [`MappedDevice::transition`] names it. Refused (with the
    /// operation in progress) if another is.
    pub(crate) fn begin_transition(&self, op: &'static str) -> Result<Transition, &'static str> {
        let mut t = self.shared.transition.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(busy) = *t {
            return Err(busy);
        }
        *t = Some(op);
        self.shared.cancel_drain.store(false, Ordering::Release);
        Ok(Transition { shared: Arc::clone(&self.shared) })
    }

    /// Makes the drain of the transition in progress (if any) give up.
    pub(crate) fn cancel_drain(&self) {
        self.shared.cancel_drain.store(true, Ordering::Release);
    }

    /// The lifecycle operation in progress, if any ("suspended", "removed").
    pub(crate) fn transition(&self) -> Option<&'static str> {
        *self.shared.transition.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until no queue has admitted I/O in flight, or until `deadline` or
    /// [`MappedDevice::cancel_drain`]: then returns what is still in flight. The queues'
    /// owner threads must keep polling (as they do in a reactor).
    pub(crate) fn wait_drained(&self, deadline: Option<Instant>) -> Result<(), DrainStopped> {
        let started = Instant::now();
        let mut warned = false;
        let queues: Vec<Weak<QueueShared>> = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner()).clone();
        // A queue dropped meanwhile has nothing left in flight that anyone waits for.
        let active = |q: &Weak<QueueShared>| q.upgrade().map_or(0, |q| q.active.load(Ordering::Acquire));
        for q in &queues {
            while active(q) != 0 {
                let left = || InFlight { per_queue: queues.iter().map(active).collect() };
                if self.shared.cancel_drain.swap(false, Ordering::AcqRel) {
                    return Err(DrainStopped::Cancelled(left()));
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(DrainStopped::TimedOut(left()));
                }
                if !warned && started.elapsed() > Duration::from_secs(5) {
                    tracing::warn!("suspend still waiting for in-flight I/O after 5 s: is a queue's thread polling?");
                    warned = true;
                }
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        Ok(())
    }

    /// Publishes `table` as live (the device must be suspended and drained).
    pub(crate) fn publish(&self, table: Option<Arc<Table>>) {
        debug_assert!(self.is_suspended());
        self.shared.live.store(table);
        self.shared.state.fetch_add(1 << GEN_SHIFT, Ordering::SeqCst);
    }

    /// Lets queues admit I/O again; they release what they held, in order.
    pub(crate) fn start_admission(&self) {
        self.shared.state.fetch_and(!SUSPENDED, Ordering::SeqCst);
    }

    /// Fails all held and future I/O with `DeviceGone` (forced removal).
    pub(crate) fn mark_removed(&self) {
        self.shared.state.fetch_or(REMOVED, Ordering::SeqCst);
    }

    /// Memory regions registered so far (to register with a newly loaded table).
    pub(crate) fn regions(&self) -> Vec<MemoryRegion> {
        self.shared.regions.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Number of queues currently open on the device.
    pub fn open_queues(&self) -> usize {
        let list = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
        list.iter().filter(|w| w.strong_count() > 0).count()
    }
}

impl BlockDevice for MappedDevice {
    fn info(&self) -> DeviceInfo {
        match self.shared.live.load().as_ref() {
            Some(t) => t.info.clone(),
            None => {
                let mut info = DeviceInfo::new(0, 512);
                info.supports_discard = false;
                info.supports_write_zeroes = false;
                info
            }
        }
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        let qs = Arc::new(QueueShared { active: AtomicUsize::new(0) });
        {
            let mut list = self.shared.queues.lock().unwrap_or_else(|e| e.into_inner());
            list.retain(|w| w.strong_count() > 0);
            list.push(Arc::downgrade(&qs));
        }
        Ok(Box::new(queue::MappedQueue::new(Arc::clone(&self.shared), qs, depth.max(1))))
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        if let Some(t) = self.shared.live.load_full() {
            t.register_memory(region)?;
        }
        self.shared.regions.lock().unwrap_or_else(|e| e.into_inner()).push(region);
        Ok(())
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.shared.regions.lock().unwrap_or_else(|e| e.into_inner()).retain(|r| *r != region);
        if let Some(t) = self.shared.live.load_full() {
            t.unregister_memory(region)?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for MappedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedDevice")
            .field("generation", &self.generation())
            .field("suspended", &self.is_suspended())
            .finish()
    }
}
