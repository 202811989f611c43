//! A hostile front end against a udm export (issue 10, defects 1-4): it speaks
//! vhost-user itself (the `vhost` crate's `Frontend`) and plays the guest by writing
//! descriptor rings into a memfd it shares, so it can send what QEMU or libblkio never
//! would. Each test checks that the daemon (this test process: the export runs in it)
//! survives, that the export keeps listening and reports its true state, and that a
//! fresh connection is served again.

mod hostile_guest;

use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use udm_drivers::{
    BlockDevice, Completion, DeviceError, DeviceInfo, IoOp, IoQueue, IoRequest, MemoryRegion, QueueFull,
};
use udm_server::vhost_blk::{Export, ExportConfig, PollMode};
use vhost::vhost_user::message::VhostUserInflight;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo};
use vmm_sys_util::eventfd::EventFd;

use hostile_guest::*;

/// A sector whose reads make the device queue panic (a stand-in for any bug below udm's
/// worker that a request can trigger).
const PANIC_SECTOR: u64 = 666;
/// A sector whose reads the device holds until the test releases them.
const HELD_SECTOR: u64 = 8;

/// A device that records what the export asks of it.
#[derive(Default)]
struct Probe {
    submitted_panic_sector: AtomicU64,
    reads: AtomicU64,
    held: AtomicU64,
    /// Makes `info()` panic: a fault in the connection's own thread (not a worker's).
    panic_in_info: AtomicBool,
    release_held: AtomicBool,
    /// (host address, registered?) in call order.
    registrations: Mutex<Vec<(u64, bool)>>,
}

struct ProbeDevice(Arc<Probe>);

struct ProbeQueue {
    probe: Arc<Probe>,
    done: Vec<Completion>,
    held: Vec<IoRequest>,
}

impl BlockDevice for ProbeDevice {
    fn info(&self) -> DeviceInfo {
        if self.0.panic_in_info.load(Ordering::SeqCst) {
            panic!("probe device: info() while asked to fail");
        }
        DeviceInfo::new(2048, 512)
    }

    fn open_queue(&self, _depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(ProbeQueue { probe: Arc::clone(&self.0), done: Vec::new(), held: Vec::new() }))
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.0.registrations.lock().unwrap().push((region.addr, true));
        Ok(())
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.0.registrations.lock().unwrap().push((region.addr, false));
        Ok(())
    }
}

impl IoQueue for ProbeQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if req.op == IoOp::Read && req.sector == PANIC_SECTOR {
            self.probe.submitted_panic_sector.fetch_add(1, Ordering::SeqCst);
            panic!("probe device: a read of sector {PANIC_SECTOR}");
        }
        if req.op == IoOp::Read {
            self.probe.reads.fetch_add(1, Ordering::SeqCst);
            req.sg.fill_zero();
        }
        if req.op == IoOp::Read && req.sector == HELD_SECTOR {
            self.probe.held.fetch_add(1, Ordering::SeqCst);
            self.held.push(req);
        } else {
            self.done.push(Completion { tag: req.tag, result: Ok(()) });
        }
        Ok(())
    }

    fn kick(&mut self) {}

    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.probe.release_held.load(Ordering::SeqCst) {
            let held = std::mem::take(&mut self.held);
            self.done.extend(held.iter().map(|r| Completion { tag: r.tag, result: Ok(()) }));
        }
        let n = self.done.len().min(out.len());
        for (slot, c) in out.iter_mut().zip(self.done.drain(..n)) {
            *slot = c;
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.done.len() + self.held.len()
    }

    fn depth(&self) -> usize {
        64
    }
}

/// A probe device exported as `name` in a fresh directory: (directory, probe, export,
/// socket path).
fn rig(name: &str) -> (tempfile::TempDir, Arc<Probe>, Export, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let probe = Arc::new(Probe::default());
    let export = start_export(dir.path(), name, &probe);
    let socket = export.config().socket.clone();
    (dir, probe, export, socket)
}

