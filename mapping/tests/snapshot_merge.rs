//! snapshot-merge: rolling an origin back to a snapshot online, as the kernel does.

mod snapshot_common;
use snapshot_common as common;

use std::time::{Duration, Instant};

use common::{block_hashes, fixture_text, mem_with, status, unxz, SyncIo};
use udm_mapping::{Registry, TableSlot};

/// Polls the merge's status until `allocated == metadata` (how LVM knows it is done).
fn wait_merged(reg: &Registry, name: &str) -> Vec<String> {
    let started = Instant::now();
    let mut seen = Vec::new();
    loop {
        let s = status(reg, name);
        if seen.last() != Some(&s) {
            seen.push(s.clone());
        }
        let (alloc, meta) =
            s.split_once('/').map(|(a, r)| (a.to_string(), r.split(' ').nth(1).unwrap_or("").to_string())).unwrap();
        if alloc == meta {
            return seen;
        }
        assert!(!s.contains("failed"), "merge failed: {s}");
        assert!(started.elapsed() < Duration::from_secs(120), "merge did not finish: {seen:?}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn merging_the_multiarea_fixture_leaves_what_the_kernel_left() {
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(&unxz("c8-multiarea/origin.img.xz"))).unwrap();
    reg.register_backend("cdisk", mem_with(&unxz("c8-multiarea/cow.img.xz"))).unwrap();
    reg.create("base-real", None, Some("0 32768 linear odisk 0")).unwrap();
    reg.create("base-cow", None, Some("0 16384 linear cdisk 0")).unwrap();
    reg.create("base", None, Some("0 32768 snapshot-merge base-real base-cow P 8")).unwrap();
    assert_eq!(reg.table("base", TableSlot::Live).unwrap(), "0 32768 snapshot-merge base-real base-cow P 8\n");
    let seen = wait_merged(&reg, "base");
    assert_eq!(seen.last().unwrap(), "16/16384 16");
    let view = SyncIo::on(&reg, "base").read_all(32768).unwrap();
    assert!(block_hashes(&view) == fixture_text("c8-merged/expected-base.sha256"));
    for name in ["base", "base-cow", "base-real"] {
        reg.remove(name, false).unwrap();
    }
    let origin = SyncIo::new(reg.device("odisk").unwrap().as_ref()).read_all(32768).unwrap();
    assert!(origin == unxz("c8-merged/origin.img.xz"), "merged origin differs from the kernel's");
    let cow = SyncIo::new(reg.device("cdisk").unwrap().as_ref()).read_all(16384).unwrap();
    assert!(cow == unxz("c8-merged/cow.img.xz"), "merged COW differs from the kernel's");
}

#[test]
fn origin_io_continues_during_a_merge_and_other_snapshots_keep_their_view() {
    let orig = unxz("patterns/orig.img.xz");
    let new1 = unxz("patterns/new1.img.xz");
    let snp1 = unxz("patterns/snp1.img.xz");
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(&orig)).unwrap();
    reg.register_backend("cdisk", mem_with(&vec![0u8; 8 << 20])).unwrap();
    reg.register_backend("cdisk2", mem_with(&vec![0u8; 8 << 20])).unwrap();
    reg.create("base-real", None, Some("0 32768 linear odisk 0")).unwrap();
    reg.create("s1-cow", None, Some("0 16384 linear cdisk 0")).unwrap();
    reg.create("s1", None, Some("0 32768 snapshot base-real s1-cow P 8")).unwrap();
    reg.create("base", None, Some("0 32768 snapshot-origin base-real")).unwrap();
    // The origin changes (NEW1 over the first 4 MiB); s1 keeps ORIG.
    let mut base = SyncIo::on(&reg, "base");
    base.write(0, &new1[..4 << 20]).unwrap();
    drop(base);
    // A second snapshot of the changed origin, with a 64 KiB chunk.
    reg.create("s2-cow", None, Some("0 16384 linear cdisk2 0")).unwrap();
    reg.suspend("base", Default::default()).unwrap();
    reg.create("s2", None, Some("0 32768 snapshot base-real s2-cow P 128")).unwrap();
    reg.resume("base").unwrap();
    let s2_before = SyncIo::on(&reg, "s2").read_all(32768).unwrap();

    // Merge s1 back: s1's device gets an error table, base becomes snapshot-merge.
    reg.suspend("base", Default::default()).unwrap();
    reg.load("s1", "0 32768 error").unwrap();
    reg.resume("s1").unwrap();
    reg.load("base", "0 32768 snapshot-merge base-real s1-cow P 8").unwrap();
    reg.resume("base").unwrap();
    // Writes during the merge: some chunks still have exceptions (they go to the COW
    // and are merged later), some do not.
    let mut base = SyncIo::on(&reg, "base");
    let mut expected = orig.clone();
    for (s, n) in [(8u64, 8u64), (4000, 16), (9000, 3), (20000, 64)] {
        let data = &snp1[s as usize * 512..(s + n) as usize * 512];
        base.write(s, data).unwrap();
        expected[s as usize * 512..(s + n) as usize * 512].copy_from_slice(data);
    }
    wait_merged(&reg, "base");
    assert!(base.read_all(32768).unwrap() == expected, "origin = snapshot + the writes made during the merge");
    drop(base);
    assert!(SyncIo::on(&reg, "s2").read_all(32768).unwrap() == s2_before, "s2 keeps its view");
    // Back to a plain origin.
    reg.suspend("base", Default::default()).unwrap();
    reg.load("base", "0 32768 snapshot-origin base-real").unwrap();
    reg.resume("base").unwrap();
    assert!(SyncIo::on(&reg, "base").read_all(32768).unwrap() == expected);
}

