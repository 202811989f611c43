//! End-to-end through the `udm` binary: `udm serve` with its control socket, the CLI as
//! its client, libblkio as the front end; snapshots, resize, bad control input,
//! SIGTERM, and reconnect after the daemon is killed.

mod blkio_client;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use blkio_client::{Client, Op};
use serde_json::{json, Value};
use udm_server::control::Client as Control;

const UDM: &str = env!("CARGO_BIN_EXE_udm");

struct Server {
    child: Child,
    dir: PathBuf,
}

impl Server {
    /// Starts `udm serve` in `dir` and waits until it is ready.
    fn start(dir: &Path, args: &[&str]) -> Server {
        let mut child = Command::new(UDM)
            .arg("serve")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("udm runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        loop {
            let line = lines.next().expect("udm serve printed its banner").unwrap();
            if line.starts_with("stop with") {
                break;
            }
        }
        // Keep reading so the daemon's later output never hits a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        Server { child, dir: dir.to_path_buf() }
    }

    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(UDM).args(args).current_dir(&self.dir).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    fn ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "udm {args:?} failed: {err}");
        out
    }

    fn control(&self) -> Control {
        Control::connect(&self.dir.join("udm.ctl")).unwrap()
    }

    fn signal(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: sending a signal to our own child process.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len as u64).map(|i| (i.wrapping_mul(0x9e37) ^ seed.wrapping_mul(0x5851)) as u8).collect()
}

#[test]
fn default_volume_cli_snapshot_resize_and_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut srv = Server::start(dir.path(), &[]);
    let ctl_mode = std::fs::metadata(dir.path().join("udm.ctl")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&ctl_mode.permissions()) & 0o777, 0o600);
    assert!(srv.ok(&["dm", "table", "vol0"]).starts_with("0 2097152 linear ram0 0"));
    assert!(srv.ok(&["dm", "info", "vol0"]).contains("Open count:        1"));

    // Bad input changes nothing.
    let before = srv.ok(&["dm", "ls", "--json"]);
    let (ok, _, err) = srv.cli(&["dm", "create", "x", "--table", "0 10 linear nowhere 0"]);
    assert!(!ok && err.contains("nowhere"), "{err}");
    let (ok, _, err) = srv.cli(&["dm", "remove", "vol0"]);
    assert!(!ok && err.contains("in use"), "{err}");
    let mut c = srv.control();
    for (method, params) in
        [("dm.load", json!({"name": "vol0"})), ("dm.create", json!(["x"])), ("export.add", json!({"name": "e"}))]
    {
        let e = c.call(method, params).unwrap_err().to_string();
        assert!(e.contains("params"), "{e}");
    }
    assert_eq!(srv.ok(&["dm", "ls", "--json"]), before);

    // Data through the export, then a snapshot that keeps the old data.
    let mut client = Client::connect(&dir.path().join("vol0.sock"), 1, false).unwrap();
    let old = pattern(1, 65536);
    client.buf()[..65536].copy_from_slice(&old);
    assert_eq!(client.run(0, &[Op::Write { offset: 1 << 20, buf: 0, len: 65536 }, Op::Flush]), vec![0, 0]);
    srv.ok(&["snapshot", "create", "vol0", "snap0", "--cow", "64M", "--chunk", "8k"]);
    assert!(srv.ok(&["snapshot", "list"]).contains("snap0"));
    let new = pattern(2, 65536);
    client.buf()[..65536].copy_from_slice(&new);
    assert_eq!(client.run(0, &[Op::Write { offset: 1 << 20, buf: 0, len: 65536 }]), vec![0]);
    srv.ok(&["export", "add", "snap0", "--read-only", "--queues", "2"]);
    let mut snap = Client::connect(&dir.path().join("snap0.sock"), 2, true).unwrap();
    assert_eq!(snap.run(1, &[Op::Read { offset: 1 << 20, buf: 0, len: 65536 }]), vec![0]);
    assert!(snap.buf()[..65536] == old[..], "the snapshot shows the data as it was");
    assert!(snap.run(0, &[Op::Write { offset: 0, buf: 0, len: 4096 }])[0] < 0);
    assert_eq!(client.run(0, &[Op::Read { offset: 1 << 20, buf: 65536, len: 65536 }]), vec![0]);
    assert!(client.buf()[65536..131072] == new[..], "the origin shows the new data");
    drop(snap);
    srv.ok(&["export", "remove", "snap0"]);
    srv.ok(&["snapshot", "remove", "snap0"]);

    // Grow vol0: a longer table over a second backend reaches the front end.
    c.call("backend.add", json!({"name": "ram1", "spec": "mem:64M"})).unwrap();
    srv.ok(&["dm", "load", "vol0", "--table", "0 2097152 linear ram0 0\n2097152 131072 linear ram1 0"]);
    assert_eq!(client.capacity(), 1 << 30, "nothing changes before resume");
    srv.ok(&["dm", "suspend", "vol0"]);
    srv.ok(&["dm", "resume", "vol0"]);
    assert_eq!(client.capacity(), (1 << 30) + (64 << 20));
    let tail = pattern(3, 4096);
    client.buf()[..4096].copy_from_slice(&tail);
    let end = (1u64 << 30) + (64 << 20) - 4096;
    assert_eq!(client.run(0, &[Op::Write { offset: end, buf: 0, len: 4096 }]), vec![0]);
    assert_eq!(client.run(0, &[Op::Read { offset: end, buf: 4096, len: 4096 }]), vec![0]);
    assert!(client.buf()[4096..8192] == tail[..]);

    let stats: Value = serde_json::from_str(&srv.ok(&["stats", "--json"])).unwrap();
    assert!(stats[0]["total"]["writes"].as_u64().unwrap() >= 3, "{stats}");
    assert!(srv.ok(&["stats"]).contains("P99us"));

    drop(client);
    let status = srv.signal(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    assert!(!dir.path().join("vol0.sock").exists() && !dir.path().join("udm.ctl").exists());
}

