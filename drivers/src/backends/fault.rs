//! `fault`: a wrapper over any [`BlockDevice`] that fails, tears, drops or corrupts I/O
//! on command, or puts a volatile write cache in front of it, for crash-consistency and
//! verification tests.
//!
//! ```no_run
//! use std::sync::Arc;
//! use udm_drivers::backends::{fault::FaultDevice, mem::MemDevice};
//!
//! let disk = Arc::new(MemDevice::new(64 << 20, 512).unwrap());
//! let faulty = FaultDevice::new(disk.clone());
//! let control = faulty.control();
//! // ... write the initial state through `faulty` ...
//! control.power_loss_at_write(100, 7); // the 100th write from now is torn, later ones vanish
//! // ... run the workload through `faulty` until control.power_lost() ...
//! let torn = control.torn_write();       // which sectors of write 100 reached the disk
//! // "Reboot": open `disk` (the surviving media) directly and check recovery.
//! ```
//!
//! A crash test that must catch a missing flush or FUA uses the volatile cache instead:
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use udm_drivers::backends::{fault::FaultDevice, mem::MemDevice};
//! let disk = Arc::new(MemDevice::new(64 << 20, 512).unwrap());
//! let faulty = FaultDevice::new(disk.clone());
//! let control = faulty.control();
//! control.volatile_cache(Some(500), 7); // writes are cached; the power goes at write 500
//! // ... run the workload through `faulty`, noting what it flushed or wrote with FUA ...
//! let cut = control.power_cut_report(); // what the cut lost, tore and reordered
//! // "Reboot" on `disk`: everything flushed or FUA is there; of the rest, whatever the seed kept.
//! ```
//!
//! All queues of one device share one [`FaultControl`] (atomics only), so "the Nth
//! write" means the Nth write submitted to the device from any thread, in submission
//! order. A write is a `Write`, `Discard` or `WriteZeroes` (FUA or not); flushes are not
//! counted.
//! The plans:
//! * [`FaultControl::fail_after_writes`]: the first N writes pass; after them every
//!   request (reads and flushes too) fails with `IoError::Host { errno: EIO }`, like a
//!   disk that died.
//! * [`FaultControl::power_loss_at_write`]: writes before the Nth reach the inner
//!   device whole; the Nth is torn at the inner device's block granularity (512 bytes
//!   on a 512-byte device), each block landing or not by a hash of the seed; every
//!   later write completes successfully but is silently dropped. Reads still see the
//!   inner device, so the state after the cut can be read back.
//! * [`FaultControl::corrupt_reads`]: reads covering a chosen sector get one byte of
//!   that sector inverted (the byte at offset `sector % 512`), every time; the inner
//!   device is left intact.
//! * [`FaultControl::stall_after_writes`]: the first N writes pass; after them every
//!   request is held and never completes, like a hung disk, so a test can kill the
//!   process above with requests provably in flight. [`FaultControl::disarm`] releases
//!   the held requests to the inner device.
//! * [`FaultControl::volatile_cache`]: a volatile write cache, like a real disk's (see
//!   [`volatile_cache`]): writes complete once in the cache and reach the inner device
//!   (the media) only at a flush, or at once with FUA. At a power cut (the Nth write, or
//!   [`FaultControl::power_cut`]) a seeded subset of the cached writes is lost, some
//!   survivors are torn at the inner device's block granularity (sectors on a 512-byte
//!   device), and the survivors land in a seeded order (where they overlap, an older
//!   one may end on top); the seed also picks how much is lost (1/8 to 7/8 of the
//!   cached writes). Writes completed before a flush that completed, and FUA writes,
//!   always survive. From the cut on the device is powered off
//!   (writes vanish, flushes do nothing) and reads show the post-power-loss media, so a
//!   test can restart on it (after [`FaultControl::disarm`], or on the inner device).
//!   [`FaultControl::power_cut_report`] says what was lost, torn and reordered.
//!   Devices joined by [`FaultControl::share_power_with`] (an origin disk and a COW
//!   disk in one machine) lose power together, whichever of them cut it.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};

