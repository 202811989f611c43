//! null and mem: data integrity across threads, every error path, queue-full hand-back,
//! and the hugepage fallback of the RAM disk.

mod common;

use std::sync::Arc;

use common::*;
use udm_drivers::backends::mem::MemDevice;
use udm_drivers::backends::null::NullDevice;
use udm_drivers::dma::{free_hugepages, PageKind, PagePolicy};
use udm_drivers::{BlockDevice, Completion, IoError, IoOp, IoRequest, SECTOR_SIZE};

#[test]
fn mem_whole_device_integrity_four_threads() {
    whole_device_integrity(Arc::new(MemDevice::new(16 << 20, 512).unwrap()), 4, 64 << 10, 1);
}

#[test]
fn mem_4k_blocks_integrity() {
    whole_device_integrity(Arc::new(MemDevice::new(8 << 20, 4096).unwrap()), 2, 16 << 10, 2);
}

#[test]
fn null_reads_zeroes_and_stores_nothing() {
    let dev = NullDevice::new(1 << 20, 512).unwrap();
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 16, 9), Ok(()));
    assert!(read_back(&mut *q, 0, 16).iter().all(|&b| b == 0));
    assert_eq!(run_one(&mut *q, IoRequest::discard(0, 16, 0)), Ok(()));
    assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
}

#[test]
fn null_without_read_zeroes_leaves_read_buffers_untouched() {
    for (zeroes, expect) in [(true, 0u8), (false, 0xab)] {
        let dev = NullDevice::new(1 << 20, 512).unwrap().with_read_zeroes(zeroes);
        let mut q = dev.open_queue(4).unwrap();
        let b = Buffer::new(4096);
        b.bytes().fill(0xab);
        assert_eq!(run_one(&mut *q, IoRequest::read(8, b.sg(), 0)), Ok(()));
        assert!(b.bytes().iter().all(|&x| x == expect), "read_zeroes={zeroes}");
    }
}

#[test]
fn mem_discard_and_write_zeroes_zero_the_range_only() {
    let dev = MemDevice::new(4 << 20, 512).unwrap();
    let mut q = dev.open_queue(4).unwrap();
    let total = dev.info().sectors;
    assert_eq!(write_pattern(&mut *q, 0, total, 4), Ok(()));
    // A large discard (whole pages given back to the kernel) and a small, unaligned one.
    assert_eq!(run_one(&mut *q, IoRequest::discard(3, 2000, 0)), Ok(()));
    assert_eq!(run_one(&mut *q, IoRequest::write_zeroes(4001, 5, 0)), Ok(()));
    let data = read_back(&mut *q, 0, total);
    for s in 0..total {
        let bytes = &data[(s * SECTOR_SIZE) as usize..((s + 1) * SECTOR_SIZE) as usize];
        if (3..2003).contains(&s) || (4001..4006).contains(&s) {
            assert!(bytes.iter().all(|&b| b == 0), "sector {s} should be zero");
        } else {
            assert_eq!(first_mismatch(bytes, s, 4), None, "sector {s} should be intact");
        }
    }
}

#[test]
fn every_error_path_of_null_and_mem() {
    let devices: Vec<Arc<dyn BlockDevice>> =
        vec![Arc::new(NullDevice::new(1 << 20, 4096).unwrap()), Arc::new(MemDevice::new(1 << 20, 4096).unwrap())];
    for dev in devices {
        let mut q = dev.open_queue(2).unwrap();
        let b = Buffer::new(8192);
        let sg = b.sg().slice(0, 4096);
        let sectors = dev.info().sectors;
        assert!(matches!(run_one(&mut *q, IoRequest::read(sectors - 4, b.sg(), 0)), Err(IoError::OutOfRange { .. })));
        assert!(matches!(run_one(&mut *q, IoRequest::write(u64::MAX - 7, sg, 0)), Err(IoError::OutOfRange { .. })));
        assert!(matches!(run_one(&mut *q, IoRequest::write(4, sg, 0)), Err(IoError::Misaligned { .. })));
        assert!(matches!(run_one(&mut *q, IoRequest::discard(8, 3, 0)), Err(IoError::Misaligned { .. })));
        let mut wrong_len = IoRequest::read(0, sg, 0);
        wrong_len.sectors = 16;
        assert!(matches!(run_one(&mut *q, wrong_len), Err(IoError::BadBuffer { .. })));
        // Queue full: the request comes back untouched, and the queue recovers after a poll.
        q.submit(IoRequest::read(0, sg, 1)).unwrap();
        q.submit(IoRequest::read(8, sg, 2)).unwrap();
        let back = q.submit(IoRequest::read(16, sg, 3)).unwrap_err();
        assert_eq!((back.0.tag, back.0.sector, back.0.op), (3, 16, IoOp::Read));
        let mut out = [Completion::EMPTY; 4];
        assert_eq!(q.poll(&mut out), 2);
        q.submit(back.0).unwrap();
        assert_eq!(q.poll(&mut out), 1);
        assert_eq!(out[0], Completion { tag: 3, result: Ok(()) });
    }
}

#[test]
fn bad_geometry_is_refused_with_a_reason() {
    for (bytes, bs) in [(0, 512), (1000, 512), (1 << 20, 3000), (1 << 20, 8192)] {
        let e = MemDevice::new(bytes, bs).unwrap_err().to_string();
        assert!(e.contains("block size") || e.contains("multiple"), "{e}");
        assert!(NullDevice::new(bytes, bs).is_err());
    }
}

/// The RAM disk takes hugepages when the host has them and falls back (with a warning)
/// to ordinary pages when it does not; asking for hugepages only fails clearly.
#[test]
fn mem_hugepage_fallback() {
    let dev = MemDevice::new(4 << 20, 512).unwrap();
    if free_hugepages() >= 2 {
        assert_eq!(dev.page_kind(), PageKind::Huge);
    } else {
        assert_eq!(dev.page_kind(), PageKind::Normal);
        let e = MemDevice::with_policy(4 << 20, 512, PagePolicy::RequireHuge).unwrap_err().to_string();
        assert!(e.contains("nr_hugepages"), "{e}");
    }
    // Either way it is a working disk.
    let mut q = dev.open_queue(2).unwrap();
    assert_eq!(write_pattern(&mut *q, 100, 8, 3), Ok(()));
    assert_eq!(first_mismatch(&read_back(&mut *q, 100, 8), 100, 3), None);
}
