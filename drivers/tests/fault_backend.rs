//! The fault-injecting wrapper: each plan does exactly what it promises, shared across
//! queues and threads.

mod common;

use std::sync::Arc;

use common::*;
use udm_drivers::backend_spec::open_backend;
use udm_drivers::backends::fault::{FaultDevice, PowerCut};
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::{BlockDevice, IoError, IoRequest, SECTOR_SIZE};

fn disk(bytes: u64, bs: u32) -> Arc<dyn BlockDevice> {
    Arc::new(MemDevice::new(bytes, bs).unwrap())
}

#[test]
fn passes_everything_through_when_unarmed() {
    whole_device_integrity(Arc::new(FaultDevice::new(disk(8 << 20, 512))), 3, 32 << 10, 7);
}

#[test]
fn fail_after_writes_fails_every_later_request() {
    let dev = FaultDevice::new(disk(1 << 20, 512));
    let ctl = dev.control();
    let mut q = dev.open_queue(4).unwrap();
    ctl.fail_after_writes(3);
    let b = Buffer::new(4096);
    for i in 0..3 {
        assert_eq!(run_one(&mut *q, IoRequest::read(0, b.sg(), 0)), Ok(()), "reads pass before the Nth write");
        assert_eq!(write_pattern(&mut *q, i * 8, 8, 1), Ok(()), "write {i} is within the budget");
    }
    assert_eq!(run_one(&mut *q, IoRequest::read(0, b.sg(), 0)), Err(IoError::Host { errno: libc::EIO }));
    assert_eq!(write_pattern(&mut *q, 24, 8, 1), Err(IoError::Host { errno: libc::EIO }));
    assert_eq!(run_one(&mut *q, IoRequest::read(0, b.sg(), 0)), Err(IoError::Host { errno: libc::EIO }));
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Err(IoError::Host { errno: libc::EIO }));
    assert_eq!(ctl.failed_ios(), 4);
    // The refused write never reached the disk.
    let mut inner = dev.inner().open_queue(2).unwrap();
    assert!(read_back(&mut *inner, 24, 8).iter().all(|&b| b == 0));
    assert_eq!(first_mismatch(&read_back(&mut *inner, 0, 24), 0, 1), None);
    ctl.disarm();
    assert_eq!(run_one(&mut *q, IoRequest::read(0, b.sg(), 0)), Ok(()));
}

#[test]
fn stall_after_writes_holds_every_later_request_until_disarmed() {
    let dev = open_backend("fault:stall-after=2@mem:1M").unwrap();
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 8, 1), Ok(()));
    assert_eq!(write_pattern(&mut *q, 8, 8, 1), Ok(()));
    let b = Buffer::new(4096);
    let data = Buffer::new(4096);
    fill(data.bytes(), 16, 2);
    q.submit(IoRequest::write(16, data.sg(), 7)).unwrap();
    q.submit(IoRequest::read(0, b.sg(), 8)).unwrap();
    q.kick();
    let mut out = [udm_drivers::Completion::EMPTY; 4];
    for _ in 0..100 {
        assert_eq!(q.poll(&mut out), 0, "a stalled device completes nothing");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(q.in_flight(), 2, "held requests count as in flight");
    let mut other = dev.open_queue(2).unwrap();
    let mut probe = [udm_drivers::Completion::EMPTY; 1];
    other.submit(IoRequest::read(16, b.sg(), 1)).unwrap();
    other.kick();
    assert_eq!(other.poll(&mut probe), 0, "every queue of the device is stalled");
    drop(other);

    let faulty = FaultDevice::new(disk(1 << 20, 512));
    let ctl = faulty.control();
    let mut q = faulty.open_queue(4).unwrap();
    ctl.stall_after_writes(0);
    q.submit(IoRequest::write(16, data.sg(), 7)).unwrap();
    q.kick();
    assert_eq!(q.poll(&mut out), 0);
    assert_eq!(ctl.held_ios(), 1);
    ctl.disarm();
    let mut got = 0;
    while got == 0 {
        got = q.poll(&mut out);
    }
    assert_eq!((out[0].tag, out[0].result), (7, Ok(())), "disarm releases the held write");
    let mut inner = faulty.inner().open_queue(2).unwrap();
    assert_eq!(first_mismatch(&read_back(&mut *inner, 16, 8), 16, 2), None);
}

