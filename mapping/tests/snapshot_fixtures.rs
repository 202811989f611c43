//! The snapshot stack against the kernel-made fixtures: the same device stack, the same
//! writes, and the same results as Linux 6.1 (status lines, snapshot and origin
//! contents, and the COW image byte for byte); and every kernel-written COW read back.

mod snapshot_common;
use snapshot_common as common;

use common::{block_hashes, fixture_text, mem_with, status, unxz, SyncIo};
use udm_mapping::{Registry, SuspendFlags, TableSlot};

const W0: [(u64, u64); 5] = [(0, 32), (800, 8), (8000, 512), (16003, 1), (32760, 8)];

/// Builds the fixtures' stack (README "Device stack in the guest"), in their order.
fn build(reg: &Registry, origin: &[u8], cow: &[u8], chunk: u64) {
    reg.register_backend("odisk", mem_with(origin)).unwrap();
    reg.register_backend("cdisk", mem_with(cow)).unwrap();
    reg.create("base-real", None, Some("0 32768 linear odisk 0")).unwrap();
    reg.create("snap-cow", None, Some(&format!("0 {} linear cdisk 0", cow.len() / 512))).unwrap();
    reg.create("snap", None, Some(&format!("0 32768 snapshot base-real snap-cow P {chunk}"))).unwrap();
    reg.create("base", None, Some("0 32768 snapshot-origin base-real")).unwrap();
}

fn teardown(reg: &Registry) {
    for name in ["base", "snap", "snap-cow", "base-real"] {
        if reg.mapped_device(name).is_ok() {
            reg.remove(name, false).unwrap();
        }
    }
}

fn write_extents(io: &mut SyncIo, extents: &[(u64, u64)], data: &[u8]) {
    for &(s, n) in extents {
        io.write(s, &data[s as usize * 512..(s + n) as usize * 512]).unwrap();
    }
}

#[test]
fn the_kernels_runs_replayed_through_udm_give_the_kernels_cow_images() {
    let orig = unxz("patterns/orig.img.xz");
    let new1 = unxz("patterns/new1.img.xz");
    let snp1 = unxz("patterns/snp1.img.xz");
    type Case = (&'static str, u64, Vec<(u64, u64)>, Vec<(u64, u64)>);
    let cases: [Case; 3] = [
        ("c8-basic", 8, W0.to_vec(), vec![]),
        ("c128-basic", 128, W0.to_vec(), vec![]),
        ("c8-multiarea", 8, vec![(0, 9600)], vec![(16384, 64), (20000, 3), (40, 8)]),
    ];
    for (fixture, chunk, origin_writes, snap_writes) in cases {
        let reg = Registry::new();
        build(&reg, &orig, &vec![0u8; 8 << 20], chunk);
        let fresh = if chunk == 8 { "16/16384 16" } else { "256/16384 256" };
        assert_eq!(status(&reg, "snap"), fresh, "{fixture}: status after create");
        assert_eq!(
            reg.table("snap", TableSlot::Live).unwrap(),
            format!("0 32768 snapshot base-real snap-cow P {chunk}\n")
        );
        assert_eq!(reg.table("base", TableSlot::Live).unwrap(), "0 32768 snapshot-origin base-real\n");

        write_extents(&mut SyncIo::on(&reg, "base"), &origin_writes, &new1);
        write_extents(&mut SyncIo::on(&reg, "snap"), &snap_writes, &snp1);

        let expected_status = fixture_text(&format!("{fixture}/status-make.txt"))
            .lines()
            .filter_map(|l| l.strip_prefix("snap: 0 32768 snapshot "))
            .filter(|l| l.contains('/'))
            .nth(1)
            .unwrap()
            .to_string();
        assert_eq!(status(&reg, "snap"), expected_status, "{fixture}: status after the writes");
        let snap_view = SyncIo::on(&reg, "snap").read_all(32768).unwrap();
        assert!(
            block_hashes(&snap_view) == fixture_text(&format!("{fixture}/expected-snap.sha256")),
            "{fixture}: snapshot view"
        );
        let base_view = SyncIo::on(&reg, "base").read_all(32768).unwrap();
        assert!(
            block_hashes(&base_view) == fixture_text(&format!("{fixture}/expected-base.sha256")),
            "{fixture}: origin view"
        );

        teardown(&reg);
        let cow = SyncIo::new(reg.device("cdisk").unwrap().as_ref()).read_all(16384).unwrap();
        let kernel_cow = unxz(&format!("{fixture}/cow.img.xz"));
        assert!(cow == kernel_cow, "{fixture}: udm's COW differs from the kernel's");
        let origin = SyncIo::new(reg.device("odisk").unwrap().as_ref()).read_all(32768).unwrap();
        assert!(origin == unxz(&format!("{fixture}/origin.img.xz")), "{fixture}: origin disk");
    }
}

#[test]
fn every_kernel_written_cow_reads_back_as_the_kernel_read_it() {
    for fixture in ["c8-basic", "c128-basic", "c8-multiarea", "c8-overflow", "c8-merged"] {
        let reg = Registry::new();
        let chunk = if fixture.starts_with("c128") { 128 } else { 8 };
        let origin = unxz(&format!("{fixture}/origin.img.xz"));
        let cow = unxz(&format!("{fixture}/cow.img.xz"));
        reg.register_backend("odisk", mem_with(&origin)).unwrap();
        reg.register_backend("cdisk", mem_with(&cow)).unwrap();
        reg.create("base-real", None, Some("0 32768 linear odisk 0")).unwrap();
        reg.create("snap-cow", None, Some("0 16384 linear cdisk 0")).unwrap();
        reg.create("snap", None, Some(&format!("0 32768 snapshot base-real snap-cow P {chunk}"))).unwrap();
        let mut io = SyncIo::on(&reg, "snap");
        match fixture {
            "c8-overflow" => {
                assert_eq!(status(&reg, "snap"), "Invalid");
                assert!(io.read(0, 4096).is_err(), "an invalid snapshot fails reads");
            }
            "c8-merged" => {
                assert_eq!(status(&reg, "snap"), "16/16384 16", "a merged COW is a valid, empty snapshot");
                assert!(io.read_all(32768).unwrap() == origin);
            }
            _ => {
                let view = io.read_all(32768).unwrap();
                assert!(block_hashes(&view) == fixture_text(&format!("{fixture}/expected-snap.sha256")), "{fixture}");
                let read_status = fixture_text(&format!("{fixture}/status-read.txt"));
                assert!(read_status.contains(&format!("snap: 0 32768 snapshot {}\n", status(&reg, "snap"))));
            }
        }
        drop(io);
        for name in ["snap", "snap-cow", "base-real"] {
            reg.remove(name, false).unwrap();
        }
        let after = SyncIo::new(reg.device("cdisk").unwrap().as_ref()).read_all(16384).unwrap();
        assert!(after == cow, "{fixture}: reading a snapshot must not change its COW");
    }
}

#[test]
fn suspend_and_resume_of_the_origin_keep_copying() {
    let orig = unxz("patterns/orig.img.xz");
    let new1 = unxz("patterns/new1.img.xz");
    let reg = Registry::new();
    build(&reg, &orig, &vec![0u8; 8 << 20], 8);
    reg.suspend("base", SuspendFlags::default()).unwrap();
    reg.resume("base").unwrap();
    write_extents(&mut SyncIo::on(&reg, "base"), &W0, &new1);
    assert_eq!(status(&reg, "snap"), "584/16384 16");
}
