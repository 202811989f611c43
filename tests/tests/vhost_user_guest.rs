//! Linux guests (QEMU, TCG) on udm's vhost-user-blk exports: ext4 made, filled, synced
//! and checked clean; a snapshot taken while the guest runs (its file system frozen),
//! exported read-only to a second guest, checks clean and shows the files as they were
//! while the origin changes; a resize reaches the running guest; a device that takes
//! small requests gets no larger ones from the guest.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use udm_drivers::backends::mem::MemDevice;
use udm_drivers::{BlockDevice, DeviceError, DeviceInfo, IoQueue, MemoryRegion};

use udm_server::daemon::config::{BackendConfig, Config, DeviceConfig};
use udm_server::daemon::Daemon;
use udm_server::vhost_blk::{ExportConfig, PollMode};
use udm_tests::udm_process::UdmProcess;
use udm_tests::vm::{modules, Guest, Mailbox};

fn export(dir: &Path, name: &str, queues: u16, read_only: bool) -> ExportConfig {
    ExportConfig {
        name: name.into(),
        socket: dir.join(format!("{name}.sock")),
        device: name.into(),
        num_queues: queues,
        queue_size: 128,
        read_only,
        poll: PollMode::Event,
        idle_poll_us: udm_server::vhost_blk::export::default_idle_poll_us(),
        cpus: vec![],
        serial: Some(format!("udm-{name}")),
        socket_mode: None,
        socket_group: None,
    }
}

fn guest() -> Guest {
    Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(512)
        .modules(modules::VIRTIO_BLK)
        .modules(&["ext4", "crc32c_generic"])
        .binary_as("/usr/sbin/mkfs.ext4", "/sbin/mkfs.ext4")
        .binary_as("/usr/sbin/e2fsck", "/sbin/e2fsck")
        .timeout(Duration::from_secs(400))
}

/// The `md5  /mnt/fN` lines the guest printed with `prefix ` in front, sorted.
fn sums(output: &str, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = output
        .lines()
        .filter_map(|l| l.strip_prefix(prefix)?.strip_prefix(' '))
        .filter(|l| l.contains("/mnt/f"))
        .map(str::to_string)
        .collect();
    v.sort();
    v
}

/// The sum line of file `name` (e.g. `/mnt/f3`), if listed.
fn sum_of<'a>(sums: &'a [String], name: &str) -> Option<&'a str> {
    sums.iter().find(|l| l.split_whitespace().nth(1) == Some(name)).map(String::as_str)
}

/// Guest shell setting `$var` to the virtio disk whose serial is `serial`.
fn find_disk(var: &str, serial: &str) -> String {
    format!(
        "{var}=\nfor d in /sys/block/vd*; do [ \"$(cat $d/serial 2>/dev/null)\" = {serial} ] && {var}=/dev/$(basename $d); done\n\
         [ -n \"${var}\" ] || {{ echo 'no disk with serial {serial}'; exit 1; }}\necho {var}=${var}\n"
    )
}

