//! Linux guests (QEMU, TCG) on udm's vhost-user-blk exports: ext4 made, filled, synced
//! and checked clean; a snapshot of the volume, exported read-only to a second guest,
//! checks clean and shows the files as they were while the origin changes.

use std::path::Path;
use std::time::Duration;

use udm_server::daemon::config::{BackendConfig, Config, DeviceConfig};
use udm_server::daemon::Daemon;
use udm_server::vhost_blk::{ExportConfig, PollMode};
use udm_tests::vm::{modules, Guest};

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

/// `md5  /mnt/fN` lines, sorted.
fn sums(output: &str) -> Vec<String> {
    let mut v: Vec<String> = output.lines().filter(|l| l.contains("/mnt/f")).map(str::to_string).collect();
    v.sort();
    v
}

#[test]
fn ext4_on_a_udm_volume_and_on_its_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon::new(vec![]);
    let config = Config {
        control: dir.path().join("udm.ctl"),
        backends: vec![BackendConfig { name: "ram0".into(), spec: "mem:256M".into() }],
        devices: vec![DeviceConfig { name: "vol0".into(), table: "0 524288 linear ram0 0".into(), uuid: None }],
        snapshots: vec![],
        exports: vec![export(dir.path(), "vol0", 2, false)],
    };
    daemon.apply(&config).unwrap();

    let first = guest()
        .vhost_user_blk(dir.path().join("vol0.sock"), 2)
        .script(
            "cat /sys/block/vda/serial; echo\n\
             mkfs.ext4 -q -F /dev/vda\n\
             mkdir -p /mnt && mount -t ext4 /dev/vda /mnt\n\
             i=0; while [ $i -lt 24 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=$((i * 7 + 1)) 2>/dev/null; i=$((i+1)); done\n\
             sync\n\
             md5sum /mnt/f*\n\
             umount /mnt\n\
             e2fsck -fn /dev/vda",
        )
        .run()
        .unwrap();
    first.assert_success();
    assert!(first.output.contains("udm-vol0"), "serial (GET_ID):\n{}", first.output);
    let original = sums(&first.output);
    assert_eq!(original.len(), 24, "{}", first.output);

    daemon.snapshot_create("vol0", "snap0", "mem:128M", "8k").unwrap();
    daemon.export_add(export(dir.path(), "snap0", 1, true)).unwrap();

    let second = guest()
        .vhost_user_blk(dir.path().join("vol0.sock"), 2)
        .vhost_user_blk(dir.path().join("snap0.sock"), 1)
        .script(
            "cat /sys/block/vdb/ro\n\
             mkdir -p /mnt\n\
             mount -t ext4 /dev/vda /mnt\n\
             i=0; while [ $i -lt 12 ]; do dd if=/dev/urandom of=/mnt/f$i bs=4k count=9 conv=notrunc 2>/dev/null; i=$((i+1)); done\n\
             rm /mnt/f23\n\
             sync; umount /mnt\n\
             e2fsck -fn /dev/vda\n\
             echo origin-clean\n\
             e2fsck -fn /dev/vdb\n\
             echo snapshot-clean\n\
             mount -t ext4 -o ro,noload /dev/vdb /mnt\n\
             md5sum /mnt/f*\n\
             umount /mnt",
        )
        .run()
        .unwrap();
    second.assert_success();
    assert!(second.output.contains("origin-clean") && second.output.contains("snapshot-clean"));
    assert!(second.output.lines().next().unwrap_or("").trim() == "1", "snapshot disk is read-only:\n{}", second.output);
    assert_eq!(sums(&second.output), original, "the snapshot shows the files as they were");
    let stats = daemon.stats(Some("vol0")).unwrap();
    assert!(stats[0].total.writes > 0 && stats[0].queues.len() == 2);
    daemon.shutdown();
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
        devices: vec![DeviceConfig { name: "vol0".into(), table: "0 131072 linear ram0 0".into(), uuid: None }],
        snapshots: vec![],
        exports: vec![export(dir.path(), "vol0", 1, false)],
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
    daemon.dm_suspend("vol0", false).unwrap();
    daemon.dm_resume("vol0").unwrap();
    let out = run.join().unwrap().unwrap();
    out.assert_success();
    assert!(out.output.contains("size0=131072"), "{}", out.output);
    assert!(out.output.contains("size1=196608"), "the guest saw the new size:\n{}", out.output);
    assert!(out.output.contains("tail-written"), "{}", out.output);
    daemon.shutdown();
}
