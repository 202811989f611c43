//! udm's NVMe driver against QEMU's emulated NVMe controllers behind a virtual IOMMU,
//! in one guest (TCG): three controllers in different configurations, bound to
//! vfio-pci, and `udm-nvme-selftest` run against each.
//!
//! | controller | namespaces | MDTS | I/O queues | used for |
//! |---|---|---|---|---|
//! | 00:04.0 `udmA` | 32 MiB / 512 B, 32 MiB / 4 KiB | QEMU default (7) | default (64) | identify, integrity, out of range, reset |
//! | 00:05.0 `udmB` | 16 MiB / 4 KiB | 1 (8 KiB) | 2 | MDTS splitting, queue exhaustion, MMIO doorbells |
//! | 00:06.0 `udmC` | null-co, 3 s latency | default | default | timeout, abort, reset |
//! | 00:07.0 `udmD` | 8 MiB / 512 B under blkdebug (I/O fails with EIO) | default | default | media error status |

use std::collections::HashMap;
use std::time::Duration;

use udm_tests::vm::{modules, shell, Backing, Guest, NvmeController, NvmeNamespace};

const MIB: u64 = 1 << 20;

/// The output of one check: its lines and exit status.
struct CheckOutput {
    lines: Vec<String>,
    status: i32,
}

/// Splits the guest's output into checks framed by `CHECK-BEGIN name` and
/// `CHECK-END name status=N`.
fn checks(output: &str) -> HashMap<String, CheckOutput> {
    let mut out = HashMap::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in output.lines() {
        if let Some(name) = line.strip_prefix("CHECK-BEGIN ") {
            current = Some((name.trim().to_string(), Vec::new()));
        } else if let Some(rest) = line.strip_prefix("CHECK-END ") {
            if let Some((name, lines)) = current.take() {
                let status = rest.rsplit("status=").next().and_then(|s| s.trim().parse().ok()).unwrap_or(-1);
                out.insert(name, CheckOutput { lines, status });
            }
        } else if let Some((_, lines)) = current.as_mut() {
            lines.push(line.to_string());
        }
    }
    out
}

