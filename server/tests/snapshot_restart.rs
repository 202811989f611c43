//! `udm serve` with a `[[snapshot]]` on a file COW, killed and started again: the
//! snapshot comes back with its exceptions (not re-initialised), a new snapshot over a
//! COW that holds a store is refused unless `--reinit`, and a merge cut short by a kill
//! resumes at the next start, with `udm snapshot list` saying so.

mod blkio_client;
mod daemon_process;

use std::path::Path;
use std::time::{Duration, Instant};

use blkio_client::{Client, Op};
use daemon_process::{Daemon, Start};
use serde_json::Value;

const DISK_BYTES: usize = 16 << 20;

/// A `udm serve --config udm.toml` in a directory; SIGKILLed on drop (no drain, no
/// flush: what a crash leaves). These tests are about what the declaration and the COW
/// bring back, so each start goes without the state file a previous run saved (which
/// would otherwise be the truth: `durable_state.rs` tests that path).
struct Serve {
    daemon: Daemon,
}

impl Serve {
    fn start(dir: &Path) -> Serve {
        let _ = std::fs::remove_file(dir.join("udm-state.json"));
        Serve { daemon: Daemon::start(dir, Start { args: &["--config", "udm.toml"], ..Start::default() }) }
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

    /// `udm snapshot list --json`, by snapshot name.
    fn snapshot(&self, name: &str) -> Option<Value> {
        let list: Value = serde_json::from_str(&self.ok(&["snapshot", "list", "--json"])).unwrap();
        list.as_array().unwrap().iter().find(|s| s["name"] == name).cloned()
    }

    fn client(&self) -> Client {
        Client::connect(&self.daemon.dir.join("vol0.sock"), 1, false).unwrap()
    }
}

fn pattern(tag: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(13).wrapping_add(tag).rotate_left(2)).collect()
}

/// A 16 MiB origin file holding pattern 1, an 8 MiB blank COW file, and a udm.toml
/// declaring `vol0` over it (exported), with snapshot `snap0` (chunk 4k); `disk_spec`
/// wraps the origin file (e.g. in a `fault:`).
fn setup(dir: &Path) -> Vec<u8> {
    let a = pattern(1, DISK_BYTES);
    std::fs::write(dir.join("disk.img"), &a).unwrap();
    std::fs::File::create(dir.join("snap0.cow")).unwrap().set_len(8 << 20).unwrap();
    declare(dir, "");
    a
}

fn declare(dir: &Path, disk_faults: &str) {
    let disk = dir.join("disk.img");
    let cow = dir.join("snap0.cow");
    let config = format!(
        "[[backend]]\nname = \"disk0\"\nspec = \"{disk_faults}file:{}\"\n\n\
         [[device]]\nname = \"vol0\"\ntable = \"0 {} linear disk0 0\"\n\n\
         [[snapshot]]\norigin = \"vol0\"\nname = \"snap0\"\ncow = \"file:{}\"\nchunk = \"4k\"\n\n\
         [[export]]\nname = \"vol0\"\ndevice = \"vol0\"\nsocket = \"vol0.sock\"\n",
        disk.display(),
        DISK_BYTES / 512,
        cow.display()
    );
    std::fs::write(dir.join("udm.toml"), config).unwrap();
}

/// Writes pattern 2 to `chunks` 4 KiB chunks, every other one (each its own exception,
/// and its own merge batch).
fn write_every_other_chunk(client: &mut Client, chunks: usize) {
    let b = pattern(2, chunks * 8192);
    client.buf()[..b.len()].copy_from_slice(&b);
    let ops: Vec<Op> = (0..chunks).map(|i| Op::Write { offset: (i * 8192) as u64, buf: i * 8192, len: 4096 }).collect();
    assert!(client.run(0, &ops).iter().all(|&r| r == 0));
}

/// Reads `len` bytes in 64 KiB requests.
fn read(client: &mut Client, offset: u64, len: usize) -> Vec<u8> {
    const STEP: usize = 64 << 10;
    let ops: Vec<Op> = (0..len.div_ceil(STEP))
        .map(|i| Op::Read { offset: offset + (i * STEP) as u64, buf: i * STEP, len: STEP.min(len - i * STEP) })
        .collect();
    assert!(client.run(0, &ops).iter().all(|&r| r == 0));
    client.buf()[..len].to_vec()
}

