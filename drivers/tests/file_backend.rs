//! The io_uring file backend on a real file (O_DIRECT on the test machine's file system,
//! buffered on request) and on a loop block device when the host allows it.

mod common;

use std::sync::Arc;

use common::*;
use udm_drivers::backend_spec::open_backend;
use udm_drivers::backends::file::{FileDevice, FileKind, FileOptions};
use udm_drivers::{BlockDevice, IoError, IoOp, IoRequest, SECTOR_SIZE};

fn image(bytes: u64) -> tempfile::NamedTempFile {
    // Under target/ (on the project's file system) rather than /tmp, which may be tmpfs.
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let f = tempfile::NamedTempFile::new_in(dir).unwrap();
    f.as_file().set_len(bytes).unwrap();
    f
}

#[test]
fn whole_device_integrity_direct_several_threads() {
    let img = image(16 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    assert_eq!(dev.kind(), FileKind::Regular);
    whole_device_integrity(Arc::new(dev), 3, 64 << 10, 11);
}

#[test]
fn whole_device_integrity_buffered() {
    let img = image(8 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions { direct: false, ..FileOptions::default() }).unwrap();
    assert!(!dev.is_direct());
    assert_eq!(dev.info().logical_block_size, 512);
    whole_device_integrity(Arc::new(dev), 2, 12 << 10, 12);
}

#[test]
fn data_survives_reopening_and_fua_and_flush_succeed() {
    let img = image(4 << 20);
    {
        let dev = open_backend(&format!("file:{}", img.path().display())).unwrap();
        let mut q = dev.open_queue(4).unwrap();
        let b = Buffer::new(8192);
        fill(b.bytes(), 64, 5);
        assert_eq!(run_one(&mut *q, IoRequest::write(64, b.sg(), 0).with_fua()), Ok(()));
        assert_eq!(run_one(&mut *q, IoRequest::flush(0)), Ok(()));
    }
    let dev = open_backend(&format!("file:{},ro", img.path().display())).unwrap();
    assert!(dev.info().read_only);
    let mut q = dev.open_queue(4).unwrap();
    let data = read_back(&mut *q, 64, 16);
    assert_eq!(first_mismatch(&data, 64, 5), None);
    let b = Buffer::new(4096);
    assert_eq!(run_one(&mut *q, IoRequest::write(0, b.sg(), 0)), Err(IoError::ReadOnly { op: IoOp::Write }));
    assert_eq!(run_one(&mut *q, IoRequest::discard(0, 8, 0)), Err(IoError::ReadOnly { op: IoOp::Discard }));
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let img = image(4 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(8).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 1024, 3), Ok(()));
    assert_eq!(run_one(&mut *q, IoRequest::discard(8, 128, 0)), Ok(()));
    assert_eq!(run_one(&mut *q, IoRequest::write_zeroes(512, 256, 0)), Ok(()));
    let data = read_back(&mut *q, 0, 1024);
    for s in 0..1024u64 {
        let bytes = &data[(s * SECTOR_SIZE) as usize..((s + 1) * SECTOR_SIZE) as usize];
        let zeroed = (8..136).contains(&s) || (512..768).contains(&s);
        if zeroed {
            assert!(bytes.iter().all(|&b| b == 0), "sector {s} should read zeroes");
        } else {
            assert_eq!(first_mismatch(bytes, s, 3), None, "sector {s} should keep its data");
        }
    }
    // Punching holes really freed space.
    use std::os::unix::fs::MetadataExt;
    assert!(img.as_file().metadata().unwrap().blocks() * 512 < 4 << 20);
}

