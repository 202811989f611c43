//! The control plane cannot be turned against itself (issue 10, defects 5-9), driving
//! the real `udm` binary (and, where a test must control a device's stall, the daemon
//! in-process): sockets in use are never taken over, only udm's own socket files are
//! removed, export names and device identities cannot be confused, a stalled device
//! freezes nothing else, and the control socket is bounded.

mod blkio_client;
mod daemon_process;

use std::io::{Read, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use blkio_client::{Client, Op};
use daemon_process::{mode_of, output_within, serve_command, wait_until, Daemon, Start, HUNG};
use serde_json::Value;

/// Writes and reads back a block through the export at `sock`.
fn round_trip(sock: &Path, seed: u8) {
    let mut c = Client::connect(sock, 1, false).unwrap();
    c.buf()[..4096].fill(seed);
    assert_eq!(
        c.run(0, &[Op::Write { offset: 8192, buf: 0, len: 4096 }, Op::Read { offset: 8192, buf: 4096, len: 4096 }]),
        vec![0, 0]
    );
    assert!(c.buf()[4096..8192].iter().all(|&b| b == seed));
}

/// Submits one 4 KiB write on queue 0 and returns without waiting for it.
fn submit_write(c: &mut Client, offset: u64) {
    let base = c.region.addr as *const u8;
    let q = &mut c.queues[0];
    q.write(offset, base, 4096, 0, ReqFlags::empty());
    let mut none: [MaybeUninit<Completion>; 1] = [MaybeUninit::uninit()];
    let mut no_wait = Duration::ZERO;
    q.do_io(&mut none, 0, Some(&mut no_wait), None).unwrap();
}

fn export_ls(d: &Daemon) -> Value {
    serde_json::from_str(&d.ok(&["export", "ls", "--json"])).unwrap()
}

/// Defect 5: `export add` over another export's socket or over the control socket is
/// refused (naming the user) and the victim keeps working; SIGTERM still stops the
/// daemon and removes exactly its own sockets.
#[test]
fn export_add_over_a_socket_in_use_is_refused_and_the_victim_still_works() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), Start::default());
    let err = d.refused(&["export", "add", "thief", "--device", "vol0", "--socket", "vol0.sock"]);
    assert!(err.contains("in use by export `vol0`"), "{err}");
    let err = d.refused(&["export", "add", "thief", "--device", "vol0", "--socket", "udm.ctl"]);
    assert!(err.contains("in use by the control socket"), "{err}");
    std::fs::write(dir.path().join("notes.txt"), "keep").unwrap();
    let err = d.refused(&["export", "add", "thief", "--device", "vol0", "--socket", "notes.txt"]);
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(dir.path().join("notes.txt")).unwrap(), "keep");

    round_trip(&dir.path().join("vol0.sock"), 0x5a);
    let ls = export_ls(&d);
    assert_eq!(ls.as_array().unwrap().len(), 1, "{ls}");
    assert!(d.signal(libc::SIGTERM).success());
    assert!(!dir.path().join("vol0.sock").exists() && !dir.path().join("udm.ctl").exists());
}

/// Defect 5 across processes: a second `udm serve` in the same directory refuses to
/// start, naming the first one's pid, and leaves it untouched; the first still serves
/// and exits on SIGTERM.
#[test]
fn a_second_daemon_in_the_same_directory_refuses_and_the_first_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut first = Daemon::start(dir.path(), Start::default());
    let mut second = serve_command(dir.path(), Start::default());
    second.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let out = output_within(second.spawn().unwrap(), HUNG).expect("the second udm serve exits at once");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains(&format!("process {}", first.pid())), "names the first daemon: {err}");

    assert!(first.ok(&["dm", "ls"]).contains("vol0"));
    round_trip(&dir.path().join("vol0.sock"), 0x33);
    assert!(first.signal(libc::SIGTERM).success());
    assert!(!dir.path().join("vol0.sock").exists() && !dir.path().join("udm.ctl").exists());
}

/// SIGTERM does not depend on the control socket's path: with it replaced by someone
/// else's listener (which never accepts), the daemon still exits, and leaves that
/// socket alone.
#[test]
fn sigterm_stops_the_daemon_even_if_its_control_path_was_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let mut d = Daemon::start(dir.path(), Start::default());
    let ctl = dir.path().join("udm.ctl");
    std::fs::remove_file(&ctl).unwrap();
    let _squatter = UnixListener::bind(&ctl).unwrap();
    let vol0 = dir.path().join("vol0.sock");
    std::fs::remove_file(&vol0).unwrap();
    let _other = UnixListener::bind(&vol0).unwrap();
    assert!(d.signal(libc::SIGTERM).success());
    assert!(ctl.exists() && vol0.exists(), "sockets udm did not create are left in place");
    UnixStream::connect(&ctl).unwrap();
}

