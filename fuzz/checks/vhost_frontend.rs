//! What the vhost-user front-end fuzz target checks, shared with the bounded proptest run
//! in `server/tests/vhost_frontend_fuzz.rs` (included there by path).
//!
//! The input is a program for a hostile front end: a sequence of vhost-user requests
//! (called on udm's handler the way the `vhost` crate calls it for each message, so every
//! request reaches the same code a socket message does) with the files a front end would
//! pass: memfds shorter than the regions declared over them, inflight files that are too
//! short or full of garbage, blocking and saturated call eventfds. Between requests it
//! plays the guest: it writes descriptors (looping, oversized, indirect, pointing
//! anywhere) and available-ring entries into the memory it shared and kicks, and the
//! queue workers start, run and stop under it. The checks:
//! 1. nothing panics, raises SIGBUS or hangs (the fuzzer sees a crash or a timeout);
//! 2. no queue worker contains a fault (a caught panic is still a bug);
//! 3. once the connection is gone, every region udm registered with the device has been
//!    unregistered exactly once, and none was unregistered before it was registered.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::{BlockDevice, DeviceError, DeviceInfo, IoQueue, MemoryRegion};
use udm_server::vhost_blk::handler::BlkHandler;
use udm_server::vhost_blk::{ExportConfig, PollMode};
use vhost::vhost_user::message::{
    VhostUserConfigFlags, VhostUserInflight, VhostUserMemoryRegion, VhostUserSingleMemoryRegion,
    VhostUserVringAddrFlags,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;

/// Where the front end claims to have guest memory mapped (vring addresses are in it).
const USER_BASE: u64 = 0x7000_0000_0000;
/// File sizes and declared region sizes are drawn from these (small, so runs are fast;
/// the declared ones include sizes no file here has).
const FILE_LENS: [u64; 4] = [0, 4096, 64 << 10, 256 << 10];
const REGION_LENS: [u64; 5] = [4096, 64 << 10, 256 << 10, 1 << 20, 1 << 40];
/// Longest the guest waits for a running worker to answer what it queued, by default
/// (short: a chain the worker cannot answer, e.g. without a ring, costs this much).
const CATCH_UP: Duration = Duration::from_millis(20);
const QUEUES: u16 = 2;

/// A RAM disk shared by every run (allocating one per input would dominate the run).
fn disk() -> Arc<MemDevice> {
    static DISK: OnceLock<Arc<MemDevice>> = OnceLock::new();
    Arc::clone(DISK.get_or_init(|| Arc::new(MemDevice::new(1 << 20, 512).expect("a 1 MiB RAM disk"))))
}

/// The disk, recording what the export registers and unregisters.
struct Recorder {
    disk: Arc<MemDevice>,
    /// Host address -> registrations minus unregistrations (never below 0).
    balance: Mutex<HashMap<u64, i64>>,
}

impl BlockDevice for Recorder {
    fn info(&self) -> DeviceInfo {
        self.disk.info()
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        self.disk.open_queue(depth)
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        *self.balance.lock().expect("recorder lock").entry(region.addr).or_insert(0) += 1;
        Ok(())
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        let mut balance = self.balance.lock().expect("recorder lock");
        let n = balance.entry(region.addr).or_insert(0);
        *n -= 1;
        assert!(*n >= 0, "region at {:#x} unregistered more often than registered", region.addr);
        Ok(())
    }
}

/// Reads the input a few bytes at a time; zeros once it runs out.
struct Input<'a>(&'a [u8]);

