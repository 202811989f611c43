//! Every registry operation, its effect and its errors (spec §1.2).

mod common;

use std::sync::Arc;

use common::{mem, pattern, run, wait_for, Buf};
use udm_drivers::{BlockDevice, Completion, IoError, IoRequest};
use udm_mapping::sync_io;
use udm_mapping::{DeviceKind, DeviceState, MappingError, Registry, SuspendFlags, TableError, TableSlot, TargetError};

fn registry_with_disks() -> (Registry, Arc<dyn BlockDevice>, Arc<dyn BlockDevice>) {
    let reg = Registry::new();
    let d0 = mem(4096);
    let d1 = mem(4096);
    reg.register_backend("disk0", Arc::clone(&d0)).unwrap();
    reg.register_backend("disk1", Arc::clone(&d1)).unwrap();
    (reg, d0, d1)
}

fn table_error(e: MappingError) -> TableError {
    match e {
        MappingError::Table { source, .. } => *source,
        other => panic!("expected a table error, got {other}"),
    }
}

#[test]
fn create_without_table_then_load_and_resume() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("vol", Some("UUID-1"), None).unwrap();
    let info = reg.info("vol").unwrap();
    assert_eq!(info.kind, DeviceKind::Mapped);
    assert_eq!(info.tables_present(), "None");
    assert_eq!(info.uuid.as_deref(), Some("UUID-1"));
    assert_eq!(info.sectors, 0);

    // No live table: I/O fails with Rejected.
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(4).unwrap();
    let buf = Buf::zeroed(512);
    assert!(matches!(run(q.as_mut(), IoRequest::read(0, buf.sg(), 1)), Err(IoError::Rejected { .. })));

    reg.load("vol", "0 1024 linear disk0 0").unwrap();
    assert_eq!(reg.info("vol").unwrap().tables_present(), "INACTIVE");
    assert_eq!(reg.table("vol", TableSlot::Inactive).unwrap(), "0 1024 linear disk0 0\n");
    assert_eq!(reg.table("vol", TableSlot::Live).unwrap(), "");
    reg.resume("vol").unwrap();
    let info = reg.info("vol").unwrap();
    assert_eq!(info.tables_present(), "LIVE");
    assert_eq!((info.sectors, info.target_count, info.state), (1024, 1, DeviceState::Active));
    // The same queue notices the new table.
    assert_eq!(run(q.as_mut(), IoRequest::read(0, buf.sg(), 2)), Ok(()));
}

#[test]
fn load_stages_without_touching_live_io_and_clear_discards() {
    let (reg, d0, _d1) = registry_with_disks();
    reg.create("vol", None, Some("0 1024 linear disk0 0")).unwrap();
    sync_io::write(d0.as_ref(), 0, &pattern(0, 1, 1), false).unwrap();
    reg.load("vol", "0 1024 zero").unwrap();
    assert_eq!(reg.info("vol").unwrap().tables_present(), "LIVE & INACTIVE");
    let vol = reg.device("vol").unwrap();
    let mut b = vec![0u8; 512];
    sync_io::read(vol.as_ref(), 0, &mut b).unwrap();
    assert_eq!(b, pattern(0, 1, 1), "the live table still serves");
    reg.clear("vol").unwrap();
    assert_eq!(reg.info("vol").unwrap().tables_present(), "LIVE");
    assert!(matches!(reg.clear("vol"), Err(MappingError::NoInactiveTable(_))));
    // Loading twice replaces the staged table.
    reg.load("vol", "0 8 zero").unwrap();
    reg.load("vol", "0 16 error").unwrap();
    assert_eq!(reg.table("vol", TableSlot::Inactive).unwrap(), "0 16 error \n");
}