fn start_export(dir: &Path, name: &str, probe: &Arc<Probe>) -> Export {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let cfg = ExportConfig {
        name: name.into(),
        socket: dir.join(format!("{name}.sock")),
        device: name.into(),
        num_queues: 1,
        queue_size: 256,
        read_only: false,
        poll: PollMode::Event,
        idle_poll_us: 0,
        cpus: vec![],
        serial: Some("hostile-serial".into()),
        socket_mode: None,
        socket_group: None,
    };
    Export::start(cfg, Arc::new(ProbeDevice(Arc::clone(probe)))).expect("export starts")
}

/// A GET_ID into a 512-byte buffer: the serial comes back.
fn check_serial(g: &mut Guest) {
    g.mem.write_at(&[0xee; 32], DATA).unwrap();
    assert_eq!(g.request(T_GET_ID, 0, &[(DATA, 512, true)]), (S_OK, 21));
    let mut id = [0u8; 20];
    g.mem.read_at(&mut id, DATA).unwrap();
    assert_eq!(&id[..14], b"hostile-serial");
    assert_eq!(id[14..], [0; 6]);
    assert_eq!(g.byte(DATA + 20), 0xee, "nothing past the 20-byte id is written");
}

fn connected(export: &Export) -> bool {
    export.info().connected
}

/// Drops the connection and waits until the export has noticed.
fn hang_up(guest: Guest, export: &Export) {
    drop(guest);
    wait_until("the export to see the disconnect", || !connected(export));
}

/// Defect 1: a GET_ID whose writable buffers add up to more than 4 GiB (legal: the guest
/// has that much memory) panicked the worker, and the disconnect re-raised the panic
/// in the listener: no reconnect ever again. Now the id is written and the request
/// completes.
#[test]
fn get_id_with_more_than_4_gib_of_buffers_is_answered_and_reconnects_work() {
    let (_dir, _probe, export, socket) = rig("getid");
    // A sparse memfd of 5 GiB and a bit: nothing is touched past the rings and the id.
    let mut g = Guest::connect(&socket, (5 << 30) + 2 * MIB);
    g.start_ring(0);
    let half = 0xA000_0000u32; // 2.5 GiB per descriptor, 5 GiB in all
    g.mem.write_at(&[0xee; 32], MIB).unwrap();
    let (status, len) = g.request(T_GET_ID, 0, &[(MIB, half, true), (MIB + u64::from(half), half, true)]);
    assert_eq!((status, len), (S_OK, 21));
    let mut id = [0u8; 14];
    g.mem.read_at(&mut id, MIB).unwrap();
    assert_eq!(&id, b"hostile-serial");
    assert_eq!(g.byte(MIB + 20), 0xee);
    check_serial(&mut g);
    assert!(connected(&export));
    hang_up(g, &export);
    let mut again = Guest::connect(&socket, 4 * MIB);
    again.start_ring(0);
    check_serial(&mut again);
    assert!(connected(&export));
}

/// A chain longer than the ring (here a loop that, cut after ring-size steps, looks like
/// a well-formed read) fails as a whole: nothing reaches the device, no status byte is
/// written, and the ring goes on.
#[test]
fn a_looping_chain_fails_and_the_ring_goes_on() {
    let (_dir, probe, export, socket) = rig("loop");
    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    check_serial(&mut g);
    let reads_before = probe.reads.load(Ordering::SeqCst);
    // Header, six 512-byte buffers, a status byte whose `next` goes back to the first
    // buffer: eight descriptors in a ring of eight, then the loop.
    let mut hdr = [0u8; 16];
    hdr[0..4].copy_from_slice(&T_IN.to_le_bytes());
    g.mem.write_at(&hdr, HEADERS).unwrap();
    g.mem.write_at(&[0xff], STATUSES).unwrap();
    let put = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        g.mem.write_at(&d, DESC + u64::from(i) * 16).unwrap();
    };
    put(0, HEADERS, 16, F_NEXT, 1);
    for i in 1..7 {
        put(i, DATA + u64::from(i) * 512, 512, F_NEXT | F_WRITE, i + 1);
    }
    put(7, STATUSES, 1, F_NEXT | F_WRITE, 1);
    let slot = u64::from(g.avail_idx % QUEUE);
    g.mem.write_at(&0u16.to_le_bytes(), AVAIL + 4 + slot * 2).unwrap();
    g.avail_idx += 1;
    g.mem.write_at(&g.avail_idx.to_le_bytes(), AVAIL + 2).unwrap();
    g.kick.write(1).unwrap();
    let done = g.avail_idx;
    wait_until("the looping chain to be answered", || g.used_idx() == done);
    assert_eq!(g.used_entry(done - 1), (0, 0), "refused with nothing written");
    assert_eq!(g.byte(STATUSES), 0xff, "no status byte for a chain without a trustworthy end");
    assert_eq!(probe.reads.load(Ordering::SeqCst), reads_before, "the device saw a read");
    check_serial(&mut g);
    assert!(connected(&export));
}