/// Guest 1 fills an ext4 volume, freezes it (fsfreeze, as LVM users do before
/// `lvcreate -s`) and, while it keeps running with a reader still hammering the raw
/// disk, the host takes a snapshot with `udm snapshot create`; the guest thaws,
/// changes and deletes files, and checks its volume clean. Guest 2 gets the snapshot
/// read-only: it checks clean and shows the files exactly as they were at the freeze.
#[test]
fn snapshot_of_a_running_guest_shows_the_files_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("udm.toml"),
        "[[backend]]\nname = \"ram0\"\nspec = \"mem:256M\"\n\n\
         [[device]]\nname = \"vol0\"\ntable = \"0 524288 linear ram0 0\"\n\n\
         [[export]]\nname = \"vol0\"\ndevice = \"vol0\"\nsocket = \"vol0.sock\"\nnum_queues = 2\nserial = \"udm-vol0\"\n",
    )
    .unwrap();
    let udm = UdmProcess::start(dir.path(), &["--config", "udm.toml"]);
    let mailbox = Mailbox::create(dir.path().join("mailbox.img")).unwrap();
    let script = format!(
        "{find_mailbox}{find_vol}\
         mkfs.ext4 -q -F $VOL\n\
         mount -t ext4 $VOL /mnt\n\
         i=0; while [ $i -lt 24 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i * 7 + 1)) 2>/dev/null; i=$((i+1)); done\n\
         sync\n\
         md5sum /mnt/f* | sed 's/^/before /'\n\
         ( n=0; while [ ! -e /tmp/stop-reader ]; do\n\
             dd if=$VOL of=/dev/null bs=64k skip=$((n % 64 * 16)) count=16 iflag=direct 2>/dev/null || {{ echo reader-failed; exit 1; }}\n\
             n=$((n+1)); done; echo reader-reads=$n ) &\n\
         reader=$!\n\
         fsfreeze --freeze /mnt\n\
         {post_frozen}{wait_snapped}\
         fsfreeze --unfreeze /mnt\n\
         echo thawed\n\
         touch /tmp/stop-reader; wait $reader\n\
         i=0; while [ $i -lt 12 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=9 conv=notrunc 2>/dev/null; i=$((i+1)); done\n\
         rm /mnt/f23\n\
         dd if=/dev/urandom of=/mnt/f24 bs=4k count=33 2>/dev/null\n\
         sync\n\
         md5sum /mnt/f* | sed 's/^/after /'\n\
         umount /mnt\n\
         e2fsck -fn $VOL\n\
         echo origin-clean\n\
         if dmesg | grep -i 'I/O error'; then echo guest-io-error; exit 1; fi\n",
        find_mailbox = Mailbox::guest_find(),
        find_vol = find_disk("VOL", "udm-vol0"),
        post_frozen = Mailbox::guest_post(0, "FROZEN"),
        wait_snapped = Mailbox::guest_wait(1, "SNAPPED", 300),
    );
    let first = guest().vhost_user_blk(dir.path().join("vol0.sock"), 2).mailbox(&mailbox).script(&script);
    let run = std::thread::spawn(move || first.run());
    assert!(mailbox.wait_for(0, "FROZEN", Duration::from_secs(300)).unwrap(), "guest 1 never froze its volume");
    udm.cli_ok(&["snapshot", "create", "vol0", "snap0", "--cow", "mem:128M", "--chunk", "8k"]);
    mailbox.post(1, "SNAPPED").unwrap();
    let first = run.join().unwrap().unwrap();
    first.assert_success();
    assert!(first.output.contains("thawed") && first.output.contains("origin-clean"), "{}", first.output);
    assert!(first.output.contains("reader-reads="), "{}", first.output);
    let before = sums(&first.output, "before");
    let after = sums(&first.output, "after");
    assert_eq!(before.len(), 24, "{}", first.output);
    assert!(sum_of(&after, "/mnt/f23").is_none() && sum_of(&after, "/mnt/f24").is_some(), "{}", first.output);
    for f in ["/mnt/f0", "/mnt/f11"] {
        assert_ne!(sum_of(&after, f), sum_of(&before, f), "{f} changed after the snapshot");
    }

    udm.cli_ok(&["export", "add", "snap0", "--read-only", "--serial", "udm-snap0"]);
    let second = guest()
        .vhost_user_blk(dir.path().join("snap0.sock"), 1)
        .script(&find_disk("SNAP", "udm-snap0"))
        .script(
            "echo ro=$(cat /sys/block/$(basename $SNAP)/ro)\n\
             e2fsck -fn $SNAP\n\
             echo snapshot-clean\n\
             mount -t ext4 -o ro,noload $SNAP /mnt\n\
             md5sum /mnt/f* | sed 's/^/snap /'\n\
             umount /mnt",
        )
        .run()
        .unwrap();
    second.assert_success();
    assert!(second.output.contains("ro=1"), "the snapshot disk is read-only:\n{}", second.output);
    assert!(second.output.contains("snapshot-clean"), "{}", second.output);
    assert_eq!(sums(&second.output, "snap"), before, "the snapshot shows the files as they were at the freeze");

    let snaps = udm.cli_json(&["snapshot", "list"]);
    assert_eq!(snaps[0]["name"], "snap0", "{snaps}");
    let used: f64 = snaps[0]["data_percent"].as_str().and_then(|p| p.parse().ok()).unwrap_or(0.0);
    assert!(used > 0.0, "writes after the snapshot copied chunks out: {snaps}");
    let stats = udm.cli_json(&["stats", "vol0"]);
    assert_eq!(stats[0]["queues"].as_array().map(Vec::len), Some(2), "{stats}");
    assert_eq!(stats[0]["total"]["errors"], 0, "no request failed around the snapshot: {stats}");
    assert_eq!(stats[0]["total"]["rejected"], 0, "{stats}");
    udm.kill();
}

