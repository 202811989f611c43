//! Crash consistency: the disk under an origin and two snapshots loses power at hundreds
//! of points during heavy origin writes (every later write lost, the cut one torn at
//! sector granularity). After "reboot" (the surviving media, a fresh registry), both
//! snapshots must still show the origin exactly as it was when they were made.

mod snapshot_common;
use snapshot_common as common;

use std::sync::Arc;

use common::{mem_with, write_batch, Rng, SyncIo};
use udm_drivers::backends::fault::FaultDevice;
use udm_mapping::Registry;

const ORIGIN: u64 = 8192; // 4 MiB
const COW: u64 = 12288; // 6 MiB each: room for every chunk of the origin

/// The stack over one physical volume, as LVM lays it out: origin, then two COWs.
fn stack(reg: &Registry, with_origin: bool) {
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear pv 0"))).unwrap();
    reg.create("s1-cow", None, Some(&format!("0 {COW} linear pv {ORIGIN}"))).unwrap();
    reg.create("s2-cow", None, Some(&format!("0 {COW} linear pv {}", ORIGIN + COW))).unwrap();
    reg.create("s1", None, Some(&format!("0 {ORIGIN} snapshot base-real s1-cow P 8"))).unwrap();
    reg.create("s2", None, Some(&format!("0 {ORIGIN} snapshot base-real s2-cow P 128"))).unwrap();
    if with_origin {
        reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();
    }
}

fn workload(seed: u64) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng(seed);
    (0..160)
        .map(|_| {
            let sectors = 1 + rng.below(24);
            let sector = rng.below(ORIGIN - sectors);
            (sector, rng.bytes(sectors as usize * 512))
        })
        .collect()
}

/// One crash at the `cut`-th write after the snapshots exist; returns whether the power
/// was lost during the workload (false: the workload needed fewer writes).
fn crash_once(initial: &[u8], cut: u64, seed: u64) -> bool {
    let media = mem_with(initial);
    let faulty = Arc::new(FaultDevice::new(Arc::clone(&media)));
    let control = faulty.control();
    let reg = Registry::new();
    reg.register_backend("pv", faulty).unwrap();
    stack(&reg, true);
    control.power_loss_at_write(control.writes_seen() + cut, seed);
    let base = reg.device("base").unwrap();
    let mut q = base.open_queue(16).unwrap();
    let writes = workload(seed);
    for batch in writes.chunks(16) {
        for r in write_batch(q.as_mut(), batch, 8) {
            r.unwrap();
        }
        if control.power_lost() {
            break;
        }
    }
    let lost = control.power_lost();
    drop(q);
    drop(reg);

    // Reboot on whatever reached the media.
    let reg = Registry::new();
    reg.register_backend("pv", media).unwrap();
    stack(&reg, false);
    for snap in ["s1", "s2"] {
        let status = common::status(&reg, snap);
        assert_ne!(status, "Invalid", "cut {cut} seed {seed}: {snap} came back invalid");
        let view = SyncIo::on(&reg, snap).read_all(ORIGIN).unwrap();
        if view != initial[..(ORIGIN * 512) as usize] {
            let bad = view.chunks(512).zip(initial.chunks(512)).position(|(a, b)| a != b).unwrap();
            panic!("cut {cut} seed {seed}: {snap} differs from the origin at snapshot time at sector {bad} ({status})");
        }
    }
    lost
}

#[test]
fn snapshots_survive_power_loss_at_hundreds_of_points() {
    let mut rng = Rng(0x5eed);
    let initial = rng.bytes(((ORIGIN + 2 * COW) * 512) as usize);
    let mut initial = initial;
    // Blank COW headers (LVM zeroes them before creating a snapshot).
    for cow in [ORIGIN, ORIGIN + COW] {
        let at = (cow * 512) as usize;
        initial[at..at + 4096].fill(0);
    }
    let mut crashes = 0;
    let mut cut = 1;
    while crashes < 300 {
        let seed = rng.next();
        if !crash_once(&initial, cut, seed) {
            // Past the end of the workload: start again with denser early cuts.
            cut = 1 + rng.below(40);
            continue;
        }
        crashes += 1;
        cut += 1 + rng.below(6);
    }
}
