//! With one chunk's copy held up on the COW device: writers to that chunk wait (and
//! join the one copy), snapshot reads of it still see the old data, writes to chunks
//! already copied go straight through, and everything completes once the copy lands.

mod snapshot_common;
use snapshot_common as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{mem_with, status, SyncIo};
use udm_drivers::{BlockDevice, Completion, DeviceError, DeviceInfo, IoQueue, IoRequest, QueueFull};
use udm_mapping::io_buf::IoBuf;
use udm_mapping::Registry;

/// Holds writes that touch `gated` sectors until the gate opens.
struct GateDevice {
    inner: Arc<dyn BlockDevice>,
    gated: std::ops::Range<u64>,
    open: Arc<AtomicBool>,
}

struct GateQueue {
    inner: Box<dyn IoQueue>,
    gated: std::ops::Range<u64>,
    open: Arc<AtomicBool>,
    held: Vec<IoRequest>,
}

impl BlockDevice for GateDevice {
    fn info(&self) -> DeviceInfo {
        self.inner.info()
    }
    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        Ok(Box::new(GateQueue {
            inner: self.inner.open_queue(depth)?,
            gated: self.gated.clone(),
            open: Arc::clone(&self.open),
            held: Vec::new(),
        }))
    }
}

impl IoQueue for GateQueue {
    fn submit(&mut self, req: IoRequest) -> Result<(), QueueFull> {
        let hits = req.op.is_write() && req.sector < self.gated.end && req.sector + req.sectors > self.gated.start;
        if hits && !self.open.load(Ordering::Acquire) {
            self.held.push(req);
            return Ok(());
        }
        self.inner.submit(req)
    }
    fn kick(&mut self) {
        self.inner.kick();
    }
    fn poll(&mut self, out: &mut [Completion]) -> usize {
        if self.open.load(Ordering::Acquire) {
            for r in self.held.drain(..) {
                self.inner.submit(r).expect("room for released writes");
            }
            self.inner.kick();
        }
        self.inner.poll(out)
    }
    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
    fn depth(&self) -> usize {
        self.inner.depth()
    }
}

fn submit(q: &mut dyn IoQueue, buf: &IoBuf, sector: u64, tag: u64) {
    q.submit(IoRequest::write(sector, buf.sg(0, buf.len()), tag)).unwrap();
    q.kick();
}

fn reap(q: &mut dyn IoQueue, done: &mut Vec<u64>, polls: usize) {
    let mut out = [Completion::EMPTY; 8];
    for _ in 0..polls {
        let n = q.poll(&mut out);
        for c in &out[..n] {
            c.result.unwrap();
            done.push(c.tag);
        }
    }
}

#[test]
fn a_held_copy_holds_its_writers_while_snapshot_reads_see_old_data() {
    let original: Vec<u8> = (0..1 << 20).map(|i: usize| (i / 512) as u8 ^ (i as u8)).collect();
    let open = Arc::new(AtomicBool::new(false));
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(&original)).unwrap();
    // The first data chunk of the COW (chunk 2, sectors 16..24) does not land until the
    // gate opens: the first copy-out hangs in flight.
    let cow = GateDevice { inner: mem_with(&vec![0u8; 1 << 20]), gated: 16..24, open: Arc::clone(&open) };
    reg.register_backend("cdisk", Arc::new(cow)).unwrap();
    reg.create("base-real", None, Some("0 2048 linear odisk 0")).unwrap();
    reg.create("s-cow", None, Some("0 2048 linear cdisk 0")).unwrap();
    reg.create("s", None, Some("0 2048 snapshot base-real s-cow P 8")).unwrap();
    reg.create("base", None, Some("0 2048 snapshot-origin base-real")).unwrap();

    let base = reg.device("base").unwrap();
    let mut q = base.open_queue(16).unwrap();
    let mut w1 = IoBuf::new(2048).unwrap();
    w1.as_mut_slice().fill(0x11);
    let mut w2 = IoBuf::new(512).unwrap();
    w2.as_mut_slice().fill(0x22);
    let mut w3 = IoBuf::new(4096).unwrap();
    w3.as_mut_slice().fill(0x33);
    submit(q.as_mut(), &w1, 80, 1); // chunk 10: its copy goes to COW chunk 2 (gated)
    submit(q.as_mut(), &w2, 84, 2); // chunk 10 again (beside it): joins the same copy
    let mut done = Vec::new();
    reap(q.as_mut(), &mut done, 2000);
    assert!(done.is_empty(), "writers to a chunk whose copy is in flight wait: {done:?}");

    // Snapshot reads of that chunk during the copy see the old data.
    let during = SyncIo::on(&reg, "s").read(80, 4096).unwrap();
    assert!(during == original[80 * 512..88 * 512]);
    assert_eq!(status(&reg, "s"), "24/2048 16", "one exception allocated for both writers");

    // A write to another chunk gets its own copy; like the kernel's store, its commit
    // is batched with the copy still in flight, so it completes with it.
    submit(q.as_mut(), &w3, 160, 3);
    reap(q.as_mut(), &mut done, 2000);
    assert!(done.is_empty());

    open.store(true, Ordering::Release);
    while done.len() < 3 {
        reap(q.as_mut(), &mut done, 1);
    }
    drop(q);
    assert_eq!(status(&reg, "s"), "32/2048 16", "exactly two copies");
    let snap = SyncIo::on(&reg, "s").read_all(2048).unwrap();
    assert!(snap == original, "the snapshot keeps the old data");
    let now = SyncIo::on(&reg, "base").read(80, 4096).unwrap();
    assert_eq!(&now[..2048], &[0x11; 2048][..]);
    assert_eq!(&now[2048..2560], &[0x22; 512][..]);
    assert!(now[2560..] == original[85 * 512..88 * 512]);
    let third = SyncIo::on(&reg, "base").read(160, 4096).unwrap();
    assert_eq!(&third[..], &[0x33; 4096][..]);
}