#[test]
fn refused_tables_change_nothing_and_say_why() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("vol", None, Some("0 1024 linear disk0 0")).unwrap();
    reg.load("vol", "0 8 zero").unwrap();
    let before = (reg.table("vol", TableSlot::Live).unwrap(), reg.table("vol", TableSlot::Inactive).unwrap());
    type Check = fn(&TableError) -> bool;
    let cases: Vec<(&str, Check)> = vec![
        ("0 8 zero\n16 8 zero", |e| matches!(e, TableError::Gap { line: 2, found: 16, expected: 8 })),
        ("0 8 bogus", |e| matches!(e, TableError::UnknownTarget { line: 1, .. })),
        (
            "0 8 linear nodisk 0",
            |e| matches!(e, TableError::Target { line: 1, error, .. } if matches!(**error, TargetError::NoSuchDevice(_))),
        ),
        (
            "0 8 linear disk0 4090",
            |e| matches!(e, TableError::Target { error, .. } if matches!(**error, TargetError::AreaOutOfRange { .. })),
        ),
        (
            "0 8 linear disk0",
            |e| matches!(e, TableError::Target { error, .. } if matches!(**error, TargetError::ArgCount { .. })),
        ),
        (
            "0 8 linear disk0 -1",
            |e| matches!(e, TableError::Target { error, .. } if matches!(**error, TargetError::BadArg { position: 2, .. })),
        ),
        ("0 8 zero x", |e| matches!(e, TableError::Target { .. })),
        (
            "0 8 linear disk0 0\n8 8 linear vol 0",
            |e| matches!(e, TableError::Target { line: 2, error, .. } if matches!(**error, TargetError::Cycle { .. })),
        ),
        ("0 12 striped 2 4 disk0 0 disk1 0", |e| matches!(e, TableError::Target { .. })),
        ("", |e| matches!(e, TableError::Empty)),
    ];
    for (text, check) in cases {
        let e = table_error(reg.load("vol", text).unwrap_err());
        assert!(check(&e), "{text:?} gave {e}");
        let msg = e.to_string();
        assert!(msg.len() > 20, "message too thin: {msg}");
        let after = (reg.table("vol", TableSlot::Live).unwrap(), reg.table("vol", TableSlot::Inactive).unwrap());
        assert_eq!(after, before, "{text:?} changed state");
    }
    // create with a bad table does not leave a device behind.
    assert!(reg.create("bad", None, Some("0 8 nothing")).is_err());
    assert!(matches!(reg.info("bad"), Err(MappingError::NoSuchDevice(_))));
}

#[test]
fn cycles_through_other_devices_are_refused() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("a", None, None).unwrap();
    reg.create("b", None, Some("0 8 linear a 0")).unwrap();
    reg.create("c", None, Some("0 8 linear b 0")).unwrap();
    let e = table_error(reg.load("a", "0 8 linear c 0").unwrap_err());
    match e {
        TableError::Target { error, .. } => match *error {
            TargetError::Cycle { path, .. } => assert_eq!(path, "a -> c -> b -> a"),
            other => panic!("{other}"),
        },
        other => panic!("{other}"),
    }
    assert!(reg.load("a", "0 8 linear a 0").is_err(), "a device cannot map onto itself");
    reg.load("a", "0 8 linear disk0 0").unwrap();
}

#[test]
fn names_uuid_and_duplicates() {
    let (reg, _d0, _d1) = registry_with_disks();
    assert!(matches!(reg.create("disk0", None, None), Err(MappingError::AlreadyExists(_))));
    assert!(matches!(reg.register_backend("disk0", mem(8)), Err(MappingError::AlreadyExists(_))));
    assert!(matches!(reg.create("a/b", None, None), Err(MappingError::InvalidName { .. })));
    reg.create("x", Some("U"), None).unwrap();
    assert!(matches!(reg.create("y", Some("U"), None), Err(MappingError::InvalidUuid { .. })));
    assert!(matches!(reg.load("disk0", "0 8 zero"), Err(MappingError::NotMapped(_))));
    assert!(matches!(reg.resume("nope"), Err(MappingError::NoSuchDevice(_))));
}

#[test]
fn remove_refused_while_used_unless_forced() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("low", None, Some("0 64 linear disk0 0")).unwrap();
    reg.create("top", None, Some("0 64 linear low 0")).unwrap();
    match reg.remove("low", false) {
        Err(MappingError::Busy { reason, .. }) => assert!(reason.contains("top"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(reg.remove("disk0", false), Err(MappingError::Busy { .. })));
    assert_eq!(reg.info("low").unwrap().holders, vec!["top".to_string()]);

    let handle = reg.open("top").unwrap();
    assert_eq!(reg.info("top").unwrap().open_count, 1);
    assert!(matches!(reg.remove("top", false), Err(MappingError::Busy { .. })));
    drop(handle);
    assert_eq!(reg.open_count("top").unwrap(), 0);
    reg.remove("top", false).unwrap();
    reg.remove("low", false).unwrap();
    assert!(reg.ls().iter().all(|(n, _)| n.starts_with("disk")));

    // Forced: I/O through a queue of the removed device fails with DeviceGone.
    reg.create("v", None, Some("0 64 linear disk0 0")).unwrap();
    let open = reg.open("v").unwrap();
    let mut q = open.device().open_queue(2).unwrap();
    reg.remove("v", true).unwrap();
    let buf = Buf::zeroed(512);
    assert!(matches!(run(q.as_mut(), IoRequest::read(0, buf.sg(), 9)), Err(IoError::DeviceGone { .. })));
}

#[test]
fn rename_shows_in_referencing_tables() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("low", None, Some("0 64 linear disk0 8")).unwrap();
    reg.create("top", None, Some("0 64 linear low 0")).unwrap();
    reg.rename("low", "my low").unwrap();
    assert_eq!(reg.table("top", TableSlot::Live).unwrap(), "0 64 linear my\\ low 0\n");
    assert_eq!(reg.deps("top", TableSlot::Live).unwrap(), vec!["my low".to_string()]);
    // The printed table re-parses to the same device.
    let text = reg.table("top", TableSlot::Live).unwrap();
    reg.load("top", &text).unwrap();
    assert_eq!(reg.table("top", TableSlot::Inactive).unwrap(), text);
    assert!(matches!(reg.rename("top", "disk0"), Err(MappingError::AlreadyExists(_))));
    assert!(matches!(reg.rename("top", "a#b"), Err(MappingError::InvalidName { .. })));
    assert!(matches!(reg.info("low"), Err(MappingError::NoSuchDevice(_))));
}

