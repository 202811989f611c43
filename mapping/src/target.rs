//! The target API: what a table line becomes, and how it maps I/O.
//!
//! Device-mapper's shape (`ctr`/`map`/`status`/`iterate_devices`/`presuspend`...), made
//! per-thread and poll-driven so the data path needs no lock:
//!
//! ```text
//!  control plane (registry, any thread)          data path (one thread per MappedQueue)
//!  ────────────────────────────────────          ──────────────────────────────────────
//!  TargetType::construct(ctx, args)   ──► Arc<dyn Target>   (one per table line; Sync;
//!     ctx.open_device(name, start, len)        shared state of this table instance)
//!     ctx.read_sync / write_sync (load-time I/O, e.g. a COW header)
//!                                                 │ Target::open_queue(setup), once per
//!  hooks: presuspend → (drain) → postsuspend      ▼ thread and table
//!         preresume (may veto) → resume       Box<dyn TargetQueue>  (Send, per thread)
//!  table_args / status_args / destroy            map(io, ctx) -> Remap | Done | Accepted
//!                                                child_done(token, result, ctx)
//!                                                poll(ctx)   (multi-step state machines)
//! ```
//!
//! # Life of a request through a mapped device
//! 1. The mapped queue finds the segment (binary search over segment starts) and cuts
//!    the request at segment ends and at the target's [`Target::split_boundary`]
//!    (a stripe chunk, a snapshot chunk). Each piece is a [`TargetIo`]: its `offset` is
//!    relative to the target's start, its `sg` a zero-copy slice of the caller's list.
//! 2. The core calls [`TargetQueue::map`] on the calling thread's queue of that target.
//!    The answer is one of:
//!    * [`MapOutcome::Remap`]: send the piece, unchanged, to one of the target's devices
//!      at a new sector. The core submits it and completes the piece when the device
//!      does; the target hears nothing more (except [`Target::remap_error`] on failure).
//!      This is the whole path for `linear` and `striped`: no allocation, no lock.
//!    * [`MapOutcome::Done`]: the piece is finished now (`zero`, `error`).
//!    * [`MapOutcome::Accepted`]: the target owns the piece. It issues internal I/O with
//!      [`TargetContext::submit`] (to any of its devices, with its own 32-bit token), hears
//!      of it in [`TargetQueue::child_done`], makes progress in [`TargetQueue::poll`], and
//!      finally calls [`TargetContext::complete`] with the piece's [`PartId`] exactly once.
//!      A snapshot's copy-out is this: read the origin chunk into a bounce buffer, write
//!      it to the COW, commit metadata, then `ctx.submit` the held origin write and
//!      complete the part from `child_done`.
//! 3. The pieces of one request complete as one [`udm_drivers::Completion`] (the first
//!    error wins), delivered by the mapped queue's `poll`.
//!
//! A read or write inside one segment whose target declares a [`Target::direct_remap`]
//! (`linear`) skips all of this: the core shifts its sector and sends it to the device
//! as it is, and its completion goes straight back to the submitter.
//!
//! # Threads and state
//! * `Arc<dyn Target>` is the per-table-instance state, shared by every thread (put
//!   cross-thread structures here: an exception table, a pending-copy map, counters).
//! * `Box<dyn TargetQueue>` is per thread and per table instance: preallocate per-request
//!   scratch (bounce buffers, state-machine slots) in [`Target::open_queue`]; the core
//!   tells you the queue depth. A queue never migrates while it has work.
//! * State shared by *several* tables (e.g. an origin and its snapshots) lives in a
//!   registry extension: [`ConstructCtx::extension`] returns one `Arc<T>` per registry.
//!
//! # Lifecycle (see `registry`)
//! * `construct` runs at **load**, with the registry's lock held; it may do synchronous
//!   I/O to the devices it opened ([`ConstructCtx::read_sync`]), and a refusal
//!   ([`TargetError`]) leaves everything as it was (drop whatever you took: RAII).
//! * `suspend`: [`Target::presuspend`] on the live table, then the device stops
//!   admitting I/O (new requests are held, in order), waits until every request and
//!   every internal I/O of every queue has finished, flushes unless `noflush`, then
//!   [`Target::postsuspend`].
//! * `resume`: [`Target::preresume`] on the table about to go live (a veto leaves the
//!   device suspended and the inactive table in place), the swap (one atomic pointer
//!   store), [`Target::destroy`] on the replaced table, [`Target::resume`] on the new
//!   live one, then held I/O is released and mapped by the **new** table.
//!   [`Target::split_boundary`] is read again after every resume, so it may change then
//!   (a snapshot-origin's split size follows its snapshots).
//! * Per-thread queues notice a new table lazily: when the thread next touches the
//!   device and has nothing in flight for the old table, it drops its old
//!   `TargetQueue`s and child queues and opens new ones. A `TargetQueue` may therefore
//!   outlive [`Target::destroy`], but it never receives I/O after it.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use udm_drivers::{BlockDevice, DeviceInfo, IoError, IoOp, SgList};