/// Defect 2, the other way round: a front end that shrinks its memfd after udm mapped it
/// (libblkio's memfds and file-backed guest memory cannot be sealed) would make the
/// worker's next access past the new end raise SIGBUS and kill the daemon (here: this
/// test process). The access is absorbed instead, the connection is ended with the
/// reason, and the export serves the next front end.
#[test]
fn a_memory_file_truncated_after_mapping_ends_that_connection_only() {
    let (_dir, _probe, export, socket) = rig("truncate");
    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    check_serial(&mut g);
    // Rings, headers and statuses stay in the first MiB; the id goes past the new end.
    g.mem.set_len(MIB).unwrap();
    let (status, _) = g.request(T_GET_ID, 0, &[(3 * MIB, 20, true)]);
    assert_eq!(status, S_OK, "the request completes (its id went to a page that is gone)");
    wait_until("the export to end the connection", || !connected(&export));
    let mut again = Guest::connect(&socket, 4 * MIB);
    again.start_ring(0);
    check_serial(&mut again);
    assert!(connected(&export));
}

/// Defect 2: a memory region larger than the file behind it was mapped as it was, and
/// the first access past the file's end raised SIGBUS (the whole daemon died). Now
/// SET_MEM_TABLE and ADD_MEM_REG refuse it before mapping.
#[test]
fn a_memory_region_larger_than_its_file_is_refused() {
    let (_dir, _probe, export, socket) = rig("shortmem");

    let g = Guest::connect(&socket, 64 << 10);
    let lie = g.region(&g.mem, 4 * MIB);
    assert!(g.fe.set_mem_table(&[lie]).is_err(), "SET_MEM_TABLE of a 4 MiB region over a 64 KiB memfd");
    // A refused message ends that connection (the back end's state is undefined to the
    // front end); the export keeps listening.
    hang_up(g, &export);

    let mut g = Guest::connect(&socket, 64 << 10);
    let lie = g.region(&g.mem, 4 * MIB);
    assert!(g.fe.add_mem_region(&lie).is_err(), "ADD_MEM_REG of a 4 MiB region over a 64 KiB memfd");
    hang_up(g, &export);

    // An offset that pushes a right-sized region past the end is refused as well.
    let g = Guest::connect(&socket, MIB);
    let mut shifted = g.region(&g.mem, MIB);
    shifted.mmap_offset = 4096;
    assert!(g.fe.set_mem_table(&[shifted]).is_err(), "region shifted past the file's end");
    hang_up(g, &export);

    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    check_serial(&mut g);
}

/// Defect 2: an inflight file shorter than the mmap_size the front end declares was
/// mapped as it was (SIGBUS when the worker touched it). Now it is refused.
#[test]
fn an_inflight_file_shorter_than_declared_is_refused() {
    let (_dir, _probe, export, socket) = rig("shortinflight");

    let mut g = Guest::connect(&socket, 4 * MIB);
    let short = memfd(64);
    let lie = VhostUserInflight { mmap_size: 1 << 20, mmap_offset: 0, num_queues: 1, queue_size: QUEUE };
    assert!(g.fe.set_inflight_fd(&lie, short.as_raw_fd()).is_err(), "SET_INFLIGHT_FD with a 64-byte file");
    hang_up(g, &export);

    let mut g = Guest::connect(&socket, 4 * MIB);
    let (info, file) =
        g.fe.get_inflight_fd(&VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QUEUE })
            .unwrap();
    assert!(file.metadata().unwrap().len() >= info.mmap_size);
    g.fe.set_inflight_fd(&info, file.as_raw_fd()).unwrap();
    g.start_ring(0);
    check_serial(&mut g);
}