fn facts(c: &CheckOutput) -> HashMap<String, String> {
    c.lines
        .iter()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn image(size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    f.as_file().set_len(size).unwrap();
    f
}

#[test]
fn nvme_driver_against_qemu_controllers() {
    let a1 = image(32 * MIB);
    let a2 = image(32 * MIB);
    let b1 = image(16 * MIB);
    let d1 = image(8 * MIB);
    let rules = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(rules.path(), "[inject-error]\nevent = \"read_aio\"\nerrno = \"5\"\n").unwrap();
    let selftest = env!("CARGO_BIN_EXE_udm-nvme-selftest");
    let script = [
        "set +e",
        &shell::bind_vfio("0000:00:04.0"),
        &shell::bind_vfio("0000:00:05.0"),
        &shell::bind_vfio("0000:00:06.0"),
        &shell::bind_vfio("0000:00:07.0"),
        "run() { name=$1; shift; echo \"CHECK-BEGIN $name\"; \"$@\" 2>&1; echo \"CHECK-END $name status=$?\"; }",
        "run identify-a udm-nvme-selftest identify 0000:00:04.0",
        "run identify-b udm-nvme-selftest identify 0000:00:05.0",
        "run integrity-a1 udm-nvme-selftest integrity nvme:0000:00:04.0/1 --threads 2 --keep --seed 100",
        // Sleeping in IoQueue::wait (hybrid polling) instead of spinning.
        "run integrity-a2 udm-nvme-selftest integrity nvme:0000:00:04.0/2 --threads 3 --seed 200 --wait",
        "run integrity-b1 udm-nvme-selftest integrity nvme:0000:00:05.0/1,shadow=off --threads 2 --seed 300",
        "run queues-b udm-nvme-selftest queues 0000:00:05.0",
        "run range-a1 udm-nvme-selftest out-of-range nvme:0000:00:04.0/1",
        "run range-a2 udm-nvme-selftest out-of-range nvme:0000:00:04.0/2",
        "run reset-a2 udm-nvme-selftest reset nvme:0000:00:04.0/2",
        "run timeout-c udm-nvme-selftest timeout nvme:0000:00:06.0/1,timeout-ms=500",
        "run media-d udm-nvme-selftest media-error nvme:0000:00:07.0/1",
        "run shared-ab udm-nvme-selftest shared nvme:0000:00:04.0/2 nvme:0000:00:05.0/1",
    ]
    .join("\n");
    let out = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(1024)
        .smp(2)
        .intel_iommu()
        .hugepages(160)
        .modules(modules::VFIO)
        .nvme(
            NvmeController::new("udmA", 4)
                .namespace(NvmeNamespace::new(Backing::raw(a1.path()), 512))
                .namespace(NvmeNamespace::new(Backing::raw(a2.path()), 4096)),
        )
        .nvme(
            NvmeController::new("udmB", 5)
                .mdts(1)
                .max_ioqpairs(2)
                .namespace(NvmeNamespace::new(Backing::raw(b1.path()), 4096)),
        )
        .nvme(
            NvmeController::new("udmC", 6)
                .namespace(NvmeNamespace::new(Backing::Null { size: 64 * MIB, latency_ns: 3_000_000_000 }, 4096)),
        )
        .nvme(NvmeController::new("udmD", 7).namespace(NvmeNamespace::new(
            Backing::Blkdebug { rules: rules.path().to_path_buf(), image: d1.path().to_path_buf() },
            512,
        )))
        .binary(selftest)
        .script(&script)
        .timeout(Duration::from_secs(900))
        .run()
        .expect("the guest ran");
    out.assert_success();
    let c = checks(&out.output);
    let show = |name: &str| -> &CheckOutput {
        let check = c.get(name).unwrap_or_else(|| panic!("check {name} missing; guest output:\n{}", out.output));
        assert_eq!(check.status, 0, "check {name} failed:\n{}", check.lines.join("\n"));
        check
    };

    // Identify matches QEMU's configuration.
    let a = facts(show("identify-a"));
    for (k, v) in [
        ("serial", "udmA"),
        ("vendor", "0x1b36"),
        ("namespaces", "2"),
        ("mdts", "7"),
        ("max_transfer", "524288"),
        ("mqes", "2048"),
        ("io_queue_pairs", "64"),
        ("shadow_doorbells", "true"),
        ("ns1.block_size", "512"),
        ("ns1.blocks", "65536"),
        ("ns1.sectors", "65536"),
        ("ns2.block_size", "4096"),
        ("ns2.blocks", "8192"),
        ("ns2.sectors", "65536"),
        ("ns1.discard", "true"),
        ("ns1.write_zeroes", "true"),
        ("ns1.volatile_cache", "true"),
    ] {
        assert_eq!(a.get(k).map(String::as_str), Some(v), "identify-a {k}: {a:?}");
    }
    let b = facts(show("identify-b"));
    for (k, v) in [
        ("serial", "udmB"),
        ("mdts", "1"),
        ("max_transfer", "8192"),
        ("io_queue_pairs", "2"),
        ("ns1.block_size", "4096"),
        ("ns1.blocks", "4096"),
    ] {
        assert_eq!(b.get(k).map(String::as_str), Some(v), "identify-b {k}: {b:?}");
    }

    // Whole namespaces written and read back, several queues at once.
    for (name, bytes) in [("integrity-a1", 32 * MIB), ("integrity-a2", 32 * MIB), ("integrity-b1", 16 * MIB)] {
        let check = show(name);
        assert!(
            check.lines.iter().any(|l| l.starts_with(&format!("integrity ok bytes={bytes} "))),
            "{name}: {}",
            check.lines.join("\n")
        );
        assert!(check.lines.iter().any(|l| l.starts_with("write_zeroes ok")), "{name}");
    }
    // integrity-a2 ran with --wait: its queues napped (hybrid polling) and the data held.
    // A wait naps unless a completion was posted between its kick and its check, which
    // no device manages for every one of the thousands of waits in a run.
    let naps = |name: &str| -> u64 {
        show(name)
            .lines
            .iter()
            .find_map(|l| l.strip_prefix("integrity ok ")?.split_whitespace().find_map(|w| w.strip_prefix("naps=")))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: no naps= in its integrity line"))
    };
    assert!(naps("integrity-a2") > 0, "integrity-a2 ran with --wait but never napped");
    assert_eq!(naps("integrity-a1"), 0, "integrity-a1 spins: no naps");
    assert!(show("queues-b").lines.iter().any(|l| l == "queues ok granted=2"));
    assert!(show("queues-b").lines.iter().any(|l| l.contains("all 2 I/O queue pairs are in use")));

    // Out-of-range I/O fails with the controller's status.
    for name in ["range-a1", "range-a2"] {
        let check = show(name);
        assert!(
            check.lines.iter().any(|l| l.contains("past the end: NVMe command failed: LBA Out of Range")),
            "{name}"
        );
    }

    // A reset with writes outstanding loses nothing.
    let reset = show("reset-a2");
    let line = reset.lines.iter().find(|l| l.starts_with("reset ok")).expect("reset ok line");
    assert!(line.contains("resets=2"), "{line}");
    assert!(!line.contains("outstanding_at_reset=0 "), "{line}");

    // A command slower than the timeout is aborted, the controller reset, the command failed.
    assert!(show("timeout-c").lines.iter().any(|l| l == "timeout ok"));

    // A read the storage fails reports the NVMe media status.
    let media = show("media-d");
    assert!(media.lines.iter().any(|l| l.contains("read: NVMe command failed: Unrecovered Read Error")));
    assert!(media.lines.iter().any(|l| l.contains("write: NVMe command failed: Write Fault")));

    // Two controllers share one VFIO container; the IOVAs come from the IOMMU's ranges
    // (QEMU's intel-iommu: 39 bits, a hole for the interrupt window).
    let shared = show("shared-ab");
    assert!(shared.lines.iter().any(|l| l == "shared ok controllers=2"));
    assert!(
        shared.lines.iter().any(|l| l == "iova_ranges=0x0-0xfedfffff,0xfef00000-0x7fffffffff"),
        "{}",
        shared.lines.join("\n")
    );

    // From the host: the data of namespace a1 is where the guest wrote it. Every sector
    // carries its own number, except the range the check zeroed.
    let data = std::fs::read(a1.path()).unwrap();
    let sectors = data.len() as u64 / 512;
    let zero_at = sectors / 3;
    let zero_len = (sectors / 4).min(300_000);
    for s in 0..sectors {
        let sector = &data[(s * 512) as usize..((s + 1) * 512) as usize];
        if (zero_at..zero_at + zero_len).contains(&s) {
            assert!(sector.iter().all(|&b| b == 0), "sector {s} should be zero");
        } else {
            assert_eq!(u64::from_le_bytes(sector[..8].try_into().unwrap()), s, "sector {s} on the host image");
        }
    }
}
