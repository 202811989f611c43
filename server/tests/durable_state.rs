//! Durable state: what is built through the CLI comes back after a SIGKILL and a plain
//! `udm serve` in the same directory (backends, tables live, inactive and suspended,
//! a snapshot with its exceptions, exports at their sockets); a device whose backend is
//! missing comes back as an error device with its reason while the rest starts, and its
//! recorded tables are kept; a corrupt or newer state file is refused and left as it
//! was, as it is by a start that fails; `config save` writes a udm.toml that recreates
//! the state and `config check` validates one.

mod blkio_client;
mod daemon_process;

use std::path::Path;
use std::process::Command;

use blkio_client::{Client, Op};
use daemon_process::{Daemon, Start, UDM};

/// A `udm serve` in a directory; SIGKILLed on drop (what a crash leaves).
struct Serve {
    daemon: Daemon,
}

impl Serve {
    /// Starts `udm serve args...` in `dir` and waits until it serves.
    fn start(dir: &Path, args: &[&str]) -> Serve {
        Serve { daemon: Daemon::start(dir, Start { args, ..Start::default() }) }
    }

    /// As `start`; `Err(stderr)` when it exits during start-up.
    fn try_start(dir: &Path, args: &[&str]) -> Result<Serve, String> {
        Daemon::try_start(dir, Start { args, ..Start::default() }).map(|daemon| Serve { daemon })
    }

    /// Runs `udm args...`: success and its stdout, or failure and its stderr.
    fn udm(&self, args: &[&str]) -> (bool, String) {
        let (ok, out, err) = self.daemon.cli(args);
        (ok, if ok { out } else { err })
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.udm(args);
        assert!(ok, "udm {args:?} failed: {text}");
        text
    }

    /// What a restart must bring back as it was.
    fn views(&self) -> Vec<String> {
        [
            &["dm", "ls"][..],
            &["dm", "ls", "--tree"],
            &["dm", "table"],
            &["dm", "table", "--inactive"],
            &["dm", "info"],
            &["backend", "ls"],
            &["export", "ls"],
            &["snapshot", "list"],
        ]
        .iter()
        .map(|a| format!("$ udm {}\n{}", a.join(" "), self.ok(a)))
        .collect()
    }

    fn kill(mut self) {
        self.daemon.child.kill().unwrap();
        self.daemon.child.wait().unwrap();
    }
}

fn file(dir: &Path, name: &str, mib: u64) -> String {
    let path = dir.join(name);
    std::fs::File::create(&path).unwrap().set_len(mib << 20).unwrap();
    format!("file:{}", path.display())
}

/// An empty udm.toml (no embedded default volume).
fn empty_config(dir: &Path) {
    std::fs::write(dir.join("udm.toml"), "").unwrap();
}

