//! Soak: several libblkio clients keep verified random writes and reads in flight on
//! their own exports of one `udm serve` while the test injects the faults a VM host
//! sees: a front end that drops its connection with requests in flight, a disk that
//! hangs under one export, a hostile front end on a neighbouring export, and the
//! daemon killed with SIGKILL and restarted while clients reconnect by themselves.
//!
//! Passes only if no client ever reads a lost, torn or misdirected block (acknowledged
//! writes are durable, abandoned ones either happened or not and never reappear
//! later), the neighbours of the hung disk and of the hostile front end keep making
//! progress and never see an error, and every block checks out at the end.
//!
//! Disk images live in a temporary directory on the host's file system (ext4 on a
//! Debian host), as a VM host would keep them.

#[path = "../../server/tests/hostile_guest/mod.rs"]
mod hostile_guest;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use udm_tests::udm_process::UdmProcess;
use udm_tests::verified_client::{Corruption, Progress, VerifiedClient};

/// Exports with a verified client; `hung` is the one whose disk stops answering.
const VERIFIED: [&str; 4] = ["d0", "d1", "d2", "hung"];
/// Blocks each client writes (16 MiB disks, 4 MiB worked on so blocks are rewritten often).
const BLOCKS: u64 = 1024;
/// Writes the hung disk lets through at each start before it holds every request.
const STALL_AFTER: u64 = 64;
/// The index of the hung disk's client.
const HUNG: usize = 3;

fn write_config(dir: &Path, hang: bool) {
    let mut toml = String::new();
    for name in VERIFIED {
        let file = format!("file:{}", dir.join(format!("{name}.img")).display());
        let spec = if name == "hung" && hang { format!("fault:stall-after={STALL_AFTER}@{file}") } else { file };
        toml += &format!("[[backend]]\nname = \"{name}\"\nspec = \"{spec}\"\n\n");
    }
    toml += "[[backend]]\nname = \"hostile\"\nspec = \"mem:16M\"\n\n";
    for name in VERIFIED.iter().chain(&["hostile"]) {
        toml += &format!("[[export]]\nname = \"{name}\"\ndevice = \"{name}\"\nsocket = \"{name}.sock\"\n\n");
    }
    std::fs::write(dir.join("udm.toml"), toml).unwrap();
}

struct Clients {
    stop: Arc<AtomicBool>,
    daemon_epoch: Arc<AtomicU64>,
    progress: Vec<Arc<Progress>>,
    threads: Vec<Option<ClientThread>>,
}

/// A client's thread: it hands the client back with how its run ended.
type ClientThread = JoinHandle<(VerifiedClient, Result<(), Corruption>)>;

