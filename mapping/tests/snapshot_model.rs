//! Model-based test: random interleavings of origin writes, snapshot writes, reads of
//! every snapshot, snapshot creation and removal, re-activation from the COW, and
//! merges (with origin writes while merging), checked against plain byte arrays.
//! Writes go in concurrent batches (several in flight, sharing chunks), so copy-outs
//! race and pending exceptions are joined.

mod snapshot_common;
use snapshot_common as common;

use std::time::{Duration, Instant};

use common::{mem_with, write_batch, SyncIo};
use proptest::prelude::*;
use udm_mapping::snapshot_ops::{self, CowSource, CreateOptions};
use udm_mapping::{Registry, TableSlot};

const SECTORS: u64 = 2048; // a 1 MiB origin
const MAX_SNAPS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    OriginWrites(Vec<(u64, u64, u8)>),
    SnapWrites(usize, Vec<(u64, u64, u8)>),
    Create { chunk: u64, persistent: bool },
    Remove(usize),
    Reactivate(usize),
    Merge(usize, Vec<(u64, u64, u8)>),
    Check,
}

fn writes() -> impl Strategy<Value = Vec<(u64, u64, u8)>> {
    prop::collection::vec((0..SECTORS, 1u64..40, any::<u8>()), 1..12)
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => writes().prop_map(Op::OriginWrites),
        3 => (0..MAX_SNAPS, writes()).prop_map(|(i, w)| Op::SnapWrites(i, w)),
        2 => (prop::sample::select(vec![8u64, 16, 128]), prop::bool::weighted(0.8))
            .prop_map(|(chunk, persistent)| Op::Create { chunk, persistent }),
        1 => (0..MAX_SNAPS).prop_map(Op::Remove),
        1 => (0..MAX_SNAPS).prop_map(Op::Reactivate),
        1 => (0..MAX_SNAPS, writes()).prop_map(|(i, w)| Op::Merge(i, w)),
        2 => Just(Op::Check),
    ]
}

struct Snap {
    name: String,
    model: Vec<u8>,
    persistent: bool,
}

struct World {
    reg: Registry,
    origin: Vec<u8>,
    snaps: Vec<Snap>,
    made: usize,
}

/// Keeps the writes of a batch that do not overlap an earlier one (so the model does
/// not depend on the order the device saw them in), clipped to the device.
fn batch(ws: &[(u64, u64, u8)]) -> Vec<(u64, Vec<u8>)> {
    let mut taken: Vec<(u64, u64)> = Vec::new();
    let mut out = Vec::new();
    for &(s, n, tag) in ws {
        let n = n.min(SECTORS - s);
        if taken.iter().any(|&(a, b)| s < b && a < s + n) {
            continue;
        }
        taken.push((s, s + n));
        let data =
            (0..n as usize * 512).map(|i| tag.wrapping_add((i / 512) as u8).wrapping_mul(3) ^ (i as u8)).collect();
        out.push((s, data));
    }
    out
}

fn apply(model: &mut [u8], writes: &[(u64, Vec<u8>)]) {
    for (s, d) in writes {
        let at = *s as usize * 512;
        model[at..at + d.len()].copy_from_slice(d);
    }
}

impl World {
    fn new() -> Self {
        let reg = Registry::new();
        let origin: Vec<u8> = (0..SECTORS as usize * 512).map(|i| (i * 7 / 512) as u8 ^ i as u8).collect();
        reg.register_backend("disk", mem_with(&origin)).unwrap();
        reg.create("vol", None, Some(&format!("0 {SECTORS} linear disk 0"))).unwrap();
        World { reg, origin, snaps: Vec::new(), made: 0 }
    }

    fn write(&mut self, dev: &str, ws: &[(u64, Vec<u8>)]) {
        let d = self.reg.device(dev).unwrap();
        let mut q = d.open_queue(16).unwrap();
        for r in write_batch(q.as_mut(), ws, 8) {
            r.unwrap();
        }
    }

    fn check(&self) {
        let origin = SyncIo::on(&self.reg, "vol").read_all(SECTORS).unwrap();
        assert!(origin == self.origin, "origin differs from the model");
        for s in &self.snaps {
            let view = SyncIo::on(&self.reg, &s.name).read_all(SECTORS).unwrap();
            if view != s.model {
                let bad = view.chunks(512).zip(s.model.chunks(512)).position(|(a, b)| a != b).unwrap();
                panic!("snapshot {} differs from the model at sector {bad}", s.name);
            }
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::OriginWrites(ws) => {
                let b = batch(ws);
                self.write("vol", &b);
                apply(&mut self.origin, &b);
            }
            Op::SnapWrites(i, ws) => {
                let Some(s) = self.snaps.get(*i % MAX_SNAPS) else { return };
                let name = s.name.clone();
                let b = batch(ws);
                self.write(&name, &b);
                apply(&mut self.snaps[*i % MAX_SNAPS].model, &b);
            }
            Op::Create { chunk, persistent } => {
                if self.snaps.len() == MAX_SNAPS {
                    return;
                }
                self.made += 1;
                let name = format!("s{}", self.made);
                let opts = CreateOptions {
                    cow: CowSource::parse("2M"),
                    chunk_sectors: *chunk,
                    persistent: *persistent,
                    existing: Default::default(),
                };
                snapshot_ops::create(&self.reg, "vol", &name, &opts).unwrap();
                self.snaps.push(Snap { name, model: self.origin.clone(), persistent: *persistent });
            }
            Op::Remove(i) => {
                if *i < self.snaps.len() {
                    let s = self.snaps.remove(*i);
                    snapshot_ops::remove(&self.reg, &s.name).unwrap();
                }
            }
            Op::Reactivate(i) => {
                let Some(s) = self.snaps.get(*i) else { return };
                if !s.persistent {
                    return;
                }
                let table = self.reg.table(&s.name, TableSlot::Live).unwrap();
                self.reg.suspend("vol", Default::default()).unwrap();
                self.reg.remove(&s.name, false).unwrap();
                self.reg.create(&s.name, None, Some(&table)).unwrap();
                self.reg.resume("vol").unwrap();
            }
            Op::Merge(i, ws) => {
                let Some(s) = self.snaps.get(*i) else { return };
                if !s.persistent {
                    return;
                }
                let s = self.snaps.remove(*i);
                snapshot_ops::merge(&self.reg, &s.name).unwrap();
                self.origin = s.model;
                let b = batch(ws);
                self.write("vol", &b);
                apply(&mut self.origin, &b);
                let started = Instant::now();
                while !snapshot_ops::merge_progress(&self.reg, "vol").unwrap().done {
                    assert!(started.elapsed() < Duration::from_secs(60), "merge stuck");
                    std::thread::sleep(Duration::from_micros(200));
                }
                snapshot_ops::finish_merge(&self.reg, "vol").unwrap();
            }
            Op::Check => self.check(),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn snapshots_behave_like_copies_of_the_origin(ops in prop::collection::vec(op(), 1..24)) {
        let mut w = World::new();
        for op in &ops {
            w.run(op);
        }
        w.check();
    }
}
