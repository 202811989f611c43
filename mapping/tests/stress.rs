//! Stress: two threads do verified I/O on `vol` while a third loads, suspends and
//! resumes tables in a loop. The tables alternate between putting `vol` on RAM disk b0
//! and on b1 (directly, through stacked devices, striped with one stripe, cut into many
//! segments); while `vol` is suspended and drained, the swapper copies the old disk to
//! the new one. So any I/O that escaped the drain, or was mapped by the old table after
//! the swap, or by a half-swapped table, loses a write that a later read or the final
//! check finds. Every completion is matched to exactly one request.
//!
//! `UDM_STRESS_SECS` sets the minimum duration (default 4 s).

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, Buf};
use udm_drivers::{BlockDevice, Completion, IoRequest};
use udm_mapping::{sync_io, Registry, SuspendFlags};

const DISK_SECTORS: u64 = 4096;
const VOL_SECTORS: u64 = 2048;
const THREADS: u64 = 2;
const SUBS: usize = 8;
const MAX_IO: u64 = 32;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random table that maps `vol` sector `s` to sector `s` of disk `k`, by a mix of
/// paths: linear on the disk, linear on the mid device `m<k>` (itself linear on the
/// disk), striped with one stripe (so every chunk is a split point).
fn identity_table(rng: &mut Rng, k: usize) -> String {
    let mut out = String::new();
    let mut start = 0;
    while start < VOL_SECTORS {
        let mut len = (1 + rng.below(300)).min(VOL_SECTORS - start);
        let chunk = 1 + rng.below(9);
        let line = match rng.below(3) {
            0 => format!("{start} {len} linear b{k} {start}"),
            1 => format!("{start} {len} linear m{k} {start}"),
            _ if len >= chunk => {
                len = len / chunk * chunk;
                format!("{start} {len} striped 1 {chunk} b{k} {start}")
            }
            _ => format!("{start} {len} linear b{k} {start}"),
        };
        out.push_str(&line);
        out.push('\n');
        start += len;
    }
    out
}

struct InFlight {
    tag: u64,
    write: bool,
    start: u64,
    len: u64,
    version: u64,
    buf: Buf,
}

/// Verified I/O on `[base, base + len)` of `dev` until `stop`; returns completions seen.
fn io_worker(dev: Arc<dyn BlockDevice>, base: u64, len: u64, seed: u64, stop: &AtomicBool) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut q = dev.open_queue(SUBS).unwrap();
    let sub_len = len / SUBS as u64;
    // Version of the last acknowledged write of each sector (0: never written, zeroes).
    let mut model = vec![0u64; len as usize];
    let mut slots: Vec<Option<InFlight>> = (0..SUBS).map(|_| None).collect();
    let mut seq = 0u64;
    let mut version = seed << 32;
    let mut completed = 0u64;
    let mut out = [Completion::EMPTY; SUBS];
    let mut last_progress = Instant::now();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            for (j, slot) in slots.iter_mut().enumerate() {
                if slot.is_some() {
                    continue;
                }
                let off = rng.below(sub_len);
                let n = 1 + rng.below(MAX_IO.min(sub_len - off));
                let start = base + j as u64 * sub_len + off;
                let write = rng.below(2) == 0;
                seq += 1;
                let tag = (seq << 8) | j as u64;
                let (buf, req_version) = if write {
                    version += 1;
                    (Buf::new(pattern(start, version, n)), version)
                } else {
                    (Buf::new(vec![0xEE; (n * 512) as usize]), 0)
                };
                let req =
                    if write { IoRequest::write(start, buf.sg(), tag) } else { IoRequest::read(start, buf.sg(), tag) };
                q.submit(req).expect("one request per slot fits the depth");
                *slot = Some(InFlight { tag, write, start, len: n, version: req_version, buf });
            }
            q.kick();
        }
        let k = q.poll(&mut out);
        if k > 0 {
            last_progress = Instant::now();
        }
        for c in &out[..k] {
            let j = (c.tag & 0xff) as usize;
            let f = match slots.get_mut(j).and_then(Option::take) {
                Some(f) if f.tag == c.tag => f,
                _ => panic!("completion for tag {:#x} that is not in flight (duplicated or invented)", c.tag),
            };
            assert_eq!(c.result, Ok(()), "I/O failed at {}+{}", f.start, f.len);
            completed += 1;
            for s in 0..f.len {
                let idx = (f.start - base + s) as usize;
                if f.write {
                    model[idx] = f.version;
                } else {
                    let got = &f.buf.data[(s * 512) as usize..][..512];
                    let want = if model[idx] == 0 { vec![0u8; 512] } else { pattern(f.start + s, model[idx], 1) };
                    assert!(got == &want[..], "sector {} does not hold its last acknowledged write", f.start + s);
                }
            }
        }
        if stopping && slots.iter().all(Option::is_none) {
            break;
        }
        assert!(last_progress.elapsed() < Duration::from_secs(60), "no completion for 60 s: a request was lost");
        if k == 0 {
            std::thread::yield_now();
        }
    }
    assert_eq!(q.in_flight(), 0);
    // Every acknowledged write is readable afterwards.
    let mut all = vec![0u8; (len * 512) as usize];
    let whole = Buf::new(all.clone());
    let tag = u64::MAX;
    q.submit(IoRequest::read(base, whole.sg(), tag)).unwrap();
    q.kick();
    assert_eq!(common::wait_for(q.as_mut(), tag), Ok(()));
    all.copy_from_slice(&whole.data);
    for (i, &v) in model.iter().enumerate() {
        let got = &all[i * 512..][..512];
        let s = base + i as u64;
        let want = if v == 0 { vec![0u8; 512] } else { pattern(s, v, 1) };
        assert!(got == &want[..], "final check: sector {s} lost its last acknowledged write");
    }
    completed
}

