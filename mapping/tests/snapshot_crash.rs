//! Crash consistency of snapshot commits under a volatile write cache. An origin disk and
//! two COW disks (one machine: one power rail) sit behind `fault` devices whose caches
//! lose, tear and reorder unflushed writes at a power cut. A client writes to the origin
//! and to one snapshot, with flushes and FUA writes, and the power goes at hundreds of
//! points (seeded: which disk's Nth write, what the caches lose). After the "reboot"
//! (the surviving media, a fresh registry that re-attaches the COWs):
//!
//! * the read-only snapshot shows the origin exactly as it was when it was made (an
//!   exception never points at lost or torn COW data, and no origin write landed
//!   without its copy-out being durable first);
//! * the origin and the written snapshot hold every write the client made durable (a
//!   flush that completed, or a FUA write), and per sector nothing but that or data
//!   written after it.
//!
//! This is what the persistent store's commit protocol guarantees (data, then PREFLUSH,
//! then the metadata area with FUA, as dm-snapshot's persistent store): removing the
//! flush or the FUA makes this test fail.
//!
//! To rerun one case: `UDM_CRASH_CASE=<disk>,<cut>,<seed>` (from a failure message).

mod snapshot_common;
use snapshot_common as common;

use common::crash::{flush, junk_disks, random_writes, run_crashes, run_writes, Machine, ViewModel};
use common::{Rng, SyncIo};
use udm_mapping::Registry;

const ORIGIN: u64 = 4096; // 2 MiB: 512 chunks of s1, two metadata areas
const COW: u64 = 6144; // 3 MiB each: room for every chunk of the origin
const DISKS: [&str; 3] = ["odisk", "c1disk", "c2disk"];

/// The stack LVM builds for an origin with two snapshots (`s1` with 4 KiB chunks,
/// `s2` with 64 KiB chunks), over the disks `odisk`, `c1disk`, `c2disk`.
fn stack(reg: &Registry) -> Result<(), udm_mapping::MappingError> {
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear odisk 0")))?;
    reg.create("s1-cow", None, Some(&format!("0 {COW} linear c1disk 0")))?;
    reg.create("s2-cow", None, Some(&format!("0 {COW} linear c2disk 0")))?;
    reg.create("s1", None, Some(&format!("0 {ORIGIN} snapshot base-real s1-cow P 8")))?;
    reg.create("s2", None, Some(&format!("0 {ORIGIN} snapshot base-real s2-cow P 128")))?;
    Ok(())
}

/// The disks before the snapshots exist: origin data, COWs of old junk with a zeroed
/// header.
struct Images {
    origin: Vec<u8>,
    cow: Vec<u8>,
}

impl Images {
    fn new() -> Self {
        let (origin, cow) = junk_disks(0x5eed, ORIGIN, COW);
        Images { origin, cow }
    }
}

/// One crash: disk `trigger` cuts the power at its `cut`-th write from the creation of
/// the snapshots on. Returns whether the power went before the workload ended.
fn crash_once(images: &Images, trigger: usize, cut: u64, seed: u64) -> bool {
    let case = format!("UDM_CRASH_CASE={trigger},{cut},{seed}");
    let machine = Machine::new(&[&images.origin, &images.cow, &images.cow]);
    let reg = Registry::new();
    for (name, dev) in DISKS.iter().zip(&machine.faulty) {
        reg.register_backend(name, dev.clone()).unwrap();
    }
    // The caches are on from the start: the power may also go while the snapshots
    // initialise their COWs.
    machine.arm(trigger, cut, seed);
    stack(&reg).unwrap();
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();

    let mut rng = Rng(seed | 1);
    let mut models = [ViewModel::new(ORIGIN), ViewModel::new(ORIGIN)];
    let mut queues =
        [reg.device("base").unwrap().open_queue(16).unwrap(), reg.device("s1").unwrap().open_queue(16).unwrap()];
    for _ in 0..24 {
        // Mostly origin writes (copy-outs to both snapshots), some snapshot writes.
        let target = usize::from(rng.below(4) == 0);
        let writes = random_writes(&mut rng, ORIGIN, 12, 24, 8);
        run_writes(queues[target].as_mut(), &writes).unwrap_or_else(|e| panic!("{case}: a write failed: {e}"));
        models[target].acknowledged(&writes, !machine.power_lost());
        if rng.below(2) == 0 {
            flush(queues[target].as_mut()).unwrap_or_else(|e| panic!("{case}: a flush failed: {e}"));
            if !machine.power_lost() {
                models[target].flushed();
            }
        }
        if machine.power_lost() {
            break;
        }
    }
    let lost = machine.power_lost();
    drop(queues);
    drop(reg);

    // Reboot on what reached the media: the snapshots re-attach their COWs.
    let reg = Registry::new();
    for (name, dev) in DISKS.iter().zip(&machine.media) {
        reg.register_backend(name, dev.clone()).unwrap();
    }
    let cuts = machine.cut_summary();
    if let Err(e) = stack(&reg) {
        panic!("{case}: the snapshots do not re-attach: {e} ({cuts})");
    }
    for snap in ["s1", "s2"] {
        let status = common::status(&reg, snap);
        assert_ne!(status, "Invalid", "{case}: {snap} came back invalid ({cuts})");
    }
    let s2 = SyncIo::on(&reg, "s2").read_all(ORIGIN).unwrap();
    if let Some(bad) = s2.chunks(512).zip(images.origin.chunks(512)).position(|(a, b)| a != b) {
        panic!("{case}: s2 differs from the origin at snapshot time at sector {bad} ({cuts})");
    }
    for (i, name) in ["base-real", "s1"].into_iter().enumerate() {
        let view = SyncIo::on(&reg, name).read_all(ORIGIN).unwrap();
        if let Err(e) = models[i].check(&view, &images.origin, "the origin's data before the workload") {
            panic!("{case}: {name}: {e} ({cuts})");
        }
    }
    lost
}

#[test]
fn snapshot_commits_survive_power_cuts_with_a_volatile_write_cache() {
    let images = Images::new();
    let crashes = run_crashes(DISKS.len(), 0xc0ffee, 12, |trigger, cut, seed| crash_once(&images, trigger, cut, seed));
    assert!(crashes > 100, "only {crashes} crashes: the workload is too short for the cut points");
}