/// Writes 1..n-1 land, write n is torn at sector granularity exactly as reported, and
/// later writes are acknowledged but dropped.
fn power_loss(seed: u64) -> Vec<std::ops::Range<u64>> {
    let dev = FaultDevice::new(disk(1 << 20, 512));
    let ctl = dev.control();
    let mut q = dev.open_queue(4).unwrap();
    // Old contents everywhere (salt 1), before arming.
    assert_eq!(write_pattern(&mut *q, 0, 2048, 1), Ok(()));
    ctl.power_loss_at_write(4, seed);
    // Eight 32-sector writes with new contents (salt 2).
    for i in 0..8 {
        assert_eq!(write_pattern(&mut *q, i * 32, 32, 2), Ok(()), "every write is acknowledged");
    }
    assert!(ctl.power_lost());
    assert_eq!(ctl.dropped_writes(), 4);
    let torn = ctl.torn_write().expect("a torn write is recorded");
    assert_eq!((torn.sector, torn.sectors), (96, 32));
    let mut media = dev.inner().open_queue(2).unwrap();
    let data = read_back(&mut *media, 0, 256);
    for s in 0..256u64 {
        let bytes = &data[(s * SECTOR_SIZE) as usize..((s + 1) * SECTOR_SIZE) as usize];
        let new = s < 96 || torn.applied.iter().any(|r| r.contains(&s));
        let salt = if new { 2 } else { 1 };
        assert_eq!(first_mismatch(bytes, s, salt), None, "sector {s} should hold salt {salt}");
    }
    torn.applied
}

#[test]
fn power_loss_tears_the_nth_write_deterministically() {
    let a = power_loss(42);
    assert_eq!(a, power_loss(42), "one seed, one tear");
    // Some seed among a few tears the write partway (neither all nor nothing).
    let partial = (0..8).map(power_loss).any(|r| {
        let n: u64 = r.iter().map(|r| r.end - r.start).sum();
        n > 0 && n < 32
    });
    assert!(partial);
}