impl Clients {
    fn start(dir: &Path) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let daemon_epoch = Arc::new(AtomicU64::new(0));
        let mut progress = Vec::new();
        let mut threads = Vec::new();
        for (i, name) in VERIFIED.iter().enumerate() {
            std::fs::File::create(dir.join(format!("{name}.img"))).unwrap().set_len(16 << 20).unwrap();
            let mut client =
                VerifiedClient::new(&dir.join(format!("{name}.sock")), i as u32 + 1, BLOCKS, 0x50a6 + i as u64);
            progress.push(Arc::clone(&client.progress));
            let (stop, epoch) = (Arc::clone(&stop), Arc::clone(&daemon_epoch));
            threads.push(Some(std::thread::spawn(move || {
                let result = client.run(&stop, &epoch, Duration::from_secs(30));
                (client, result)
            })));
        }
        Clients { stop, daemon_epoch, progress, threads }
    }

    fn completed(&self) -> Vec<u64> {
        self.progress.iter().map(|p| p.completed()).collect()
    }

    /// A client that stopped on its own found a wrong block: its report, now.
    fn fail_fast(&mut self, udm: &UdmProcess) {
        for (name, thread) in VERIFIED.iter().zip(self.threads.iter_mut()) {
            if thread.as_ref().is_some_and(|t| t.is_finished()) {
                let (_, result) = thread.take().expect("checked").join().expect("client thread");
                let c = result.expect_err("a client stops early only on a wrong block");
                panic!("{name}: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
            }
        }
    }

    /// Waits until each client `i` in `which` completes `count` more requests (the
    /// hung disk's client fewer), failing at once if a client finds a wrong block.
    fn wait_for_progress(&mut self, udm: &UdmProcess, which: &[usize], count: u64, what: &str) {
        let start = self.completed();
        let deadline = Instant::now() + Duration::from_secs(60);
        // The hung disk lets only a few writes through at each start.
        let wanted = |i: usize| if i == HUNG { count.min(STALL_AFTER / 2) } else { count };
        while which.iter().any(|&i| self.progress[i].completed() < start[i] + wanted(i)) {
            self.fail_fast(udm);
            assert!(
                Instant::now() < deadline,
                "{what}: clients {which:?} stuck at {:?} (from {start:?})",
                self.completed()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn errors(&self) -> Vec<u64> {
        self.progress.iter().map(|p| p.errors.load(Ordering::Relaxed)).collect()
    }
}

/// A guest that sends what no driver would: memory it does not back (a region longer
/// than its memfd), a GET_ID with 5 GiB of buffers (it panicked the worker on
/// c9b6bcd), a chain that loops, then hangs up with a request in flight. Then a front
/// end that speaks vhost-user badly: truncated headers, an unknown request with a huge
/// payload size, a memory table claiming regions it passes no fds for. Each
/// connection must end alone.
fn hostile_front_end(socket: &Path) {
    use hostile_guest::*;
    use std::os::unix::fs::FileExt;

    let mut guest = Guest::connect(socket, 4 * MIB);
    guest.mem_len = 64 * MIB; // claims more than the memfd holds
    assert!(guest.set_memory().is_err(), "a region longer than its file was accepted");
    drop(guest);

    let mut guest = Guest::connect(socket, (5 << 30) + 2 * MIB);
    guest.start_ring(0);
    let half = 0xA000_0000u32;
    let (status, _) = guest.request(T_GET_ID, 0, &[(MIB, half, true), (MIB + u64::from(half), half, true)]);
    assert_eq!(status, S_OK, "GET_ID into 5 GiB of buffers");
    // A read whose status descriptor leads back into the chain.
    let mut header = [0u8; 16];
    header[0..4].copy_from_slice(&T_IN.to_le_bytes());
    guest.mem.write_at(&header, HEADERS).unwrap();
    let descriptor = |addr: u64, len: u32, flags: u16, next: u16| {
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        d
    };
    guest.mem.write_at(&descriptor(HEADERS, 16, F_NEXT, 1), DESC).unwrap();
    guest.mem.write_at(&descriptor(DATA, 512, F_NEXT | F_WRITE, 2), DESC + 16).unwrap();
    guest.mem.write_at(&descriptor(STATUSES, 1, F_NEXT | F_WRITE, 1), DESC + 32).unwrap();
    let slot = u64::from(guest.avail_idx % QUEUE);
    guest.mem.write_at(&0u16.to_le_bytes(), AVAIL + 4 + slot * 2).unwrap();
    guest.avail_idx = guest.avail_idx.wrapping_add(1);
    guest.mem.write_at(&guest.avail_idx.to_le_bytes(), AVAIL + 2).unwrap();
    guest.kick.write(1).unwrap();
    let answered = guest.avail_idx;
    wait_until("the looping chain to be answered", || guest.used_idx() == answered);
    // Hang up with a read in flight.
    guest.submit(T_IN, 0, &[(DATA, 4096, true)]);
    drop(guest);

    let messages: [&[u8]; 4] = [
        // A header cut short.
        &[1, 0, 0],
        // GET_FEATURES with a payload size far beyond any message.
        &[1, 0, 0, 0, 1, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f],
        // SET_MEM_TABLE (5) announcing 8 regions with no fds and no bodies.
        &[5, 0, 0, 0, 1, 0, 0, 0, 8, 0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0],
        // An unknown request type.
        &[0xff, 0xff, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0],
    ];
    for message in messages {
        if let Ok(mut stream) = UnixStream::connect(socket) {
            let _ = stream.write_all(message);
            let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
            let _ = std::io::Read::read(&mut stream, &mut [0u8; 64]);
        }
    }
}

#[test]
fn verified_clients_survive_disconnects_hung_disks_hostile_neighbours_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    write_config(dir.path(), true);
    let mut clients = Clients::start(dir.path());
    let mut udm = UdmProcess::start(dir.path(), &["--config", "udm.toml"]);
    let neighbours = [0, 1, 2];
    clients.wait_for_progress(&udm, &[0, 1, 2, 3], 200, "start");

    for round in 0..3 {
        // The hung disk holds every request; its neighbours carry on.
        udm.wait_for_log("fault: device stalled", Duration::from_secs(60));
        clients.wait_for_progress(&udm, &neighbours, 3000, "beside a hung disk");

        // A front end drops its connection with requests in flight, twice; it
        // reconnects, and its neighbours do not notice.
        for _ in 0..2 {
            clients.progress[0].disconnect.store(true, Ordering::Relaxed);
            clients.wait_for_progress(&udm, &neighbours, 1000, "across a front end's disconnect");
        }

        // A hostile front end on the neighbouring export.
        hostile_front_end(&dir.path().join("hostile.sock"));
        // ... whose export still serves a well-behaved front end afterwards.
        let mut after = VerifiedClient::new(&dir.path().join("hostile.sock"), 99, 64, 7);
        after.verify_all().unwrap_or_else(|c| panic!("hostile export after the attack: block {} {}", c.block, c.what));
        clients.wait_for_progress(&udm, &neighbours, 1000, "beside a hostile front end");
        assert_eq!(clients.errors(), vec![0; VERIFIED.len()], "a neighbour saw an I/O error");

        // SIGKILL with requests in flight everywhere; the last restart frees the disk.
        udm.kill();
        clients.daemon_epoch.fetch_add(1, Ordering::Release);
        write_config(dir.path(), round < 2);
        // The config changed (the hung disk is freed at the last round): the daemon
        // rebuilds from its state file when there is one, so start from the config.
        let _ = std::fs::remove_file(dir.path().join("udm-state.json"));
        udm = UdmProcess::start(dir.path(), &["--config", "udm.toml"]);
        clients.wait_for_progress(&udm, &[0, 1, 2, HUNG], 200, "after a restart");
    }
    assert_eq!(clients.errors(), vec![0; VERIFIED.len()], "a client saw an I/O error");

    clients.stop.store(true, Ordering::Relaxed);
    let mut summary = Vec::new();
    for (name, thread) in VERIFIED.iter().zip(clients.threads) {
        let (mut client, result) = thread.expect("still running").join().expect("client thread");
        if let Err(c) = result {
            panic!("{name}: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
        }
        if let Err(c) = client.verify_all() {
            panic!("{name} final check: block {} {}\ndaemon log:\n{}", c.block, c.what, udm.log());
        }
        let p = &client.progress;
        summary.push(format!(
            "{name}: {} writes, {} reads, {} connections",
            p.writes.load(Ordering::Relaxed),
            p.reads.load(Ordering::Relaxed),
            p.connections.load(Ordering::Relaxed)
        ));
    }
    eprintln!("{}", summary.join("\n"));
    assert!(!udm.log().contains("panicked"), "the daemon panicked:\n{}", udm.log());
}
