//! Property test against a trivial model: random tables (1 to 10,000 segments of mixed
//! targets) on two mid-level devices over three RAM disks, a top device stacked on
//! them (two levels deep), random I/O through the top and the mid devices; every
//! result and every byte must be where the model says, down to the RAM disks.

mod common;

use std::sync::Arc;

use common::Buf;
use proptest::prelude::*;
use udm_drivers::{BlockDevice, Completion, IoError, IoQueue, IoRequest, IoSegment, SgList};
use udm_mapping::sync_io;
use udm_mapping::{Registry, TableSlot};

const BACKENDS: usize = 3;
const BACKEND_SECTORS: u64 = 8192;
const MIDS: usize = 2;

/// A deterministic generator, so a failing seed reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Dev {
    Backend(usize),
    Mid(usize),
}

impl Dev {
    fn name(self) -> String {
        match self {
            Dev::Backend(i) => format!("b{i}"),
            Dev::Mid(i) => format!("m{i}"),
        }
    }
}

#[derive(Clone, Debug)]
enum Kind {
    Linear(Dev, u64),
    Striped(u64, Vec<(Dev, u64)>),
    Zero,
    Error,
}

#[derive(Clone, Debug)]
struct Seg {
    start: u64,
    len: u64,
    kind: Kind,
}

#[derive(Clone, Debug, Default)]
struct ModelTable {
    segs: Vec<Seg>,
}

impl ModelTable {
    fn size(&self) -> u64 {
        self.segs.last().map_or(0, |s| s.start + s.len)
    }

    fn text(&self, rng: &mut Rng) -> String {
        let mut out = String::new();
        for s in &self.segs {
            if rng.below(50) == 0 {
                out.push_str("  # a comment line\n\n");
            }
            let args = match &s.kind {
                Kind::Linear(d, off) => format!("linear {} {off}", d.name()),
                Kind::Striped(chunk, stripes) => {
                    let mut a = format!("striped {} {chunk}", stripes.len());
                    for (d, off) in stripes {
                        a.push_str(&format!(" {} {off}", d.name()));
                    }
                    a
                }
                Kind::Zero => "zero".into(),
                Kind::Error => "error".into(),
            };
            let comment = if rng.below(20) == 0 { " # inline" } else { "" };
            out.push_str(&format!("{} {} {args}{comment}\n", s.start, s.len));
        }
        out
    }
}

enum Loc {
    Backend(usize, u64),
    Zero,
    Error,
}

struct Model {
    mids: Vec<ModelTable>,
    top: ModelTable,
    shadow: Vec<Vec<u8>>,
}

impl Model {
    fn table(&self, d: Dev) -> Option<&ModelTable> {
        match d {
            Dev::Backend(_) => None,
            Dev::Mid(i) => Some(&self.mids[i]),
        }
    }

    fn resolve_in(&self, t: &ModelTable, sector: u64) -> Loc {
        let i = t.segs.partition_point(|s| s.start <= sector) - 1;
        let s = &t.segs[i];
        let o = sector - s.start;
        match &s.kind {
            Kind::Linear(d, off) => self.resolve(*d, off + o),
            Kind::Striped(chunk, stripes) => {
                let n = stripes.len() as u64;
                let c = o / chunk;
                let (d, off) = stripes[(c % n) as usize];
                self.resolve(d, off + (c / n) * chunk + o % chunk)
            }
            Kind::Zero => Loc::Zero,
            Kind::Error => Loc::Error,
        }
    }

    fn resolve(&self, d: Dev, sector: u64) -> Loc {
        match d {
            Dev::Backend(b) => Loc::Backend(b, sector),
            Dev::Mid(_) => self.resolve_in(self.table(d).unwrap(), sector),
        }
    }

    fn supports_write_zeroes_in(&self, t: &ModelTable) -> bool {
        t.segs.iter().all(|s| match &s.kind {
            Kind::Linear(d, _) => self.supports_write_zeroes(*d),
            Kind::Striped(_, st) => st.iter().all(|(d, _)| self.supports_write_zeroes(*d)),
            Kind::Zero => false,
            Kind::Error => true,
        })
    }

