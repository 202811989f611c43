//! Durable state (issue 11): what an operator builds through the CLI survives the
//! daemon. `udm serve` saves every successful control change in a state file beside
//! its control socket (`udm-state.json`, or `--state PATH`) before it replies, and a
//! `udm serve` started again in the same directory rebuilds backends, devices (live
//! and inactive tables, suspended or not), snapshots (COW re-attached, merges resumed)
//! and exports at the same sockets, so clients reconnect by themselves.
//!
//! * [`a_stack_built_through_the_cli_survives_sigkill_at_random_points`]: two file
//!   backends, a striped device, a snapshot whose file COW holds exceptions, a merge
//!   stopped half way (its origin disk hangs after a few writes), a suspended device
//!   with an inactive table, two exports with verified clients; the daemon is killed
//!   at seeded random points, also while two threads each take a device through
//!   create, load, suspend, resume, export add, load, export remove, clear and remove,
//!   and a third creates and removes a snapshot, in loops. After each restart the
//!   reports are what they were, each change in flight is either wholly there or not
//!   at all, every acknowledged change and write is there, the merge resumed, and the
//!   clients carried on by themselves.
//! * [`a_corrupt_or_newer_state_file_is_refused_and_left_as_it_was`]
//! * [`a_device_whose_backend_file_is_gone_comes_up_as_an_error_and_the_rest_start`]
//! * [`config_save_recreates_every_table_and_config_check_names_what_is_wrong`]
//!
//! Disk images live in a temporary directory on the host's file system (ext4 on a
//! Debian host). `UDM_DURABLE_SEED=N` replays the kill points of a failed run (every
//! failure message names its seed).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use udm_tests::udm_process::{udm_binary, UdmProcess};
use udm_tests::verified_client::{Corruption, Progress, VerifiedClient, QUEUE_DEPTH};

/// The state file's name when `--state` is not given (beside the control socket).
const STATE_FILE: &str = "udm-state.json";
/// Writes the merging snapshot's origin disk lets through at each start before it
/// holds every request: the merge advances a little at each start and never finishes
/// within the test.
const MERGE_STALL_AFTER: u64 = 2;
/// Blocks each verified client works on (4 MiB).
const CLIENT_BLOCKS: u64 = 1024;
/// Kills with the clients' writes and control changes in flight.
const KILL_ROUNDS: usize = 8;
/// Completions each client must make after a restart to show it carried on.
const PROGRESS_AFTER_RESTART: u64 = 200;

// ---------------------------------------------------------------------------------
// The CLI, from any thread (the control-change thread outlives a daemon).

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(udm_binary()).args(args).current_dir(dir).env("NO_COLOR", "1").output().expect("udm runs")
}

#[track_caller]
fn cli_ok(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(out.status.success(), "udm {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[track_caller]
fn cli_json(dir: &Path, args: &[&str]) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let text = cli_ok(dir, &all);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("udm {all:?} printed no JSON ({e}): {text}"))
}

fn file_spec(dir: &Path, file: &str) -> String {
    format!("file:{}", dir.join(file).display())
}

/// Creates a sparse file of `mib` MiB (reads as zeroes, as a new disk image does).
fn create_image(dir: &Path, file: &str, mib: u64) {
    std::fs::File::create(dir.join(file)).unwrap().set_len(mib << 20).unwrap();
}