/// 100 writes of 8 sectors (salt 3) over sectors 0..800, 25 from each of four threads
/// with their own queues.
fn write_from_four_threads(dev: &Arc<FaultDevice>) {
    let handles: Vec<_> = (0..4u64)
        .map(|t| {
            let dev = Arc::clone(dev);
            std::thread::spawn(move || {
                let mut q = dev.open_queue(4).unwrap();
                for i in 0..25u64 {
                    assert_eq!(write_pattern(&mut *q, (t * 25 + i) * 8, 8, 3), Ok(()));
                }
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
}

#[test]
fn power_loss_counts_writes_across_threads() {
    let dev = Arc::new(FaultDevice::new(disk(4 << 20, 512)));
    let ctl = dev.control();
    ctl.power_loss_at_write(50, 1);
    write_from_four_threads(&dev);
    assert_eq!(ctl.writes_seen(), 100);
    assert_eq!(ctl.dropped_writes(), 50);
    assert!(ctl.torn_write().is_some());
}

#[test]
fn corrupt_reads_flip_one_byte_of_chosen_sectors_only() {
    let dev = open_backend("fault:corrupt=10,corrupt=700@mem:1M").unwrap();
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 32, 5), Ok(()));
    let data = read_back(&mut *q, 0, 32);
    for s in 0..32u64 {
        let bytes = &data[(s * SECTOR_SIZE) as usize..((s + 1) * SECTOR_SIZE) as usize];
        if s == 10 {
            let bad: Vec<usize> = (0..512).filter(|&i| bytes[i] != pattern_byte(s, i, 5)).collect();
            assert_eq!(bad, [10], "exactly the byte at offset sector % 512 is inverted");
            assert_eq!(bytes[10], !pattern_byte(s, 10, 5));
        } else {
            assert_eq!(first_mismatch(bytes, s, 5), None);
        }
    }
}

/// Writes the pattern `salt` over `sectors` at `sector` with FUA.
fn write_fua(q: &mut dyn udm_drivers::IoQueue, sector: u64, sectors: u64, salt: u64) -> Result<(), IoError> {
    let b = Buffer::new((sectors * SECTOR_SIZE) as usize);
    fill(b.bytes(), sector, salt);
    run_one(q, IoRequest::write(sector, b.sg(), 0).with_fua())
}

/// Which salt each sector of `data` (starting at sector 0) holds; 0 for none of `salts`.
fn salts_of(data: &[u8], salts: &[u64]) -> Vec<u64> {
    data.chunks(SECTOR_SIZE as usize)
        .enumerate()
        .map(|(s, bytes)| {
            salts.iter().copied().find(|&salt| first_mismatch(bytes, s as u64, salt).is_none()).unwrap_or(0)
        })
        .collect()
}

/// The unflushed writes of [`volatile_scenario`]: `(first sector, sectors)`, salt 10 + index.
/// 3 and 5 overlap 2; 6 overlaps the FUA write at 512..520.
const UNFLUSHED: [(u64, u64); 7] = [(256, 16), (288, 8), (320, 32), (336, 8), (384, 24), (328, 16), (512, 4)];

/// One power cut with seed `seed` over a known history: flushed writes (salt 2 over
/// 0..128), FUA writes (salt 3 over 512..520), then the unflushed writes above. Checks
/// that reads see every write before the cut, that the media holds only durable writes
/// until the cut, and that after it every sector holds its durable data or one of its
/// unflushed versions. Returns the report and the salt of every sector of 0..640.
fn volatile_scenario(seed: u64) -> (PowerCut, Vec<u64>) {
    let dev = FaultDevice::new(disk(1 << 20, 512));
    let ctl = dev.control();
    let mut q = dev.open_queue(4).unwrap();
    assert!(!dev.info().volatile_cache, "unarmed, a fault device is as its inner one");
    assert_eq!(write_pattern(&mut *q, 0, 2048, 1), Ok(()), "old contents everywhere, before arming");
    ctl.volatile_cache(None, seed);
    for i in 0..8 {
        assert_eq!(write_pattern(&mut *q, i * 16, 16, 2), Ok(()));
    }
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    assert_eq!(write_pattern(&mut *q, 512, 8, 9), Ok(()), "a cached write the FUA write replaces");
    assert_eq!(write_fua(&mut *q, 512, 8, 3), Ok(()));
    for (i, &(sector, sectors)) in UNFLUSHED.iter().enumerate() {
        assert_eq!(write_pattern(&mut *q, sector, sectors, 10 + i as u64), Ok(()), "acknowledged from the cache");
    }
    assert_eq!(ctl.cached_writes(), UNFLUSHED.len() as u64);
    let all: Vec<u64> = [1, 2, 3, 9].into_iter().chain(10..10 + UNFLUSHED.len() as u64).collect();
    // The newest version of every sector, as the model sees it.
    let mut newest = vec![1u64; 640];
    (0..128).for_each(|s| newest[s] = 2);
    (512..520).for_each(|s| newest[s] = 3);
    for (i, &(sector, sectors)) in UNFLUSHED.iter().enumerate() {
        (sector..sector + sectors).for_each(|s| newest[s as usize] = 10 + i as u64);
    }
    assert_eq!(salts_of(&read_back(&mut *q, 0, 640), &all), newest, "reads see the cache");
    let mut media = dev.inner().open_queue(2).unwrap();
    let mut durable = vec![1u64; 640];
    (0..128).for_each(|s| durable[s] = 2);
    (512..520).for_each(|s| durable[s] = 3);
    assert_eq!(salts_of(&read_back(&mut *media, 0, 640), &all), durable, "the media holds the durable writes only");

    let report = ctl.power_cut();
    assert_eq!(report.unflushed, UNFLUSHED.len() as u64);
    assert_eq!(report.lost + report.torn + report.whole, report.unflushed);
    assert!(ctl.power_lost());
    let after = salts_of(&read_back(&mut *media, 0, 640), &all);
    for s in 0..640usize {
        let versions: Vec<u64> = UNFLUSHED
            .iter()
            .enumerate()
            .filter(|(_, &(sector, sectors))| (sector..sector + sectors).contains(&(s as u64)))
            .map(|(i, _)| 10 + i as u64)
            .collect();
        assert!(
            after[s] == durable[s] || versions.contains(&after[s]),
            "seed {seed}: sector {s} holds salt {} (durable {}, unflushed versions {versions:?})",
            after[s],
            durable[s]
        );
    }
    assert_eq!(salts_of(&read_back(&mut *q, 0, 640), &all), after, "after the cut, reads show the media");
    assert_eq!(write_pattern(&mut *q, 0, 8, 77), Ok(()), "writes after the cut are acknowledged");
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    assert_eq!(first_mismatch(&read_back(&mut *media, 0, 8), 0, 2), None, "… and vanish");
    (report, after)
}

#[test]
fn volatile_cache_loses_tears_and_reorders_unflushed_writes_but_never_flushed_or_fua_ones() {
    let mut lost_some = false;
    let mut kept_all = false;
    let mut reordered = false;
    let mut torn = false;
    let mut stale = false;
    for seed in 0..64u64 {
        let (report, after) = volatile_scenario(seed);
        assert_eq!(volatile_scenario(seed).1, after, "seed {seed}: one seed, one outcome");
        let landed = |i: usize| {
            let (sector, sectors) = UNFLUSHED[i];
            (sector..sector + sectors).any(|s| after[s as usize] == 10 + i as u64)
        };
        lost_some |= report.lost > 0;
        kept_all |= report.lost == 0;
        torn |= report.torn > 0;
        // Write 4 overlaps nothing: if it landed while write 0 or 1 (also alone) did
        // not, a later write reached the media before an earlier one.
        if landed(4) && (!landed(0) || !landed(1)) {
            assert!(report.reordered, "seed {seed}: the report says so");
            reordered = true;
        }
        stale |= report.stale_blocks > 0;
    }
    assert!(lost_some, "some seed loses an unflushed write");
    assert!(kept_all, "some seed keeps every unflushed write");
    assert!(reordered, "some seed lands a later write while losing an earlier one");
    assert!(torn, "some seed tears a write");
    assert!(stale, "some seed applies overlapping survivors out of order");
}

#[test]
fn volatile_cache_from_a_spec_cuts_the_power_at_the_nth_write() {
    let dev = open_backend("fault:volatile-cache,power-loss=6,seed=5@mem:1M").unwrap();
    let mut q = dev.open_queue(4).unwrap();
    for i in 0..4 {
        assert_eq!(write_pattern(&mut *q, i * 8, 8, 1), Ok(()));
    }
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    assert_eq!(write_pattern(&mut *q, 64, 8, 2), Ok(()), "write 5, cached");
    assert_eq!(write_pattern(&mut *q, 72, 8, 2), Ok(()), "write 6: the power goes");
    assert_eq!(write_pattern(&mut *q, 80, 8, 2), Ok(()), "write 7 is acknowledged by a dead disk");
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    let data = read_back(&mut *q, 0, 96);
    assert_eq!(first_mismatch(&data[..32 * 512], 0, 1), None, "flushed writes survive");
    assert!(data[80 * 512..].iter().all(|&b| b == 0), "writes after the cut vanish");
}

/// Writes completed before a flush that completed survive a cut, whichever thread
/// wrote them and whichever flushed.
#[test]
fn volatile_cache_flush_covers_every_queue() {
    let dev = Arc::new(FaultDevice::new(disk(4 << 20, 512)));
    let ctl = dev.control();
    ctl.volatile_cache(None, 3);
    write_from_four_threads(&dev);
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(ctl.cached_writes(), 100);
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    assert_eq!(ctl.cached_writes(), 0);
    assert_eq!(write_pattern(&mut *q, 1000, 8, 4), Ok(()));
    ctl.power_cut();
    let mut media = dev.inner().open_queue(2).unwrap();
    assert_eq!(first_mismatch(&read_back(&mut *media, 0, 800), 0, 3), None);
    ctl.disarm();
    assert_eq!(write_pattern(&mut *q, 1000, 8, 5), Ok(()), "powered on again: a plain device");
    assert_eq!(first_mismatch(&read_back(&mut *media, 1000, 8), 1000, 5), None);
}

#[test]
fn devices_sharing_power_lose_it_together() {
    let origin = FaultDevice::new(disk(1 << 20, 512));
    let cow = FaultDevice::new(disk(1 << 20, 512));
    let (oc, cc) = (origin.control(), cow.control());
    oc.share_power_with(&cc);
    // Seed 1 loses some of 16 unflushed writes on the COW disk (checked below).
    oc.volatile_cache(Some(3), 1);
    cc.volatile_cache(None, 1);
    let mut oq = origin.open_queue(4).unwrap();
    let mut cq = cow.open_queue(4).unwrap();
    assert_eq!(write_fua(&mut *cq, 0, 8, 1), Ok(()));
    for i in 0..16 {
        assert_eq!(write_pattern(&mut *cq, 8 + i * 8, 8, 2), Ok(()));
    }
    assert_eq!(write_pattern(&mut *oq, 0, 8, 3), Ok(()));
    assert_eq!(write_pattern(&mut *oq, 8, 8, 3), Ok(()));
    assert!(!cc.power_lost());
    assert_eq!(write_pattern(&mut *oq, 16, 8, 3), Ok(()), "the origin disk's third write cuts the power");
    assert!(oc.power_lost() && cc.power_lost(), "both disks lost power");
    let report = cc.power_cut_report().expect("the COW disk's cache was cut too");
    assert_eq!(report.unflushed, 16);
    assert!(report.lost > 0, "{report:?}");
    assert_eq!(write_pattern(&mut *cq, 512, 8, 4), Ok(()));
    let mut media = cow.inner().open_queue(2).unwrap();
    assert_eq!(first_mismatch(&read_back(&mut *media, 0, 8), 0, 1), None, "the FUA write survived");
    assert!(read_back(&mut *media, 512, 8).iter().all(|&b| b == 0), "the COW disk is off too");
}

mod model {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        /// Any sequence of writes, any cut point and seed: the media equals a model that
        /// applies the writes before the cut whole, the recorded pieces of the torn one,
        /// and nothing after it.
        #[test]
        fn media_after_power_loss_matches_the_model(
            writes in prop::collection::vec((0u64..480, 1u64..32), 1..24),
            cut in 1u64..26,
            seed in any::<u64>(),
        ) {
            let sectors = 512u64;
            let dev = FaultDevice::new(disk(sectors * 512, 512));
            let ctl = dev.control();
            ctl.power_loss_at_write(cut, seed);
            let mut q = dev.open_queue(4).unwrap();
            let mut model = vec![0u64; sectors as usize]; // salt per sector, 0 = never written
            for (i, &(start, len)) in writes.iter().enumerate() {
                let salt = i as u64 + 1;
                prop_assert_eq!(write_pattern(&mut *q, start, len, salt), Ok(()));
                let ordinal = i as u64 + 1;
                if ordinal < cut {
                    (start..start + len).for_each(|s| model[s as usize] = salt);
                } else if ordinal == cut {
                    let torn = ctl.torn_write().unwrap();
                    prop_assert_eq!((torn.sector, torn.sectors), (start, len));
                    for r in torn.applied {
                        prop_assert!(r.start >= start && r.end <= start + len);
                        r.for_each(|s| model[s as usize] = salt);
                    }
                }
            }
            prop_assert_eq!(ctl.power_lost(), writes.len() as u64 >= cut);
            let mut media = dev.inner().open_queue(2).unwrap();
            let data = read_back(&mut *media, 0, sectors);
            for (s, &salt) in model.iter().enumerate() {
                let bytes = &data[s * 512..(s + 1) * 512];
                if salt == 0 {
                    prop_assert!(bytes.iter().all(|&b| b == 0), "sector {} was never written", s);
                } else {
                    prop_assert_eq!(first_mismatch(bytes, s as u64, salt), None, "sector {} should hold write {}", s, salt);
                }
            }
        }

        /// Any history of cached writes, FUA writes and flushes, cut anywhere with any
        /// seed: every sector ends holding its durable version (the newest one written
        /// before the last flush, or by a FUA write) or a version written after it.
        #[test]
        fn volatile_cache_media_after_a_cut_matches_the_model(
            ops in prop::collection::vec((0u64..5, 0u64..480, 1u64..32), 1..40),
            cut in 1u64..40,
            seed in any::<u64>(),
        ) {
            let sectors = 512usize;
            let dev = FaultDevice::new(disk(sectors as u64 * 512, 512));
            let ctl = dev.control();
            ctl.volatile_cache(Some(cut), seed);
            let mut q = dev.open_queue(4).unwrap();
            prop_assert!(dev.info().volatile_cache, "a volatile cache says it may lose unflushed writes");
            // Per sector: the durable salt (0 = never written) and the salts since.
            let mut durable = vec![0u64; sectors];
            let mut since: Vec<Vec<u64>> = vec![Vec::new(); sectors];
            let mut writes = 0u64;
            for (i, &(kind, start, len)) in ops.iter().enumerate() {
                let salt = i as u64 + 1;
                if kind == 0 {
                    prop_assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
                    if writes < cut {
                        for s in 0..sectors {
                            if let Some(&newest) = since[s].last() {
                                durable[s] = newest;
                            }
                            since[s].clear();
                        }
                    }
                    continue;
                }
                writes += 1;
                let fua = kind == 1;
                // Kind 2: a discard (cached as zeroes, salt 0); 3: a write.
                let (r, salt) = match kind {
                    1 => (write_fua(&mut *q, start, len, salt), salt),
                    2 => (run_one(&mut *q, IoRequest::discard(start, len, 0)), 0),
                    _ => (write_pattern(&mut *q, start, len, salt), salt),
                };
                prop_assert_eq!(r, Ok(()));
                if writes > cut {
                    continue;
                }
                for s in start..start + len {
                    let s = s as usize;
                    if fua && writes < cut {
                        durable[s] = salt;
                        since[s].clear();
                    } else {
                        since[s].push(salt);
                    }
                }
            }
            prop_assert_eq!(ctl.power_lost(), writes >= cut);
            if !ctl.power_lost() {
                ctl.power_cut();
            }
            let mut media = dev.inner().open_queue(2).unwrap();
            let data = read_back(&mut *media, 0, sectors as u64);
            for s in 0..sectors {
                let bytes = &data[s * 512..(s + 1) * 512];
                let ok = |salt: u64| {
                    if salt == 0 { bytes.iter().all(|&b| b == 0) } else { first_mismatch(bytes, s as u64, salt).is_none() }
                };
                prop_assert!(
                    ok(durable[s]) || since[s].iter().any(|&salt| ok(salt)),
                    "sector {} holds neither its durable write {} nor one of {:?}", s, durable[s], since[s]
                );
            }
        }
    }
}