    fn supports_write_zeroes(&self, d: Dev) -> bool {
        match d {
            Dev::Backend(_) => true,
            Dev::Mid(_) => self.supports_write_zeroes_in(self.table(d).unwrap()),
        }
    }
}

/// A random table of `nseg` segments over `children` (device, size).
fn gen_table(rng: &mut Rng, nseg: usize, children: &[(Dev, u64)], max_len: u64) -> ModelTable {
    let mut t = ModelTable::default();
    let mut start = 0;
    for _ in 0..nseg {
        let roll = rng.below(100);
        let kind_len = if roll < 55 {
            let len = rng.range(1, max_len);
            let fitting: Vec<_> = children.iter().filter(|(_, sz)| *sz >= len).collect();
            if fitting.is_empty() {
                (Kind::Zero, len)
            } else {
                let (d, sz) = *fitting[rng.below(fitting.len() as u64) as usize];
                (Kind::Linear(d, rng.below(sz - len + 1)), len)
            }
        } else if roll < 85 {
            let n = rng.range(1, 3);
            let chunk = rng.range(1, 12);
            let per = chunk * rng.range(1, 3);
            let fitting: Vec<_> = children.iter().filter(|(_, sz)| *sz >= per).collect();
            if fitting.is_empty() {
                (Kind::Error, n * per)
            } else {
                let stripes = (0..n)
                    .map(|_| {
                        let (d, sz) = *fitting[rng.below(fitting.len() as u64) as usize];
                        (d, rng.below(sz - per + 1))
                    })
                    .collect();
                (Kind::Striped(chunk, stripes), n * per)
            }
        } else if roll < 96 {
            (Kind::Zero, rng.range(1, max_len))
        } else {
            (Kind::Error, rng.range(1, max_len))
        };
        t.segs.push(Seg { start, len: kind_len.1, kind: kind_len.0 });
        start += kind_len.1;
    }
    t
}

/// One request's buffer, split into 1..=3 byte-granular segments.
struct SplitBuf {
    buf: Buf,
    segs: Vec<IoSegment>,
}

impl SplitBuf {
    fn new(data: Vec<u8>, rng: &mut Rng) -> Self {
        let mut buf = Buf::new(data);
        let len = buf.data.len();
        let mut cuts = vec![0, len];
        for _ in 0..rng.below(3) {
            cuts.push(rng.below(len as u64 + 1) as usize);
        }
        cuts.sort();
        let base = buf.data.as_mut_ptr();
        let segs = cuts
            .windows(2)
            // SAFETY: each window lies inside `buf.data`, which the SplitBuf keeps alive.
            .map(|w| unsafe { IoSegment::new(base.add(w[0]), w[1] - w[0]) })
            .collect();
        SplitBuf { buf, segs }
    }

    fn sg(&self) -> SgList {
        // SAFETY: the segments and their memory live as long as the SplitBuf, which the
        // test keeps until the request completes.
        unsafe { SgList::from_raw(self.segs.as_ptr(), self.segs.len()) }
    }
}

fn random_bytes(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    while v.len() < len {
        v.extend_from_slice(&rng.next().to_le_bytes());
    }
    v.truncate(len);
    v
}

fn complete_all(q: &mut dyn IoQueue, n: usize) -> Vec<Completion> {
    let mut got = Vec::new();
    let mut out = [Completion::EMPTY; 8];
    let mut spins = 0u64;
    while got.len() < n {
        let k = q.poll(&mut out);
        got.extend_from_slice(&out[..k]);
        spins += 1;
        assert!(spins < 50_000_000, "requests never completed");
    }
    assert_eq!(q.in_flight(), 0);
    let mut tags: Vec<_> = got.iter().map(|c| c.tag).collect();
    tags.sort();
    tags.dedup();
    assert_eq!(tags.len(), n, "a completion was duplicated or lost");
    got
}

