//! A full COW: `P` invalidates the snapshot (and only it), `PO` overflows on snapshot
//! writes; transient stores; table lines that re-parse to the same table.

mod snapshot_common;
use snapshot_common as common;

use common::{mem_with, status, SyncIo};
use udm_mapping::{Registry, TableSlot};

const ORIGIN: u64 = 2048; // 1 MiB = 256 chunks of 4 KiB
const SMALL_COW: u64 = 512; // 64 chunks: header, area 0, 62 data chunks

fn data(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| tag ^ (i as u8).wrapping_mul(13)).collect()
}

fn setup(original: &[u8]) -> Registry {
    let reg = Registry::new();
    reg.register_backend("odisk", mem_with(original)).unwrap();
    reg.register_backend("smalldisk", mem_with(&vec![0u8; SMALL_COW as usize * 512])).unwrap();
    reg.register_backend("bigdisk", mem_with(&vec![0u8; 4 << 20])).unwrap();
    reg.create("base-real", None, Some(&format!("0 {ORIGIN} linear odisk 0"))).unwrap();
    reg.create("small-cow", None, Some(&format!("0 {SMALL_COW} linear smalldisk 0"))).unwrap();
    reg.create("big-cow", None, Some("0 8192 linear bigdisk 0")).unwrap();
    reg
}

#[test]
fn a_full_persistent_cow_invalidates_that_snapshot_only_and_stays_invalid() {
    let original = data(1, ORIGIN as usize * 512);
    let reg = setup(&original);
    reg.create("small", None, Some(&format!("0 {ORIGIN} snapshot base-real small-cow P 8"))).unwrap();
    reg.create("big", None, Some(&format!("0 {ORIGIN} snapshot base-real big-cow P 8"))).unwrap();
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();
    let new = data(2, ORIGIN as usize * 512);
    let mut base = SyncIo::on(&reg, "base");
    for chunk in 0..ORIGIN / 8 {
        let at = (chunk * 8 * 512) as usize;
        base.write(chunk * 8, &new[at..at + 4096]).unwrap();
    }
    assert_eq!(status(&reg, "small"), "Invalid");
    assert!(SyncIo::on(&reg, "small").read(0, 4096).is_err(), "an invalid snapshot fails reads");
    assert!(SyncIo::on(&reg, "small").write(0, &[0u8; 4096]).is_err(), "and writes");
    assert!(base.read_all(ORIGIN).unwrap() == new, "the origin took every write");
    assert!(SyncIo::on(&reg, "big").read_all(ORIGIN).unwrap() == original, "the other snapshot is intact");
    assert_eq!(status(&reg, "big"), "2072/8192 24");
    drop(base);
    for name in ["base", "small", "big"] {
        reg.remove(name, false).unwrap();
    }
    let header = SyncIo::new(reg.device("smalldisk").unwrap().as_ref()).read(0, 512).unwrap();
    assert_eq!(&header[..8], &[0x53, 0x6e, 0x41, 0x70, 0, 0, 0, 0], "header valid = 0 on disk");
    reg.create("small", None, Some(&format!("0 {ORIGIN} snapshot base-real small-cow P 8"))).unwrap();
    assert_eq!(status(&reg, "small"), "Invalid", "it stays invalid when reactivated");
}

#[test]
fn a_full_po_cow_overflows_on_snapshot_writes_and_comes_back_valid() {
    let original = data(3, ORIGIN as usize * 512);
    let reg = setup(&original);
    reg.create("small", None, Some(&format!("0 {ORIGIN} snapshot base-real small-cow PO 8"))).unwrap();
    assert_eq!(reg.table("small", TableSlot::Live).unwrap(), format!("0 {ORIGIN} snapshot base-real small-cow PO 8\n"));
    let mut snap = SyncIo::on(&reg, "small");
    let mut expected = original.clone();
    let mut failed = 0;
    for chunk in 0..64u64 {
        let d = data(chunk as u8, 4096);
        match snap.write(chunk * 8, &d) {
            Ok(()) => expected[(chunk * 4096) as usize..((chunk + 1) * 4096) as usize].copy_from_slice(&d),
            Err(_) => failed += 1,
        }
    }
    assert_eq!(failed, 2, "62 data chunks fit");
    assert_eq!(status(&reg, "small"), "Overflow");
    assert!(snap.read_all(ORIGIN).unwrap() == expected, "reads keep working");
    drop(snap);
    reg.remove("small", false).unwrap();
    let header = SyncIo::new(reg.device("smalldisk").unwrap().as_ref()).read(0, 512).unwrap();
    assert_eq!(&header[4..8], &[1, 0, 0, 0], "overflow is not recorded on disk");
    reg.create("small", None, Some(&format!("0 {ORIGIN} snapshot base-real small-cow PO 8"))).unwrap();
    assert_eq!(status(&reg, "small"), "512/512 16", "valid again, and full");
    assert!(SyncIo::on(&reg, "small").read_all(ORIGIN).unwrap() == expected);
}