#[test]
fn ls_tree_and_deps() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("base-real", None, Some("0 64 linear disk0 0")).unwrap();
    reg.create("base", None, Some("0 64 linear base-real 0")).unwrap();
    reg.create("snap-cow", None, Some("0 32 linear disk1 0")).unwrap();
    reg.create("stripes", None, Some("0 128 striped 2 8 disk0 64 disk1 64")).unwrap();
    assert_eq!(reg.deps("stripes", TableSlot::Live).unwrap(), vec!["disk0".to_string(), "disk1".to_string()]);
    let names: Vec<_> = reg.ls().into_iter().map(|(n, k)| format!("{n}:{k:?}")).collect();
    assert_eq!(
        names,
        ["base:Mapped", "base-real:Mapped", "disk0:Backend", "disk1:Backend", "snap-cow:Mapped", "stripes:Mapped"]
    );
    assert_eq!(reg.ls_tree(), "base\n`-base-real\n  `-disk0\nsnap-cow\n`-disk1\nstripes\n|-disk0\n`-disk1\n");
}

#[test]
fn status_lines() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("s", None, Some("0 64 striped 2 8 disk0 0 disk1 0\n64 8 zero\n72 8 error")).unwrap();
    assert_eq!(reg.status("s", TableSlot::Live).unwrap(), "0 64 striped 2 disk0 disk1 1 AA\n64 8 zero \n72 8 error \n");
    assert!(matches!(reg.status("disk0", TableSlot::Live), Err(MappingError::NotMapped(_))));
}

#[test]
fn suspended_io_is_held_in_order_and_mapped_by_the_new_table() {
    let (reg, d0, d1) = registry_with_disks();
    reg.create("vol", None, Some("0 64 linear disk0 0")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(8).unwrap();
    reg.suspend("vol", SuspendFlags::default()).unwrap();
    assert_eq!(reg.info("vol").unwrap().state, DeviceState::Suspended);
    reg.suspend("vol", SuspendFlags { noflush: true }).unwrap();

    let a = Buf::new(pattern(5, 1, 1));
    let b = Buf::new(pattern(5, 2, 1));
    q.submit(IoRequest::write(5, a.sg(), 1)).unwrap();
    q.submit(IoRequest::write(5, b.sg(), 2)).unwrap();
    q.kick();
    let mut out = [Completion::EMPTY; 4];
    for _ in 0..100 {
        assert_eq!(q.poll(&mut out), 0, "held I/O must not complete while suspended");
    }
    assert_eq!(q.in_flight(), 2);
    reg.load("vol", "0 64 linear disk1 0").unwrap();
    reg.resume("vol").unwrap();
    let mut order = Vec::new();
    while order.len() < 2 {
        let n = q.poll(&mut out);
        for c in &out[..n] {
            assert_eq!(c.result, Ok(()));
            order.push(c.tag);
        }
    }
    assert_eq!(order, vec![1, 2], "held writes complete in submission order");
    let mut got = vec![0u8; 512];
    sync_io::read(d1.as_ref(), 5, &mut got).unwrap();
    assert_eq!(got, pattern(5, 2, 1), "released I/O went through the new table, in order");
    sync_io::read(d0.as_ref(), 5, &mut got).unwrap();
    assert!(got.iter().all(|&x| x == 0), "the old table never saw the held writes");
}

#[test]
fn suspended_read_returns_zeroes_after_switch_to_zero() {
    let (reg, d0, _d1) = registry_with_disks();
    sync_io::write(d0.as_ref(), 0, &pattern(0, 9, 8), false).unwrap();
    reg.create("vol", None, Some("0 64 linear disk0 0")).unwrap();
    let vol = reg.device("vol").unwrap();
    let mut q = vol.open_queue(4).unwrap();
    let buf = Buf::new(vec![0xAA; 4096]);
    assert_eq!(run(q.as_mut(), IoRequest::read(0, buf.sg(), 1)), Ok(()));
    reg.suspend("vol", SuspendFlags::default()).unwrap();
    let buf2 = Buf::new(vec![0xAA; 4096]);
    q.submit(IoRequest::read(0, buf2.sg(), 2)).unwrap();
    reg.load("vol", "0 64 zero").unwrap();
    reg.resume("vol").unwrap();
    assert_eq!(wait_for(q.as_mut(), 2), Ok(()));
    assert!(buf2.data.iter().all(|&x| x == 0));
    assert_eq!(buf.data, pattern(0, 9, 8));
}

#[test]
fn resume_with_inactive_suspends_first_and_plain_resume_is_a_noop_when_active() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("vol", None, Some("0 64 linear disk0 0")).unwrap();
    let g0 = reg.info("vol").unwrap().generation;
    reg.resume("vol").unwrap();
    assert_eq!(reg.info("vol").unwrap().generation, g0);
    reg.load("vol", "0 128 linear disk1 0").unwrap();
    reg.resume("vol").unwrap();
    let info = reg.info("vol").unwrap();
    assert_eq!((info.generation, info.sectors, info.state), (g0 + 1, 128, DeviceState::Active));
    assert!(matches!(reg.table("vol", TableSlot::Inactive).as_deref(), Ok("")));
}