use arc_swap::ArcSwap;

use crate::completion_ring::{completion_ring, CompletionRing};
use crate::device::{BlockDevice, DeviceInfo, IoQueue, MemoryRegion};
use crate::error::{DeviceError, IoError};
use crate::request::{Completion, IoOp, IoRequest, QueueFull, SECTOR_SIZE};
use crate::validate::validate_request;

pub mod volatile_cache;

pub use volatile_cache::PowerCut;
use volatile_cache::VolatileCache;

const MODE_OFF: u8 = 0;
const MODE_FAIL_AFTER: u8 = 1;
const MODE_POWER_LOSS: u8 = 2;
const MODE_STALL_AFTER: u8 = 3;
const MODE_VOLATILE: u8 = 4;

/// What a fault device does to writes, as parsed from a backend spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFault {
    /// [`FaultControl::fail_after_writes`].
    FailAfterWrites(u64),
    /// [`FaultControl::power_loss_at_write`].
    PowerLossAtWrite {
        /// 1-based ordinal of the torn write.
        write: u64,
        /// Chooses which blocks of the torn write land.
        seed: u64,
    },
    /// [`FaultControl::stall_after_writes`].
    StallAfterWrites(u64),
    /// [`FaultControl::volatile_cache`].
    VolatileCache {
        /// 1-based ordinal of the write during which the power goes, if any.
        power_loss: Option<u64>,
        /// Chooses what the power cut loses, tears and reorders.
        seed: u64,
    },
}

/// Faults to arm when a fault device is created (see `backend_spec`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// What happens to writes, if anything.
    pub writes: Option<WriteFault>,
    /// Sectors whose reads come back corrupted.
    pub corrupt_sectors: Vec<u64>,
}

/// The one write that a power loss tore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornWrite {
    /// The operation (Write, Discard or WriteZeroes).
    pub op: IoOp,
    /// Its first sector.
    pub sector: u64,
    /// Its length in sectors.
    pub sectors: u64,
    /// The sector ranges that reached the inner device; the rest kept their old data.
    pub applied: Vec<Range<u64>>,
}

/// Shared switches and counters of one fault device.
#[derive(Debug)]
pub struct FaultControl {
    mode: AtomicU8,
    threshold: AtomicU64,
    seed: AtomicU64,
    writes: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
    corrupted: AtomicU64,
    held: AtomicU64,
    power_lost: AtomicBool,
    corrupt: ArcSwap<Vec<u64>>,
    torn: Mutex<Option<TornWrite>>,
    cache: Mutex<VolatileCache>,
    /// The power supply this device shares with others.
    rail: Mutex<Arc<Rail>>,
}

/// Devices that lose power together ([`FaultControl::share_power_with`]). Every request
/// in volatile-cache mode holds `power` while it runs, and a cut holds it while it powers
/// every member off, so no member does I/O between the first disk going dark and the
/// last.
#[derive(Debug, Default)]
struct Rail {
    power: Mutex<()>,
    members: Vec<Weak<FaultControl>>,
}