use crate::error::TargetError;
pub use crate::mapped::context::TargetContext;

/// Index of a device among those one target opened, in the order of its
/// [`ConstructCtx::open_device`] calls (0, 1, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DevIndex(pub u16);

/// Identifies one accepted piece of a request, for [`TargetContext::complete`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PartId(pub(crate) u32);

/// One piece of a request, inside one target and one split boundary.
#[derive(Debug, Clone, Copy)]
pub struct TargetIo {
    /// What to do. A `Flush` carries no range; see [`FlushPolicy`].
    pub op: IoOp,
    /// First sector, relative to the target's start.
    pub offset: u64,
    /// Length in sectors (0 for a flush).
    pub sectors: u64,
    /// The data of this piece (empty unless `op` is Read or Write).
    pub sg: SgList,
    /// Forced unit access, as asked by the submitter.
    pub fua: bool,
    /// Which piece this is, for [`TargetContext::complete`] after [`MapOutcome::Accepted`].
    pub part: PartId,
    /// For flushes under [`FlushPolicy::Map`]: which of the target's flushes (0..n).
    pub flush_index: u32,
}

/// What [`TargetQueue::map`] decided for one piece.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOutcome {
    /// Send the piece unchanged to device `dev` at absolute `sector` (ignored for
    /// flushes). The core completes it when the device does.
    Remap {
        /// Which of the target's devices.
        dev: DevIndex,
        /// The sector on that device.
        sector: u64,
    },
    /// The piece is finished.
    Done(Result<(), IoError>),
    /// The target keeps the piece and will call [`TargetContext::complete`] for it
    /// exactly once (possibly from inside this very `map` call).
    Accepted,
}

/// See [`Target::direct_remap`]: target offset `o` is sector `start + o` of device `dev`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DirectRemap {
    /// Which of the target's devices.
    pub dev: DevIndex,
    /// The device sector of the target's first sector.
    pub start: u64,
}

/// How a flush of the mapped device reaches a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlushPolicy {
    /// The target needs no flush (zero, error).
    None,
    /// Flush every device the target opened. The core sends one flush per distinct
    /// device of the whole table, however many segments share it.
    AllDevices,
    /// Call [`TargetQueue::map`] `n` times with `op == Flush` and `flush_index` 0..n
    /// (dm's `num_flush_bios`), e.g. a snapshot remaps its one flush to the COW.
    Map(u32),
}

/// Operations a target supports beyond read, write and flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetCaps {
    /// Discard reaches `map` (otherwise the mapped device does not advertise it).
    pub discard: bool,
    /// Write-zeroes reaches `map`.
    pub write_zeroes: bool,
}

/// What [`Target::open_queue`] is told about the thread's queue.
#[derive(Debug, Clone)]
pub struct QueueSetup<'a> {
    /// The mapped queue's depth: at most this many requests (and so, at most this many
    /// accepted pieces per request boundary) are in flight at once.
    pub depth: usize,
    /// Information on the target's devices, indexed by [`DevIndex`].
    pub devices: &'a [DeviceInfo],
}

