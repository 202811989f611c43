//! `udm bench --device dm:<table-file>`: stacks built from table files and named
//! devices, verified end to end; bad stacks are refused with a reason.

use std::process::{Command, Output};

fn udm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_udm")).args(args).output().expect("udm runs")
}

#[test]
fn verify_passes_through_a_two_level_stack() {
    let dir = tempfile::tempdir().unwrap();
    let low = dir.path().join("low.table");
    // 8 MiB striped over two RAM disks, with a zero-free layout so every byte verifies.
    std::fs::write(&low, "0 16384 striped 2 16 d0 0 d1 0\n").unwrap();
    let top = dir.path().join("top.table");
    std::fs::write(&top, "# the measured device\n0 8192 linear low 8192\n8192 4096 linear d2 100\n").unwrap();
    let low_arg = format!("low=dm:{}", low.display());
    let top_arg = format!("dm:{}", top.display());
    let out = udm(&[
        "bench",
        "--device",
        &top_arg,
        "--device",
        "d0=mem:8M",
        "--device",
        "d1=mem:8M",
        "--device",
        "d2=mem:8M",
        "--device",
        &low_arg,
        "--rw",
        "randrw",
        "--qd",
        "16",
        "--threads",
        "2",
        "--time",
        "300ms",
        "--verify",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn verify_passes_through_a_snapshot_stack_file() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("origin.stack");
    std::fs::write(
        &stack,
        "# LVM's order: -real, -cow, the snapshot, then the origin (measured: last)\n\
         vol-real: 0 16384 linear disk 0\n\
         snap-cow: 0 20480 linear cow 0\n\
         snap: 0 16384 snapshot vol-real snap-cow P 8\n\
         vol: 0 16384 snapshot-origin vol-real\n",
    )
    .unwrap();
    let arg = format!("dm:{}", stack.display());
    let out = udm(&[
        "bench",
        "--device",
        "disk=mem:8M",
        "--device",
        "cow=mem:10M",
        "--device",
        &arg,
        "--rw",
        "randrw",
        "--qd",
        "8",
        "--time",
        "300ms",
        "--verify",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The last device of the file is the one measured: ending it with an `error` device
    // makes every I/O fail.
    std::fs::write(&stack, "vol-real: 0 16384 linear disk 0\nbroken: 0 16384 error\n").unwrap();
    let out = udm(&["bench", "--device", "disk=mem:8M", "--device", &arg, "--rw", "randread", "--time", "200ms"]);
    assert!(!out.status.success(), "I/O to an error target must fail the bench");
}

#[test]
fn bad_stacks_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.table");
    std::fs::write(&t, "0 8 linear nowhere 0\n").unwrap();
    let arg = format!("dm:{}", t.display());
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--device", &arg, "--device", "d0=mem:1M"], "nowhere"),
        (vec!["--device", &arg, "--device", "mem:1M"], "name=spec"),
        (vec!["--device", "dm:/nonexistent/file", "--device", "d0=mem:1M"], "cannot read table file"),
        (vec!["--device", "mem:1M", "--device", "null:1M"], "dm:"),
    ];
    for (args, needle) in cases {
        let mut all = vec!["bench"];
        all.extend(args.iter());
        all.extend(["--time", "100ms"]);
        let out = udm(&all);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{all:?}: {err}");
        assert!(err.contains(needle), "{all:?}: {err}");
    }
}
