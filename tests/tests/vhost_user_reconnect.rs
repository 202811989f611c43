//! Reconnect under load: a Linux guest keeps writing and verifying 64 KiB blocks on a
//! udm vhost-user-blk disk (QEMU's `reconnect=1`) while the udm daemon is killed with
//! SIGKILL and restarted several times. QEMU hands the inflight region back to each new
//! udm, which redoes the requests the dead one had taken; the guest must see every
//! acknowledged write when it reads back, and its I/O must resume each time.
//!
//! Runs the `udm` binary of the same build (`cargo test --workspace` builds it).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;
use udm_server::control::Client;
use udm_tests::vm::{modules, Backing, Guest};

fn udm_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>");
    let udm = profile_dir.join("udm");
    assert!(
        udm.exists(),
        "{} is missing: build it first with `cargo build -p udm-server` (same profile)",
        udm.display()
    );
    udm
}

fn start_udm(dir: &Path) -> Child {
    let mut child = Command::new(udm_binary())
        .args(["serve", "--config", "udm.toml"])
        .env("RUST_LOG", std::env::var("UDM_TEST_LOG").unwrap_or_else(|_| "warn".into()))
        .current_dir(dir)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().starts_with("stop with") {
            break;
        }
    }
    std::thread::spawn(move || lines.for_each(drop));
    child
}

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

const GUEST_SCRIPT: &str = r#"
UDM=; FLAG=
for d in /sys/block/vd*; do
  if [ "$(cat $d/serial 2>/dev/null)" = udm-disk ]; then UDM=/dev/$(basename $d); else FLAG=/dev/$(basename $d); fi
done
echo udm=$UDM flag=$FLAG
i=0; while [ $i -lt 8 ]; do dd if=/dev/urandom of=/tmp/p$i bs=64k count=1 2>/dev/null; i=$((i+1)); done
n=0
while ! dd if=$FLAG bs=512 count=1 iflag=direct 2>/dev/null | grep -q STOP; do
  b=$((n % 48)); p=$(( (n / 48 + n) % 8 ))
  dd if=/tmp/p$p of=$UDM bs=64k seek=$b count=1 oflag=direct 2>/dev/null || { echo write-failed $n; exit 1; }
  echo $p > /tmp/blk$b
  dd if=$UDM of=/tmp/r bs=64k skip=$b count=1 iflag=direct 2>/dev/null || { echo read-failed $n; exit 1; }
  cmp -s /tmp/r /tmp/p$p || { echo mismatch at $n block $b; exit 1; }
  n=$((n+1))
done
echo writes=$n
b=0
while [ $b -lt 48 ]; do
  if [ -e /tmp/blk$b ]; then
    p=$(cat /tmp/blk$b)
    dd if=$UDM of=/tmp/r bs=64k skip=$b count=1 iflag=direct 2>/dev/null
    cmp -s /tmp/r /tmp/p$p || { echo final-mismatch block $b; exit 1; }
  fi
  b=$((b+1))
done
echo verified
"#;

#[test]
fn guest_io_survives_udm_being_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    std::fs::File::create(&img).unwrap().set_len(64 << 20).unwrap();
    let flag = dir.path().join("flag.img");
    std::fs::File::create(&flag).unwrap().set_len(1 << 20).unwrap();
    std::fs::write(
        dir.path().join("udm.toml"),
        format!(
            "[[backend]]\nname = \"disk\"\nspec = \"file:{}\"\n\n[[export]]\nname = \"disk\"\ndevice = \"disk\"\n\
             socket = \"disk.sock\"\nserial = \"udm-disk\"\n",
            img.display()
        ),
    )
    .unwrap();
    let mut udm = start_udm(dir.path());
    let sock = dir.path().join("disk.sock");
    let chardev = format!("socket,id=vu0,path={},reconnect=1", sock.display());
    let guest = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(384)
        .modules(modules::VIRTIO_BLK)
        .shared_memory()
        .qemu_args(&["-chardev", &chardev, "-device", "vhost-user-blk-pci,chardev=vu0,num-queues=1"])
        .virtio_disk(Backing::raw(&flag))
        .script(GUEST_SCRIPT)
        .timeout(Duration::from_secs(500));
    let run = std::thread::spawn(move || guest.run());

    wait_for_writes(dir.path(), 30, "start");
    for round in 0..3 {
        udm.kill().unwrap();
        udm.wait().unwrap();
        std::thread::sleep(Duration::from_millis(500 + 300 * round));
        udm = start_udm(dir.path());
        wait_for_writes(dir.path(), 30, "resume after a restart");
    }
    std::fs::write(&flag, b"STOP").unwrap();
    let out = run.join().unwrap().unwrap();
    let _ = udm.kill();
    let _ = udm.wait();
    out.assert_success();
    assert!(out.output.contains("verified"), "{}", out.output);
}