/// A target type: the name in the table (`linear`) and its constructor.
pub trait TargetType: Send + Sync {
    /// The name tables use; at most 15 characters.
    fn name(&self) -> &'static str;

    /// Builds one target instance from a table line's arguments (unescaped). Runs at
    /// load time; see [`ConstructCtx`] for what it may do.
    fn construct(&self, ctx: &mut ConstructCtx<'_>, args: &[String]) -> Result<Arc<dyn Target>, TargetError>;
}

/// One constructed target: one table line of one table instance, shared by all threads.
pub trait Target: Send + Sync {
    /// The target type name, as printed in the table.
    fn type_name(&self) -> &'static str;

    /// The target's table arguments, as dmsetup prints them (devices by udm name,
    /// escaped with [`crate::table_text::escape_arg`]); must re-parse to an equal target.
    fn table_args(&self) -> String;

    /// The target's status arguments (`dmsetup status`); empty by default.
    fn status_args(&self) -> String {
        String::new()
    }

    /// Pieces never cross a multiple of this many sectors, counted from the target's
    /// start (a stripe or snapshot chunk). Read at load and after every resume.
    fn split_boundary(&self) -> Option<NonZeroU64> {
        None
    }

    /// A mapping of reads and writes that is a fixed shift onto one device, for the
    /// core's pass-through path: a read or write that lies inside the segment goes to
    /// `dev` at `start + offset` without a call to [`TargetQueue::map`], and completes
    /// straight back to the submitter (failures included: [`Target::remap_error`] does
    /// not hear of them). Only for targets whose `map` would answer exactly that `Remap`
    /// for every read and write, from any thread, at any time, with no
    /// [`Target::split_boundary`] and nothing to learn from errors (`linear`).
    /// Asked once, when the table is built; flushes, discards and write-zeroes still go
    /// through `map`.
    fn direct_remap(&self) -> Option<DirectRemap> {
        None
    }

    /// How flushes reach this target.
    fn flush_policy(&self) -> FlushPolicy {
        FlushPolicy::AllDevices
    }

    /// Discard and write-zeroes support.
    fn caps(&self) -> TargetCaps;

    /// Opens the calling thread's queue for this target instance.
    fn open_queue(&self, setup: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError>;

    /// Before the device stops admitting I/O (a merge stops here).
    fn presuspend(&self) {}

    /// After the device has drained (and flushed unless `noflush`).
    fn postsuspend(&self) {}

    /// Before this table goes live (or before a plain resume of the live table). An
    /// error vetoes the resume: the device stays suspended and nothing is swapped.
    fn preresume(&self) -> Result<(), TargetError> {
        Ok(())
    }

    /// After this table is live, before held I/O is released (a snapshot becomes
    /// active here).
    fn resume(&self) {}

    /// The table this target belongs to was replaced, cleared or removed: release
    /// cross-table registrations here (an origin forgets this snapshot).
    fn destroy(&self) {}

    /// A piece remapped to `dev` failed (the striped target marks that stripe `D`).
    fn remap_error(&self, dev: DevIndex, error: IoError) {
        let _ = (dev, error);
    }
}

/// A target's per-thread queue. Every method runs on the thread that owns the mapped
/// queue, from inside its `submit` or `poll`; none may block.
pub trait TargetQueue: Send {
    /// Maps one piece; see [`MapOutcome`].
    fn map(&mut self, io: &TargetIo, ctx: &mut TargetContext<'_>) -> MapOutcome;

    /// An internal I/O submitted with [`TargetContext::submit`] and `token` finished.
    fn child_done(&mut self, token: u32, result: Result<(), IoError>, ctx: &mut TargetContext<'_>) {
        let _ = (token, result, ctx);
    }

    /// Whether [`TargetQueue::poll`] must run on every poll of the mapped queue (for
    /// work that advances without a completion of this queue, e.g. another thread
    /// finishing a copy this queue waits for). Asked once, when the queue opens.
    fn needs_poll(&self) -> bool {
        false
    }

    /// Makes progress: retries internal I/O that found a device queue full, advances
    /// state machines, completes accepted pieces.
    fn poll(&mut self, ctx: &mut TargetContext<'_>) {
        let _ = ctx;
    }

    /// Whether the queue holds no work besides what the core already counts (accepted
    /// pieces and internal I/O in flight). The core switches to a new table only when
    /// every target queue is idle.
    fn is_idle(&self) -> bool {
        true
    }
}

/// A device's name, shared between the registry and every table that references the
/// device, so a rename shows in their table output at once.
#[derive(Debug, Clone)]
pub struct SharedName(Arc<Mutex<String>>);

impl SharedName {
    /// A name cell holding `name`.
    pub fn new(name: &str) -> Self {
        SharedName(Arc::new(Mutex::new(name.to_string())))
    }