#[test]
fn a_restart_brings_back_what_the_cli_built() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let (disk1, disk2, cow) = (file(d, "d1.img", 16), file(d, "d2.img", 16), file(d, "s1.cow", 8));
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk1", &disk1]);
    serve.ok(&["backend", "add", "disk2", &disk2]);
    serve.ok(&["dm", "create", "stripe", "--uuid", "UDM-stripe", "--table", "0 32768 striped 2 8 disk1 0 disk2 0"]);
    serve.ok(&["dm", "create", "vol", "--table", "0 8192 linear disk1 16384"]);
    serve.ok(&["dm", "create", "staged", "--table", "0 4096 linear disk2 16384"]);
    serve.ok(&["dm", "load", "staged", "--table", "0 8192 linear disk2 16384"]);
    serve.ok(&["dm", "create", "held", "--table", "0 2048 linear disk2 24576"]);
    serve.ok(&["dm", "suspend", "held"]);
    serve.ok(&["dm", "create", "bare"]);
    serve.ok(&["snapshot", "create", "vol", "snap", "--cow", &cow, "--chunk", "4k"]);
    let socket = d.join("vol.sock");
    serve.ok(&["export", "add", "vol", "--socket", socket.to_str().unwrap(), "--queues", "2", "--serial", "S-1"]);
    serve.ok(&["export", "add", "stripe", "--socket", d.join("stripe.sock").to_str().unwrap(), "--read-only"]);
    // Origin writes copy out to the snapshot: it has exceptions to come back with.
    {
        let mut client = Client::connect(&socket, 1, false).unwrap();
        client.buf()[..65536].fill(0xa5);
        assert!(client.run(0, &[Op::Write { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
    }
    let before = serve.views();
    assert!(before.iter().any(|v| v.contains("snap ") && v.contains("vol ")), "{before:?}");
    serve.kill();

    // No arguments: the control socket and the state file are found in the directory.
    let serve = Serve::start(d, &[]);
    let after = serve.views();
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(b, a, "differs after the restart");
    }
    assert!(!after[0].contains("vol0"), "the embedded default volume is not added over a state: {}", after[0]);
    let info = serve.ok(&["dm", "info", "held"]);
    assert!(info.contains("SUSPENDED"), "{info}");
    // The snapshot was re-attached with its exceptions (its Data% above, equal), not
    // re-initialised: the copied-out chunks read as they were before the writes.
    // The exports serve at the same sockets: the data written is there.
    let mut client = Client::connect(&socket, 1, false).unwrap();
    assert!(client.run(0, &[Op::Read { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
    assert!(client.buf()[..65536].iter().all(|&b| b == 0xa5));
}

#[test]
fn a_missing_backend_comes_back_as_an_error_device_and_the_rest_starts() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let (disk1, disk2) = (file(d, "d1.img", 4), file(d, "d2.img", 4));
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk1", &disk1]);
    serve.ok(&["backend", "add", "disk2", &disk2]);
    serve.ok(&["dm", "create", "on1", "--table", "0 8192 linear disk1 0"]);
    serve.ok(&["dm", "create", "on2", "--table", "0 8192 linear disk2 0"]);
    serve.ok(&["snapshot", "create", "on2", "ramsnap", "--cow", "4M"]);
    let tables = serve.ok(&["dm", "table"]);
    serve.kill();

    std::fs::rename(d.join("d1.img"), d.join("d1.away")).unwrap();
    let serve = Serve::start(d, &[]);
    let ls = serve.ok(&["dm", "ls"]);
    let line = |name: &str| ls.lines().find(|l| l.starts_with(&format!("{name}\t"))).unwrap_or("").to_string();
    assert!(line("disk1").contains("ERROR") && line("disk1").contains("d1.img"), "{ls}");
    assert!(line("on1").contains("uses `disk1`"), "{ls}");
    assert!(!line("on2").contains("ERROR") && !line("disk2").contains("ERROR"), "the rest starts: {ls}");
    // A snapshot whose COW was in RAM cannot come back: it says so.
    assert!(line("ramsnap").contains("RAM"), "{ls}");
    let info = serve.ok(&["dm", "info", "disk1"]);
    assert!(info.contains("Problem:") && info.contains("cannot be opened"), "{info}");
    // The device over it keeps its table.
    let on1 = serve.ok(&["dm", "table", "on1"]);
    assert_eq!(on1.trim(), "0 8192 linear disk1 0");
    // A change is saved with what the error devices stand for, not their error tables.
    serve.ok(&["dm", "create", "later", "--table", "0 8 linear disk2 0"]);
    let state = std::fs::read_to_string(d.join("udm-state.json")).unwrap();
    assert!(state.contains("d1.img") && state.contains("snapshot on2-real ramsnap-cow P 8"), "{state}");
    assert!(!state.contains(" error"), "the stand-in error tables are not recorded: {state}");
    serve.kill();

    // The disk is back: so is everything over it.
    std::fs::rename(d.join("d1.away"), d.join("d1.img")).unwrap();
    let serve = Serve::start(d, &[]);
    let ls = serve.ok(&["dm", "ls"]);
    assert!(!ls.lines().any(|l| l.starts_with("disk1") && l.contains("ERROR")), "{ls}");
    let now = serve.ok(&["dm", "table"]);
    for l in tables.lines().filter(|l| !l.starts_with("ramsnap")) {
        assert!(now.contains(l), "`{l}` is back: {now}");
    }
}

#[test]
fn a_corrupt_or_newer_state_file_is_refused_and_left_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let state = d.join("udm-state.json");
    for (bytes, says) in [
        (&b"{\"version\": 1, \"udm\": \"0.1.0\", \"backends\": [{"[..], "corrupt"),
        (b"{\"version\": 7, \"udm\": \"9.9.9\"}", "version 7"),
    ] {
        std::fs::write(&state, bytes).unwrap();
        let e = Serve::try_start(d, &[]).err().expect("refused");
        assert!(e.contains(says) && e.contains("udm-state.json"), "{e}");
        assert_eq!(std::fs::read(&state).unwrap(), bytes, "left as it was");
        assert!(!d.join("udm.ctl").exists(), "nothing was started");
    }
    // A start that fails after reading a good state does not write it either.
    std::fs::remove_file(&state).unwrap();
    let disk = file(d, "d.img", 4);
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk", &disk]);
    serve.kill();
    let good = std::fs::read(&state).unwrap();
    std::fs::write(d.join("udm.toml"), "[[device]]\nname = \"broken\"\ntable = \"0 8 linear nowhere 0\"\n").unwrap();
    let e = Serve::try_start(d, &["--config", "udm.toml"]).err().expect("the declaration fails");
    assert!(e.contains("broken") && e.contains("left as it was"), "{e}");
    assert_eq!(std::fs::read(&state).unwrap(), good);
}

#[test]
fn config_save_recreates_the_state_and_config_check_validates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let disk = file(d, "d.img", 4);
    let serve = Serve::start(d, &["--config", "udm.toml", "--state", "elsewhere.json"]);
    serve.ok(&["backend", "add", "disk", &disk]);
    serve.ok(&["dm", "create", "a", "--table", "0 1024 linear disk 0"]);
    serve.ok(&["dm", "load", "a", "--table", "0 2048 linear disk 0"]);
    serve.ok(&["dm", "create", "b", "--table", "0 1024 linear a 0"]);
    serve.ok(&["dm", "suspend", "b"]);
    assert!(d.join("elsewhere.json").exists() && !d.join("udm-state.json").exists());
    let saved = serve.ok(&["config", "save"]);
    let tables = (serve.ok(&["dm", "table"]), serve.ok(&["dm", "table", "--inactive"]), serve.ok(&["dm", "info", "b"]));
    serve.kill();

    let other = tempfile::tempdir().unwrap();
    std::fs::write(other.path().join("saved.toml"), &saved).unwrap();
    let check = Command::new(UDM).args(["config", "check", "saved.toml"]).current_dir(other.path()).output().unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
    let serve = Serve::start(other.path(), &["--config", "saved.toml"]);
    assert_eq!(
        (serve.ok(&["dm", "table"]), serve.ok(&["dm", "table", "--inactive"]), serve.ok(&["dm", "info", "b"])),
        tables
    );

    std::fs::write(
        other.path().join("bad.toml"),
        "[[backend]]\nname = \"x\"\nspec = \"nonsense\"\n\n[[device]]\nname = \"x\"\ntable = \"0 8 linear y 0\"\n",
    )
    .unwrap();
    let check =
        Command::new(UDM).args(["config", "check", "bad.toml", "--json"]).current_dir(other.path()).output().unwrap();
    assert!(!check.status.success());
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(text.contains("nonsense") && text.contains("already used") && text.contains("uses `y`"), "{text}");
}

/// Polls `done` (a merge runs in the background) for up to a minute.
fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn a_merge_finished_in_the_background_is_saved() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let (disk, cow) = (file(d, "d.img", 4), file(d, "s.cow", 4));
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk", &disk]);
    serve.ok(&["dm", "create", "vol", "--table", "0 8192 linear disk 0"]);
    serve.ok(&["snapshot", "create", "vol", "snap", "--cow", &cow]);
    serve.ok(&["export", "add", "vol", "--socket", d.join("vol.sock").to_str().unwrap()]);
    {
        let mut client = Client::connect(&d.join("vol.sock"), 1, false).unwrap();
        client.buf()[..65536].fill(0x5a);
        assert!(client.run(0, &[Op::Write { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
    }
    serve.ok(&["snapshot", "merge", "snap"]);
    wait_for("the merge finishing", || !serve.ok(&["dm", "ls"]).contains("snap"));
    // Saved by the finisher itself, with no control call after it.
    wait_for("the state saved", || !std::fs::read_to_string(d.join("udm-state.json")).unwrap().contains("snapshot"));
    serve.kill();
    let serve = Serve::start(d, &[]);
    assert_eq!(serve.ok(&["dm", "table", "vol"]).trim(), "0 8192 linear disk 0");
}

#[test]
fn an_export_that_cannot_start_again_is_kept_and_shown() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    std::fs::create_dir(d.join("socks")).unwrap();
    let disk = file(d, "d.img", 4);
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk", &disk]);
    serve.ok(&["export", "add", "e", "--device", "disk", "--socket", d.join("socks/e.sock").to_str().unwrap()]);
    serve.kill();
    std::fs::remove_dir_all(d.join("socks")).unwrap();

    let serve = Serve::start(d, &[]);
    let ls = serve.ok(&["export", "ls"]);
    assert!(ls.contains("NOT RUNNING") && ls.contains("e: not running:"), "{ls}");
    serve.ok(&["dm", "create", "x", "--table", "0 8 linear disk 0"]);
    let state = std::fs::read_to_string(d.join("udm-state.json")).unwrap();
    assert!(state.contains("socks/e.sock"), "kept in the state: {state}");
    serve.ok(&["export", "remove", "e"]);
    let state = std::fs::read_to_string(d.join("udm-state.json")).unwrap();
    assert!(!state.contains("socks/e.sock"), "forgotten once removed: {state}");
}

#[test]
fn a_merge_begun_before_its_tables_were_saved_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    empty_config(d);
    let (disk, cow) = (file(d, "d.img", 4), file(d, "s.cow", 4));
    let serve = Serve::start(d, &["--config", "udm.toml"]);
    serve.ok(&["backend", "add", "disk", &disk]);
    serve.ok(&["dm", "create", "vol", "--table", "0 8192 linear disk 0"]);
    {
        serve.ok(&["export", "add", "vol", "--socket", d.join("vol.sock").to_str().unwrap()]);
        let mut client = Client::connect(&d.join("vol.sock"), 1, false).unwrap();
        client.buf()[..65536].fill(0x11);
        assert!(client.run(0, &[Op::Write { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
        serve.ok(&["snapshot", "create", "vol", "snap", "--cow", &cow]);
        client.buf()[..65536].fill(0x22);
        assert!(client.run(0, &[Op::Write { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
    }
    serve.kill();
    // What a kill leaves when `snapshot merge` had marked the COW (and begun writing the
    // origin) but its tables were not saved yet: the state still shows the snapshot.
    {
        let cow_dev = udm_drivers::backend_spec::open_backend(&cow).unwrap();
        let mut q = cow_dev.open_queue(4).unwrap();
        udm_mapping::exception_store::probe::write_merge_mark(q.as_mut(), &cow_dev.info(), true).unwrap();
    }
    let serve = Serve::start(d, &[]);
    // The merge goes on and finishes: the origin is rolled back to the snapshot.
    wait_for("the resumed merge finishing", || !serve.ok(&["dm", "ls"]).contains("snap"));
    let mut client = Client::connect(&d.join("vol.sock"), 1, false).unwrap();
    assert!(client.run(0, &[Op::Read { offset: 0, buf: 0, len: 65536 }]).iter().all(|&r| r == 0));
    assert!(client.buf()[..65536].iter().all(|&b| b == 0x11), "rolled back to the snapshot");
}