impl Input<'_> {
    fn u8(&mut self) -> u8 {
        let (&b, rest) = self.0.split_first().unwrap_or((&0, &[]));
        self.0 = rest;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    fn u64(&mut self) -> u64 {
        u64::from(self.u32()) | (u64::from(self.u32()) << 32)
    }
    /// True for one byte value in `n` (0, n, 2n, ...).
    fn one_in(&mut self, n: u8) -> bool {
        self.u8().is_multiple_of(n)
    }
    fn pick<T: Copy>(&mut self, from: &[T]) -> T {
        from[usize::from(self.u8()) % from.len()]
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn memfd(len: u64) -> File {
    // SAFETY: plain memfd_create with a static name.
    let fd = unsafe { libc::memfd_create(c"fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a descriptor just created, owned by the File alone.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(len).expect("sizing a memfd");
    f
}

fn eventfd(blocking: bool, count: u64) -> File {
    let flags = libc::EFD_CLOEXEC | if blocking { 0 } else { libc::EFD_NONBLOCK };
    // SAFETY: eventfd with constant flags.
    let fd = unsafe { libc::eventfd(0, flags) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: as memfd.
    let f = unsafe { File::from_raw_fd(fd) };
    if count > 0 {
        // Saturating the counter is what a hostile front end would do.
        (&f).write_all(&count.min(u64::MAX - 1).to_ne_bytes()).expect("an eventfd takes its maximum");
    }
    f
}

/// A guest's view: the files it shared and where its rings are.
struct Guest {
    /// (guest physical address, file, file length) of each region shared.
    regions: Vec<(u64, File, u64)>,
    /// Per ring: (descriptor table, available ring, used ring) guest addresses, size,
    /// next available index.
    rings: [(u64, u64, u64, u16, u16); QUEUES as usize],
    /// The guest's side of each ring's kick eventfd.
    kicks: [Option<File>; QUEUES as usize],
}

impl Guest {
    /// Writes `bytes` at guest address `gpa` if a shared file holds them.
    fn write(&self, gpa: u64, bytes: &[u8]) {
        for (base, file, len) in &self.regions {
            if gpa >= *base && gpa - base + bytes.len() as u64 <= *len {
                let _ = file.write_at(bytes, gpa - base);
                return;
            }
        }
    }

    fn read_u16(&self, gpa: u64) -> Option<u16> {
        for (base, file, len) in &self.regions {
            if gpa >= *base && gpa - base + 2 <= *len {
                let mut b = [0u8; 2];
                file.read_exact_at(&mut b, gpa - base).ok()?;
                return Some(u16::from_le_bytes(b));
            }
        }
        None
    }
}

/// What a run did, so tests can tell that the data path ran at all.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Summary {
    /// Times the guest found every chain it queued answered in the used ring.
    pub answered: u32,
}

/// Runs every check on `data`.
pub fn check_frontend(data: &[u8]) -> Summary {
    check_frontend_with(data, CATCH_UP)
}

/// As [`check_frontend`], waiting up to `patience` for a running worker to answer.
pub fn check_frontend_with(data: &[u8], patience: Duration) -> Summary {
    let faults = Arc::new(Mutex::new(Vec::<String>::new()));
    let recorder = Arc::new(Recorder { disk: disk(), balance: Mutex::new(HashMap::new()) });
    let config = ExportConfig {
        name: "fuzz".into(),
        socket: "/nonexistent/fuzz.sock".into(),
        device: "fuzz".into(),
        num_queues: QUEUES,
        queue_size: 256,
        read_only: false,
        poll: PollMode::Event,
        idle_poll_us: 0,
        cpus: vec![],
        serial: None,
        socket_mode: None,
        socket_group: None,
    };
    let hook = {
        let faults = Arc::clone(&faults);
        Arc::new(move |reason: &str| faults.lock().expect("fault list").push(reason.to_owned()))
    };
    let device: Arc<dyn BlockDevice> = Arc::clone(&recorder) as Arc<dyn BlockDevice>;
    let mut h = BlkHandler::standalone(&config, device, hook).expect("a valid export configuration");
    let mut guest =
        Guest { regions: Vec::new(), rings: [(0, 0x1000, 0x2000, 256, 0); QUEUES as usize], kicks: [None, None] };
    let mut input = Input(data);
    let mut steps = 0;
    let mut summary = Summary::default();
    while !input.is_empty() && steps < 64 {
        steps += 1;
        if step(&mut h, &mut guest, &mut input, patience) {
            summary.answered += 1;
        }
    }
    // The front end goes away: every worker stops, every mapping goes.
    drop(h);
    let faults = faults.lock().expect("fault list");
    assert!(faults.is_empty(), "a queue worker contained a fault: {faults:?}");
    for (addr, n) in recorder.balance.lock().expect("recorder lock").iter() {
        assert_eq!(*n, 0, "region at {addr:#x} still registered after the connection ended");
    }
    summary
}

fn region_from(input: &mut Input<'_>, guest: &Guest) -> (VhostUserMemoryRegion, File, u64) {
    let file_len = input.pick(&FILE_LENS);
    let size = input.pick(&REGION_LENS);
    // Mostly non-overlapping, page-aligned addresses; sometimes anything.
    let gpa = match input.u8() % 4 {
        0 => u64::from(input.u32()),
        _ => (guest.regions.len() as u64) << 20,
    };
    let offset = match input.u8() % 4 {
        0 => u64::from(input.u16()) << 12,
        _ => 0,
    };
    let file = memfd(file_len);
    (VhostUserMemoryRegion::new(gpa, size, USER_BASE + gpa, offset), file, file_len)
}

/// One request or guest action; true when the guest queued chains and saw them answered.
fn step(h: &mut BlkHandler, guest: &mut Guest, input: &mut Input<'_>, patience: Duration) -> bool {
    let ring = u32::from(input.u8() % (QUEUES as u8 + 1)); // one index past the last
    let r = ring as usize % QUEUES as usize;
    match input.u8() % 20 {
        0 => {
            let _ = h.set_owner();
        }
        1 => {
            let _ = h.reset_owner();
        }
        2 => {
            let f = h.get_features().unwrap_or(0);
            let want = if input.one_in(4) { input.u64() } else { (f & input.u64()) | (1 << 30) };
            let _ = h.set_features(want);
        }
        3 => {
            let f = h.get_protocol_features().map(|p| p.bits()).unwrap_or(0);
            let _ = h.set_protocol_features(if input.one_in(4) { input.u64() } else { f });
        }
        4 => {
            let n = input.u8() % 3;
            let mut regions = Vec::new();
            let mut files = Vec::new();
            let mut shared = Vec::new();
            for _ in 0..n {
                let (region, file, len) = region_from(input, guest);
                shared.push((region.guest_phys_addr, file.try_clone().expect("dup"), len.min(region.memory_size)));
                regions.push(region);
                files.push(file);
            }
            if input.one_in(8) {
                files.pop(); // a region without its file
            }
            if h.set_mem_table(&regions, files, None).is_ok() {
                guest.regions = shared;
            }
        }
        5 => {
            let (region, file, len) = region_from(input, guest);
            let single = VhostUserSingleMemoryRegion::new(
                region.guest_phys_addr,
                region.memory_size,
                region.user_addr,
                region.mmap_offset,
            );
            let dup = file.try_clone().expect("dup");
            if h.add_mem_region(&single, file, None).is_ok() {
                guest.regions.push((region.guest_phys_addr, dup, len.min(region.memory_size)));
            }
        }
        6 => {
            let (gpa, size) = match guest.regions.first() {
                Some((gpa, _, len)) if input.one_in(2) => (*gpa, *len),
                _ => (u64::from(input.u32()), u64::from(input.u32())),
            };
            let single = VhostUserSingleMemoryRegion::new(gpa, size, 0, 0);
            if h.remove_mem_region(&single).is_ok() {
                guest.regions.retain(|(g, _, _)| *g != gpa);
            }
        }
        7 => {
            // Any size, including the non-powers of two and the sizes past the export's.
            let num = match input.u8() % 4 {
                0 => u32::from(input.u16()),
                1 => input.u32(),
                _ => 1 << (input.u8() % 16),
            };
            if h.set_vring_num(ring, num).is_ok() {
                guest.rings[r].3 = num as u16;
            }
        }
        8 => {
            let base = (u64::from(input.u8()) << 12) + u64::from(input.u8() % 4) * 2;
            let (desc, avail, used) = (base, base + 0x1000 + u64::from(input.u8() % 2), base + 0x2000);
            let _ = h.set_vring_addr(
                ring,
                VhostUserVringAddrFlags::empty(),
                USER_BASE + desc,
                USER_BASE + used,
                USER_BASE + avail,
                0,
            );
            guest.rings[r].0 = desc;
            guest.rings[r].1 = avail;
            guest.rings[r].2 = used;
        }
        9 => {
            let base = input.u16();
            if h.set_vring_base(ring, u32::from(base)).is_ok() {
                guest.rings[r].4 = base;
            }
        }
        10 => {
            let fd = (!input.one_in(4)).then(|| eventfd(input.one_in(2), 0));
            guest.kicks[r] = fd.as_ref().map(|f| f.try_clone().expect("dup"));
            let _ = h.set_vring_kick(ring as u8, fd);
        }
        11 => {
            let fd = (!input.one_in(4)).then(|| eventfd(input.one_in(2), input.pick(&[0, 1, u64::MAX])));
            let _ = h.set_vring_call(ring as u8, fd);
        }
        12 => {
            let _ = h.set_vring_enable(ring, !input.one_in(4));
        }
        13 => {
            let _ = h.get_vring_base(ring);
        }
        14 => {
            let ask = VhostUserInflight {
                mmap_size: 0,
                mmap_offset: 0,
                num_queues: u16::from(input.u8() % 4),
                queue_size: input.pick(&[0, 1, 8, 256, 1000, 32768, u16::MAX]),
            };
            let _ = h.get_inflight_fd(&ask);
        }
        15 => {
            // An inflight file of the front end's making: any size, any contents.
            let file = memfd(input.pick(&[0, 64, 4096, 16384]));
            let garbage: Vec<u8> = (0..input.u8()).map(|_| input.u8()).collect();
            let _ = file.write_at(&garbage, u64::from(input.u8()) * 16);
            let info = VhostUserInflight {
                mmap_size: input.pick(&[0, 64, 4096, 16384, 1 << 30]),
                mmap_offset: input.pick(&[0, 4096, 1 << 40]),
                num_queues: u16::from(input.u8() % 4),
                queue_size: input.pick(&[0, 8, 256, 32768]),
            };
            let _ = h.set_inflight_fd(&info, file);
        }
        16 => {
            let _ = h.get_config(u32::from(input.u8()), u32::from(input.u16()), VhostUserConfigFlags::empty());
            let bytes: Vec<u8> = (0..input.u8() % 16).map(|_| input.u8()).collect();
            let _ = h.set_config(u32::from(input.u8()), &bytes, VhostUserConfigFlags::WRITABLE);
        }
        17 => {
            let _ = (h.get_queue_num(), h.get_max_mem_slots());
        }
        18 => guest_write_descriptor(guest, r, input),
        _ => return guest_queue_chain(h, guest, r, input, patience),
    }
    false
}

/// The guest writes one descriptor, in the ring's table or anywhere (indirect tables).
fn guest_write_descriptor(guest: &Guest, r: usize, input: &mut Input<'_>) {
    let (desc, _, _, size, _) = guest.rings[r];
    let at = match input.u8() % 4 {
        0 => u64::from(input.u16()) << 4, // an indirect table somewhere
        _ => desc + u64::from(input.u16() % size.max(1)) * 16,
    };
    let addr = match input.u8() % 4 {
        0 => input.u64(),
        _ => u64::from(input.u16()) << 4,
    };
    let len = match input.u8() % 4 {
        0 => input.u32(),
        1 => 16,
        2 => 512 * u32::from(input.u8() % 9),
        _ => 1,
    };
    // NEXT, WRITE and INDIRECT in any combination, plus unknown bits.
    let flags = u16::from(input.u8()) & 0x0f;
    let next = input.u16();
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    guest.write(at, &d);
    // A request header there too sometimes, so parsing gets past it.
    if input.one_in(2) {
        let mut hdr = [0u8; 16];
        hdr[0..4].copy_from_slice(&input.pick(&[0u32, 1, 4, 8, 11, 13, 99]).to_le_bytes());
        hdr[8..16].copy_from_slice(&u64::from(input.u16()).to_le_bytes());
        guest.write(addr, &hdr);
    }
}

/// The guest makes heads available on ring `r` and kicks; waits (briefly) for a running
/// worker to answer them, so the data path runs under the fuzzer.
fn guest_queue_chain(
    h: &mut BlkHandler,
    guest: &mut Guest,
    r: usize,
    input: &mut Input<'_>,
    patience: Duration,
) -> bool {
    let (_, avail, used, size, next) = guest.rings[r];
    let count = 1 + input.u8() % 4;
    let mut idx = next;
    for _ in 0..count {
        let head = if input.one_in(8) { input.u16() } else { input.u16() % size.max(1) };
        guest.write(avail + 4 + u64::from(idx % size.max(1)) * 2, &head.to_le_bytes());
        idx = idx.wrapping_add(1);
    }
    guest.write(avail + 2, &idx.to_le_bytes());
    guest.rings[r].4 = idx;
    if let Some(kick) = &guest.kicks[r] {
        // Non-blocking or far from saturated: never blocks.
        let _ = (&*kick).write(&1u64.to_ne_bytes());
    }
    if !h.is_running(r) {
        return false;
    }
    let deadline = Instant::now() + patience;
    while h.is_running(r) && Instant::now() < deadline {
        if guest.read_u16(used + 2) == Some(idx) {
            return true;
        }
        std::thread::yield_now();
    }
    false
}