/// Defect 6: while an export is being removed (its device stalled, so draining takes
/// as long as the stall), its name cannot be re-added; once the removal returns, a
/// re-add works and its socket is not removed by the old export's teardown.
#[test]
fn an_export_name_is_reusable_only_after_its_removal_finished() {
    use udm_drivers::backends::{fault::FaultDevice, mem::MemDevice};
    use udm_server::daemon::Daemon as InProcess;
    use udm_server::vhost_blk::ExportConfig;

    let dir = tempfile::tempdir().unwrap();
    let daemon = Arc::new(InProcess::new(vec![]));
    let fault = Arc::new(FaultDevice::new(Arc::new(MemDevice::new(16 << 20, 512).unwrap())));
    let stall = fault.control();
    daemon.registry().register_backend("disk", fault).unwrap();
    let sock = dir.path().join("disk.sock");
    let config: ExportConfig = serde_json::from_value(serde_json::json!({
        "name": "disk", "device": "disk", "socket": sock,
    }))
    .unwrap();
    daemon.export_add(config.clone()).unwrap();

    let mut client = Client::connect(&sock, 1, false).unwrap();
    stall.stall_after_writes(0);
    submit_write(&mut client, 0);
    wait_until("the write is held by the stalled device", || stall.held_ios() > 0);
    let remover = {
        let daemon = Arc::clone(&daemon);
        std::thread::spawn(move || daemon.export_remove("disk"))
    };
    wait_until("the removal started", || !daemon.export_ls().iter().any(|e| e.config.name == "disk" && !e.removing));
    let err = daemon.export_add(config.clone()).expect_err("the name is still being removed");
    assert!(err.to_string().contains("being removed"), "{err}");

    stall.disarm();
    remover.join().unwrap().unwrap();
    drop(client);
    daemon.export_add(config).unwrap();
    assert!(sock.exists(), "the new export's socket survived the old one's teardown");
    round_trip(&sock, 0x21);
    daemon.shutdown();
    assert!(!sock.exists());
}

/// Defect 7: exports follow the device, not its name: after `dm rename`, forcing out a
/// new backend with the old name leaves the export alone, and forcing out the renamed
/// one stops it.
#[test]
fn backend_remove_force_after_rename_stops_the_right_export() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), Start::default());
    d.ok(&["backend", "add", "disk1", "mem:16M"]);
    d.ok(&["export", "add", "raw1", "--device", "disk1"]);
    d.ok(&["dm", "rename", "disk1", "disk1old"]);
    d.ok(&["backend", "add", "disk1", "mem:8M"]);

    d.ok(&["backend", "remove", "--force", "disk1"]);
    let ls = export_ls(&d);
    let raw1 = ls.as_array().unwrap().iter().find(|e| e["config"]["name"] == "raw1").expect("raw1 still runs");
    assert_eq!(raw1["config"]["device"], "disk1old", "{ls}");
    round_trip(&dir.path().join("raw1.sock"), 0x77);
    let backends: Value = serde_json::from_str(&d.ok(&["backend", "ls", "--json", "disk1old"])).unwrap();
    assert_eq!(backends[0]["exported_by"], serde_json::json!(["raw1"]), "{backends}");
    let err = d.refused(&["backend", "remove", "disk1old"]);
    assert!(err.contains("raw1"), "{err}");

    d.ok(&["backend", "remove", "--force", "disk1old"]);
    assert!(!d.ok(&["export", "ls"]).contains("raw1"));
    assert!(!dir.path().join("raw1.sock").exists());
}

/// Defect 8: `dm suspend --timeout` on a device whose I/O is stalled gives up, says
/// what is in flight and leaves the device active; a suspend that waits (dmsetup's
/// default) holds no registry-wide lock: `dm ls` and other devices' lifecycle answer.
#[test]
fn a_stalled_suspend_times_out_with_a_report_and_freezes_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("udm.toml"),
        "[[backend]]\nname = \"stuck\"\nspec = \"fault:stall-after=0@mem:16M\"\n\n\
         [[device]]\nname = \"slow\"\ntable = \"0 32768 linear stuck 0\"\n\n\
         [[export]]\nname = \"slow\"\ndevice = \"slow\"\nsocket = \"slow.sock\"\n",
    )
    .unwrap();
    let mut d = Daemon::start(
        dir.path(),
        Start { args: &["--config", "udm.toml", "--shutdown-timeout", "1"], ..Default::default() },
    );
    let mut client = Client::connect(&dir.path().join("slow.sock"), 1, false).unwrap();
    submit_write(&mut client, 0);

    // The write reaches the device at once; until it has, a suspend succeeds (and
    // holds it), so resume and try again.
    let mut report = None;
    for _ in 0..50 {
        let (ok, _, err) = d.cli(&["dm", "suspend", "slow", "--timeout", "0.2"]);
        if !ok {
            report = Some(err);
            break;
        }
        d.ok(&["dm", "resume", "slow"]);
    }
    let report = report.expect("a suspend with a write stalled in flight times out");
    assert!(report.contains("timed out") && report.contains("1 request(s) in flight (queue 0: 1)"), "{report}");
    assert!(d.ok(&["dm", "info", "slow"]).contains("ACTIVE"), "the device was left as it was");

    // A suspend without a timeout waits for the stalled write; everything else goes on.
    let waiting = std::process::Command::new(daemon_process::UDM)
        .args(["dm", "suspend", "slow"])
        .current_dir(dir.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the suspend is draining", || d.ok(&["dm", "info", "slow"]).contains("SUSPENDED"));
    assert!(d.ok(&["dm", "ls"]).contains("slow"));
    d.ok(&["dm", "create", "other", "--table", "0 8 zero"]);
    d.ok(&["dm", "suspend", "other"]);
    d.ok(&["dm", "resume", "other"]);
    d.ok(&["dm", "remove", "other"]);
    let err = d.refused(&["dm", "remove", "--force", "slow"]);
    assert!(err.contains("being suspended"), "{err}");
    assert!(d.refused(&["dm", "suspend", "slow"]).contains("being suspended"));
    // `dm resume` is the way out of a suspend that waits: it cancels it.
    d.ok(&["dm", "resume", "slow"]);
    assert!(d.ok(&["dm", "info", "slow"]).contains("ACTIVE"));
    let out = output_within(waiting, HUNG).expect("the cancelled suspend returns");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cancelled"), "{err}");
    // SIGTERM with the write still stalled: the daemon exits after its grace period,
    // saying what did not finish, instead of waiting for the device forever.
    let status = d.signal(libc::SIGTERM);
    assert_eq!(status.code(), Some(1));
    drop(client);
}

