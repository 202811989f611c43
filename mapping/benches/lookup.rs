//! Segment lookup cost against table size (1 to 100,000 segments): it should grow like
//! log n (a binary search over segment starts). Two views:
//! * `lookup`: `Table::lookup` alone, at pseudo-random sectors;
//! * `read_4k`: a 4 KiB read through a mapped queue over a null device (submit, map,
//!   child submit, poll), at pseudo-random sectors, one request at a time; `read_4k/0`
//!   is the same loop on the null device itself (the baseline).
//!
//! `cargo bench -p udm-mapping --bench lookup`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use udm_drivers::backends::null::NullDevice;
use udm_drivers::{Completion, IoRequest, IoSegment, SgList};
use udm_mapping::Registry;

const SEG_SECTORS: u64 = 64;
const SIZES: [u64; 6] = [1, 10, 100, 1_000, 10_000, 100_000];

/// A registry with `vol`: `n` linear segments of 64 sectors over a null device,
/// alternating offsets so no two neighbours are contiguous on the device.
fn registry(n: u64) -> Registry {
    let reg = Registry::new();
    let disk = Arc::new(NullDevice::new(n * SEG_SECTORS * 2 * 512, 512).unwrap());
    reg.register_backend("null0", disk).unwrap();
    let mut text = String::with_capacity(n as usize * 32);
    for i in 0..n {
        let off = if i % 2 == 0 { i * SEG_SECTORS } else { (n + i) * SEG_SECTORS };
        text.push_str(&format!("{} {SEG_SECTORS} linear null0 {off}\n", i * SEG_SECTORS));
    }
    reg.create("vol", None, Some(&text)).unwrap();
    reg
}

fn sectors(n: u64, count: usize) -> Vec<u64> {
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x % (n * SEG_SECTORS - 8)) & !7
        })
        .collect()
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for n in SIZES {
        let reg = registry(n);
        let table = reg.mapped_device("vol").unwrap().live_table().unwrap();
        let points = sectors(n, 4096);
        g.throughput(Throughput::Elements(points.len() as u64));
        g.bench_with_input(BenchmarkId::from_parameter(n), &points, |b, points| {
            b.iter(|| {
                let mut acc = 0usize;
                for &s in points {
                    acc = acc.wrapping_add(table.lookup(black_box(s)));
                }
                acc
            })
        });
    }
    g.finish();
}

fn bench_read(c: &mut Criterion) {
    let mut g = c.benchmark_group("read_4k");
    // n = 0: the null device itself, the baseline of the same loop.
    for n in std::iter::once(0).chain(SIZES) {
        let reg = registry(n.max(1));
        let dev = if n == 0 { reg.device("null0").unwrap() } else { reg.device("vol").unwrap() };
        let mut q = dev.open_queue(4).unwrap();
        let mut buf = vec![0u8; 4096];
        // SAFETY: `buf` outlives every request; each is reaped inside the iteration.
        let seg = unsafe { IoSegment::new(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: as above.
        let sg = unsafe { SgList::from_segment(&seg) };
        let points = sectors(n.max(1), 4096);
        let mut out = [Completion::EMPTY; 4];
        g.throughput(Throughput::Elements(points.len() as u64));
        g.bench_function(BenchmarkId::from_parameter(n), |b| {
            b.iter(|| {
                for &s in &points {
                    q.submit(IoRequest::read(s, sg, s)).unwrap();
                    q.kick();
                    while q.poll(&mut out) == 0 {}
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_lookup, bench_read);
criterion_main!(benches);