/// LVM's own sequence (`lvconvert --merge` with the origin active, then `lvremove`'s
/// reload of the snapshot): tables over a live snapshot's COW take its state over at
/// resume instead of re-reading the COW (the kernel's handover).
#[test]
fn tables_loaded_over_a_live_snapshot_take_it_over() {
    let orig = unxz("patterns/orig.img.xz");
    let new1 = unxz("patterns/new1.img.xz");
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(&orig)).unwrap();
    reg.register_backend("cdisk", mem_with(&vec![0u8; 8 << 20])).unwrap();
    reg.create("base-real", None, Some("0 32768 linear odisk 0")).unwrap();
    reg.create("s1-cow", None, Some("0 16384 linear cdisk 0")).unwrap();
    reg.create("s1", None, Some("0 32768 snapshot base-real s1-cow P 8")).unwrap();
    reg.create("base", None, Some("0 32768 snapshot-origin base-real")).unwrap();
    SyncIo::on(&reg, "base").write(0, &new1[..1 << 20]).unwrap();

    // A plain reload of the snapshot keeps it working and copying.
    reg.load("s1", "0 32768 snapshot base-real s1-cow P 8").unwrap();
    reg.suspend("s1", Default::default()).unwrap();
    reg.resume("s1").unwrap();
    SyncIo::on(&reg, "base").write(4096, &new1[4096 * 512..(4096 + 2048) * 512]).unwrap();
    assert!(SyncIo::on(&reg, "s1").read_all(32768).unwrap() == orig);
    assert_eq!(status(&reg, "s1"), "4128/16384 32");

    // lvconvert --merge: load the merge over the live snapshot, error out the snapshot.
    reg.load("base", "0 32768 snapshot-merge base-real s1-cow P 8").unwrap();
    reg.load("s1", "0 32768 error").unwrap();
    reg.suspend("s1", Default::default()).unwrap();
    reg.suspend("base", Default::default()).unwrap();
    reg.resume("s1").unwrap();
    reg.resume("base").unwrap();
    let seen = wait_merged(&reg, "base");
    assert_eq!(seen.last().unwrap(), "16/16384 16");
    assert!(SyncIo::on(&reg, "base").read_all(32768).unwrap() == orig, "the origin is back to the snapshot");
}