#[test]
fn transient_snapshots_report_the_kernels_status() {
    let original = data(4, ORIGIN as usize * 512);
    let reg = setup(&original);
    reg.create("small", None, Some(&format!("0 {ORIGIN} snapshot base-real small-cow n 8"))).unwrap();
    assert_eq!(reg.table("small", TableSlot::Live).unwrap(), format!("0 {ORIGIN} snapshot base-real small-cow N 8\n"));
    assert_eq!(status(&reg, "small"), "0/512 0");
    reg.create("base", None, Some(&format!("0 {ORIGIN} snapshot-origin base-real"))).unwrap();
    SyncIo::on(&reg, "base").write(100, &[9u8; 512]).unwrap();
    assert_eq!(status(&reg, "small"), "8/512 0");
    assert!(SyncIo::on(&reg, "small").read_all(ORIGIN).unwrap() == original);
}

#[test]
fn table_lines_reparse_to_the_same_table_and_bad_lines_are_refused() {
    let reg = setup(&data(5, ORIGIN as usize * 512));
    for table in [
        format!("0 {ORIGIN} snapshot base-real big-cow P 16"),
        format!("0 {ORIGIN} snapshot-origin base-real"),
        format!("0 {ORIGIN} snapshot-merge base-real big-cow P 16"),
    ] {
        reg.create("t", None, Some(&table)).unwrap();
        let printed = reg.table("t", TableSlot::Live).unwrap();
        assert_eq!(printed, format!("{table}\n"));
        reg.remove("t", false).unwrap();
        reg.create("t", None, Some(&printed)).unwrap();
        assert_eq!(reg.table("t", TableSlot::Live).unwrap(), printed);
        reg.remove("t", false).unwrap();
    }
    for bad in [
        format!("0 {ORIGIN} snapshot base-real big-cow X 8"),
        format!("0 {ORIGIN} snapshot base-real big-cow P 12"),
        format!("0 {ORIGIN} snapshot base-real base-real P 8"),
        format!("0 {ORIGIN} snapshot base-real big-cow P"),
        format!("0 {ORIGIN} snapshot-merge base-real big-cow N 8"),
        format!("0 {} snapshot base-real big-cow P 8", ORIGIN + 8),
        "0 8 snapshot-origin".to_string(),
    ] {
        let err = reg.create("t", None, Some(&bad)).unwrap_err();
        assert!(!err.to_string().is_empty(), "{bad}");
        assert!(reg.device("t").is_err());
    }
    // One COW serves one snapshot at a time: another origin cannot take it, and only
    // one table may stand ready to take it over.
    reg.create("a", None, Some(&format!("0 {ORIGIN} snapshot base-real big-cow P 8"))).unwrap();
    reg.create("other-real", None, Some(&format!("0 {ORIGIN} linear odisk 0"))).unwrap();
    let err = reg.create("b", None, Some(&format!("0 {ORIGIN} snapshot other-real big-cow P 8"))).unwrap_err();
    assert!(err.to_string().contains("another origin"), "{err}");
    reg.load("a", &format!("0 {ORIGIN} snapshot base-real big-cow P 8")).unwrap();
    let err = reg.create("b", None, Some(&format!("0 {ORIGIN} snapshot base-real big-cow P 8"))).unwrap_err();
    assert!(err.to_string().contains("only one handover"), "{err}");
}
