//! The persistent store's commit protocol: what it writes, in which order, and when it
//! reports exceptions durable.

use udm_drivers::{BlockDevice, IoOp, IoQueue};

use crate::exception_store::dump::dump_image;
use crate::exception_store::{sync_io, Exception, ExceptionStore, PersistentStore, PrepareError, StoreEvent};
use crate::test_fixtures::{mem_device, read_all};

/// One metadata request as the device saw it: (op, sector, fua).
type Seen = (IoOp, u64, bool);

fn new_store(
    cow_chunks: u64,
) -> (PersistentStore, Box<dyn IoQueue>, std::sync::Arc<udm_drivers::backends::mem::MemDevice>) {
    let dev = mem_device(&vec![0u8; cow_chunks as usize * 4096]);
    let mut q = dev.open_queue(4).unwrap();
    let (store, _) = PersistentStore::activate(q.as_mut(), &dev.info(), 8, 1 << 30).unwrap();
    (store, q, dev)
}

/// Runs the due metadata requests, recording them.
fn pump_seen(store: &mut PersistentStore, q: &mut dyn IoQueue) -> Vec<Seen> {
    let mut seen = Vec::new();
    while let Some(req) = store.next_io() {
        seen.push((req.op, req.sector, req.fua));
        let r = sync_io::run(q, req);
        store.io_done(r);
    }
    seen
}

fn events(store: &mut PersistentStore) -> Vec<StoreEvent> {
    let mut ev = Vec::new();
    store.take_events(&mut ev);
    ev
}

#[test]
fn commits_wait_for_every_copy_in_flight_then_flush_and_write_the_area_with_fua() {
    let (mut s, mut q, _dev) = new_store(2048);
    let a = Exception { old_chunk: 10, new_chunk: s.prepare(10).unwrap() };
    let b = Exception { old_chunk: 11, new_chunk: s.prepare(11).unwrap() };
    let c = Exception { old_chunk: 12, new_chunk: s.prepare(12).unwrap() };
    assert_eq!((a.new_chunk, b.new_chunk, c.new_chunk), (2, 3, 4));
    // Copies finish out of order: nothing is written while one is still in flight.
    s.commit(c, true);
    s.commit(a, true);
    assert!(pump_seen(&mut s, q.as_mut()).is_empty());
    assert!(events(&mut s).is_empty());
    s.commit(b, true);
    // One batch: preflush, then the area with FUA; exceptions in allocation order.
    assert_eq!(pump_seen(&mut s, q.as_mut()), vec![(IoOp::Flush, 0, false), (IoOp::Write, 8, true)]);
    assert_eq!(
        events(&mut s),
        vec![StoreEvent::Committed(a, true), StoreEvent::Committed(b, true), StoreEvent::Committed(c, true)]
    );
    assert_eq!(s.exceptions(), &[a, b, c]);
}

#[test]
fn nothing_is_reported_before_the_area_write_completes() {
    let (mut s, mut q, _dev) = new_store(2048);
    let a = Exception { old_chunk: 1, new_chunk: s.prepare(1).unwrap() };
    s.commit(a, true);
    let flush = s.next_io().unwrap();
    assert!(s.next_io().is_none(), "one metadata request at a time");
    s.io_done(sync_io::run(q.as_mut(), flush));
    let write = s.next_io().unwrap();
    assert!(events(&mut s).is_empty());
    s.io_done(sync_io::run(q.as_mut(), write));
    assert_eq!(events(&mut s), vec![StoreEvent::Committed(a, true)]);
}

/// An exception whose copy finished while the preflush was in flight may have data the
/// flush did not cover: the area write that follows must not carry it (it would point
/// at data a power cut can lose), and must not fill the area before the next one is
/// zeroed. It goes durable with the next commit, after its own preflush.
#[test]
fn the_area_write_carries_only_exceptions_its_preflush_covered() {
    let (mut s, mut q, dev) = new_store(2048);
    let a = Exception { old_chunk: 1, new_chunk: s.prepare(1).unwrap() };
    s.commit(a, true);
    let flush = s.next_io().unwrap();
    assert_eq!(flush.op, IoOp::Flush);
    // b is copied while the flush is in flight: its data may have missed it.
    let b = Exception { old_chunk: 2, new_chunk: s.prepare(2).unwrap() };
    s.commit(b, true);
    s.io_done(sync_io::run(q.as_mut(), flush));
    let write = s.next_io().unwrap();
    assert!(write.fua);
    s.io_done(sync_io::run(q.as_mut(), write));
    assert_eq!(events(&mut s), vec![StoreEvent::Committed(a, true)]);
    let area = &read_all(dev.as_ref())[4096..8192];
    assert_eq!(area[16..32], [0u8; 16], "b is not in the area yet");
    assert_eq!(pump_seen(&mut s, q.as_mut()), vec![(IoOp::Flush, 0, false), (IoOp::Write, 8, true)]);
    assert_eq!(events(&mut s), vec![StoreEvent::Committed(b, true)]);
    assert_ne!(read_all(dev.as_ref())[4096 + 16..4096 + 32], [0u8; 16], "b is durable now");
}