#[test]
fn forced_removal_fails_held_io() {
    let (reg, _d0, _d1) = registry_with_disks();
    reg.create("v", None, Some("0 64 linear disk0 0")).unwrap();
    let v = reg.device("v").unwrap();
    let mut q = v.open_queue(4).unwrap();
    reg.suspend("v", SuspendFlags::default()).unwrap();
    let buf = Buf::zeroed(512);
    q.submit(IoRequest::read(0, buf.sg(), 5)).unwrap();
    let mut out = [Completion::EMPTY; 2];
    assert_eq!(q.poll(&mut out), 0, "held while suspended");
    reg.remove("v", true).unwrap();
    assert!(matches!(wait_for(q.as_mut(), 5), Err(IoError::DeviceGone { .. })));
}

#[test]
fn preresume_veto_leaves_the_device_suspended_with_its_inactive_table() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use udm_mapping::target::{
        ConstructCtx, MapOutcome, QueueSetup, Target, TargetCaps, TargetContext, TargetIo, TargetQueue, TargetType,
    };

    static VETO: AtomicBool = AtomicBool::new(true);
    struct VetoType;
    struct Veto;
    struct VetoQueue;
    impl TargetType for VetoType {
        fn name(&self) -> &'static str {
            "veto"
        }
        fn construct(&self, _: &mut ConstructCtx<'_>, _: &[String]) -> Result<Arc<dyn Target>, TargetError> {
            Ok(Arc::new(Veto))
        }
    }
    impl Target for Veto {
        fn type_name(&self) -> &'static str {
            "veto"
        }
        fn table_args(&self) -> String {
            String::new()
        }
        fn caps(&self) -> TargetCaps {
            TargetCaps { discard: false, write_zeroes: false }
        }
        fn open_queue(&self, _: &QueueSetup<'_>) -> Result<Box<dyn TargetQueue>, TargetError> {
            Ok(Box::new(VetoQueue))
        }
        fn preresume(&self) -> Result<(), TargetError> {
            if VETO.load(Ordering::SeqCst) {
                Err(TargetError::Vetoed("not yet".into()))
            } else {
                Ok(())
            }
        }
    }
    impl TargetQueue for VetoQueue {
        fn map(&mut self, _: &TargetIo, _: &mut TargetContext<'_>) -> MapOutcome {
            MapOutcome::Done(Ok(()))
        }
    }

    let (reg, _d0, _d1) = registry_with_disks();
    reg.register_target_type(Arc::new(VetoType));
    reg.create("v", None, Some("0 64 linear disk0 0")).unwrap();
    reg.load("v", "0 64 veto").unwrap();
    match reg.resume("v") {
        Err(MappingError::Target { source, .. }) => assert!(matches!(*source, TargetError::Vetoed(_))),
        other => panic!("{other:?}"),
    }
    let info = reg.info("v").unwrap();
    assert_eq!((info.state, info.tables_present()), (DeviceState::Suspended, "LIVE & INACTIVE"));
    assert_eq!(reg.table("v", TableSlot::Live).unwrap(), "0 64 linear disk0 0\n");
    VETO.store(false, Ordering::SeqCst);
    reg.resume("v").unwrap();
    assert_eq!(reg.table("v", TableSlot::Live).unwrap(), "0 64 veto \n");
    assert_eq!(reg.info("v").unwrap().state, DeviceState::Active);
}