impl FaultControl {
    fn new(media: Arc<dyn BlockDevice>) -> Self {
        FaultControl {
            mode: AtomicU8::new(MODE_OFF),
            threshold: AtomicU64::new(0),
            seed: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            corrupted: AtomicU64::new(0),
            held: AtomicU64::new(0),
            power_lost: AtomicBool::new(false),
            corrupt: ArcSwap::from_pointee(Vec::new()),
            torn: Mutex::new(None),
            cache: Mutex::new(VolatileCache::new(media)),
            rail: Mutex::new(Arc::new(Rail::default())),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, VolatileCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes what a volatile cache still holds to the media (the acknowledged writes of
    /// a device switched off cleanly) and stops caching.
    fn settle_cache(&self) {
        let mut cache = self.cache();
        if cache.armed && !cache.powered_off {
            if let Err(e) = cache.write_back() {
                tracing::error!("fault: writing the volatile cache back to the media failed: {e}");
            }
        }
        cache.armed = false;
        cache.powered_off = false;
        cache.cut_at = None;
    }

    fn arm(&self, mode: u8, threshold: u64, seed: u64) {
        self.mode.store(MODE_OFF, Ordering::SeqCst);
        self.settle_cache();
        self.writes.store(0, Ordering::SeqCst);
        self.power_lost.store(false, Ordering::SeqCst);
        *self.torn.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.threshold.store(threshold, Ordering::SeqCst);
        self.seed.store(seed, Ordering::SeqCst);
        self.mode.store(mode, Ordering::SeqCst);
    }

    /// From now on, let `n` writes through, then fail every request with EIO.
    /// Resets the write count.
    pub fn fail_after_writes(&self, n: u64) {
        self.arm(MODE_FAIL_AFTER, n, 0);
    }

    /// From now on, writes `1..n` (counted from this call) land whole, write `n` is torn
    /// by `seed`, and every later write completes without reaching the inner device.
    /// `n` must be at least 1. Resets the write count and the torn-write record.
    pub fn power_loss_at_write(&self, n: u64, seed: u64) {
        self.arm(MODE_POWER_LOSS, n.max(1), seed);
    }

    /// From now on, let `n` writes through, then hold every request (reads and flushes
    /// too) without completing it, until [`FaultControl::disarm`]. Resets the write count.
    pub fn stall_after_writes(&self, n: u64) {
        self.arm(MODE_STALL_AFTER, n, 0);
    }

    /// From now on, cache writes in a volatile write cache (see the module
    /// documentation); with `power_loss_at = Some(n)` the power goes during write `n`
    /// (counted from this call, from 1), which is cached like the others, acknowledged,
    /// and subject to the cut. `seed` decides what the cut loses, tears and reorders.
    /// What an earlier volatile cache still held is written to the media first. Resets
    /// the write count and the power-cut report.
    pub fn volatile_cache(&self, power_loss_at: Option<u64>, seed: u64) {
        self.arm(MODE_OFF, 0, seed);
        {
            let mut cache = self.cache();
            cache.armed = true;
            cache.cut_at = power_loss_at.map(|n| n.max(1));
            cache.seed = seed;
            cache.report = None;
        }
        self.mode.store(MODE_VOLATILE, Ordering::SeqCst);
    }

    /// Cuts the power now. With a volatile cache, applies the cut to the cached writes
    /// (see [`FaultControl::volatile_cache`]) and returns what it did; in any mode, the
    /// device is powered off from here: writes complete without reaching the media,
    /// flushes do nothing, reads see the media. [`FaultControl::disarm`] powers it on.
    pub fn power_cut(&self) -> PowerCut {
        let rail = self.rail();
        let _power = rail.power.lock().unwrap_or_else(|p| p.into_inner());
        let report = self.cut_here();
        self.cut_the_rail(&rail);
        report
    }

    /// Cuts this device's power (the caller holds the rail's lock).
    fn cut_here(&self) -> PowerCut {
        let mut cache = self.cache();
        let report = if cache.armed && !cache.powered_off {
            cache.cut(None).unwrap_or_else(|e| {
                tracing::error!("fault: writing the surviving blocks to the media failed: {e}");
                cache.report.clone().unwrap_or_default()
            })
        } else {
            PowerCut::default()
        };
        cache.powered_off = true;
        self.power_off();
        report
    }

    /// Makes this device and `other` lose power together from now on: a power cut of
    /// either (armed with `power-loss=N` or by [`FaultControl::power_cut`]) cuts both, at
    /// once, as the disks of one machine. Joins are transitive: every device joined to
    /// either shares the power too. Join before starting I/O.
    pub fn share_power_with(self: &Arc<Self>, other: &Arc<FaultControl>) {
        let (a, b) = (self.rail(), other.rail());
        if Arc::ptr_eq(&a, &b) {
            return;
        }
        let mut members: Vec<Weak<FaultControl>> = a.members.iter().chain(&b.members).cloned().collect();
        for c in [self, other] {
            if !members.iter().any(|m| std::ptr::eq(m.as_ptr(), Arc::as_ptr(c))) {
                members.push(Arc::downgrade(c));
            }
        }
        let rail = Arc::new(Rail { power: Mutex::new(()), members });
        for member in rail.members.iter().filter_map(Weak::upgrade) {
            *member.rail.lock().unwrap_or_else(|p| p.into_inner()) = Arc::clone(&rail);
        }
    }

    fn rail(&self) -> Arc<Rail> {
        Arc::clone(&self.rail.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Cuts every other device on `rail` that still has power (the caller holds the
    /// rail's lock).
    fn cut_the_rail(&self, rail: &Rail) {
        for other in rail.members.iter().filter_map(Weak::upgrade) {
            if !std::ptr::eq(Arc::as_ptr(&other), self) && !other.power_lost() {
                other.cut_here();
            }
        }
    }

    /// From the cut on: drop writes and flushes (the power-loss plan past its write).
    fn power_off(&self) {
        self.threshold.store(0, Ordering::SeqCst);
        self.power_lost.store(true, Ordering::SeqCst);
        self.mode.store(MODE_POWER_LOSS, Ordering::SeqCst);
    }

    /// What the volatile cache's power cut did, once it happened.
    pub fn power_cut_report(&self) -> Option<PowerCut> {
        self.cache().report.clone()
    }

    /// Acknowledged writes that are only in the volatile cache (a power cut now could
    /// lose them).
    pub fn cached_writes(&self) -> u64 {
        self.cache().cached_writes()
    }

    /// A request in volatile-cache mode, run to completion under the cache's lock.
    fn cached_io(&self, req: &IoRequest) -> Result<(), IoError> {
        let rail = self.rail();
        let _power = rail.power.lock().unwrap_or_else(|p| p.into_inner());
        let (result, cut) = {
            let mut cache = self.cache();
            let ordinal = if req.op.is_write() { self.writes.fetch_add(1, Ordering::AcqRel) + 1 } else { 0 };
            if cache.powered_off && req.op.is_write() {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
            let (result, cut) = cache.handle(req, ordinal);
            if cut {
                self.power_off();
            }
            (result, cut)
        };
        if cut {
            self.cut_the_rail(&rail);
        }
        result
    }

    /// Corrupts every read that covers one of `sectors` (replacing the previous set).
    pub fn corrupt_reads(&self, sectors: impl IntoIterator<Item = u64>) {
        let mut v: Vec<u64> = sectors.into_iter().collect();
        v.sort_unstable();
        v.dedup();
        self.corrupt.store(Arc::new(v));
    }

    /// Stops injecting write faults and read corruption: the device behaves like the
    /// inner one again (counters and the torn-write record stay readable); requests held
    /// by a stall go to the inner device at each queue's next poll; what a volatile
    /// cache holds goes to the media (a clean shutdown); a powered-off device is powered
    /// on, over the media the cut left.
    pub fn disarm(&self) {
        self.mode.store(MODE_OFF, Ordering::SeqCst);
        self.settle_cache();
        self.corrupt.store(Arc::new(Vec::new()));
    }

    /// Applies a parsed plan.
    pub fn apply(&self, plan: &FaultPlan) {
        match plan.writes {
            Some(WriteFault::FailAfterWrites(n)) => self.fail_after_writes(n),
            Some(WriteFault::PowerLossAtWrite { write, seed }) => self.power_loss_at_write(write, seed),
            Some(WriteFault::StallAfterWrites(n)) => self.stall_after_writes(n),
            Some(WriteFault::VolatileCache { power_loss, seed }) => self.volatile_cache(power_loss, seed),
            None => {}
        }
        self.corrupt_reads(plan.corrupt_sectors.iter().copied());
    }

    /// Writes submitted since the plan was armed.
    pub fn writes_seen(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Requests failed on purpose since the device was created.
    pub fn failed_ios(&self) -> u64 {
        self.failed.load(Ordering::SeqCst)
    }

    /// Writes acknowledged but dropped after a power loss, since the device was created.
    pub fn dropped_writes(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }

    /// Reads corrupted on purpose since the device was created.
    pub fn corrupted_reads(&self) -> u64 {
        self.corrupted.load(Ordering::SeqCst)
    }

    /// Requests held by a stall since the device was created (released ones included).
    pub fn held_ios(&self) -> u64 {
        self.held.load(Ordering::SeqCst)
    }

    /// Whether the power is gone: the power-loss write was reached, or a power cut
    /// (volatile cache, [`FaultControl::power_cut`], or a device sharing the power) happened.
    pub fn power_lost(&self) -> bool {
        self.power_lost.load(Ordering::SeqCst)
    }

    /// The torn write, once the power loss happened.
    pub fn torn_write(&self) -> Option<TornWrite> {
        self.torn.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// What to do with one request, decided at submission.
    #[inline]
    fn fate(&self, op: IoOp) -> Fate {
        let mode = self.mode.load(Ordering::Acquire);
        if mode == MODE_OFF {
            return Fate::Pass;
        }
        let n = self.threshold.load(Ordering::Acquire);
        if !op.is_write() {
            return if mode == MODE_FAIL_AFTER && self.writes.load(Ordering::Acquire) >= n {
                Fate::Fail
            } else if mode == MODE_STALL_AFTER && self.writes.load(Ordering::Acquire) >= n {
                Fate::Hold
            } else if mode == MODE_POWER_LOSS && op == IoOp::Flush && self.power_lost() {
                Fate::Drop
            } else {
                Fate::Pass
            };
        }
        let ordinal = self.writes.fetch_add(1, Ordering::AcqRel) + 1;
        match mode {
            MODE_FAIL_AFTER if ordinal > n => Fate::Fail,
            MODE_POWER_LOSS if ordinal == n => {
                self.power_lost.store(true, Ordering::Release);
                Fate::Tear(self.seed.load(Ordering::Acquire))
            }
            MODE_POWER_LOSS if ordinal > n => Fate::Drop,
            MODE_STALL_AFTER if ordinal > n => Fate::Hold,
            _ => Fate::Pass,
        }
    }
}

enum Fate {
    Pass,
    Fail,
    Drop,
    Tear(u64),
    Hold,
}

/// A device that injects the faults its [`FaultControl`] is armed with.
pub struct FaultDevice {
    inner: Arc<dyn BlockDevice>,
    control: Arc<FaultControl>,
}

impl FaultDevice {
    /// Wraps `inner`; nothing is injected until the control is armed.
    pub fn new(inner: Arc<dyn BlockDevice>) -> Self {
        FaultDevice { control: Arc::new(FaultControl::new(Arc::clone(&inner))), inner }
    }

    /// Wraps `inner` with `plan` armed.
    pub fn with_plan(inner: Arc<dyn BlockDevice>, plan: &FaultPlan) -> Self {
        let d = Self::new(inner);
        d.control.apply(plan);
        d
    }

    /// The switches and counters, shared with every queue.
    pub fn control(&self) -> Arc<FaultControl> {
        Arc::clone(&self.control)
    }

    /// The wrapped device (the "media" that survives a power loss).
    pub fn inner(&self) -> &Arc<dyn BlockDevice> {
        &self.inner
    }
}

impl BlockDevice for FaultDevice {
    /// The inner device's, except that it says it has a volatile write cache while the
    /// volatile cache is on (a suspend flushes only devices that say so). Not in the
    /// other modes: a suspend's flush would hang on a stalled device.
    fn info(&self) -> DeviceInfo {
        let mut info = self.inner.info();
        info.volatile_cache |= self.control.mode.load(Ordering::Acquire) == MODE_VOLATILE;
        info
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        let inner = self.inner.open_queue(depth)?;
        let depth = inner.depth();
        let info = self.inner.info();
        Ok(Box::new(FaultQueue {
            inner,
            control: Arc::clone(&self.control),
            slots: vec![Slot::EMPTY; depth].into_boxed_slice(),
            free: (0..depth as u32).rev().collect(),
            local: completion_ring(depth),
            deferred: VecDeque::with_capacity(depth),
            held: Vec::with_capacity(depth),
            scratch: vec![Completion::EMPTY; depth].into_boxed_slice(),
            granule: (u64::from(info.logical_block_size) / SECTOR_SIZE).max(1),
            info,
            depth,
        }))
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.inner.register_memory(region)
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.inner.unregister_memory(region)
    }
}

#[derive(Clone, Copy)]
struct Slot {
    req: IoRequest,
    /// Inner requests not yet completed (several for a torn write).
    pending: u32,
    result: Result<(), IoError>,
}

impl Slot {
    const EMPTY: Slot = Slot { req: IoRequest::flush(0), pending: 0, result: Ok(()) };
}

struct FaultQueue {
    inner: Box<dyn IoQueue>,
    control: Arc<FaultControl>,
    slots: Box<[Slot]>,
    free: Vec<u32>,
    /// Completions decided here (failed, dropped, fully torn away).
    local: CompletionRing,
    /// Pieces of a torn write that did not fit in the inner queue yet.
    deferred: VecDeque<IoRequest>,
    /// Requests a stall holds (in flight, never completed while it lasts).
    held: Vec<IoRequest>,
    scratch: Box<[Completion]>,
    /// Tearing unit in sectors: the inner device's logical block.
    granule: u64,
    info: DeviceInfo,
    depth: usize,
}

impl FaultQueue {
    /// Sends `req` to the inner device through a slot of its own.
    fn pass(&mut self, req: IoRequest) {
        let idx = self.free.pop().expect("a free slot: in_flight < depth") as usize;
        self.slots[idx] = Slot { req, pending: 1, result: Ok(()) };
        let mut inner = req;
        inner.tag = idx as u64;
        self.forward(inner);
    }

    /// Holds `req` for a stall; the first one held says so in the log, which is how a
    /// test knows requests are now stuck in flight.
    fn hold(&mut self, req: IoRequest) {
        if self.control.held.fetch_add(1, Ordering::AcqRel) == 0 {
            tracing::warn!(
                writes = self.control.threshold.load(Ordering::Acquire),
                "fault: device stalled; holding every request from now on"
            );
        }
        self.held.push(req);
    }

    /// After `disarm`, the held requests go to the inner device.
    fn release_held(&mut self) {
        if self.held.is_empty() || self.control.mode.load(Ordering::Acquire) == MODE_STALL_AFTER {
            return;
        }
        let power_lost = self.control.power_lost();
        for req in std::mem::take(&mut self.held) {
            if power_lost {
                // A cut while they were held: they never reach the media.
                if req.op.is_write() {
                    self.control.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.local.push(Completion { tag: req.tag, result: Ok(()) });
            } else {
                self.pass(req);
            }
        }
    }

    fn forward(&mut self, req: IoRequest) {
        if let Err(QueueFull(req)) = self.inner.submit(req) {
            self.deferred.push_back(req);
        }
    }

    /// Sends the blocks of `req` that the seed picks; records them.
    fn tear(&mut self, idx: usize, req: IoRequest, seed: u64) {
        let g = self.granule;
        let mut applied: Vec<Range<u64>> = Vec::new();
        let blocks = req.sectors / g;
        for b in 0..blocks {
            if mix(seed ^ mix(req.sector + b * g)) & 1 == 1 {
                let s = req.sector + b * g;
                match applied.last_mut() {
                    Some(r) if r.end == s => r.end = s + g,
                    _ => applied.push(s..s + g),
                }
            }
        }
        tracing::info!(sector = req.sector, sectors = req.sectors, ?applied, "fault: power loss tears this write");
        self.slots[idx].pending = applied.len() as u32;
        for r in &applied {
            let mut piece = req;
            piece.sector = r.start;
            piece.sectors = r.end - r.start;
            if req.op == IoOp::Write {
                let off = ((r.start - req.sector) * SECTOR_SIZE) as usize;
                piece.sg = req.sg.slice(off, (piece.sectors * SECTOR_SIZE) as usize);
            }
            piece.tag = idx as u64;
            self.forward(piece);
        }
        let none = applied.is_empty();
        *self.control.torn.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(TornWrite { op: req.op, sector: req.sector, sectors: req.sectors, applied });
        if none {
            self.free.push(idx as u32);
            self.local.push(Completion { tag: req.tag, result: Ok(()) });
        }
    }

    /// Inverts one byte of each chosen sector the read covers.
    fn corrupt(&self, req: &IoRequest) {
        let set = self.control.corrupt.load();
        if set.is_empty() {
            return;
        }
        let end = req.sector + req.sectors;
        let first = set.partition_point(|&s| s < req.sector);
        for &s in set[first..].iter().take_while(|&&s| s < end) {
            let at = ((s - req.sector) * SECTOR_SIZE + s % SECTOR_SIZE) as usize;
            let byte = req.sg.slice(at, 1);
            let mut b = [0u8];
            byte.copy_to_slice(&mut b);
            b[0] ^= 0xff;
            byte.copy_from_slice(&b);
            self.control.corrupted.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// splitmix64's finaliser: a cheap, well-mixed hash for the tearing pattern.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl IoQueue for FaultQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.in_flight() >= self.depth {
            return Err(QueueFull(req));
        }
        if let Err(e) = validate_request(&self.info, &req) {
            // Invalid requests are the inner device's to refuse and must not count as writes.
            self.local.push(Completion { tag: req.tag, result: Err(e) });
            return Ok(());
        }
        if self.control.mode.load(Ordering::Acquire) == MODE_VOLATILE {
            let result = self.control.cached_io(&req);
            if req.op == IoOp::Read && result.is_ok() {
                self.corrupt(&req);
            }
            self.local.push(Completion { tag: req.tag, result });
            return Ok(());
        }
        match self.control.fate(req.op) {
            Fate::Fail => {
                self.control.failed.fetch_add(1, Ordering::Relaxed);
                self.local.push(Completion { tag: req.tag, result: Err(IoError::Host { errno: libc::EIO }) });
            }
            Fate::Drop => {
                if req.op.is_write() {
                    self.control.dropped.fetch_add(1, Ordering::Relaxed);
                }
                self.local.push(Completion { tag: req.tag, result: Ok(()) });
            }
            Fate::Pass => self.pass(req),
            Fate::Hold => self.hold(req),
            Fate::Tear(seed) => {
                let idx = self.free.pop().expect("a free slot: in_flight < depth") as usize;
                self.slots[idx] = Slot { req, pending: 0, result: Ok(()) };
                self.tear(idx, req, seed);
            }
        }
        Ok(())
    }

    fn kick(&mut self) {
        self.inner.kick();
    }

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        self.release_held();
        while let Some(req) = self.deferred.pop_front() {
            if let Err(QueueFull(req)) = self.inner.submit(req) {
                self.deferred.push_front(req);
                break;
            }
        }
        self.inner.kick();
        let mut n = self.local.drain_into(out);
        // One inner completion yields at most one of ours, so this never overfills `out`.
        let room = (out.len() - n).min(self.scratch.len());
        let got = self.inner.poll(&mut self.scratch[..room]);
        for i in 0..got {
            let c = self.scratch[i];
            let idx = c.tag as usize;
            let slot = &mut self.slots[idx];
            if slot.result.is_ok() {
                slot.result = c.result;
            }
            slot.pending -= 1;
            if slot.pending > 0 {
                continue;
            }
            let slot = *slot;
            if slot.req.op == IoOp::Read && slot.result.is_ok() {
                self.corrupt(&slot.req);
            }
            self.free.push(idx as u32);
            out[n] = Completion { tag: slot.req.tag, result: slot.result };
            n += 1;
        }
        n
    }

    fn wait(&mut self, timeout: std::time::Duration) {
        if self.local.is_empty() && self.deferred.is_empty() {
            self.inner.wait(timeout);
        } else {
            self.inner.kick();
        }
    }

    fn in_flight(&self) -> usize {
        self.depth - self.free.len() + self.local.len() + self.held.len()
    }

    fn depth(&self) -> usize {
        self.depth
    }
}