    /// The current name.
    pub fn get(&self) -> String {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(crate) fn set(&self, name: &str) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = name.to_string();
    }
}

/// Registry-wide identity of a device (never reused by a registry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceId(pub(crate) u64);

/// A device a target opened at construction.
#[derive(Clone)]
pub struct TargetDevice {
    index: DevIndex,
    id: DeviceId,
    name: SharedName,
    device: Arc<dyn BlockDevice>,
    info: DeviceInfo,
}

impl fmt::Debug for TargetDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TargetDevice").field("index", &self.index).field("name", &self.name.get()).finish()
    }
}

impl TargetDevice {
    /// Its index among the target's devices.
    pub fn index(&self) -> DevIndex {
        self.index
    }

    /// Its current udm name (how tables print it).
    pub fn name(&self) -> String {
        self.name.get()
    }

    /// Its name, escaped for table output.
    pub fn table_name(&self) -> String {
        crate::table_text::escape_arg(&self.name.get())
    }

    /// The device itself, e.g. to register bounce-buffer memory with it.
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.device
    }

    /// Its geometry when the target was constructed.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub(crate) fn id(&self) -> DeviceId {
        self.id
    }

    pub(crate) fn shared_name(&self) -> SharedName {
        self.name.clone()
    }
}

/// What the registry knows of a device a table names.
#[derive(Clone)]
pub(crate) struct ResolvedDevice {
    pub id: DeviceId,
    pub name: SharedName,
    pub device: Arc<dyn BlockDevice>,
    /// Size to check areas against; `None` when it has no table yet (as the kernel, which
    /// skips the check for a zero-sized device).
    pub size: Option<u64>,
    pub info: DeviceInfo,
}

/// Looks device names up for a constructor (the registry, under its lock).
pub(crate) trait DeviceResolver {
    fn resolve(&self, name: &str) -> Option<ResolvedDevice>;

    /// If using device `id` would make the loading device depend on itself, the chain
    /// of names that closes the loop.
    fn cycle_path(&self, id: DeviceId) -> Option<String>;
}

/// A counter of table events (`dmsetup info`'s event number): a target raises one when
/// something a monitor should see happens (a snapshot got invalidated).
#[derive(Debug, Clone, Default)]
pub struct EventCounter(Arc<AtomicU64>);