#[test]
fn growing_the_volume_reaches_the_running_guest() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = std::sync::Arc::new(Daemon::new(vec![]));
    let config = Config {
        control: dir.path().join("udm.ctl"),
        backends: vec![
            BackendConfig { name: "ram0".into(), spec: "mem:64M".into() },
            BackendConfig { name: "ram1".into(), spec: "mem:64M".into() },
        ],
        devices: vec![DeviceConfig::new("vol0", "0 131072 linear ram0 0")],
        snapshots: vec![],
        exports: vec![export(dir.path(), "vol0", 1, false)],
        ..Config::default()
    };
    daemon.apply(&config).unwrap();
    let guest = guest().vhost_user_blk(dir.path().join("vol0.sock"), 1).script(
        "echo size0=$(cat /sys/block/vda/size)\n\
         echo ready > /dev/vda\n\
         i=0; while [ $(cat /sys/block/vda/size) = 131072 ] && [ $i -lt 600 ]; do sleep 0.2; i=$((i+1)); done\n\
         echo size1=$(cat /sys/block/vda/size)\n\
         dd if=/dev/zero of=/dev/vda bs=4096 seek=$((196608 / 8 - 1)) count=1 oflag=direct 2>/dev/null && echo tail-written",
    );
    let run = std::thread::spawn(move || guest.run());
    // Wait for the guest's first write, so the resize lands while it runs.
    let deadline = std::time::Instant::now() + Duration::from_secs(240);
    while daemon.stats(Some("vol0")).unwrap()[0].total.writes == 0 {
        assert!(std::time::Instant::now() < deadline, "the guest never wrote");
        std::thread::sleep(Duration::from_millis(200));
    }
    daemon.dm_load("vol0", "0 131072 linear ram0 0\n131072 65536 linear ram1 0").unwrap();
    daemon.dm_suspend("vol0", false, None).unwrap();
    daemon.dm_resume("vol0").unwrap();
    let out = run.join().unwrap().unwrap();
    out.assert_success();
    assert!(out.output.contains("size0=131072"), "{}", out.output);
    assert!(out.output.contains("size1=196608"), "the guest saw the new size:\n{}", out.output);
    assert!(out.output.contains("tail-written"), "{}", out.output);
    daemon.shutdown();
}

/// A RAM disk that takes at most 128 KiB per request, like an NVMe SSD with MDTS 5
/// (many real ones have 128 or 256 KiB).
struct SmallTransfers(Arc<dyn BlockDevice>);

const SMALL_MAX_TRANSFER: u32 = 128 << 10;

impl BlockDevice for SmallTransfers {
    fn info(&self) -> DeviceInfo {
        DeviceInfo { max_transfer: SMALL_MAX_TRANSFER, ..self.0.info() }
    }

    fn open_queue(&self, depth: usize) -> Result<Box<dyn IoQueue>, DeviceError> {
        self.0.open_queue(depth)
    }

    fn register_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.0.register_memory(region)
    }

    fn unregister_memory(&self, region: MemoryRegion) -> Result<(), DeviceError> {
        self.0.unregister_memory(region)
    }
}

/// A guest's 4 MiB direct reads and writes on an export whose device takes 128 KiB per
/// request: the config space (seg_max x size_max) keeps the guest's requests within
/// that, so none is refused and the data reads back.
#[test]
fn guest_requests_stay_within_the_device_max_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::new(vec![]);
    let ram: Arc<dyn BlockDevice> = Arc::new(MemDevice::new(64 << 20, 512).unwrap());
    daemon.registry().register_backend("small", Arc::new(SmallTransfers(ram))).unwrap();
    let mut cfg = export(dir.path(), "small", 1, false);
    cfg.device = "small".into();
    daemon.export_add(cfg).unwrap();
    let out = guest()
        .vhost_user_blk(dir.path().join("small.sock"), 1)
        .script(
            "q=/sys/block/vda/queue\n\
             echo segments=$(cat $q/max_segments) segment_size=$(cat $q/max_segment_size) max_kb=$(cat $q/max_sectors_kb)\n\
             dd if=/dev/urandom of=/tmp/big bs=1M count=8 2>/dev/null\n\
             dd if=/tmp/big of=/dev/vda bs=4M oflag=direct\n\
             dd if=/dev/vda of=/tmp/back bs=4M count=2 iflag=direct\n\
             cmp /tmp/big /tmp/back && echo big-io-verified",
        )
        .run()
        .unwrap();
    out.assert_success();
    assert!(out.output.contains("big-io-verified"), "{}", out.output);
    let limits = out.output.lines().find(|l| l.starts_with("segments=")).unwrap_or_default().to_string();
    let field = |k: &str| -> u64 {
        limits.split_whitespace().find_map(|w| w.strip_prefix(k)?.parse().ok()).unwrap_or_else(|| panic!("{limits}"))
    };
    assert!(
        field("segments=") * field("segment_size=") <= u64::from(SMALL_MAX_TRANSFER),
        "the guest may build requests larger than the device takes: {limits}"
    );
    let stats = daemon.stats(Some("small")).unwrap();
    assert_eq!((stats[0].total.rejected, stats[0].total.errors), (0, 0), "{stats:?}");
    assert!(stats[0].total.bytes_written >= 8 << 20 && stats[0].total.bytes_read >= 8 << 20, "{stats:?}");
    daemon.shutdown();
}
