//! The LVM-style operations: create, list, extend, merge, remove.

mod snapshot_common;
use snapshot_common as common;

use std::time::{Duration, Instant};

use common::{mem_with, SyncIo};
use udm_mapping::snapshot_ops::{self, CowSource, CreateOptions, ExistingCow};
use udm_mapping::{Registry, TableSlot};

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(tag)).collect()
}

fn opts(cow: &str, chunk: u64) -> CreateOptions {
    CreateOptions { cow: CowSource::parse(cow), chunk_sectors: chunk, persistent: true, existing: ExistingCow::Refuse }
}

#[test]
fn create_builds_lvms_stack_and_the_snapshot_keeps_the_old_data() {
    let reg = Registry::new();
    let a = pattern(1, 4 << 20);
    reg.register_backend("disk", mem_with(&a)).unwrap();
    reg.create("vol", None, Some("0 8192 linear disk 0")).unwrap();
    snapshot_ops::create(&reg, "vol", "snap", &opts("1M", 8)).unwrap();
    assert_eq!(reg.table("vol-real", TableSlot::Live).unwrap(), "0 8192 linear disk 0\n");
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 8192 snapshot-origin vol-real\n");
    assert_eq!(reg.table("snap-cow", TableSlot::Live).unwrap(), "0 2048 linear snap-cowdev 0\n");
    assert_eq!(reg.table("snap", TableSlot::Live).unwrap(), "0 8192 snapshot vol-real snap-cow P 8\n");

    let b = pattern(2, 256 << 10);
    SyncIo::on(&reg, "vol").write(0, &b).unwrap();
    let snap = SyncIo::on(&reg, "snap").read_all(8192).unwrap();
    assert!(snap == a, "the snapshot shows the origin as it was");
    let list = snapshot_ops::list(&reg);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].origin, "vol");
    assert_eq!(list[0].status, "528/2048 16");
    assert_eq!(list[0].data_percent(), "25.78");

    // Growing the COW online: the status follows.
    let size = snapshot_ops::extend(&reg, "snap", &CowSource::parse("1M")).unwrap();
    assert_eq!(size, 4096);
    assert_eq!(snapshot_ops::list(&reg)[0].status, "528/4096 16");
    SyncIo::on(&reg, "vol").write(1024, &b).unwrap();
    assert!(SyncIo::on(&reg, "snap").read_all(8192).unwrap() == a);

    // Removing the last snapshot restores the plain origin.
    snapshot_ops::remove(&reg, "snap").unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 8192 linear disk 0\n");
    for gone in ["snap", "snap-cow", "snap-cowdev", "snap-cowdev1", "vol-real"] {
        assert!(reg.device(gone).is_err(), "{gone} should be gone");
    }
}