impl EventCounter {
    /// Records one event.
    pub fn raise(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Events so far.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Per-registry shared state for target types, keyed by type (e.g. "origins and their
/// snapshots" for the snapshot targets). One instance per registry, made on first use.
#[derive(Default)]
pub struct Extensions(Mutex<HashMap<std::any::TypeId, Arc<dyn Any + Send + Sync>>>);

impl Extensions {
    /// The registry's instance of `T`, created with `T::default()` on first use.
    pub fn get<T: Any + Default + Send + Sync>(&self) -> Arc<T> {
        let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(std::any::TypeId::of::<T>()).or_insert_with(|| Arc::new(T::default()));
        Arc::clone(entry).downcast::<T>().unwrap_or_else(|_| unreachable!("keyed by TypeId"))
    }
}

/// What a constructor may use: its place in the table, device lookup, load-time I/O.
pub struct ConstructCtx<'a> {
    pub(crate) start: u64,
    pub(crate) length: u64,
    pub(crate) device_name: &'a str,
    pub(crate) resolver: &'a dyn DeviceResolver,
    pub(crate) devices: Vec<TargetDevice>,
    pub(crate) extensions: &'a Extensions,
    pub(crate) events: EventCounter,
}

impl<'a> ConstructCtx<'a> {
    pub(crate) fn new(
        device_name: &'a str,
        start: u64,
        length: u64,
        resolver: &'a dyn DeviceResolver,
        extensions: &'a Extensions,
        events: EventCounter,
    ) -> Self {
        ConstructCtx { start, length, device_name, resolver, devices: Vec::new(), extensions, events }
    }

    /// The target's first sector in the mapped device.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The target's length in sectors.
    pub fn length(&self) -> u64 {
        self.length
    }

    /// The name of the mapped device the table is loaded into.
    pub fn device_name(&self) -> &str {
        self.device_name
    }

    /// Opens the device called `name` for sectors `start..start+len` (`len` 0: no area
    /// check). Checks that the area lies inside the device and is aligned to its
    /// logical block size; the device becomes a dependency of the table. Devices get
    /// [`DevIndex`] 0, 1, ... in call order.
    pub fn open_device(&mut self, name: &str, start: u64, len: u64) -> Result<TargetDevice, TargetError> {
        let found = self.resolver.resolve(name).ok_or_else(|| TargetError::NoSuchDevice(name.to_string()))?;
        if let Some(path) = self.resolver.cycle_path(found.id) {
            return Err(TargetError::Cycle { device: name.to_string(), path });
        }
        let end = start.checked_add(len).ok_or(TargetError::AreaOutOfRange {
            device: name.to_string(),
            start,
            end: u64::MAX,
            size: found.size.unwrap_or(0),
        })?;
        if let Some(size) = found.size {
            if end > size {
                return Err(TargetError::AreaOutOfRange { device: name.to_string(), start, end, size });
            }
        }
        let block_sectors = u64::from(found.info.logical_block_size / 512).max(1);
        if !start.is_multiple_of(block_sectors) || !len.is_multiple_of(block_sectors) {
            return Err(TargetError::Misaligned {
                device: name.to_string(),
                start,
                len,
                block_size: found.info.logical_block_size,
            });
        }
        let index = u16::try_from(self.devices.len())
            .map_err(|_| TargetError::Invalid("a target may open at most 65536 devices".into()))?;
        let dev = TargetDevice {
            index: DevIndex(index),
            id: found.id,
            name: found.name,
            device: found.device,
            info: found.info,
        };
        self.devices.push(dev.clone());
        Ok(dev)
    }

    /// Reads `buf.len()` bytes at `sector` of an opened device, synchronously.
    /// (Hangs while that device is suspended, as the kernel's would.)
    pub fn read_sync(&self, dev: &TargetDevice, sector: u64, buf: &mut [u8]) -> Result<(), TargetError> {
        crate::sync_io::read(dev.device.as_ref(), sector, buf).map_err(|error| TargetError::Io {
            what: format!("reading sector {sector}"),
            device: dev.name(),
            error,
        })
    }

    /// Writes `buf` at `sector` of an opened device, synchronously.
    pub fn write_sync(&self, dev: &TargetDevice, sector: u64, buf: &[u8], fua: bool) -> Result<(), TargetError> {
        crate::sync_io::write(dev.device.as_ref(), sector, buf, fua).map_err(|error| TargetError::Io {
            what: format!("writing sector {sector}"),
            device: dev.name(),
            error,
        })
    }

    /// Flushes an opened device, synchronously.
    pub fn flush_sync(&self, dev: &TargetDevice) -> Result<(), TargetError> {
        crate::sync_io::flush(dev.device.as_ref()).map_err(|error| TargetError::Io {
            what: "flushing".into(),
            device: dev.name(),
            error,
        })
    }

    /// The registry's shared instance of `T` (see [`Extensions`]).
    pub fn extension<T: Any + Default + Send + Sync>(&self) -> Arc<T> {
        self.extensions.get::<T>()
    }

    /// The mapped device's table-event counter.
    pub fn events(&self) -> EventCounter {
        self.events.clone()
    }
}