/// Defect 3: a call eventfd that is blocking and saturated made the worker block in
/// write(2) forever; stopping the export never returned. The front end here even clears
/// O_NONBLOCK again after udm set it (the flag is shared with it).
#[test]
fn a_saturated_blocking_call_eventfd_does_not_wedge_the_worker() {
    let (_dir, _probe, export, socket) = rig("callfd");

    let mut g = Guest::connect(&socket, 4 * MIB);
    g.call = EventFd::new(0).unwrap();
    g.start_ring(0);
    let fd = g.call.as_raw_fd();
    // SAFETY: fcntl on the test's own eventfd.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above. (udm sets O_NONBLOCK; a hostile front end can clear it again.)
    assert_eq!(unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) }, 0);
    g.call.write(u64::MAX - 1).unwrap(); // the counter's maximum: any further write blocks

    // The guest and the stop run on a thread of their own: a wedged worker must fail this
    // test, not hang it (unwinding would wait for the worker while dropping the export).
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        check_serial(&mut g);
        check_serial(&mut g);
        export.stop();
        drop(g);
        let _ = tx.send(());
    });
    // A guard, not a speed check: a worker blocked in write(2) never lets this finish.
    rx.recv_timeout(Duration::from_secs(60))
        .expect("requests complete and the export stops while the call eventfd is saturated");
}

/// Defect 4 (a request that faults is a poison pill): a request that makes the worker
/// panic is completed with IOERR and cleared from the inflight region; the connection
/// ends, the export says so and keeps listening, and after a reconnect with the same
/// inflight region the request is not replayed.
#[test]
fn a_faulting_request_fails_with_ioerr_and_is_not_replayed_after_reconnect() {
    let (_dir, probe, export, socket) = rig("poison");

    let mut g = Guest::connect(&socket, 4 * MIB);
    let (info, inflight) =
        g.fe.get_inflight_fd(&VhostUserInflight { mmap_size: 0, mmap_offset: 0, num_queues: 1, queue_size: QUEUE })
            .unwrap();
    g.start_ring(0);
    check_serial(&mut g);
    let (status, len) = g.request(T_IN, PANIC_SECTOR, &[(DATA, 512, true)]);
    assert_eq!((status, len), (S_IOERR, 1));
    assert_eq!(probe.submitted_panic_sector.load(Ordering::SeqCst), 1);
    // udm ended the connection: the export says so.
    wait_until("the export to drop the faulted connection", || !connected(&export));
    let used = g.used_idx();
    let mem = g.mem.try_clone().unwrap();
    drop(g);

    // The front end reconnects (as QEMU does) with the same memory and inflight region.
    let mut g = Guest::connect(&socket, 4 * MIB);
    g.mem = mem;
    g.fe.set_inflight_fd(&info, inflight.as_raw_fd()).unwrap();
    g.start_ring(used);
    check_serial(&mut g);
    assert_eq!(probe.submitted_panic_sector.load(Ordering::SeqCst), 1, "the faulting request was replayed");
    assert_eq!(g.used_idx(), used.wrapping_add(1), "only the new request completed");
    assert!(connected(&export));
}