/// `allocated` of a snapshot's status (`<allocated>/<total> <metadata>`).
fn allocated(snapshot: &Value) -> u64 {
    let status = snapshot["status"].as_str().unwrap();
    status.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("status `{status}`"))
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(started.elapsed() < Duration::from_secs(60), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_declared_snapshot_keeps_its_exceptions_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let a = setup(dir.path());
    let srv = Serve::start(dir.path());
    let mut client = srv.client();
    write_every_other_chunk(&mut client, 48);
    let before = srv.snapshot("snap0").unwrap();
    assert_eq!(before["status"], "400/16384 16", "48 exceptions: (2 + 48) chunks of 8 sectors");
    drop(client);
    drop(srv); // SIGKILL

    let srv = Serve::start(dir.path());
    let after = srv.snapshot("snap0").unwrap();
    assert_eq!(after["status"], before["status"], "the COW was re-attached, not re-initialised");
    assert_eq!(after["data_percent"], before["data_percent"]);
    srv.ok(&["export", "add", "snap0", "--read-only"]);
    let mut snap = Client::connect(&dir.path().join("snap0.sock"), 1, true).unwrap();
    assert!(read(&mut snap, 0, 1 << 20) == a[..1 << 20], "the snapshot still shows the old data");
    drop(snap);

    // A new snapshot over a COW that holds a store is refused, saying what it holds;
    // --attach re-attaches it as it is, --reinit starts afresh.
    let copy = |name: &str| {
        std::fs::copy(dir.path().join("snap0.cow"), dir.path().join(name)).unwrap();
        format!("file:{}", dir.path().join(name).display())
    };
    let (copy1, copy2) = (copy("copy1.cow"), copy("copy2.cow"));
    let (ok, err) = srv.udm(&["snapshot", "create", "vol0", "snap1", "--cow", &copy1]);
    assert!(!ok && err.contains("48 exceptions") && err.contains("--reinit"), "{err}");
    assert!(srv.snapshot("snap1").is_none());
    srv.ok(&["snapshot", "create", "vol0", "snap1", "--cow", &copy1, "--attach"]);
    assert_eq!(srv.snapshot("snap1").unwrap()["status"], before["status"]);
    srv.ok(&["snapshot", "create", "vol0", "snap2", "--cow", &copy2, "--reinit"]);
    assert_eq!(srv.snapshot("snap2").unwrap()["status"], "16/16384 16");
}

#[test]
fn a_merge_killed_midway_resumes_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let a = setup(dir.path());
    let srv = Serve::start(dir.path());
    write_every_other_chunk(&mut srv.client(), 64);
    drop(srv);

    // The origin disk hangs after 5 writes: the merge stops part way, and the daemon
    // is killed there.
    declare(dir.path(), "fault:stall-after=5@");
    let srv = Serve::start(dir.path());
    let full = allocated(&srv.snapshot("snap0").unwrap());
    assert_eq!(full, 528, "64 exceptions came back");
    srv.ok(&["snapshot", "merge", "snap0"]);
    wait_for("a few batches to merge", || srv.snapshot("snap0").is_some_and(|s| allocated(&s) < full));
    drop(srv);

    // Next start: the COW says a merge was under way; it resumes, and list says so.
    declare(dir.path(), "fault:stall-after=3@");
    let srv = Serve::start(dir.path());
    let resumed = srv.snapshot("snap0").expect("the merging snapshot is listed");
    assert_eq!(resumed["merging"], true, "{resumed}");
    assert_eq!(resumed["origin"], "vol0");
    assert!(allocated(&resumed) < full, "{resumed}");
    assert!(srv.ok(&["snapshot", "list"]).contains("merging"));
    let (ok, err) = srv.udm(&["snapshot", "create", "vol0", "snap1", "--cow", "64M"]);
    assert!(!ok && err.contains("once the merge completes"), "no new snapshot of an origin while it merges: {err}");
    let (ok, err) = srv.udm(&["snapshot", "remove", "snap0"]);
    assert!(!ok && err.contains("being merged into `vol0`"), "{err}");
    drop(srv);

    // Without the fault the merge completes; udm finishes it and removes the snapshot.
    declare(dir.path(), "");
    let srv = Serve::start(dir.path());
    wait_for("the merge to finish", || srv.snapshot("snap0").is_none());
    assert_eq!(srv.ok(&["dm", "table", "vol0"]).trim(), format!("0 {} linear disk0 0", DISK_BYTES / 512));
    let mut client = srv.client();
    assert!(read(&mut client, 0, 1 << 20) == a[..1 << 20], "the origin has the snapshot's data");
}
