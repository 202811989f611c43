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