#[test]
fn two_snapshots_then_merge_one_back() {
    let reg = Registry::new();
    let a = pattern(1, 4 << 20);
    reg.register_backend("disk", mem_with(&a)).unwrap();
    reg.register_backend("cows", mem_with(&vec![0u8; 4 << 20])).unwrap();
    reg.create("vol", None, Some("0 8192 linear disk 0")).unwrap();
    let s1 = CreateOptions {
        cow: CowSource::Device { name: "cows".into(), offset: 0, sectors: Some(4096) },
        chunk_sectors: 8,
        persistent: true,
        existing: ExistingCow::Refuse,
    };
    snapshot_ops::create(&reg, "vol", "s1", &s1).unwrap();
    let b = pattern(2, 1 << 20);
    SyncIo::on(&reg, "vol").write(2048, &b).unwrap();
    let mut after_b = a.clone();
    after_b[2048 * 512..2048 * 512 + b.len()].copy_from_slice(&b);
    let s2 = CreateOptions {
        cow: CowSource::Device { name: "cows".into(), offset: 4096, sectors: Some(4096) },
        chunk_sectors: 128,
        persistent: true,
        existing: ExistingCow::Refuse,
    };
    snapshot_ops::create(&reg, "vol", "s2", &s2).unwrap();
    assert_eq!(reg.table("s2", TableSlot::Live).unwrap(), "0 8192 snapshot vol-real s2-cow P 128\n");
    let c = pattern(3, 512 << 10);
    SyncIo::on(&reg, "vol").write(0, &c).unwrap();
    assert!(SyncIo::on(&reg, "s1").read_all(8192).unwrap() == a);
    assert!(SyncIo::on(&reg, "s2").read_all(8192).unwrap() == after_b);

    snapshot_ops::merge(&reg, "s1").unwrap();
    let started = Instant::now();
    while !snapshot_ops::merge_progress(&reg, "vol").unwrap().done {
        assert!(started.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(1));
    }
    snapshot_ops::finish_merge(&reg, "vol").unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 8192 snapshot-origin vol-real\n");
    assert!(SyncIo::on(&reg, "vol").read_all(8192).unwrap() == a, "vol is back to s1's content");
    assert!(SyncIo::on(&reg, "s2").read_all(8192).unwrap() == after_b, "s2 kept its view through the merge");
    assert!(reg.device("s1").is_err() && reg.device("s1-cow").is_err());
    snapshot_ops::remove(&reg, "s2").unwrap();
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 8192 linear disk 0\n");
}

#[test]
fn bad_requests_are_refused_and_change_nothing() {
    let reg = Registry::new();
    reg.register_backend("disk", mem_with(&vec![0u8; 1 << 20])).unwrap();
    reg.create("vol", None, Some("0 2048 linear disk 0")).unwrap();
    assert!(snapshot_ops::create(&reg, "vol", "s", &opts("1M", 12)).is_err());
    assert!(snapshot_ops::create(&reg, "vol", "s", &opts("nosuchdev", 8)).is_err());
    assert!(snapshot_ops::create(&reg, "vol", "s", &opts("8k", 8)).is_err(), "too small a COW");
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "0 2048 linear disk 0\n");
    assert!(reg.device("vol-real").is_err() && reg.device("s").is_err() && reg.device("s-cow").is_err());
    assert!(snapshot_ops::remove(&reg, "vol").is_err());
    assert!(snapshot_ops::merge(&reg, "vol").is_err());
    assert!(snapshot_ops::list(&reg).is_empty());
}

/// Captured log lines.
#[derive(Clone, Default)]
struct Log(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn filling_cow_stores_warn_at_80_and_95_percent_once_each() {
    let log = Log::default();
    let writer = log.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || writer.clone()).with_ansi(false).finish();
    tracing::subscriber::with_default(subscriber, || {
        let reg = Registry::new();
        reg.register_backend("disk", mem_with(&pattern(1, 1 << 20))).unwrap();
        reg.create("vol", None, Some("0 2048 linear disk 0")).unwrap();
        // 128 KiB of COW = 32 chunks: 80 % is reached at the 24th chunk, 95 % at the 29th.
        snapshot_ops::create(&reg, "vol", "snap", &opts("128k", 8)).unwrap();
        let mut io = SyncIo::on(&reg, "vol");
        for chunk in 0..22u64 {
            io.write(chunk * 8, &pattern(chunk as u8, 4096)).unwrap();
        }
        assert!(!String::from_utf8_lossy(&log.0.lock().unwrap()).contains("full"));
        for chunk in 22..29u64 {
            io.write(chunk * 8, &pattern(chunk as u8, 4096)).unwrap();
        }
    });
    let text = String::from_utf8_lossy(&log.0.lock().unwrap()).to_string();
    let warnings: Vec<&str> = text.lines().filter(|l| l.contains("WARN") && l.contains("% full")).collect();
    assert_eq!(warnings.len(), 2, "{text}");
    assert!(warnings[0].contains("snapshot snap is 8") && warnings[0].contains("extend"), "{}", warnings[0]);
    assert!(warnings[1].contains("snapshot snap is 9"), "{}", warnings[1]);
}
