//! The pass-through path of a mapped queue: reads and writes inside one `linear`
//! segment go straight to the child queue and complete straight back. These tests pin
//! what it must keep from the general path: data at the right place, the caller's tags
//! (any 64-bit value) exactly once however small the poll buffer, the table's own
//! validation, a child queue with less room than the mapped queue, errors, and a
//! suspend that waits for pass-through I/O in flight.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{mem, pattern, run, wait_for, Buf};
use udm_drivers::backends::fault::FaultDevice;
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::dma::PagePolicy;
use udm_drivers::{BlockDevice, Completion, DeviceError, DeviceInfo, IoError, IoQueue, IoRequest, QueueFull};
use udm_mapping::{sync_io, DeviceState, Registry, SuspendFlags};

/// Wraps a device: each queue takes at most `limit` requests, and while `open` is false
/// it keeps what it is given instead of passing it on.
struct HoldDevice {
    inner: Arc<dyn BlockDevice>,
    limit: usize,
    open: Arc<AtomicBool>,
}

struct HoldQueue {
    inner: Box<dyn IoQueue>,
    limit: usize,
    open: Arc<AtomicBool>,
    held: Vec<IoRequest>,
}

impl BlockDevice for HoldDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(HoldQueue {
            inner: self.inner.open_queue(depth)?,
            limit: self.limit,
            open: Arc::clone(&self.open),
            held: Vec::new(),
        }))
    }
}

impl IoQueue for HoldQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        if self.in_flight() >= self.limit {
            return Err(QueueFull(req));
        }
        self.held.push(req);
        Ok(())
    }
    fn kick(&mut self) {}
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.open.load(Ordering::Acquire) {
            for r in self.held.drain(..) {
                self.inner.submit(r).expect("room below: the limit is under the inner depth");
            }
            self.inner.kick();
        }
        self.inner.poll(out)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
    fn depth(&self) -> usize {
        self.limit
    }
}

fn hold(inner: Arc<dyn BlockDevice>, limit: usize, open: bool) -> (Arc<dyn BlockDevice>, Arc<AtomicBool>) {
    let gate = Arc::new(AtomicBool::new(open));
    (Arc::new(HoldDevice { inner, limit, open: Arc::clone(&gate) }), gate)
}

/// Polls with a one-completion buffer until `want` completions arrived; returns them.
fn reap_one_at_a_time(q: &mut dyn IoQueue, want: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let mut out = [Completion::EMPTY; 1];
    for _ in 0..1_000_000 {
        if got.len() == want {
            break;
        }
        let n = q.poll(&mut out);
        got.extend_from_slice(&out[..n]);
    }
    assert_eq!(got.len(), want, "every request completes");
    assert_eq!(q.in_flight(), 0);
    got
}