fn run_case(seed: u64, nseg: usize, ops: usize, depth: usize) {
    let mut rng = Rng(seed);
    let reg = Registry::new();
    let backends: Vec<Arc<dyn BlockDevice>> = (0..BACKENDS).map(|_| common::mem(BACKEND_SECTORS)).collect();
    for (i, b) in backends.iter().enumerate() {
        reg.register_backend(&format!("b{i}"), Arc::clone(b)).unwrap();
    }
    let backend_children: Vec<(Dev, u64)> = (0..BACKENDS).map(|i| (Dev::Backend(i), BACKEND_SECTORS)).collect();
    let max_len = if nseg > 1000 { 8 } else { 64 };
    let mids: Vec<ModelTable> = (0..MIDS).map(|_| gen_table(&mut rng, nseg, &backend_children, max_len)).collect();
    for (i, t) in mids.iter().enumerate() {
        let text = t.text(&mut rng);
        reg.create(&format!("m{i}"), None, Some(&text)).unwrap();
        // The printed table re-parses to itself.
        let printed = reg.table(&format!("m{i}"), TableSlot::Live).unwrap();
        reg.load(&format!("m{i}"), &printed).unwrap();
        assert_eq!(reg.table(&format!("m{i}"), TableSlot::Inactive).unwrap(), printed);
        reg.clear(&format!("m{i}")).unwrap();
    }
    let mut top_children: Vec<(Dev, u64)> = mids.iter().enumerate().map(|(i, t)| (Dev::Mid(i), t.size())).collect();
    top_children.push((Dev::Backend(0), BACKEND_SECTORS));
    let top_nseg = rng.range(1, 40) as usize;
    let top = gen_table(&mut rng, top_nseg, &top_children, 256);
    reg.create("top", None, Some(&top.text(&mut rng))).unwrap();

    let mut model = Model { mids, top, shadow: vec![vec![0u8; (BACKEND_SECTORS * 512) as usize]; BACKENDS] };
    let top_dev = reg.device("top").unwrap();
    let mid_devs: Vec<_> = (0..MIDS).map(|i| reg.device(&format!("m{i}")).unwrap()).collect();
    let mut top_q = top_dev.open_queue(depth).unwrap();
    let mut mid_qs: Vec<_> = mid_devs.iter().map(|d| d.open_queue(depth).unwrap()).collect();
    assert_eq!(top_dev.info().sectors, model.top.size());

    let mut tag = 0u64;
    for _ in 0..ops {
        let (which, size) = if rng.below(10) < 7 {
            (None, model.top.size())
        } else {
            let m = rng.below(MIDS as u64) as usize;
            (Some(m), model.mids[m].size())
        };
        let q: &mut dyn IoQueue = match which {
            None => top_q.as_mut(),
            Some(m) => mid_qs[m].as_mut(),
        };
        let table = match which {
            None => &model.top,
            Some(m) => &model.mids[m],
        };
        let start = rng.below(size);
        let len = rng.range(1, (size - start).min(128));
        let any_error = (start..start + len).any(|s| matches!(model.resolve_in(table, s), Loc::Error));
        let roll = rng.below(100);
        tag += 1;
        if roll < 45 {
            let data = random_bytes(&mut rng, (len * 512) as usize);
            let sb = SplitBuf::new(data.clone(), &mut rng);
            q.submit(IoRequest::write(start, sb.sg(), tag)).unwrap();
            q.kick();
            let c = complete_all(q, 1);
            assert_eq!(c[0].result.is_err(), any_error, "write {start}+{len}: {:?}", c[0].result);
            // Pieces of one request run concurrently: when two sectors of the request
            // alias one disk sector, either may land last. Accept either, then follow.
            let mut candidates: std::collections::HashMap<(usize, u64), Vec<u64>> = Default::default();
            for k in 0..len {
                if let Loc::Backend(b, s) = model.resolve_in(table, start + k) {
                    candidates.entry((b, s)).or_default().push(k);
                }
            }
            for ((b, s), ks) in candidates {
                let mut landed = vec![0u8; 512];
                if ks.len() > 1 {
                    sync_io::read(backends[b].as_ref(), s, &mut landed).unwrap();
                    assert!(
                        ks.iter().any(|k| landed[..] == data[(k * 512) as usize..][..512]),
                        "aliased disk sector b{b}:{s} holds none of the request's sectors"
                    );
                } else {
                    landed.copy_from_slice(&data[(ks[0] * 512) as usize..][..512]);
                }
                model.shadow[b][(s * 512) as usize..][..512].copy_from_slice(&landed);
            }
        } else if roll < 85 {
            // A batch of reads in flight together.
            let batch = rng.range(1, depth.min(4) as u64);
            let mut reads = Vec::new();
            for j in 0..batch {
                let s0 = if j == 0 { start } else { rng.below(size) };
                let l = if j == 0 { len } else { rng.range(1, (size - s0).min(64)) };
                let sb = SplitBuf::new(vec![0xEE; (l * 512) as usize], &mut rng);
                q.submit(IoRequest::read(s0, sb.sg(), tag + j)).unwrap();
                reads.push((tag + j, s0, l, sb));
            }
            q.kick();
            let got = complete_all(q, reads.len());
            for (t, s0, l, sb) in &reads {
                let c = got.iter().find(|c| c.tag == *t).unwrap();
                let err = (*s0..s0 + l).any(|s| matches!(model.resolve_in(table, s), Loc::Error));
                assert_eq!(c.result.is_err(), err, "read {s0}+{l}: {:?}", c.result);
                if err {
                    continue;
                }
                for k in 0..*l {
                    let got = &sb.buf.data[(k * 512) as usize..][..512];
                    match model.resolve_in(table, s0 + k) {
                        Loc::Backend(b, s) => {
                            assert_eq!(got, &model.shadow[b][(s * 512) as usize..][..512], "sector {}", s0 + k)
                        }
                        Loc::Zero => assert!(got.iter().all(|&x| x == 0), "zero sector {}", s0 + k),
                        Loc::Error => unreachable!(),
                    }
                }
            }
            tag += batch;
        } else if roll < 95 {
            let supported = model.supports_write_zeroes_in(table);
            q.submit(IoRequest::write_zeroes(start, len, tag)).unwrap();
            q.kick();
            let c = complete_all(q, 1);
            if !supported {
                assert!(matches!(c[0].result, Err(IoError::Unsupported { .. })), "{:?}", c[0].result);
                continue;
            }
            assert_eq!(c[0].result.is_err(), any_error, "write-zeroes {start}+{len}: {:?}", c[0].result);
            for k in 0..len {
                if let Loc::Backend(b, s) = model.resolve_in(table, start + k) {
                    model.shadow[b][(s * 512) as usize..][..512].fill(0);
                }
            }
        } else {
            q.submit(IoRequest::flush(tag)).unwrap();
            q.kick();
            assert_eq!(complete_all(q, 1)[0].result, Ok(()));
        }
    }
    // Every byte of every RAM disk is what the model says.
    for (b, dev) in backends.iter().enumerate() {
        let mut all = vec![0u8; (BACKEND_SECTORS * 512) as usize];
        sync_io::read(dev.as_ref(), 0, &mut all).unwrap();
        if all != model.shadow[b] {
            let first = all.iter().zip(&model.shadow[b]).position(|(a, b)| a != b).unwrap();
            panic!("backend b{b} differs from the model at sector {}", first / 512);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    #[test]
    fn io_lands_where_the_model_says(
        seed in any::<u64>(),
        nseg in prop_oneof![1usize..=10, 10usize..=300, 2000usize..=10_000],
        depth in prop_oneof![Just(1usize), Just(2), Just(4), Just(32)],
    ) {
        run_case(seed, nseg, 150, depth);
    }
}

#[test]
fn ten_thousand_segments_two_levels() {
    run_case(0x5EED, 10_000, 300, 8);
}
