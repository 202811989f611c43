//! `udm bench` end to end: the real binary on null, mem, file and fault devices.

use std::process::{Command, Output};

fn udm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_udm")).args(args).output().expect("udm runs")
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bad JSON ({e}): {}\nstderr: {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn verify_passes_on_a_sound_ram_disk_with_several_threads() {
    let out = udm(&[
        "bench",
        "--device",
        "mem:16M",
        "--rw",
        "randrw",
        "--rwmixread",
        "60",
        "--qd",
        "8",
        "--threads",
        "2",
        "--time",
        "300ms",
        "--verify",
        "--json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let r = json(&out);
    // Prefill + read-back alone check every block once: 16 MiB / 4 KiB.
    assert!(r["verify"]["checked_blocks"].as_u64().unwrap() >= 4096, "{r}");
    assert!(r["verify"]["mismatch"].is_null());
    let op = if r["read"].is_null() { "write" } else { "read" };
    assert!(r[op]["ios"].as_u64().unwrap() > 0);
    for key in ["p50", "p99", "p99_9", "max"] {
        assert!(r[op]["lat_us"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    assert!(r["cpu"]["user_s"].as_f64().unwrap() >= 0.0);
}

#[test]
fn verify_catches_a_corrupted_device_and_names_the_sector() {
    let out = udm(&[
        "bench",
        "--device",
        "fault:corrupt=2056@mem:8M",
        "--rw",
        "randwrite",
        "--qd",
        "4",
        "--time",
        "200ms",
        "--verify",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let m = &json(&out)["verify"]["mismatch"];
    assert_eq!(m["sector"], 2056, "{m}");
    assert_eq!(m["byte"], 2056 % 512);
    // The human summary says it too.
    let out = udm(&["bench", "--device", "fault:corrupt=2056@mem:8M", "--rw", "read", "--time", "100ms", "--verify"]);
    assert_eq!(out.status.code(), Some(3));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("VERIFY FAILED: first bad sector 2056"), "{text}");
}

#[test]
fn verify_catches_lost_writes_after_a_power_loss() {
    // The power fails during the prefill (2048 writes of 4 KiB): the 1000th write is
    // torn and later ones are acknowledged but dropped, so the read-back finds blocks
    // that never received their pattern, however long the timed phase ran.
    let out = udm(&[
        "bench",
        "--device",
        "fault:power-loss=1000,seed=3@mem:8M",
        "--rw",
        "randwrite",
        "--qd",
        "4",
        "--time",
        "300ms",
        "--verify",
        "--json",
    ]);
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stdout));
    let m = &json(&out)["verify"]["mismatch"];
    assert!(m["found_generation"].as_u64().unwrap() < m["expected_generation"].as_u64().unwrap(), "{m}");
}

#[test]
fn io_errors_stop_the_run_with_status_2() {
    let out =
        udm(&["bench", "--device", "fault:fail-after=100@mem:8M", "--rw", "randwrite", "--time", "10s", "--json"]);
    assert_eq!(out.status.code(), Some(2));
    let r = json(&out);
    assert_eq!(r["failure"]["op"], "write");
    assert!(r["failure"]["error"].as_str().unwrap().contains("Input/output error"), "{r}");
    // The run stops at the first error: no more than the 100 allowed writes succeeded.
    assert!(r["write"]["ios"].as_u64().unwrap_or(0) <= 100, "{r}");
}

#[test]
fn file_backend_with_verify() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let img = tempfile::NamedTempFile::new_in(dir).unwrap();
    img.as_file().set_len(8 << 20).unwrap();
    let spec = format!("file:{}", img.path().display());
    let out = udm(&["bench", "--device", &spec, "--rw", "randrw", "--qd", "16", "--time", "300ms", "--verify"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all correct"));
    // Sleeping instead of spinning gives the same, correct, result.
    let out =
        udm(&["bench", "--device", &spec, "--rw", "randrw", "--qd", "16", "--time", "300ms", "--verify", "--wait"]);
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("all correct"));
    let ro = format!("{spec},ro");
    let out = udm(&["bench", "--device", &ro, "--rw", "randwrite", "--time", "100ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("read-only"));
}

#[test]
fn sequential_and_null_runs_report_sensible_figures() {
    for rw in ["read", "write", "randread", "randwrite"] {
        let out = udm(&[
            "bench", "--device", "null:64M", "--rw", rw, "--bs", "64k", "--qd", "4", "--time", "100ms", "--json",
        ]);
        assert!(out.status.success());
        let r = json(&out);
        let dir = if rw.contains("read") { "read" } else { "write" };
        let ios = r[dir]["ios"].as_u64().unwrap();
        assert!(ios > 0);
        let mb = r["mb_per_s"].as_f64().unwrap();
        let expect = r["iops"].as_f64().unwrap() * 65536.0 / 1e6;
        assert!((mb - expect).abs() < 1e-6 * expect.max(1.0));
    }
}

#[test]
fn bad_arguments_say_what_to_do() {
    let cases: &[(&[&str], &str)] = &[
        (&["bench", "--device", "disk:1G"], "unknown backend kind"),
        (&["bench", "--device", "mem:1M,bs=4096", "--bs", "512"], "logical block size"),
        (&["bench", "--device", "null:1M", "--bs", "8M"], "largest request"),
        (&["bench", "--device", "mem:64k", "--qd", "32", "--verify"], "too few"),
        (&["bench", "--device", "null:1G", "--device", "mem:1G"], "measures one device"),
        (&["bench", "--device", "file:/nonexistent/x.img"], "truncate"),
    ];
    for (args, want) in cases {
        let out = udm(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    let out = udm(&["bench", "--device", "null:1G", "--time", "soon"]);
    assert!(!out.status.success());
}

#[test]
fn help_documents_every_option() {
    let out = udm(&["bench", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in
        ["--device", "--rw", "--rwmixread", "--bs", "--qd", "--time", "--threads", "--verify", "--json", "Exit status"]
    {
        assert!(text.contains(opt), "--help lacks {opt}");
    }
}