#[test]
fn a_full_area_zeroes_the_next_one_first_and_allocation_skips_it() {
    let (mut s, mut q, dev) = new_store(2048);
    let mut all = Vec::new();
    for k in 0..256 {
        let e = Exception { old_chunk: k, new_chunk: s.prepare(k).unwrap() };
        all.push(e);
    }
    assert_eq!(all.last().unwrap().new_chunk, 257);
    for e in &all {
        s.commit(*e, true);
    }
    assert_eq!(
        pump_seen(&mut s, q.as_mut()),
        vec![(IoOp::Write, 258 * 8, false), (IoOp::Flush, 0, false), (IoOp::Write, 8, true)]
    );
    assert_eq!(s.usage().status(), "2072/16384 24");
    assert_eq!(s.prepare(999), Ok(259), "chunk 258 is area 1");
    let dump = dump_image(&read_all(dev.as_ref()));
    assert!(dump.contains("area 0 @chunk 1: 256 exceptions (full)\n"));
    assert!(dump.contains("area 1 @chunk 258: 0 exceptions\n"));
}

/// Fills a COW of `chunks` chunks (cs 8) with 256 exceptions.
fn fill_256(chunks: u64) -> (PersistentStore, Vec<StoreEvent>, Vec<u8>) {
    let (mut s, mut q, dev) = new_store(chunks);
    for k in 0..256 {
        let e = Exception { old_chunk: k, new_chunk: s.prepare(k).unwrap() };
        s.commit(e, true);
        pump_seen(&mut s, q.as_mut());
    }
    let ev = events(&mut s);
    (s, ev, read_all(dev.as_ref()))
}

#[test]
fn a_cow_with_no_room_for_the_next_area_is_invalidated_by_the_last_exception() {
    // As observed in the kernel: 258 chunks -> invalidated by the 256th exception.
    let (s, ev, image) = fill_256(258);
    assert!(!s.is_valid());
    assert!(ev.contains(&StoreEvent::Invalidated));
    assert!(ev.contains(&StoreEvent::Committed(Exception { old_chunk: 255, new_chunk: 257 }, false)));
    assert_eq!(&image[4..8], &[0, 0, 0, 0], "header valid = 0 on disk");
    // 259 chunks -> takes all 256 and reports 2072/2072 24.
    let (mut s, ev, _) = fill_256(259);
    assert!(s.is_valid());
    assert_eq!(ev.len(), 256);
    assert_eq!(s.usage().status(), "2072/2072 24");
    assert_eq!(s.prepare(256), Err(PrepareError::Full));
}

#[test]
fn invalidation_is_written_with_fua_and_failures_are_reported_after_it() {
    let (mut s, mut q, dev) = new_store(2048);
    let a = Exception { old_chunk: 3, new_chunk: s.prepare(3).unwrap() };
    let b = Exception { old_chunk: 4, new_chunk: s.prepare(4).unwrap() };
    s.commit(a, true);
    s.invalidate();
    assert!(events(&mut s).is_empty(), "nothing is reported before the header says invalid");
    assert_eq!(pump_seen(&mut s, q.as_mut()), vec![(IoOp::Write, 0, true)]);
    assert_eq!(events(&mut s), vec![StoreEvent::Invalidated, StoreEvent::Committed(a, false)]);
    s.commit(b, true);
    assert_eq!(events(&mut s), vec![StoreEvent::Committed(b, false)]);
    assert_eq!(s.prepare(5), Err(PrepareError::Invalid));
    assert!(pump_seen(&mut s, q.as_mut()).is_empty(), "no metadata is written after invalidation");
    let image = read_all(dev.as_ref());
    assert_eq!(&image[..16], &[0x53, 0x6e, 0x41, 0x70, 0, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]);
}

#[test]
fn a_failed_copy_invalidates_the_store() {
    let (mut s, mut q, _dev) = new_store(2048);
    let a = Exception { old_chunk: 3, new_chunk: s.prepare(3).unwrap() };
    s.commit(a, false);
    assert_eq!(pump_seen(&mut s, q.as_mut()), vec![(IoOp::Write, 0, true)]);
    assert_eq!(events(&mut s), vec![StoreEvent::Invalidated, StoreEvent::Committed(a, false)]);
}

#[test]
fn a_new_store_is_a_header_and_a_zeroed_area_zero_and_nothing_else() {
    let mut image = vec![0xEEu8; 64 * 4096];
    image[..4096].fill(0);
    let dev = mem_device(&image);
    let mut q = dev.open_queue(4).unwrap();
    let (s, act) = PersistentStore::activate(q.as_mut(), &dev.info(), 8, 1 << 20).unwrap();
    assert!(act.initialised);
    assert_eq!(s.usage().status(), "16/512 16");
    let after = read_all(dev.as_ref());
    assert_eq!(&after[..16], &[0x53, 0x6e, 0x41, 0x70, 1, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0]);
    assert!(after[16..8192].iter().all(|&b| b == 0));
    assert!(after[8192..].iter().all(|&b| b == 0xEE), "stale data elsewhere is left alone");
}