#[test]
fn acknowledged_writes_survive_killing_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let config = format!(
        "[[backend]]\nname = \"disk\"\nspec = \"file:{}\"\n\n[[export]]\nname = \"disk\"\ndevice = \"disk\"\n\
         socket = \"disk.sock\"\nnum_queues = 2\n",
        img.display()
    );
    std::fs::write(dir.path().join("udm.toml"), config).unwrap();
    let sock = dir.path().join("disk.sock");
    // Each round writes a new generation to every block in flight at once, kills the
    // daemon with SIGKILL right after the acknowledgements, restarts it and checks that
    // every acknowledged block reads back.
    let blocks = 64usize;
    let len = 16384;
    let mut acked: Vec<Option<u64>> = vec![None; blocks];
    for round in 0..4u64 {
        let srv = Server::start(dir.path(), &["--config", "udm.toml"]);
        let mut client = Client::connect(&sock, 2, false).unwrap();
        for (b, gen) in acked.iter().enumerate() {
            if let Some(g) = gen {
                assert_eq!(client.run(b % 2, &[Op::Read { offset: (b * len) as u64, buf: 0, len }]), vec![0]);
                assert!(client.buf()[..len] == pattern(*g * 1000 + b as u64, len)[..], "round {round} block {b}");
            }
        }
        for q in 0..2 {
            let mut ops = Vec::new();
            for b in (q..blocks).step_by(2) {
                let buf = b * len;
                let data = pattern(round * 1000 + b as u64, len);
                client.buf()[buf..buf + len].copy_from_slice(&data);
                ops.push(Op::Write { offset: (b * len) as u64, buf, len });
            }
            let results = client.run(q, &ops);
            for (i, r) in results.iter().enumerate() {
                if *r == 0 {
                    acked[q + 2 * i] = Some(round);
                }
            }
        }
        drop(srv); // SIGKILL, no drain, no flush
        drop(client);
    }
    assert!(acked.iter().all(Option::is_some));
}