#[test]
fn many_requests_in_flight_and_queue_full_hands_back() {
    let img = image(8 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(32).unwrap();
    assert_eq!(q.depth(), 32);
    let bufs: Vec<Buffer> = (0..33).map(|_| Buffer::new(4096)).collect();
    for (i, b) in bufs.iter().enumerate().take(32) {
        q.submit(IoRequest::read(i as u64 * 8, b.sg(), i as u64)).unwrap();
    }
    assert_eq!(q.in_flight(), 32);
    let full = q.submit(IoRequest::read(0, bufs[32].sg(), 99)).unwrap_err();
    assert_eq!(full.0.tag, 99);
    q.kick();
    let mut out = [udm_drivers::Completion::EMPTY; 64];
    let mut seen = 0;
    while q.in_flight() > 0 {
        let n = q.poll(&mut out);
        assert!(out[..n].iter().all(|c| c.result.is_ok()));
        seen += n;
    }
    assert_eq!(seen, 32);
}

/// Sleeping in `wait` instead of spinning: it sends the requests (no kick needed) and
/// returns once completions are there to poll.
#[test]
fn wait_submits_and_sleeps_until_completions_arrive() {
    let img = image(4 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(16).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 1024, 13), Ok(()));
    let bufs: Vec<Buffer> = (0..16).map(|_| Buffer::new(4096)).collect();
    for (i, b) in bufs.iter().enumerate() {
        q.submit(IoRequest::read(i as u64 * 64, b.sg(), i as u64)).unwrap();
    }
    let mut out = [udm_drivers::Completion::EMPTY; 16];
    let mut got = 0;
    while got < 16 {
        q.wait(std::time::Duration::from_secs(5));
        let n = q.poll(&mut out);
        assert!(out[..n].iter().all(|c| c.result.is_ok()));
        got += n;
    }
    assert_eq!(q.in_flight(), 0);
    for (i, b) in bufs.iter().enumerate() {
        assert_eq!(first_mismatch(b.bytes(), i as u64 * 64, 13), None);
    }
    // Nothing in flight: returns at once instead of sleeping for the timeout.
    q.wait(std::time::Duration::from_secs(3600));
}