/// Defect 1, second half: a fault in a connection's message loop (here the device panics
/// while GET_FEATURES reads its geometry) ended the listener with it: every reconnect
/// was refused while `export ls` said connected. Now it ends that connection only.
#[test]
fn a_fault_in_the_message_loop_ends_that_connection_only() {
    let (_dir, probe, export, socket) = rig("loopfault");
    let fe = Frontend::connect(&socket, 1).expect("connect");
    fe.set_owner().unwrap();
    probe.panic_in_info.store(true, Ordering::SeqCst);
    // On a thread of its own: a connection left half-dead would never answer.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(fe.get_features().is_err());
    });
    let ended = rx.recv_timeout(Duration::from_secs(20)).expect("the faulted connection is closed, not left hanging");
    assert!(ended, "GET_FEATURES failed: the connection ended");
    probe.panic_in_info.store(false, Ordering::SeqCst);
    wait_until("the export to drop the faulted connection", || !connected(&export));
    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    check_serial(&mut g);
    assert!(connected(&export));
}

/// Defect 4 (unregistering memory in use): SET_MEM_TABLE while a request is in flight
/// must not unregister (DMA unmap) the old region before that request completes.
#[test]
fn a_new_memory_table_keeps_the_old_region_registered_until_its_requests_complete() {
    let (_dir, probe, export, socket) = rig("memswap");

    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    let (_, status_at) = g.submit(T_IN, HELD_SECTOR, &[(DATA, 4096, true)]);
    wait_until("the read to reach the device", || probe.held.load(Ordering::SeqCst) == 1);
    let old_region = probe.registrations.lock().unwrap()[0].0;

    // The front end moves guest memory to another file (QEMU does on memory hotplug);
    // the ring contents come along.
    let moved = memfd(4 * MIB);
    let mut all = vec![0u8; (DATA + 4096) as usize];
    g.mem.read_exact_at(&mut all, 0).unwrap();
    moved.write_all_at(&all, 0).unwrap();
    let region = g.region(&moved, 4 * MIB);
    g.fe.set_mem_table(&[region]).unwrap();
    let unregistered_early = probe.registrations.lock().unwrap().contains(&(old_region, false));
    // Released before asserting, so a failure does not leave the export draining forever.
    probe.release_held.store(true, Ordering::SeqCst);
    assert!(!unregistered_early, "the old region was unregistered while a request on it was in flight");

    g.mem = moved;
    wait_until("the held read to complete", || g.used_idx() == 1);
    assert_eq!(g.byte(status_at), S_OK);
    wait_until("the old region to be unregistered once idle", || {
        probe.registrations.lock().unwrap().contains(&(old_region, false))
    });
    check_serial(&mut g);
    drop(export);
}

/// Defect 4, REM_MEM_REG: removing a region a request in flight still uses keeps it
/// registered (DMA-mapped) until that request completes.
#[test]
fn a_removed_region_stays_registered_until_its_requests_complete() {
    let (_dir, probe, export, socket) = rig("memremove");
    let mut g = Guest::connect(&socket, 4 * MIB);
    g.start_ring(0);
    // A second region, 1 MiB at guest address 16 MiB, holds the read's buffer.
    let extra_gpa = 16 * MIB;
    let extra = memfd(MIB);
    let extra_region = VhostUserMemoryRegionInfo {
        guest_phys_addr: extra_gpa,
        memory_size: MIB,
        userspace_addr: USER_BASE + extra_gpa,
        mmap_offset: 0,
        mmap_handle: extra.as_raw_fd(),
    };
    g.fe.add_mem_region(&extra_region).unwrap();
    let extra_host = probe.registrations.lock().unwrap().last().expect("the new region was registered").0;
    let (_, status_at) = g.submit(T_IN, HELD_SECTOR, &[(extra_gpa, 4096, true)]);
    wait_until("the read to reach the device", || probe.held.load(Ordering::SeqCst) == 1);

    g.fe.remove_mem_region(&extra_region).unwrap();
    let unregistered_early = probe.registrations.lock().unwrap().contains(&(extra_host, false));
    probe.release_held.store(true, Ordering::SeqCst);
    assert!(!unregistered_early, "the removed region was unregistered while a request on it was in flight");
    wait_until("the held read to complete", || g.used_idx() == 1);
    assert_eq!(g.byte(status_at), S_OK);
    wait_until("the removed region to be unregistered once idle", || {
        probe.registrations.lock().unwrap().contains(&(extra_host, false))
    });
    check_serial(&mut g);
    drop(export);
}