/// The names in the `name` fields of a JSON array.
fn names(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().filter_map(|e| e["name"].as_str().map(String::from)).collect()
}

#[test]
fn backends_are_added_listed_and_removed_at_runtime() {
    let dir = tempfile::tempdir().unwrap();
    let srv = Server::start(dir.path(), &[]);
    srv.ok(&["backend", "add", "disk1", "mem:64M"]);
    srv.ok(&["backend", "add", "disk2", "mem:32M,bs=4096"]);
    let ls: Value = serde_json::from_str(&srv.ok(&["backend", "ls", "--json"])).unwrap();
    assert_eq!(names(&ls), ["disk1", "disk2", "ram0"], "{ls}");
    assert_eq!(ls[2]["spec"], "mem:1G");
    assert_eq!(ls[2]["used_by"], json!(["vol0"]));
    assert_eq!(ls[1]["block_size"], 4096);
    let human = srv.ok(&["backend", "ls"]);
    assert!(human.contains("disk1") && human.contains("64M") && human.contains("mem:64M"), "{human}");
    assert!(human.lines().any(|l| l.starts_with("ram0") && l.contains("vol0")), "{human}");

    // Every refusal names who is in the way and changes nothing.
    srv.ok(&["export", "add", "raw1", "--device", "disk1"]);
    srv.ok(&["dm", "create", "vol2", "--table", "0 65536 linear disk2 0"]);
    let before = srv.ok(&["backend", "ls", "--json"]);
    for (args, expect) in [
        (&["backend", "remove", "ram0"][..], "vol0"),
        (&["backend", "remove", "disk1"], "raw1"),
        (&["backend", "remove", "disk2"], "vol2"),
        (&["backend", "remove", "vol0"], "dm remove"),
        (&["backend", "remove", "nothing"], "nothing"),
        (&["backend", "add", "disk1", "mem:1M"], "disk1"),
        (&["backend", "add", "disk3", "mem:lots"], "lots"),
        (&["backend", "ls", "vol0"], "not a backend"),
    ] {
        let (ok, _, err) = srv.cli(args);
        assert!(!ok && err.contains(expect), "udm {args:?}: {err}");
    }
    let e = srv.control().call("backend.remove", json!({"name": "disk1", "forse": true})).unwrap_err();
    assert!(e.to_string().contains("forse"), "{e}");
    assert_eq!(srv.ok(&["backend", "ls", "--json"]), before);
    assert!(dir.path().join("raw1.sock").exists());

    // --force stops the export serving the backend and removes it.
    srv.ok(&["backend", "remove", "--force", "disk1"]);
    assert!(!srv.ok(&["export", "ls"]).contains("raw1"));
    assert!(!dir.path().join("raw1.sock").exists(), "the forced removal stopped the export");
    // --force under a table: the table keeps its handle and its I/O goes on.
    srv.ok(&["export", "add", "vol2"]);
    srv.ok(&["backend", "remove", "-f", "disk2"]);
    let mut client = Client::connect(&dir.path().join("vol2.sock"), 1, false).unwrap();
    let data = pattern(7, 8192);
    client.buf()[..8192].copy_from_slice(&data);
    assert_eq!(
        client
            .run(0, &[Op::Write { offset: 4096, buf: 0, len: 8192 }, Op::Read { offset: 4096, buf: 8192, len: 8192 }]),
        vec![0, 0]
    );
    assert!(client.buf()[8192..16384] == data[..]);
    drop(client);
    // An unused backend goes without --force.
    srv.ok(&["backend", "add", "tmp", "null:1G"]);
    srv.ok(&["backend", "remove", "tmp"]);
    let ls: Value = serde_json::from_str(&srv.ok(&["backend", "ls", "--json"])).unwrap();
    assert_eq!(names(&ls), ["ram0"], "{ls}");
}