#[test]
fn a_queue_opened_on_one_thread_works_on_another() {
    let img = image(1 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(4).unwrap();
    let unused = dev.open_queue(4).unwrap();
    std::thread::spawn(move || {
        assert_eq!(write_pattern(&mut *q, 8, 8, 6), Ok(()));
        assert_eq!(first_mismatch(&read_back(&mut *q, 8, 8), 8, 6), None);
        drop(unused);
    })
    .join()
    .unwrap();
}

/// Pages pinned long-term by this process (io_uring registered buffers count here).
fn pinned_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmPin:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn registered_memory_uses_fixed_buffers_and_can_be_withdrawn() {
    let img = image(4 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(8).unwrap();
    let registered = Buffer::new(1 << 20);
    let region = registered.mem.region();
    let before = pinned_kib();
    dev.register_memory(region).unwrap();
    // Whole 64 KiB pieces of the registered memory (single-buffer requests go through
    // READ_FIXED/WRITE_FIXED), and an unregistered buffer beside them.
    let whole: Vec<udm_drivers::IoSegment> = (0..16)
        // SAFETY: inside `registered`, which outlives the requests.
        .map(|i| unsafe { udm_drivers::IoSegment::new(registered.mem.as_ptr().add(i << 16), 1 << 16) })
        .collect();
    // SAFETY: `whole` and `registered` outlive the requests.
    let lists: Vec<udm_drivers::SgList> =
        whole.iter().map(|s| unsafe { udm_drivers::SgList::from_segment(s) }).collect();
    fill(registered.bytes(), 0, 8);
    let writes: Vec<IoRequest> = (0..16).map(|i| IoRequest::write(i as u64 * 128, lists[i], 0)).collect();
    assert!(run(&mut *q, &writes).iter().all(|r| r.is_ok()));
    assert!(pinned_kib() >= before + 1024, "the megabyte is pinned by the ring: {} -> {}", before, pinned_kib());
    registered.bytes().fill(0);
    let reads: Vec<IoRequest> = (0..16).map(|i| IoRequest::read(i as u64 * 128, lists[i], 0)).collect();
    assert!(run(&mut *q, &reads).iter().all(|r| r.is_ok()));
    assert_eq!(first_mismatch(registered.bytes(), 0, 8), None);
    assert_eq!(first_mismatch(&read_back(&mut *q, 0, 2048), 0, 8), None);
    // Withdrawn: the next request drops the registration and still works.
    dev.unregister_memory(region).unwrap();
    assert!(dev.unregister_memory(region).is_err(), "unknown regions are refused");
    assert_eq!(run_one(&mut *q, IoRequest::read(0, lists[0], 0)), Ok(()));
    assert!(pinned_kib() < before + 1024);
}

#[test]
fn every_error_path_fails_the_request_not_the_queue() {
    let img = image(1 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions { block_size: Some(4096), ..FileOptions::default() }).unwrap();
    assert_eq!(dev.info().logical_block_size, 4096);
    let mut q = dev.open_queue(4).unwrap();
    let b = Buffer::new(8192);
    let sg = b.sg().slice(0, 4096);
    let sectors = dev.info().sectors;
    assert!(matches!(run_one(&mut *q, IoRequest::read(sectors, sg, 0)), Err(IoError::OutOfRange { .. })));
    assert!(matches!(run_one(&mut *q, IoRequest::read(1, sg, 0)), Err(IoError::Misaligned { .. })));
    let mut short = IoRequest::read(0, sg, 0);
    short.sectors = 16;
    assert!(matches!(run_one(&mut *q, short), Err(IoError::BadBuffer { .. })));
    // O_DIRECT needs aligned memory: a buffer one byte off is refused up front.
    let odd = b.sg().slice(1, 4096);
    if dev.is_direct() {
        assert!(matches!(run_one(&mut *q, IoRequest::read(0, odd, 0)), Err(IoError::BadBuffer { .. })));
    }
    // The queue still works.
    assert_eq!(run_one(&mut *q, IoRequest::read(0, sg, 0)), Ok(()));
}

/// A file that shrinks under the device: reads that reach the new end come back short;
/// the queue continues them from where they stopped and fails what lies past the end.
#[test]
fn short_reads_are_continued_and_reads_past_a_shrunken_end_fail() {
    let img = image(1 << 20);
    let dev = FileDevice::open(img.path(), &FileOptions::default()).unwrap();
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(write_pattern(&mut *q, 0, 2048, 2), Ok(()));
    img.as_file().set_len(512 << 10).unwrap();
    let b = Buffer::new(8192);
    // Entirely inside the remaining part: fine.
    assert_eq!(run_one(&mut *q, IoRequest::read(1000, b.sg(), 0)), Ok(()));
    assert_eq!(first_mismatch(b.bytes(), 1000, 2), None);
    // Straddling the new end: the first 4 KiB arrive, then end of file.
    assert_eq!(run_one(&mut *q, IoRequest::read(1016, b.sg(), 0)), Err(IoError::Host { errno: libc::EIO }));
    assert_eq!(first_mismatch(&b.bytes()[..4096], 1016, 2), None);
    // Wholly past it.
    assert_eq!(run_one(&mut *q, IoRequest::read(1536, b.sg(), 0)), Err(IoError::Host { errno: libc::EIO }));
}

#[test]
fn opening_bad_files_says_what_to_do() {
    let e = FileDevice::open("/nonexistent/x.img", &FileOptions::default()).unwrap_err().to_string();
    assert!(e.contains("truncate"), "{e}");
    let empty = image(0);
    let e = FileDevice::open(empty.path(), &FileOptions::default()).unwrap_err().to_string();
    assert!(e.contains("less than one"), "{e}");
    let e = FileDevice::open("/dev/null", &FileOptions::default()).unwrap_err().to_string();
    assert!(e.contains("neither a regular file nor a block device"), "{e}");
    let img = image(1 << 20);
    let e = FileDevice::open(img.path(), &FileOptions { block_size: Some(3000), ..FileOptions::default() })
        .unwrap_err()
        .to_string();
    assert!(e.contains("block size"), "{e}");
}

/// A loop device over an image: the block-device path (BLKSSZGET, size by seeking,
/// discard through fallocate). Needs root and loop devices, as CI has.
#[test]
fn loop_block_device() {
    let img = image(8 << 20);
    let out = std::process::Command::new("losetup").args(["-f", "--show"]).arg(img.path()).output();
    let loopdev = match out {
        Ok(o) if o.status.success() => String::from_utf8(o.stdout).unwrap().trim().to_string(),
        other => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must be able to create loop devices (losetup as root): {other:?}"
            );
            eprintln!("skipping: cannot create a loop device here: {other:?}");
            return;
        }
    };
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup").arg("-d").arg(&self.0).status();
        }
    }
    let _detach = Detach(loopdev.clone());
    let dev = FileDevice::open(&loopdev, &FileOptions::default()).unwrap();
    assert_eq!(dev.kind(), FileKind::BlockDevice);
    assert_eq!(dev.info().sectors, (8 << 20) / 512);
    let dev: Arc<dyn BlockDevice> = Arc::new(dev);
    whole_device_integrity(Arc::clone(&dev), 2, 32 << 10, 21);
    let mut q = dev.open_queue(4).unwrap();
    assert_eq!(run_one(&mut *q, IoRequest::write_zeroes(0, 64, 0)), Ok(()));
    assert!(read_back(&mut *q, 0, 64).iter().all(|&b| b == 0));
    // A loop device over a file on ext4 discards by punching holes in the file.
    assert_eq!(write_pattern(&mut *q, 64, 64, 4), Ok(()));
    assert!(dev.info().supports_discard);
    assert_eq!(run_one(&mut *q, IoRequest::discard(64, 64, 0)), Ok(()));
    assert!(read_back(&mut *q, 64, 64).iter().all(|&b| b == 0));
}
