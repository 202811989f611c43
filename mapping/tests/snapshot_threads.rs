//! Writers on several threads race for the same chunks: every chunk is copied out
//! exactly once per snapshot (the allocation count proves it), and readers of the
//! snapshots never see new data, even while the copies are under way.

mod snapshot_common;
use snapshot_common as common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::{mem_with, status, write_batch, Rng, SyncIo};
use udm_mapping::Registry;

const ORIGIN: u64 = 8192; // 4 MiB = 1024 chunks of 4 KiB

#[test]
fn racing_writers_copy_each_chunk_once_and_readers_see_old_data() {
    let mut rng = Rng(77);
    let original = rng.bytes((ORIGIN * 512) as usize);
    let reg = Arc::new(Registry::new());
    reg.register_backend("odisk", mem_with(&original)).unwrap();
    reg.register_backend("c1", mem_with(&vec![0u8; 8 << 20])).unwrap();
    reg.register_backend("c2", mem_with(&vec![0u8; 8 << 20])).unwrap();
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear odisk 0"))).unwrap();
    reg.create("s1-cow", None, Some("0 16384 linear c1 0")).unwrap();
    reg.create("s2-cow", None, Some("0 16384 linear c2 0")).unwrap();
    reg.create("s1", None, Some(&format!("0 {ORIGIN} snapshot base-real s1-cow P 8"))).unwrap();
    reg.create("s2", None, Some(&format!("0 {ORIGIN} snapshot base-real s2-cow P 128"))).unwrap();
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();

    // Every even chunk gets written, by every writer, in its own order, with the same
    // data, in pieces of one sector up to the whole chunk.
    let chunks: Vec<u64> = (0..1024).filter(|c| c % 2 == 0).collect();
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = ["s1", "s2"]
        .into_iter()
        .map(|snap| {
            let (reg, done, original) = (Arc::clone(&reg), Arc::clone(&done), original.clone());
            std::thread::spawn(move || {
                let mut io = SyncIo::on(&reg, snap);
                let mut rounds = 0;
                while !done.load(Ordering::Acquire) || rounds == 0 {
                    assert!(io.read_all(ORIGIN).unwrap() == original, "{snap} showed new data");
                    rounds += 1;
                }
            })
        })
        .collect();
    let writers: Vec<_> = (0..4u64)
        .map(|t| {
            let (reg, chunks) = (Arc::clone(&reg), chunks.clone());
            std::thread::spawn(move || {
                let mut rng = Rng(1000 + t);
                let mut order = chunks;
                for i in (1..order.len()).rev() {
                    order.swap(i, rng.below(i as u64 + 1) as usize);
                }
                let writes: Vec<(u64, Vec<u8>)> = order
                    .iter()
                    .map(|&c| {
                        let sectors = 1 + (c / 2) % 8;
                        let data = (0..sectors as usize * 512).map(|i| (c as u8) ^ (i as u8)).collect();
                        (c * 8, data)
                    })
                    .collect();
                let dev = reg.device("base").unwrap();
                let mut q = dev.open_queue(32).unwrap();
                for r in write_batch(q.as_mut(), &writes, 16) {
                    r.unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, Ordering::Release);
    for r in readers {
        r.join().unwrap();
    }
    // 512 chunks of 4 KiB: next_free = 2 + 512 + 512/256 areas. 64 KiB chunks: all 64 touched.
    assert_eq!(status(&reg, "s1"), "4128/16384 32");
    assert_eq!(status(&reg, "s2"), "8448/16384 256");
    assert!(SyncIo::on(&reg, "s1").read_all(ORIGIN).unwrap() == original);
    assert!(SyncIo::on(&reg, "s2").read_all(ORIGIN).unwrap() == original);
}

/// A store's next metadata commit goes out on whichever queue finished the previous one,
/// and it covers other writers' exceptions. Here queue A's commit is in flight (held by
/// a stalled COW device) while queue B's copy finishes, so B's exception waits for the
/// next commit, which A's queue sends when its own completes. A's write is then done but
/// its queue still carries B's commit: `in_flight` must say so (a caller polling until
/// zero, as the contract says, keeps B from waiting on a queue nobody polls).
#[test]
fn a_queue_carrying_another_writers_commit_counts_it_in_flight() {
    use udm_drivers::backends::fault::FaultDevice;
    use udm_drivers::{BlockDevice, Completion, IoQueue, IoRequest};
    use udm_mapping::io_buf::IoBuf;

    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(&vec![0u8; (ORIGIN * 512) as usize])).unwrap();
    let faulty = FaultDevice::new(mem_with(&vec![0u8; 8 << 20]));
    let cow = faulty.control();
    reg.register_backend("c1", Arc::new(faulty) as Arc<dyn BlockDevice>).unwrap();
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear odisk 0"))).unwrap();
    reg.create("s1-cow", None, Some("0 16384 linear c1 0")).unwrap();
    reg.create("s1", None, Some(&format!("0 {ORIGIN} snapshot base-real s1-cow P 8"))).unwrap();
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();
    let dev = reg.device("base").unwrap();
    let (mut a, mut b) = (dev.open_queue(8).unwrap(), dev.open_queue(8).unwrap());
    let buf = IoBuf::new(2 * 4096).unwrap();
    let mut out = [Completion::EMPTY; 8];
    fn poll(q: &mut Box<dyn IoQueue>, times: usize) -> usize {
        let mut out = [Completion::EMPTY; 8];
        let mut n = 0;
        for _ in 0..times {
            n += q.poll(&mut out);
            std::thread::yield_now();
        }
        n
    }

    // A's copy reaches the COW (one write passes), its commit is held.
    cow.stall_after_writes(1);
    a.submit(IoRequest::write(0, buf.sg(0, 4096), 1)).unwrap();
    a.kick();
    assert_eq!(poll(&mut a, 200), 0, "A's write waits for its commit");
    assert!(cow.held_ios() > 0, "A's commit is held by the COW device");
    // B's copy starts (held too), then everything is let through.
    b.submit(IoRequest::write(8, buf.sg(4096, 4096), 2)).unwrap();
    b.kick();
    assert_eq!(poll(&mut b, 200), 0);
    cow.disarm();
    // B's copy finishes while A's commit is still unreaped: B's exception waits for the
    // next commit. Then A reaps its commit and sends the next one, B's.
    assert_eq!(poll(&mut b, 200), 0, "B's write waits for a commit");
    let mut a_done = 0;
    for _ in 0..200 {
        a_done += a.poll(&mut out);
        if a_done > 0 {
            break;
        }
    }
    assert_eq!(a_done, 1, "A's write completes with its commit");
    assert!(a.in_flight() > 0, "A's queue carries B's commit, so it is not idle");
    assert_eq!(poll(&mut b, 200), 0, "B's commit is on A's queue, which nobody polled");
    // Following the contract, A's owner polls until nothing is in flight; then B's write
    // completes.
    while a.in_flight() > 0 {
        poll(&mut a, 1);
    }
    assert_eq!(poll(&mut b, 200), 1, "B's write completes once A's queue is drained");
    assert_eq!(b.in_flight(), 0);
}