/// Defect 9: a line over the limit gets exactly one error reply, then the connection
/// closes (a request after it is not answered, so the client cannot desync).
#[test]
fn an_over_long_control_line_gets_exactly_one_error_reply() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), Start::default());
    let mut s = UnixStream::connect(dir.path().join("udm.ctl")).unwrap();
    let mut reader = s.try_clone().unwrap();
    let replies = std::thread::spawn(move || {
        let mut all = String::new();
        reader.read_to_string(&mut all).unwrap();
        all
    });
    let long = vec![b'x'; (16 << 20) + 100];
    s.write_all(&long).unwrap();
    s.write_all(b"\n").unwrap();
    // The daemon may have closed by now; what matters is what it answered.
    let _ = s.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"dm.ls\",\"id\":1}\n");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let all = replies.join().unwrap();
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.len(), 1, "{all}");
    let reply: Value = serde_json::from_str(lines[0]).unwrap();
    assert!(reply["error"]["message"].as_str().unwrap().contains("longer than 16 MiB"), "{reply}");
    // The CLI's client reads that reply even though its write is cut off.
    let mut c = udm_server::control::Client::connect(&dir.path().join("udm.ctl")).unwrap();
    let e = c.call("dm.load", serde_json::json!({"name": "vol0", "table": "x".repeat(17 << 20)})).unwrap_err();
    assert!(e.to_string().contains("longer than 16 MiB"), "{e}");
    assert!(d.ok(&["dm", "ls"]).contains("vol0"));
}

/// Defect 9: hundreds of idle control connections cost no more than the cap of
/// threads; the longest-idle ones are closed to make room and a real command answers.
#[test]
fn idle_control_connections_are_bounded_and_a_real_command_still_answers() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), Start::default());
    let baseline = d.threads();
    let idle: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(dir.path().join("udm.ctl")).unwrap()).collect();
    assert!(d.ok(&["dm", "ls"]).contains("vol0"));
    let cap = udm_server::control::server::MAX_CLIENTS;
    // Connections closed to make room end their threads at once, but asynchronously.
    wait_until("at most one thread per allowed connection", || d.threads() <= baseline + cap);
    let mut closed = 0;
    for mut s in idle {
        s.set_nonblocking(true).unwrap();
        if matches!(s.read(&mut [0u8; 1]), Ok(0)) {
            closed += 1;
        }
    }
    assert!(closed >= 300 + 1 - cap, "only {closed} idle connections were closed");
}

/// Defect 9: sockets are created 0600 whatever the umask (000 here), atomically; an
/// export given a mode and a group gets exactly those.
#[test]
fn sockets_are_0600_under_umask_000_unless_configured() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(dir.path(), Start { umask: Some(0), ..Default::default() });
    assert_eq!(mode_of(&dir.path().join("udm.ctl")), 0o600);
    assert_eq!(mode_of(&dir.path().join("vol0.sock")), 0o600);
    // SAFETY: getegid has no preconditions.
    let gid = unsafe { libc::getegid() }.to_string();
    d.ok(&["export", "add", "shared", "--device", "vol0", "--socket-mode", "0660", "--socket-group", &gid]);
    let shared = dir.path().join("shared.sock");
    assert_eq!(mode_of(&shared), 0o660);
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(&shared).unwrap()).to_string(), gid);
    let err = d.refused(&["export", "add", "bad", "--device", "vol0", "--socket-mode", "0460"]);
    assert!(err.contains("0460"), "{err}");
    let err = d.refused(&["export", "add", "bad", "--device", "vol0", "--socket-group", "no-such-group-udm"]);
    assert!(err.contains("no-such-group-udm"), "{err}");
    assert!(!dir.path().join("bad.sock").exists());
}
