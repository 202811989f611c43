//! Reconnect under load: a Linux guest keeps writing and verifying 64 KiB blocks on a
//! udm vhost-user-blk disk (QEMU's `reconnect=1`) while the udm daemon is killed with
//! SIGKILL and restarted several times. QEMU hands the inflight region back to each new
//! udm, which redoes the requests the dead one had taken; the guest must see every
//! acknowledged write when it reads back, and its I/O must resume each time. A second
//! test kills udm only once requests are provably stuck in it (a fault device that
//! hangs) and checks that the next udm redoes them.
//!
//! Runs the `udm` binary of the same build (`cargo test --workspace` builds it).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use udm_server::control::Client;
use udm_tests::udm_process::UdmProcess;
use udm_tests::vm::{modules, Guest, Mailbox};

/// Writes completed by the running daemon (0 if it is not answering yet).
fn writes(dir: &Path) -> u64 {
    Client::connect(&dir.join("udm.ctl"))
        .and_then(|mut c| c.call("stats", json!({})))
        .ok()
        .and_then(|v| v[0]["total"]["writes"].as_u64())
        .unwrap_or(0)
}

fn wait_for_writes(dir: &Path, at_least: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(240);
    while writes(dir) < at_least {
        assert!(Instant::now() < deadline, "guest I/O did not {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Three writers, each over its own 16 blocks of 64 KiB, write, read back and compare
/// until the mailbox says STOP; then every block is checked against the last write
/// the guest saw acknowledged, and the kernel log must hold no I/O error.
const GUEST_SCRIPT: &str = r#"
UDM=
for d in /sys/block/vd*; do [ "$(cat $d/serial 2>/dev/null)" = udm-disk ] && UDM=/dev/$(basename $d); done
echo udm=$UDM mailbox=$MAILBOX
i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/tmp/p$i bs=64k count=1 2>/dev/null; i=$((i+1)); done
stopped() { dd if=$MAILBOX bs=512 count=1 iflag=direct 2>/dev/null | grep -qx STOP; }
writer() {
  w=$1; n=0
  while ! stopped; do
    b=$((w * 16 + n % 16)); p=$(( (n / 16 + n + w) % 8 ))
    dd if=/tmp/p$p of=$UDM bs=64k seek=$b count=1 oflag=direct 2>/dev/null || { echo write-failed writer $w at $n; return 1; }
    echo $p > /tmp/blk$b
    dd if=$UDM of=/tmp/r$w bs=64k skip=$b count=1 iflag=direct 2>/dev/null || { echo read-failed writer $w at $n; return 1; }
    cmp -s /tmp/r$w /tmp/p$p || { echo mismatch writer $w at $n block $b; return 1; }
    n=$((n+1))
  done
  echo writer $w writes=$n
}
writer 0 & j0=$!
writer 1 & j1=$!
writer 2 & j2=$!
wait $j0; wait $j1; wait $j2
b=0
while [ $b -lt 48 ]; do
  if [ -e /tmp/blk$b ]; then
    p=$(cat /tmp/blk$b)
    dd if=$UDM of=/tmp/r bs=64k skip=$b count=1 iflag=direct 2>/dev/null
    cmp -s /tmp/r /tmp/p$p || { echo final-mismatch block $b; exit 1; }
  fi
  b=$((b+1))
done
if dmesg | grep -i "I/O error"; then echo guest-io-error; exit 1; fi
echo verified
"#;

/// A temporary directory with the disk image, the mailbox and udm.toml.
struct Setup {
    dir: tempfile::TempDir,
    img: PathBuf,
    mailbox: Mailbox,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk.img");
        std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
        let mailbox = Mailbox::create(dir.path().join("mailbox.img")).unwrap();
        let s = Setup { dir, img, mailbox };
        s.write_config("");
        s
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The config the next udm reads: the disk image, under `faults` (`stall-after=N`)
    /// when not empty. The saved state goes, so the next udm starts from this
    /// declaration (the state would otherwise bring the old backend spec back).
    fn write_config(&self, faults: &str) {
        let _ = std::fs::remove_file(self.path().join("udm-state.json"));
        let file = format!("file:{}", self.img.display());
        let spec = if faults.is_empty() { file } else { format!("fault:{faults}@{file}") };
        std::fs::write(
            self.path().join("udm.toml"),
            format!(
                "[[backend]]\nname = \"disk\"\nspec = \"{spec}\"\n\n[[export]]\nname = \"disk\"\ndevice = \"disk\"\n\
                 socket = \"disk.sock\"\nserial = \"udm-disk\"\n"
            ),
        )
        .unwrap();
    }

    /// Boots the guest (QEMU reconnects to the socket every second) in a thread.
    fn run_guest(&self) -> std::thread::JoinHandle<Result<udm_tests::vm::GuestOutput, udm_tests::vm::VmError>> {
        let chardev = format!("socket,id=vu0,path={},reconnect=1", self.path().join("disk.sock").display());
        let guest = Guest::new()
            .expect("guest kernel (run scripts/vm-prepare.sh)")
            .memory_mib(384)
            .modules(modules::VIRTIO_BLK)
            .shared_memory()
            // 1024-entry rings, the usual setting for fast disks (udm's default limit).
            .qemu_args(&[
                "-chardev",
                &chardev,
                "-device",
                "vhost-user-blk-pci,chardev=vu0,num-queues=1,queue-size=1024",
            ])
            .mailbox(&self.mailbox)
            .script(&Mailbox::guest_find())
            .script(GUEST_SCRIPT)
            .timeout(Duration::from_secs(500));
        std::thread::spawn(move || guest.run())
    }

    /// Tells the guest to stop, waits for it and checks what it verified.
    fn stop_guest(
        &self,
        run: std::thread::JoinHandle<Result<udm_tests::vm::GuestOutput, udm_tests::vm::VmError>>,
    ) -> udm_tests::vm::GuestOutput {
        self.mailbox.post(0, "STOP").unwrap();
        let out = run.join().unwrap().unwrap();
        out.assert_success();
        assert!(out.output.contains("verified"), "{}", out.output);
        out
    }
}

#[test]
fn guest_io_survives_udm_being_killed_and_restarted() {
    let setup = Setup::new();
    let mut udm = UdmProcess::start(setup.path(), &["--config", "udm.toml"]);
    let run = setup.run_guest();
    wait_for_writes(setup.path(), 30, "start");
    for round in 0..3 {
        udm.kill();
        std::thread::sleep(Duration::from_millis(500 + 300 * round));
        udm = UdmProcess::start(setup.path(), &["--config", "udm.toml"]);
        wait_for_writes(setup.path(), 30, "resume after a restart");
    }
    setup.stop_guest(run);
    udm.kill();
}

/// Writes each udm lets through before its disk hangs.
const STALL_AFTER: u64 = 20;

/// udm is killed while requests are provably in flight: its disk (a fault device with
/// `stall-after`) holds every request after a few writes and says so in the log, and
/// only then comes the SIGKILL. The next udm must redo exactly those requests (it logs
/// how many), the guest must see them complete without an error, and every write it
/// saw acknowledged must read back at the end.
#[test]
fn requests_in_flight_when_udm_is_killed_are_redone_by_the_next_one() {
    let setup = Setup::new();
    setup.write_config(&format!("stall-after={STALL_AFTER}"));
    let mut udm = UdmProcess::start(setup.path(), &["--config", "udm.toml"]);
    let run = setup.run_guest();
    let mut redone = Vec::new();
    for round in 0..3 {
        udm.wait_for_log("fault: device stalled", Duration::from_secs(300));
        udm.kill();
        if round == 2 {
            setup.write_config("");
        }
        udm = UdmProcess::start(setup.path(), &["--config", "udm.toml"]);
        let line = udm.wait_for_log("resubmitting requests left in flight", Duration::from_secs(120));
        let count: u64 = line
            .split("count=")
            .nth(1)
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no count in `{line}`"));
        redone.push(count);
    }
    wait_for_writes(setup.path(), 30, "go on after the last restart");
    let stats = Client::connect(&setup.path().join("udm.ctl")).unwrap().call("stats", json!({})).unwrap();
    setup.stop_guest(run);
    udm.kill();
    eprintln!("requests redone after each restart: {redone:?}");
    assert!(redone.iter().all(|&n| n >= 1), "every restart redid the requests left in flight: {redone:?}");
    assert_eq!(stats[0]["total"]["errors"], 0, "{stats}");
    assert_eq!(stats[0]["total"]["rejected"], 0, "{stats}");
}