#[test]
fn pass_through_and_split_requests_land_in_place_with_the_callers_tags_once() {
    let reg = Registry::new();
    let d0 = mem(1024);
    let d1 = mem(1024);
    reg.register_backend("d0", Arc::clone(&d0)).unwrap();
    reg.register_backend("d1", Arc::clone(&d1)).unwrap();
    reg.create("vol", None, Some("0 64 linear d0 100\n64 64 linear d1 8\n128 64 zero")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(8).unwrap();
    // Inside d0's segment, inside d1's, across the two (split), across into zero; tags
    // use the bits the core uses for its own child tags. Two orders: pass-through
    // requests first (they go below with the caller's tag, and the split pieces wait
    // for them), and split ones first (the pass-through ones then take core tags).
    let writes = [(0u64, 8u64, u64::MAX), (56, 8, 1 << 62), (64, 16, 1 << 63), (60, 8, 3 << 62), (120, 16, 0)];
    let bufs: Vec<Buf> = writes.iter().map(|&(s, n, _)| Buf::new(pattern(s, 1, n))).collect();
    for order in [[0usize, 1, 2, 3, 4], [3, 4, 0, 1, 2]] {
        for i in order {
            let (sector, _, tag) = writes[i];
            q.submit(IoRequest::write(sector, bufs[i].sg(), tag)).unwrap();
        }
        q.kick();
        let done = reap_one_at_a_time(q.as_mut(), writes.len());
        let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
        tags.sort_unstable();
        let mut want: Vec<u64> = writes.iter().map(|w| w.2).collect();
        want.sort_unstable();
        assert_eq!(tags, want, "each caller tag exactly once");
        for c in &done {
            assert_eq!(c.result, Ok(()), "tag {:#x}", c.tag);
        }
    }
    // Where the bytes went: vol 0..64 -> d0 100..164, vol 64..128 -> d1 8..72. The
    // write at 60 came after the one at 56 and the one at 64 in submission order but
    // overlaps them; read back what each device holds for sectors nobody else wrote.
    let mut back = vec![0u8; 8 * 512];
    sync_io::read(d0.as_ref(), 100, &mut back).unwrap();
    assert!(back == pattern(0, 1, 8), "vol sector 0 is d0 sector 100");
    sync_io::read(d1.as_ref(), 8 + 72 - 64, &mut back).unwrap();
    assert!(back == pattern(72, 1, 8), "vol sector 72 is d1 sector 16");
    // Reads back through the pass-through path see what the devices hold.
    let read = Buf::zeroed(8 * 512);
    assert_eq!(run(q.as_mut(), IoRequest::read(0, read.sg(), 7)), Ok(()));
    assert!(read.data == pattern(0, 1, 8));
}

#[test]
fn the_table_validates_what_the_child_would_accept() {
    let reg = Registry::new();
    reg.register_backend("small", mem(1024)).unwrap();
    let big: Arc<dyn BlockDevice> = Arc::new(MemDevice::with_policy(1 << 20, 4096, PagePolicy::Normal).unwrap());
    reg.register_backend("big", big).unwrap();
    // The 512-byte device alone would take a request at sector 1; the table's logical
    // block is 4096 bytes (the largest below), so the mapped device must refuse it.
    reg.create("vol", None, Some("0 64 linear small 0\n64 64 linear big 0")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(4).unwrap();
    let buf = Buf::zeroed(4096);
    assert!(matches!(run(q.as_mut(), IoRequest::read(1, buf.sg(), 1)), Err(IoError::Misaligned { .. })));
    assert!(matches!(run(q.as_mut(), IoRequest::read(128, buf.sg(), 2)), Err(IoError::OutOfRange { .. })));
    assert!(matches!(run(q.as_mut(), IoRequest::read(124, buf.sg(), 3)), Err(IoError::OutOfRange { .. })));
    let mut short = IoRequest::read(8, buf.sg(), 4);
    short.sectors = 16;
    assert!(matches!(run(q.as_mut(), short), Err(IoError::BadBuffer { .. })));
    assert_eq!(run(q.as_mut(), IoRequest::read(8, buf.sg(), 5)), Ok(()));
}

#[test]
fn a_child_queue_with_less_room_holds_the_rest_and_loses_nothing() {
    let reg = Registry::new();
    let disk = mem(4096);
    let (narrow, _gate) = hold(Arc::clone(&disk), 2, true);
    reg.register_backend("narrow", narrow).unwrap();
    reg.create("vol", None, Some("0 2048 linear narrow 1024")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(16).unwrap();
    let bufs: Vec<Buf> = (0..16u64).map(|i| Buf::new(pattern(i * 8, 3, 8))).collect();
    for (i, b) in bufs.iter().enumerate() {
        q.submit(IoRequest::write(i as u64 * 8, b.sg(), 1000 + i as u64)).unwrap();
    }
    q.kick();
    let done = reap_one_at_a_time(q.as_mut(), 16);
    let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
    tags.sort_unstable();
    assert_eq!(tags, (1000..1016).collect::<Vec<u64>>());
    assert!(done.iter().all(|c| c.result.is_ok()));
    let mut back = vec![0u8; 128 * 512];
    sync_io::read(disk.as_ref(), 1024, &mut back).unwrap();
    assert!(back == pattern(0, 3, 128), "all 16 writes landed at offset 1024");
}

#[test]
fn errors_below_come_back_with_the_callers_tag() {
    let reg = Registry::new();
    let faulty = FaultDevice::new(mem(1024));
    let control = faulty.control();
    reg.register_backend("f", Arc::new(faulty)).unwrap();
    reg.create("vol", None, Some("0 512 linear f 256")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(4).unwrap();
    let buf = Buf::zeroed(4096);
    assert_eq!(run(q.as_mut(), IoRequest::read(8, buf.sg(), u64::MAX)), Ok(()));
    control.fail_after_writes(0);
    assert!(matches!(run(q.as_mut(), IoRequest::read(8, buf.sg(), u64::MAX)), Err(IoError::Host { .. })));
    assert!(matches!(run(q.as_mut(), IoRequest::write(16, buf.sg(), 5)), Err(IoError::Host { .. })));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn suspend_waits_for_pass_through_io_in_flight() {
    let reg = Registry::new();
    let disk = mem(1024);
    let (gated, gate) = hold(Arc::clone(&disk), 64, false);
    reg.register_backend("g", gated).unwrap();
    reg.create("vol", None, Some("0 1024 linear g 0")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(8).unwrap();
    let data = Buf::new(pattern(40, 5, 8));
    q.submit(IoRequest::write(40, data.sg(), 9)).unwrap();
    q.kick();
    std::thread::scope(|s| {
        let reg = &reg;
        let h = s.spawn(move || reg.suspend("vol", SuspendFlags::default()).unwrap());
        // The write is held below: the suspend must not finish however long it waits.
        let mut out = [Completion::EMPTY; 4];
        for _ in 0..200 {
            assert_eq!(q.poll(&mut out), 0);
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(!h.is_finished(), "suspend returned while a pass-through write was in flight");
        // A request submitted now is held by the mapped queue, not sent below.
        let late = Buf::new(pattern(48, 5, 8));
        q.submit(IoRequest::write(48, late.sg(), 10)).unwrap();
        gate.store(true, Ordering::Release);
        assert_eq!(wait_for(q.as_mut(), 9), Ok(()));
        h.join().unwrap();
        assert_eq!(reg.info("vol").unwrap().state, DeviceState::Suspended);
        let mut back = vec![0u8; 512];
        sync_io::read(disk.as_ref(), 48, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0), "I/O submitted while suspended waits");
        reg.resume("vol").unwrap();
        assert_eq!(wait_for(q.as_mut(), 10), Ok(()));
    });
    let mut back = vec![0u8; 16 * 512];
    sync_io::read(disk.as_ref(), 40, &mut back).unwrap();
    assert!(back[..4096] == pattern(40, 5, 8) && back[4096..] == pattern(48, 5, 8));
}