#[test]
fn io_survives_table_swaps_suspends_and_resumes() {
    let secs: u64 = std::env::var("UDM_STRESS_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(4);
    let reg = Registry::new();
    let disks: Vec<Arc<dyn BlockDevice>> = (0..2).map(|_| common::mem(DISK_SECTORS)).collect();
    for (i, d) in disks.iter().enumerate() {
        reg.register_backend(&format!("b{i}"), Arc::clone(d)).unwrap();
        reg.create(&format!("m{i}"), None, Some(&format!("0 {DISK_SECTORS} linear b{i} 0"))).unwrap();
    }
    let mut rng = Rng(0xC0FFEE);
    reg.create("vol", None, Some(&identity_table(&mut rng, 0))).unwrap();
    let vol = reg.device("vol").unwrap();
    let stop = AtomicBool::new(false);
    let swaps = AtomicU64::new(0);
    let per = VOL_SECTORS / THREADS;
    let started = Instant::now();
    std::thread::scope(|s| {
        let workers: Vec<_> = (0..THREADS)
            .map(|t| {
                let vol = Arc::clone(&vol);
                let stop = &stop;
                s.spawn(move || io_worker(vol, t * per, per, 0x1234 + t, stop))
            })
            .collect();
        let mut on = 0usize;
        while started.elapsed() < Duration::from_secs(secs) || swaps.load(Ordering::Relaxed) < 20 {
            let next = 1 - on;
            match rng.below(8) {
                0 => {
                    // A plain suspend/resume with no new table.
                    reg.suspend("vol", SuspendFlags { noflush: rng.below(2) == 0 }).unwrap();
                    reg.resume("vol").unwrap();
                    continue;
                }
                1 => {
                    // A staged table that never goes live.
                    reg.load("vol", &identity_table(&mut rng, next)).unwrap();
                    reg.clear("vol").unwrap();
                    continue;
                }
                _ => {}
            }
            reg.load("vol", &identity_table(&mut rng, next)).unwrap();
            reg.suspend("vol", SuspendFlags { noflush: rng.below(2) == 0 }).unwrap();
            // Drained: nothing is in flight. Move the data to the disk the new table uses.
            let mut data = vec![0u8; (VOL_SECTORS * 512) as usize];
            sync_io::read(disks[on].as_ref(), 0, &mut data).unwrap();
            sync_io::write(disks[next].as_ref(), 0, &data, false).unwrap();
            // Scribble on the old disk: I/O mapped by the old table would now read garbage.
            sync_io::write(disks[on].as_ref(), 0, &vec![0xA5; data.len()], false).unwrap();
            reg.resume("vol").unwrap();
            on = next;
            swaps.fetch_add(1, Ordering::Relaxed);
        }
        stop.store(true, Ordering::Relaxed);
        let total: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(total > 0);
        eprintln!("{} table swaps, {total} verified completions", swaps.load(Ordering::Relaxed));
    });
}