/// `udm serve` with no config in `dir`, then the embedded default volume (if the
/// daemon made one) removed again, so the stack holds only what the test builds.
fn start_empty(dir: &Path) -> UdmProcess {
    let udm = UdmProcess::start(dir, &[]);
    if udm.cli_json(&["export", "ls"]).as_array().unwrap().iter().any(|e| e["config"]["name"] == "vol0") {
        udm.cli_ok(&["export", "remove", "vol0"]);
    }
    if udm.cli_json(&["dm", "ls"]).as_array().unwrap().iter().any(|d| d["name"] == "vol0") {
        udm.cli_ok(&["dm", "remove", "vol0"]);
    }
    if udm.cli_json(&["dm", "ls"]).as_array().unwrap().iter().any(|d| d["name"] == "ram0") {
        udm.cli_ok(&["backend", "remove", "ram0"]);
    }
    udm
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Seeded choices (xorshift64*), so a failing run's kill points can be replayed.
struct Rng(u64);

impl Rng {
    fn from_env() -> Rng {
        let seed = std::env::var("UDM_DURABLE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        eprintln!("durable_state: UDM_DURABLE_SEED={seed}");
        Rng(seed | 1)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

// ---------------------------------------------------------------------------------
// What the daemon reports, and what may differ across a restart.

/// The reports an operator compares: `dm ls --tree`, `dm table` (live and inactive),
/// `dm status`, `dm info`, `snapshot list`, `backend ls`, `export ls`, keyed by name.
#[derive(Debug, Clone, PartialEq)]
struct Reports {
    tree: String,
    live: BTreeMap<String, String>,
    inactive: BTreeMap<String, String>,
    status: BTreeMap<String, String>,
    /// `dm info` without what changes by itself (open count, event number).
    info: BTreeMap<String, String>,
    snapshots: BTreeMap<String, Value>,
    backends: BTreeMap<String, String>,
    exports: BTreeMap<String, String>,
}

fn by_name(rows: &Value, value: impl Fn(&Value) -> String) -> BTreeMap<String, String> {
    rows.as_array()
        .expect("a list")
        .iter()
        .filter(|r| !is_churn(r["name"].as_str().unwrap_or("")))
        .map(|r| (r["name"].as_str().expect("a name").to_string(), value(r)))
        .collect()
}

impl Reports {
    fn collect(dir: &Path) -> Reports {
        let tree = cli_json(dir, &["dm", "ls", "--tree"]).as_str().expect("the tree as text").to_string();
        let text = |r: &Value| r["text"].as_str().unwrap_or("").trim_end().to_string();
        let info = |r: &Value| {
            format!(
                "{} {} {} tables={} targets={} sectors={}",
                r["kind"], r["uuid"], r["state"], r["tables"], r["targets"], r["sectors"]
            )
        };
        let backend = |r: &Value| format!("{} {} {} {}", r["spec"], r["sectors"], r["block_size"], r["read_only"]);
        let exports = cli_json(dir, &["export", "ls"])
            .as_array()
            .expect("a list")
            .iter()
            .map(|e| {
                let c = &e["config"];
                (
                    c["name"].as_str().expect("a name").to_string(),
                    format!("{} {} {} {}", c["device"], c["socket"], c["num_queues"], c["read_only"]),
                )
            })
            .filter(|(name, _)| !is_churn(name))
            .collect();
        let snapshots = cli_json(dir, &["snapshot", "list"])
            .as_array()
            .expect("a list")
            .iter()
            .map(|s| (s["name"].as_str().expect("a name").to_string(), s.clone()))
            .filter(|(name, _)| !is_churn(name))
            .collect();
        Reports {
            tree: tree_without(&tree, is_churn),
            live: by_name(&cli_json(dir, &["dm", "table"]), text),
            inactive: by_name(&cli_json(dir, &["dm", "table", "--inactive"]), text),
            status: by_name(&cli_json(dir, &["dm", "status"]), text),
            info: by_name(&cli_json(dir, &["dm", "info"]), info),
            snapshots,
            backends: by_name(&cli_json(dir, &["backend", "ls"]), backend),
            exports,
        }
    }

    /// What differs from `before` beyond what a restart may change: the merging
    /// snapshot's exceptions may only have shrunk (the merge resumed), and with
    /// `writes_ran` the other snapshot's may only have grown (its origin was written).
    fn differences(&self, before: &Reports, writes_ran: bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.tree != before.tree {
            out.push(format!("dm ls --tree was\n{}now\n{}", before.tree, self.tree));
        }
        for (what, was, now) in [
            ("dm table", &before.live, &self.live),
            ("dm table --inactive", &before.inactive, &self.inactive),
            ("dm info", &before.info, &self.info),
            ("backend ls", &before.backends, &self.backends),
            ("export ls", &before.exports, &self.exports),
        ] {
            if was != now {
                out.push(format!("{what} was {was:#?}\nnow {now:#?}"));
            }
        }
        if before.status.keys().ne(self.status.keys()) {
            out.push(format!("dm status lists {:?}, was {:?}", self.status.keys(), before.status.keys()));
        }
        for (name, was) in &before.status {
            let Some(now) = self.status.get(name) else { continue };
            if let Err(e) = same_status(was, now, allocation_rule(name, writes_ran)) {
                out.push(format!("dm status {name}: was `{was}`, now `{now}`: {e}"));
            }
        }
        if before.snapshots.keys().ne(self.snapshots.keys()) {
            out.push(format!("snapshot list names {:?}, was {:?}", self.snapshots.keys(), before.snapshots.keys()));
        }
        for (name, was) in &before.snapshots {
            let Some(now) = self.snapshots.get(name) else { continue };
            let fixed = |s: &Value| {
                let mut s = s.clone();
                let o = s.as_object_mut().expect("an object");
                o.remove("status");
                o.remove("data_percent");
                s
            };
            let (was_status, now_status) = (was["status"].as_str().unwrap_or(""), now["status"].as_str().unwrap_or(""));
            if fixed(was) != fixed(now) {
                out.push(format!("snapshot list {name}: was {was}, now {now}"));
            } else if let Err(e) = same_allocation(was_status, now_status, allocation_rule(name, writes_ran)) {
                out.push(format!("snapshot list {name}: status was `{was_status}`, now `{now_status}`: {e}"));
            }
        }
        out
    }
}

/// `tree` without the top-level entries `skip` picks and what they show below them.
fn tree_without(tree: &str, skip: impl Fn(&str) -> bool) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in tree.lines() {
        if !line.starts_with(['|', '`', ' ']) {
            skipping = skip(line.trim());
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// How a snapshot's allocated sectors may move across a restart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Allocation {
    Same,
    /// Its origin was written meanwhile: exceptions were added. The count taken before
    /// may also include exceptions of writes then in flight, which a kill may have cut
    /// before their commit (their writes were never acknowledged; the snapshot's
    /// contents, checked at the end, tell whether any acknowledged one went missing).
    MayGrow,
    MayShrink,
}

/// Sectors of the exceptions a kill may take back: one 4k chunk per write the origin's
/// client had in flight, plus a metadata chunk.
const UNCOMMITTED_SLACK: u64 = (QUEUE_DEPTH as u64 + 1) * 8;

/// The merge's devices (`mvol`, `msnap` and their parts) may shrink; the other
/// snapshot grows while its origin's client writes.
fn allocation_rule(name: &str, writes_ran: bool) -> Allocation {
    if name.starts_with("mvol") || name.starts_with("msnap") {
        Allocation::MayShrink
    } else if writes_ran {
        Allocation::MayGrow
    } else {
        Allocation::Same
    }
}

/// Compares two `dm status` texts line by line; snapshot lines (`start len snapshot
/// A/T M`, also `snapshot-merge`) follow `rule` for A.
fn same_status(was: &str, now: &str, rule: Allocation) -> Result<(), String> {
    if was == now {
        return Ok(());
    }
    let (was_lines, now_lines): (Vec<&str>, Vec<&str>) = (was.lines().collect(), now.lines().collect());
    if was_lines.len() != now_lines.len() {
        return Err("a different number of targets".into());
    }
    for (w, n) in was_lines.iter().zip(&now_lines) {
        let (wt, nt): (Vec<&str>, Vec<&str>) = (w.split_whitespace().collect(), n.split_whitespace().collect());
        let snapshot_like = wt.get(2).is_some_and(|t| *t == "snapshot" || *t == "snapshot-merge");
        if wt.len() < 4 || wt[..3] != nt[..3.min(nt.len())] || !snapshot_like {
            if w != n {
                return Err(format!("`{w}` became `{n}`"));
            }
            continue;
        }
        same_allocation(wt[3..].join(" ").as_str(), nt[3..].join(" ").as_str(), rule)?;
    }
    Ok(())
}

/// A snapshot status `A/T M`: A follows `rule`, T stays.
fn same_allocation(was: &str, now: &str, rule: Allocation) -> Result<(), String> {
    if was == now {
        return Ok(());
    }
    let parse = |s: &str| -> Option<(u64, u64)> {
        let (a, rest) = s.split_once('/')?;
        let t = rest.split_whitespace().next()?;
        Some((a.parse().ok()?, t.parse().ok()?))
    };
    let (Some((wa, wt)), Some((na, nt))) = (parse(was), parse(now)) else {
        return Err("not an `allocated/total metadata` status".into());
    };
    match rule {
        _ if wt != nt => Err(format!("total {wt} became {nt}")),
        Allocation::Same => Err(format!("allocated {wa} became {na} with no write in between")),
        Allocation::MayGrow if na + UNCOMMITTED_SLACK < wa => {
            Err(format!("allocated shrank from {wa} to {na}: more exceptions lost than writes were in flight"))
        }
        Allocation::MayShrink if na > wa => Err(format!("allocated grew from {wa} to {na} during a merge")),
        _ => Ok(()),
    }
}

// ---------------------------------------------------------------------------------
// Verified clients, paused and resumed around restarts.

type ClientThread = JoinHandle<(VerifiedClient, Result<(), Corruption>)>;

/// Verified clients running on their exports; `epoch` tells them the daemon was
/// restarted (libblkio does not report a dead socket).
struct Workload {
    names: Vec<String>,
    stop: Arc<AtomicBool>,
    progress: Vec<Arc<Progress>>,
    threads: Vec<Option<ClientThread>>,
}

impl Workload {
    fn start(clients: Vec<(String, VerifiedClient)>, epoch: &Arc<AtomicU64>) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let mut names = Vec::new();
        let mut progress = Vec::new();
        let mut threads = Vec::new();
        for (name, mut client) in clients {
            names.push(name);
            progress.push(Arc::clone(&client.progress));
            let (stop, epoch) = (Arc::clone(&stop), Arc::clone(epoch));
            threads.push(Some(std::thread::spawn(move || {
                let result = client.run(&stop, &epoch, Duration::from_secs(10));
                (client, result)
            })));
        }
        Workload { names, stop, progress, threads }
    }

    fn completed(&self) -> Vec<u64> {
        self.progress.iter().map(|p| p.completed()).collect()
    }

    fn connections(&self) -> Vec<u64> {
        self.progress.iter().map(|p| p.connections.load(Ordering::Relaxed)).collect()
    }

    /// A client that stopped on its own found a wrong block: its report, now.
    fn fail_fast(&mut self, log: &str, seed: &str) {
        for (name, thread) in self.names.iter().zip(self.threads.iter_mut()) {
            if thread.as_ref().is_some_and(|t| t.is_finished()) {
                let (_, result) = thread.take().expect("checked").join().expect("client thread");
                let c = result.expect_err("a client stops early only on a wrong block");
                panic!("{seed}: {name}: block {} {}\ndaemon log:\n{log}", c.block, c.what);
            }
        }
    }

    /// Waits until every client completed `count` more requests on a connection made
    /// after `connections` (it reconnected by itself).
    fn wait_for_progress(&mut self, udm: &UdmProcess, connections: Option<&[u64]>, count: u64, what: &str, seed: &str) {
        let start = self.completed();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let reconnected = connections.is_none_or(|c| self.connections().iter().zip(c).all(|(now, was)| now > was));
            if reconnected && self.completed().iter().zip(&start).all(|(now, was)| *now >= was + count) {
                return;
            }
            self.fail_fast(&udm.log(), seed);
            assert!(
                Instant::now() < deadline,
                "{seed}: {what}: clients {:?} stuck at {:?} completions (from {start:?}), connections {:?} (were {connections:?})\ndaemon log:\n{}",
                self.names,
                self.completed(),
                self.connections(),
                udm.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the clients and hands them back (their models intact).
    fn pause(mut self, log: &str, seed: &str) -> Vec<(String, VerifiedClient)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for (name, thread) in self.names.iter().zip(self.threads.iter_mut()) {
            let (client, result) = thread.take().expect("running").join().expect("client thread");
            if let Err(c) = result {
                panic!("{seed}: {name}: block {} {}\ndaemon log:\n{log}", c.block, c.what);
            }
            out.push((name.clone(), client));
        }
        out
    }
}

// ---------------------------------------------------------------------------------
// Control-change threads: each takes its own device through a cycle of changes.

/// A device the control-change threads work on: its name and its two tables (created
/// with the first, the second loaded inactive). Two run at once, so changes also
/// race each other for the state file.
#[derive(Debug, Clone, Copy)]
struct Churn {
    name: &'static str,
    tables: [&'static str; 2],
}

const CHURNS: [Churn; 2] = [
    Churn { name: "churn", tables: ["0 2048 linear b 32768", "0 4096 linear b 32768"] },
    Churn { name: "churn2", tables: ["0 2048 linear b 40960", "0 4096 linear b 40960"] },
];
/// Changes in a cycle; any two states two changes apart differ, so a lost
/// acknowledged change cannot pass for the one after it.
const CHURN_STEPS: usize = 9;

/// The devices the control-change threads change (compared on their own): the
/// churn devices, and the snapshot `sn` of `sorig` with its parts.
fn is_churn(name: &str) -> bool {
    CHURNS.iter().any(|c| c.name == name) || name.starts_with("sorig") || name == "sn" || name.starts_with("sn-")
}

/// A churn device as the daemon reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ChurnState {
    exists: bool,
    live: String,
    inactive: String,
    suspended: bool,
    exported: bool,
}

impl ChurnState {
    fn absent() -> ChurnState {
        ChurnState { exists: false, live: String::new(), inactive: String::new(), suspended: false, exported: false }
    }
}

impl Churn {
    /// The state after `done` changes of the cycle from an absent device.
    fn after(&self, done: usize) -> ChurnState {
        let [t1, t2] = self.tables;
        let device = |live: &str, inactive: &str, suspended, exported| ChurnState {
            exists: true,
            live: live.into(),
            inactive: inactive.into(),
            suspended,
            exported,
        };
        match done % CHURN_STEPS {
            0 => ChurnState::absent(),
            1 => device(t1, "", false, false),
            2 => device(t1, t2, false, false),
            3 => device(t1, t2, true, false),
            4 | 8 => device(t2, "", false, false),
            5 => device(t2, "", false, true),
            6 => device(t2, t1, false, true),
            _ => device(t2, t1, false, false),
        }
    }

    fn observe(&self, dir: &Path) -> ChurnState {
        let name = self.name;
        let exported = cli_json(dir, &["export", "ls"]).as_array().unwrap().iter().any(|e| e["config"]["name"] == name);
        let info = cli(dir, &["dm", "info", name, "--json"]);
        if !info.status.success() {
            return ChurnState { exported, ..ChurnState::absent() };
        }
        let info: Value = serde_json::from_slice(&info.stdout).expect("dm info prints JSON");
        let info = if info.is_array() { info[0].clone() } else { info };
        let table = |inactive: bool| {
            let mut args = vec!["dm", "table", name];
            if inactive {
                args.push("--inactive");
            }
            let rows = cli_json(dir, &args);
            rows[0]["text"].as_str().unwrap_or("").trim().to_string()
        };
        ChurnState {
            exists: true,
            live: table(false),
            inactive: table(true),
            suspended: info["state"] == "SUSPENDED",
            exported,
        }
    }

    fn socket(&self, dir: &Path) -> String {
        dir.join(format!("{}.sock", self.name)).display().to_string()
    }

    /// The CLI arguments of change number `step` of the cycle.
    fn step(&self, step: usize, dir: &Path) -> Vec<String> {
        let name = self.name;
        let socket = self.socket(dir);
        let args: Vec<&str> = match step % CHURN_STEPS {
            0 => vec!["dm", "create", name, "--table", self.tables[0]],
            1 => vec!["dm", "load", name, "--table", self.tables[1]],
            2 => vec!["dm", "suspend", name],
            3 => vec!["dm", "resume", name],
            4 => vec!["export", "add", name, "--socket", &socket],
            5 => vec!["dm", "load", name, "--table", self.tables[0]],
            6 => vec!["export", "remove", name],
            7 => vec!["dm", "clear", name],
            _ => vec!["dm", "remove", name],
        };
        args.into_iter().map(String::from).collect()
    }

    fn spawn(self, dir: &Path, killed: &Arc<AtomicBool>) -> JoinHandle<ChurnEnd> {
        spawn_changes(dir, killed, move |step, dir| self.step(step, dir))
    }

    /// Takes the device back to absent, whatever state it came back in.
    fn remove(&self, dir: &Path) {
        let state = self.observe(dir);
        if state.exported {
            cli_ok(dir, &["export", "remove", self.name]);
        }
        if state.exists {
            if state.suspended {
                cli_ok(dir, &["dm", "resume", self.name]);
            }
            cli_ok(dir, &["dm", "remove", self.name]);
        }
        assert_eq!(self.observe(dir), ChurnState::absent(), "{} after its removal", self.name);
    }
}

/// How a control-change thread ended: the changes acknowledged, and the error of the
/// first that was not (with whether the daemon had been killed by then).
struct ChurnEnd {
    acknowledged: usize,
    error: String,
    after_kill: bool,
}

/// Applies changes `step(0)`, `step(1)`, ... one after another until one fails (the
/// daemon is killed meanwhile), counting those whose reply said ok.
fn spawn_changes(
    dir: &Path,
    killed: &Arc<AtomicBool>,
    step: impl Fn(usize, &Path) -> Vec<String> + Send + 'static,
) -> JoinHandle<ChurnEnd> {
    let (dir, killed) = (dir.to_path_buf(), Arc::clone(killed));
    std::thread::spawn(move || {
        let mut done = 0;
        loop {
            let args = step(done, &dir);
            let out = cli(&dir, &args.iter().map(String::as_str).collect::<Vec<_>>());
            if !out.status.success() {
                return ChurnEnd {
                    acknowledged: done,
                    error: format!("udm {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim()),
                    after_kill: killed.load(Ordering::Acquire),
                };
            }
            done += 1;
        }
    })
}

/// The table of `sorig`, whose snapshot `sn` a control-change thread creates
/// (`snapshot create`: the origin suspended, its table replaced, three devices made)
/// and removes, in turn: compound changes.
const SNAP_ORIGIN_TABLE: &str = "0 2048 linear b 45056";

fn snapshot_step(step: usize, dir: &Path) -> Vec<String> {
    let cow = file_spec(dir, "sn.cow");
    let args = if step.is_multiple_of(2) {
        vec!["snapshot", "create", "sorig", "sn", "--cow", &cow, "--reinit"]
    } else {
        vec!["snapshot", "remove", "sn"]
    };
    args.into_iter().map(String::from).collect()
}

/// The snapshot `sn` as the daemon reports it: which of its parts exist, and the
/// origin's table.
fn snapshot_parts(dir: &Path) -> (Vec<String>, String) {
    let names: Vec<String> = cli_json(dir, &["dm", "ls"])
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|d| d["name"].as_str().map(String::from))
        .filter(|n| ["sorig-real", "sn", "sn-cow"].contains(&n.as_str()))
        .collect();
    let origin = cli_ok(dir, &["dm", "table", "sorig"]).trim().to_string();
    (names, origin)
}

/// What [`snapshot_parts`] must be with or without the snapshot.
fn snapshot_parts_when(present: bool) -> (Vec<String>, String) {
    if present {
        (vec!["sn".into(), "sn-cow".into(), "sorig-real".into()], "0 2048 snapshot-origin sorig-real".into())
    } else {
        (vec![], SNAP_ORIGIN_TABLE.into())
    }
}

// ---------------------------------------------------------------------------------
// 1 + 2: the stack, killed at random points.

/// Builds the stack through the CLI only; returns the daemon and the verified clients
/// (not yet running) for the exports `stripe` and `vol`.
fn build_stack(dir: &Path) -> (UdmProcess, Vec<(String, VerifiedClient)>) {
    for (file, mib) in [("a.img", 24), ("b.img", 24), ("m.img", 8), ("snap.cow", 8), ("msnap.cow", 8)] {
        create_image(dir, file, mib);
    }
    let udm = start_empty(dir);
    let ok = |args: &[&str]| udm.cli_ok(args);
    ok(&["backend", "add", "a", &file_spec(dir, "a.img")]);
    ok(&["backend", "add", "b", &file_spec(dir, "b.img")]);
    ok(&["dm", "create", "stripe", "--table", "0 32768 striped 2 128 a 0 b 0"]);
    ok(&["dm", "create", "vol", "--table", "0 16384 linear a 16384"]);
    // The origin is still all zeroes: whatever the client writes to `vol` later is
    // copied out first, and the snapshot must read zeroes to the end.
    ok(&["snapshot", "create", "vol", "snap", "--cow", &file_spec(dir, "snap.cow"), "--chunk", "4k"]);
    // A device left suspended with a bigger table staged, as dmsetup would show it.
    ok(&["dm", "create", "susp", "--table", "0 2048 linear b 16384"]);
    ok(&["dm", "load", "susp", "--table", "0 4096 linear b 16384"]);
    ok(&["dm", "suspend", "susp"]);

    // A merge that stops half way: the snapshot of `mvol` gets exceptions (writes to
    // the snapshot itself, which leave the origin's disk alone), then merges into an
    // origin whose disk hangs after MERGE_STALL_AFTER writes at every start.
    let m = format!("fault:stall-after={MERGE_STALL_AFTER}@{}", file_spec(dir, "m.img"));
    ok(&["backend", "add", "m", &m]);
    ok(&["dm", "create", "mvol", "--table", "0 16384 linear m 0"]);
    ok(&["snapshot", "create", "mvol", "msnap", "--cow", &file_spec(dir, "msnap.cow"), "--chunk", "4k"]);
    ok(&["export", "add", "msnap"]);
    let mut filler = VerifiedClient::new(&dir.join("msnap.sock"), 9, 256, 0x3e96);
    let (stop, epoch) = (AtomicBool::new(false), AtomicU64::new(0));
    std::thread::scope(|s| {
        let progress = Arc::clone(&filler.progress);
        let runner = s.spawn(|| filler.run(&stop, &epoch, Duration::from_secs(10)));
        wait_until("300 writes to the snapshot", Duration::from_secs(30), || {
            runner.is_finished() || progress.writes.load(Ordering::Relaxed) >= 300
        });
        stop.store(true, Ordering::Relaxed);
        if let Err(c) = runner.join().expect("filler thread") {
            panic!("msnap: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
        }
    });
    ok(&["export", "remove", "msnap"]);
    let full = allocated(&snapshot(dir, "msnap").expect("msnap is listed"));
    ok(&["snapshot", "merge", "msnap"]);
    udm.wait_for_log("fault: device stalled", Duration::from_secs(20));
    let merging = snapshot(dir, "msnap").expect("the merging snapshot is listed");
    assert_eq!(merging["merging"], true, "{merging}");
    assert!(allocated(&merging) < full && allocated(&merging) > 100, "not half way: {merging} (had {full})");

    // The origin of the snapshot a control-change thread creates and removes.
    create_image(dir, "sn.cow", 1);
    ok(&["dm", "create", "sorig", "--table", SNAP_ORIGIN_TABLE]);

    ok(&["export", "add", "stripe"]);
    ok(&["export", "add", "vol"]);
    let clients = vec![
        ("stripe".to_string(), VerifiedClient::new(&dir.join("stripe.sock"), 1, CLIENT_BLOCKS, 0x57e1)),
        ("vol".to_string(), VerifiedClient::new(&dir.join("vol.sock"), 2, CLIENT_BLOCKS, 0x7011)),
    ];
    (udm, clients)
}

/// Once paused clients' connections are gone, a suspend and resume of each exported
/// device drains what the daemon still had in flight for them, so the reports stop
/// moving.
fn settle(dir: &Path, exports: &[&str]) {
    wait_until("the paused clients' connections to close", Duration::from_secs(20), || {
        cli_json(dir, &["export", "ls"])
            .as_array()
            .unwrap()
            .iter()
            .all(|e| !exports.contains(&e["config"]["name"].as_str().unwrap_or("")) || e["connected"] == false)
    });
    for device in exports {
        cli_ok(dir, &["dm", "suspend", device]);
        cli_ok(dir, &["dm", "resume", device]);
    }
}

fn snapshot(dir: &Path, name: &str) -> Option<Value> {
    cli_json(dir, &["snapshot", "list"]).as_array().unwrap().iter().find(|s| s["name"] == name).cloned()
}

/// `allocated` of a snapshot's status (`<allocated>/<total> <metadata>`).
fn allocated(snapshot: &Value) -> u64 {
    let status = snapshot["status"].as_str().unwrap_or("");
    status.split('/').next().and_then(|a| a.parse().ok()).unwrap_or_else(|| panic!("status `{status}`"))
}

/// Restarts `udm serve` (no config) in `dir`: what it rebuilds comes from the state file.
fn restart(dir: &Path) -> UdmProcess {
    UdmProcess::start(dir, &[])
}

#[test]
fn a_stack_built_through_the_cli_survives_sigkill_at_random_points() {
    let dir = tempfile::tempdir().unwrap();
    let dir = dir.path();
    let mut rng = Rng::from_env();
    let seed = format!("UDM_DURABLE_SEED={}", rng.0);
    let (mut udm, clients) = build_stack(dir);
    let epoch = Arc::new(AtomicU64::new(0));
    let mut workload = Workload::start(clients, &epoch);
    workload.wait_for_progress(&udm, None, PROGRESS_AFTER_RESTART, "before the first kill", &seed);

    // A kill with nothing in flight: every report is exactly what it was (but for the
    // merge, which resumes and moves on).
    let clients = workload.pause(&udm.log(), &seed);
    settle(dir, &["stripe", "vol"]);
    let before = Reports::collect(dir);
    let merge_before = allocated(&snapshot(dir, "msnap").unwrap());
    udm.kill();
    epoch.fetch_add(1, Ordering::Release);
    udm = restart(dir);
    let after = Reports::collect(dir);
    let differences = after.differences(&before, false);
    assert!(differences.is_empty(), "{seed}: after a quiet kill:\n{}\nlog:\n{}", differences.join("\n"), udm.log());
    assert_eq!(after.info["susp"], before.info["susp"], "suspended, with an inactive table");
    // The merge resumed by itself: it moves on until its disk hangs again.
    udm.wait_for_log("fault: device stalled", Duration::from_secs(20));
    let merge_now = snapshot(dir, "msnap").expect("the merge is still under way");
    assert!(
        merge_now["merging"] == true && allocated(&merge_now) < merge_before,
        "{seed}: the merge did not resume: {merge_now} (was {merge_before})"
    );
    let connections: Vec<u64> = clients.iter().map(|(_, c)| c.progress.connections.load(Ordering::Relaxed)).collect();
    workload = Workload::start(clients, &epoch);
    workload.wait_for_progress(&udm, Some(&connections), PROGRESS_AFTER_RESTART, "after a quiet kill", &seed);

    // Kills at random points, with the clients' writes in flight and a control change
    // under way.
    let mut landed_mid_change = 0;
    for round in 1..=KILL_ROUNDS {
        let before = Reports::collect(dir);
        let connections = workload.connections();
        let killed = Arc::new(AtomicBool::new(false));
        let churns: Vec<_> = CHURNS.iter().map(|c| (c, c.spawn(dir, &killed))).collect();
        let snapshot_changes = spawn_changes(dir, &killed, snapshot_step);
        std::thread::sleep(Duration::from_millis(rng.below(400)));
        killed.store(true, Ordering::Release);
        udm.kill();
        epoch.fetch_add(1, Ordering::Release);
        let ends: Vec<(&Churn, ChurnEnd)> =
            churns.into_iter().map(|(c, t)| (c, t.join().expect("control-change thread"))).collect();
        let snapshot_end = snapshot_changes.join().expect("snapshot-change thread");

        udm = restart(dir);
        let after = Reports::collect(dir);
        let differences = after.differences(&before, true);
        assert!(differences.is_empty(), "{seed}: round {round}:\n{}\nlog:\n{}", differences.join("\n"), udm.log());
        for (churn, end) in &ends {
            let name = churn.name;
            assert!(end.after_kill, "{seed}: round {round}: a change failed with the daemon up: {}", end.error);
            // A change the kill cut short fails on the connection it had (`control
            // connection: ...`); one started after the kill cannot reach the daemon.
            if !end.error.contains("cannot reach udm") {
                landed_mid_change += 1;
            }
            // The change in flight is there whole or not at all; every acknowledged
            // one is.
            let state = churn.observe(dir);
            let (done, next) = (churn.after(end.acknowledged), churn.after(end.acknowledged + 1));
            assert!(
                state == done || state == next,
                "{seed}: round {round}: after {} acknowledged changes ({}) {name} is {state:?}: \
                 neither {done:?} nor {next:?}",
                end.acknowledged,
                end.error
            );
            if state.exported {
                assert!(Path::new(&churn.socket(dir)).exists(), "{seed}: export {name} came back without its socket");
            }
            eprintln!("round {round}: {name}: {} changes acknowledged, came back as {state:?}", end.acknowledged);
        }
        workload.wait_for_progress(&udm, Some(&connections), PROGRESS_AFTER_RESTART, &format!("round {round}"), &seed);
        // A snapshot create or remove cut short: all of it or none of it.
        let end = &snapshot_end;
        assert!(end.after_kill, "{seed}: round {round}: a change failed with the daemon up: {}", end.error);
        if !end.error.contains("cannot reach udm") {
            landed_mid_change += 1;
        }
        let parts = snapshot_parts(dir);
        let done = end.acknowledged;
        assert!(
            parts == snapshot_parts_when(!done.is_multiple_of(2))
                || parts == snapshot_parts_when(done.is_multiple_of(2)),
            "{seed}: round {round}: after {done} acknowledged snapshot changes ({}) sn is half there: {parts:?}",
            end.error
        );
        eprintln!("round {round}: sn: {done} changes acknowledged, came back as {parts:?}");
        for churn in &CHURNS {
            churn.remove(dir);
        }
        if parts.0.iter().any(|n| n == "sn") {
            cli_ok(dir, &["snapshot", "remove", "sn"]);
        }
    }
    eprintln!("{landed_mid_change} of {} control changes were cut short by the kill", KILL_ROUNDS * (CHURNS.len() + 1));

    let merge_end = snapshot(dir, "msnap").expect("the merge is still under way after every restart");
    eprintln!("msnap: allocated {merge_before} before the first restart, {} after the last", allocated(&merge_end));

    // The last word: every block of both clients, and the snapshot still reads the
    // origin as it was when it was taken (all zeroes), its exceptions intact.
    let clients = workload.pause(&udm.log(), &seed);
    for (name, mut client) in clients {
        let p = Arc::clone(&client.progress);
        if let Err(c) = client.verify_all() {
            panic!("{seed}: {name} final check: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
        }
        eprintln!(
            "{name}: {} writes, {} reads, {} connections",
            p.writes.load(Ordering::Relaxed),
            p.reads.load(Ordering::Relaxed),
            p.connections.load(Ordering::Relaxed)
        );
    }
    udm.cli_ok(&["export", "add", "snap"]);
    let mut snap = VerifiedClient::new(&dir.join("snap.sock"), 3, CLIENT_BLOCKS, 1);
    if let Err(c) = snap.verify_all() {
        panic!("{seed}: the snapshot lost its exceptions: block {} {}", c.block, c.what);
    }
    assert!(!udm.log().contains("panicked"), "the daemon panicked:\n{}", udm.log());
}

// ---------------------------------------------------------------------------------
// 3: a state file udm cannot use.

/// Runs `udm serve <args>` in `dir` expecting it to refuse to start: returns its
/// standard error (panics if it serves instead).
fn serve_refused(dir: &Path, args: &[&str]) -> String {
    let child = Command::new(udm_binary())
        .arg("serve")
        .args(args)
        .current_dir(dir)
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udm serve starts");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(out) => out.expect("udm serve ran"),
        Err(_) => {
            // SAFETY: kill(2) on the pid of our own child, which has not been reaped
            // (its waiting thread has not returned).
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
            let out = rx.recv().expect("the waiting thread").expect("udm serve ran");
            panic!(
                "udm serve {args:?} started instead of refusing: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    };
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "udm serve {args:?} exited 0: {stderr}");
    stderr
}

/// The top-level version field of a state file (its name contains `version`).
fn version_field(state: &Value) -> String {
    let o = state.as_object().expect("the state file holds a JSON object");
    o.iter()
        .find(|(k, v)| k.contains("version") && v.is_u64())
        .map(|(k, _)| k.clone())
        .unwrap_or_else(|| panic!("the state file has no numeric top-level version field: {:?}", o.keys()))
}

#[test]
fn a_corrupt_or_newer_state_file_is_refused_and_left_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_image(dir, "a.img", 4);
    let udm = start_empty(dir);
    udm.cli_ok(&["backend", "add", "a", &file_spec(dir, "a.img")]);
    udm.cli_ok(&["dm", "create", "lin", "--table", "0 2048 linear a 0"]);
    let state_path = dir.join(STATE_FILE);
    let good = std::fs::read(&state_path)
        .unwrap_or_else(|e| panic!("no state file at {} after two changes: {e}", state_path.display()));

    // A start that fails for another reason (a daemon already serves here) leaves
    // the state file alone too.
    let err = serve_refused(dir, &[]);
    assert!(err.contains("udm.ctl"), "{err}");
    assert_eq!(std::fs::read(&state_path).unwrap(), good, "a refused second daemon rewrote the state file");
    udm.kill();

    let mut newer: Value = serde_json::from_slice(&good).expect("the state file is JSON");
    let field = version_field(&newer);
    let version = newer[&field].as_u64().expect("checked");
    newer[&field] = Value::from(version + 1000);
    let newer = serde_json::to_vec_pretty(&newer).unwrap();
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("cut short (a torn write)", good[..good.len() / 2].to_vec(), ""),
        ("not JSON", b"\x00\x01garbage {{ not a state file".to_vec(), ""),
        ("empty", Vec::new(), ""),
        ("from a newer udm", newer, "version"),
    ];
    std::fs::create_dir(dir.join("elsewhere")).unwrap();
    for (what, bytes, says) in &cases {
        for state_arg in [None, Some("elsewhere/custom-state.json")] {
            let path = state_arg.map_or(state_path.clone(), |p| dir.join(p));
            std::fs::write(&path, bytes).unwrap();
            let args: Vec<&str> = state_arg.map_or(vec![], |p| vec!["--state", p]);
            let err = serve_refused(dir, &args);
            let name = path.file_name().unwrap().to_str().unwrap();
            assert!(err.contains(name), "a state file {what}: the message does not name {name}: {err}");
            assert!(err.to_lowercase().contains(says), "a state file {what}: the message does not say `{says}`: {err}");
            assert_eq!(&std::fs::read(&path).unwrap(), bytes, "a state file {what} was changed by a failed start");
            assert!(!served(&dir.join("udm.ctl")), "a state file {what}: a daemon kept serving");
        }
    }

    // The good file still starts.
    std::fs::write(&state_path, &good).unwrap();
    let udm = restart(dir);
    assert_eq!(udm.cli_ok(&["dm", "table", "lin"]).trim(), "0 2048 linear a 0");
}

/// Whether something accepts connections on a Unix socket.
fn served(path: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(path).is_ok()
}

// ---------------------------------------------------------------------------------
// 4: a backend gone between runs.

/// The lines of `udm dm ls` about `device` (its line and the indented ones after it).
fn ls_lines_about(ls: &str, device: &str) -> String {
    let mut out = String::new();
    let mut inside = false;
    for line in ls.lines() {
        if !line.starts_with(char::is_whitespace) {
            let rest = line.strip_prefix(device);
            inside = rest
                .is_some_and(|r| r.is_empty() || !r.starts_with(|c: char| c.is_alphanumeric() || c == '-' || c == '_'));
        }
        if inside {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

#[test]
fn a_device_whose_backend_file_is_gone_comes_up_as_an_error_and_the_rest_start() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create_image(dir, "a.img", 8);
    create_image(dir, "b.img", 8);
    let udm = start_empty(dir);
    udm.cli_ok(&["backend", "add", "a", &file_spec(dir, "a.img")]);
    udm.cli_ok(&["backend", "add", "b", &file_spec(dir, "b.img")]);
    udm.cli_ok(&["dm", "create", "da", "--table", "0 2048 linear a 0"]);
    udm.cli_ok(&["dm", "create", "db", "--table", "0 8192 linear b 0"]);
    udm.cli_ok(&["dm", "create", "dab", "--table", "0 4096 striped 2 128 a 2048 b 8192"]);
    udm.cli_ok(&["export", "add", "db"]);
    let tables = cli_json(dir, &["dm", "table"]);

    // Some acknowledged writes on db, to be found after the restarts.
    let epoch = Arc::new(AtomicU64::new(0));
    let mut workload =
        Workload::start(vec![("db".into(), VerifiedClient::new(&dir.join("db.sock"), 4, 256, 0xdb))], &epoch);
    workload.wait_for_progress(&udm, None, 300, "db before the kill", "");
    let mut clients = workload.pause(&udm.log(), "");
    udm.kill();

    std::fs::remove_file(dir.join("a.img")).unwrap();
    let udm = restart(dir);
    let ls = udm.cli_ok(&["dm", "ls"]);
    let missing = ls_lines_about(&ls, "a");
    assert!(
        missing.to_lowercase().contains("error") && missing.contains(&dir.join("a.img").display().to_string()),
        "`udm dm ls` does not show the missing backend `a` as an error naming its file:\n{ls}"
    );
    // The devices over it are in error too (every request fails): `dm ls` should say
    // so on their own lines, or an operator reading it takes them for healthy. Checked
    // last, so what follows is tested either way.
    let mut unmarked = Vec::new();
    for device in ["da", "dab"] {
        let about = ls_lines_about(&ls, device);
        assert!(!about.is_empty(), "`udm dm ls` does not list {device} at all (nothing rebuilt):\n{ls}");
        let marked = about.to_lowercase().contains("error")
            && (about.contains("a.img") || about.contains("`a`") || about.contains("backend a"));
        if !marked {
            unmarked.push(device);
        }
    }
    assert!(!ls_lines_about(&ls, "db").to_lowercase().contains("error"), "db is fine:\n{ls}");
    assert_eq!(udm.cli_ok(&["dm", "table", "db"]).trim(), "0 8192 linear b 0");
    assert_eq!(udm.cli_json(&["dm", "info", "db"])[0]["state"], "ACTIVE");
    let (_, mut db) = clients.pop().expect("db's client");
    if let Err(c) = db.verify_all() {
        panic!("db after the restart: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
    }

    // A change made meanwhile is saved without dropping the devices in error: with
    // the file back, they come back as they were.
    udm.cli_ok(&["dm", "create", "extra", "--table", "0 1024 linear b 4096"]);
    udm.kill();
    create_image(dir, "a.img", 8);
    let udm = restart(dir);
    let mut expected = tables.as_array().unwrap().clone();
    expected.push(serde_json::json!({"name": "extra", "text": "0 1024 linear b 4096\n"}));
    expected.sort_by_key(|r| r["name"].as_str().unwrap().to_string());
    assert_eq!(cli_json(dir, &["dm", "table"]), Value::from(expected), "{}", udm.log());
    for device in ["da", "dab"] {
        assert_eq!(udm.cli_json(&["dm", "info", device])[0]["state"], "ACTIVE", "{device} with its backend back");
    }
    assert!(
        unmarked.is_empty(),
        "with backend `a` missing, `udm dm ls` showed {unmarked:?} (which use it) with no error and no reason:\n{ls}"
    );
}

// ---------------------------------------------------------------------------------
// 5: `udm config save` and `udm config check`.

/// `udm config check FILE` run in `dir` with no daemon: (succeeded, everything it printed).
fn config_check(dir: &Path, file: &str) -> (bool, String) {
    let out = cli(dir, &["config", "check", file]);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn config_save_recreates_every_table_and_config_check_names_what_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    let (dir, fresh) = (tmp.path().join("first"), tmp.path().join("fresh"));
    std::fs::create_dir(&dir).unwrap();
    std::fs::create_dir(&fresh).unwrap();
    for (file, mib) in [("a.img", 16), ("b.img", 16), ("snap.cow", 8)] {
        create_image(&dir, file, mib);
    }
    let udm = start_empty(&dir);
    udm.cli_ok(&["backend", "add", "a", &file_spec(&dir, "a.img")]);
    udm.cli_ok(&["backend", "add", "b", &file_spec(&dir, "b.img")]);
    udm.cli_ok(&["dm", "create", "stripe", "--table", "0 16384 striped 2 128 a 0 b 0"]);
    udm.cli_ok(&["dm", "create", "vol", "--table", "0 8192 linear a 8192\n8192 8192 linear b 8192"]);
    udm.cli_ok(&["snapshot", "create", "vol", "snap", "--cow", &file_spec(&dir, "snap.cow"), "--chunk", "8k"]);
    udm.cli_ok(&["export", "add", "vol"]);
    // Exceptions in the COW, which the recreated snapshot must re-attach.
    let epoch = Arc::new(AtomicU64::new(0));
    let workload =
        Workload::start(vec![("vol".into(), VerifiedClient::new(&dir.join("vol.sock"), 5, 256, 0x5a))], &epoch);
    wait_until("writes to vol", Duration::from_secs(30), || workload.progress[0].writes.load(Ordering::Relaxed) >= 100);
    let mut clients = workload.pause(&udm.log(), "");
    settle(&dir, &["vol"]);

    let saved = udm.cli_ok(&["config", "save"]);
    let tables = cli_json(&dir, &["dm", "table"]);
    let snapshots = cli_json(&dir, &["snapshot", "list"]);
    let exports: Vec<Value> =
        cli_json(&dir, &["export", "ls"]).as_array().unwrap().iter().map(|e| e["config"].clone()).collect();
    udm.kill();

    std::fs::write(fresh.join("saved.toml"), &saved).unwrap();
    let (ok, text) = config_check(&fresh, "saved.toml");
    assert!(ok, "`udm config check` refuses what `udm config save` printed: {text}\n{saved}");
    assert!(!fresh.join(STATE_FILE).exists() && !fresh.join("udm.ctl").exists(), "config check applied something");

    let udm = UdmProcess::start(&fresh, &["--config", "saved.toml", "--control", "udm.ctl"]);
    assert_eq!(cli_json(&fresh, &["dm", "table"]), tables, "saved config:\n{saved}");
    assert_eq!(
        cli_json(&fresh, &["snapshot", "list"]),
        snapshots,
        "the COW was not re-attached; saved config:\n{saved}"
    );
    let now: Vec<Value> =
        cli_json(&fresh, &["export", "ls"]).as_array().unwrap().iter().map(|e| e["config"].clone()).collect();
    assert_eq!(now, exports, "saved config:\n{saved}");
    let (_, mut vol) = clients.pop().expect("vol's client");
    if let Err(c) = vol.verify_all() {
        panic!("vol from the saved config: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
    }
    drop(udm);

    // Broken declarations are refused, naming what is wrong.
    let broken: [(&str, String, &str); 3] = [
        (
            "a table over a device that does not exist",
            format!("{saved}\n[[device]]\nname = \"ghost\"\ntable = \"0 2048 linear nosuchdev 0\"\n"),
            "nosuchdev",
        ),
        ("a misspelt key", saved.replacen("spec", "spek", 1), "spek"),
        (
            "an unknown target",
            format!("{saved}\n[[device]]\nname = \"typo\"\ntable = \"0 2048 linaer a 0\"\n"),
            "linaer",
        ),
    ];
    for (what, text, named) in broken {
        std::fs::write(fresh.join("broken.toml"), &text).unwrap();
        let (ok, out) = config_check(&fresh, "broken.toml");
        assert!(!ok, "`udm config check` accepted {what}:\n{text}");
        assert!(out.contains(named), "`udm config check` on {what} does not name `{named}`: {out}");
    }
}

#[test]
fn churn_states_two_changes_apart_differ() {
    for churn in CHURNS {
        for done in 0..CHURN_STEPS {
            assert_ne!(churn.after(done), churn.after(done + 2), "{} after {done} changes", churn.name);
        }
    }
}
