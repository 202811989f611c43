//! `udm-nvme-vm-bench`: udm's NVMe driver beside QEMU's userspace NVMe driver and the
//! Linux kernel's, on the same emulated controller in one QEMU guest (TCG), in one run.
//!
//! ```text
//! cargo build --release -p udm-server -p udm-tests --bins
//! target/release/udm-nvme-vm-bench [--secs 10] [--doorbells]
//! ```
//!
//! Workloads: 4 KiB random read at QD 1 and 32, random write at QD 32 (QEMU's
//! `qemu-img bench` has no random mode: it runs sequentially). Each run reports IOPS and
//! the guest CPU time it consumed (from /proc/stat: user, nice, system, irq, softirq of
//! both vCPUs), so drivers compare by IOPS per guest CPU-second: under TCG the device
//! model shares the host's cores with the guest and absolute IOPS mean little.

use std::path::PathBuf;
use std::time::Duration;

use udm_tests::vm::{modules, shell, Backing, Guest, NvmeController, NvmeNamespace};

const BDF: &str = "0000:00:04.0";

struct Run {
    name: &'static str,
    workload: &'static str,
    command: String,
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let p = exe.parent().expect("target dir").join(name);
    assert!(p.is_file(), "{} is missing: cargo build --release -p udm-server", p.display());
    p
}

fn main() {
    let secs: u64 = std::env::args()
        .skip_while(|a| a != "--secs")
        .nth(1)
        .map(|s| s.parse().expect("--secs takes a number"))
        .unwrap_or(10);
    let img = tempfile::NamedTempFile::new().expect("image");
    // 1 GiB, written (not sparse), so every read finds data.
    {
        use std::io::Write;
        let mut f = img.as_file();
        let chunk = vec![0x5au8; 1 << 20];
        for _ in 0..1024 {
            f.write_all(&chunk).expect("writing the image");
        }
        f.sync_all().expect("sync");
    }
    let dev = format!("nvme:{BDF}/1");
    let udm = |rw: &str, qd: u32| format!("udm bench --device {dev} --rw {rw} --bs 4k --qd {qd} --time {secs}s --json");
    let udm_mmio = |rw: &str, qd: u32| {
        format!("udm bench --device {dev},shadow=off --rw {rw} --bs 4k --qd {qd} --time {secs}s --json")
    };
    // qemu-img bench counts requests, not time: sized for roughly `secs` seconds at
    // the rates this setup reaches.
    let qimg = |qd: u32, count: u64, write: bool| {
        // QEMU 7.2's driver sometimes hangs while opening the controller (it enables
        // MSI-X after creating its queues): such an attempt is killed and retried.
        format!(
            "qimg {} -c {count} -d {qd} -s 4096 {} --image-opts driver=nvme,device={BDF},namespace=1",
            secs * 4,
            if write { "-w" } else { "" }
        )
    };
    let fio = |rw: &str, qd: u32| {
        format!(
            "fio --name=k --filename=/dev/nvme0n1 --ioengine=io_uring --direct=1 --rw={rw} --bs=4k --iodepth={qd} \
             --runtime={secs} --time_based --norandommap --randrepeat=0 --output-format=json"
        )
    };
    let runs = [
        Run { name: "udm", workload: "randread qd1", command: udm("randread", 1) },
        Run { name: "udm", workload: "randread qd32", command: udm("randread", 32) },
        Run { name: "udm", workload: "randwrite qd32", command: udm("randwrite", 32) },
        Run { name: "udm", workload: "randread qd32, MMIO doorbells", command: udm_mmio("randread", 32) },
        Run { name: "qemu-img", workload: "randread qd1", command: qimg(1, 1500 * secs, false) },
        Run { name: "qemu-img", workload: "randread qd32", command: qimg(32, 4000 * secs, false) },
        Run { name: "qemu-img", workload: "randwrite qd32", command: qimg(32, 4000 * secs, true) },
        Run { name: "kernel", workload: "randread qd1", command: fio("randread", 1) },
        Run { name: "kernel", workload: "randread qd32", command: fio("randread", 32) },
        Run { name: "kernel", workload: "randwrite qd32", command: fio("randwrite", 32) },
    ];
    // `--doorbells`: shadow against MMIO doorbells only, alternating, three rounds.
    let doorbells_only = std::env::args().any(|a| a == "--doorbells");
    let doorbell_runs: Vec<Run> = (0..3)
        .flat_map(|_| {
            [
                Run { name: "udm", workload: "randread qd32, shadow doorbells", command: udm("randread", 32) },
                Run { name: "udm", workload: "randread qd32, MMIO doorbells", command: udm_mmio("randread", 32) },
            ]
        })
        .collect();
    let runs: Vec<Run> = if doorbells_only { doorbell_runs } else { runs.into_iter().collect() };
    let mut script = String::from(
        "set +e\ncpu() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }\n\
         measure() { name=$1; shift; echo \"RUN-BEGIN $name\"; t0=$(cpu); s0=$(cut -d' ' -f1 /proc/uptime); \"$@\" 2>&1; rc=$?; \
         s1=$(cut -d' ' -f1 /proc/uptime); t1=$(cpu); echo \"RUN-END $name status=$rc jiffies=$((t1-t0)) wall=$s0,$s1\"; }\n\
         qimg() { limit=$1; shift; for attempt in 1 2 3 4; do timeout $limit qemu-img bench \"$@\" && return 0; \
         echo \"qemu-img attempt $attempt did not finish\"; done; return 1; }\n",
    );
    script.push_str(&shell::bind_vfio(BDF));
    for (i, r) in runs.iter().enumerate() {
        if r.name == "kernel" && i > 0 && runs[i - 1].name != "kernel" {
            // Back to the kernel's nvme driver.
            script.push_str(&format!(
                "echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind\necho > /sys/bus/pci/devices/{BDF}/driver_override\n\
                 echo {BDF} > /sys/bus/pci/drivers_probe\ni=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
            ));
        }
        script.push_str(&format!("measure run{i} {}\n", r.command));
    }
    let out = Guest::new()
        .expect("guest kernel (run scripts/vm-prepare.sh)")
        .memory_mib(2048)
        .smp(2)
        .intel_iommu()
        .hugepages(128)
        .modules(modules::VFIO)
        .modules(modules::NVME)
        .nvme(NvmeController::new("udmbench", 4).namespace(NvmeNamespace::new(Backing::raw(img.path()), 512)))
        .binary(sibling("udm"))
        .binary("/usr/bin/qemu-img")
        .binary("/usr/bin/fio")
        .script(&script)
        .timeout(Duration::from_secs(60 + 20 * secs * runs.len() as u64))
        .run()
        .expect("the guest ran");
    println!("| driver | workload | IOPS | guest CPU s (of wall s) | requests per guest CPU-s |");
    println!("|---|---|---|---|---|");
    for (i, r) in runs.iter().enumerate() {
        let begin = format!("RUN-BEGIN run{i}\n");
        let Some(start) = out.output.find(&begin) else {
            println!("| {} | {} | missing | | |", r.name, r.workload);
            continue;
        };
        let body = &out.output[start + begin.len()..];
        let end = body.find(&format!("RUN-END run{i} ")).unwrap_or(body.len());
        let text = &body[..end];
        let tail = body[end..].lines().next().unwrap_or("");
        let field = |k: &str| tail.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("").to_string();
        let jiffies: f64 = field("jiffies=").parse().unwrap_or(0.0);
        let cpu_s = jiffies / 100.0;
        let wall: Vec<f64> = field("wall=").split(',').filter_map(|s| s.parse().ok()).collect();
        let wall_s = if wall.len() == 2 { wall[1] - wall[0] } else { 0.0 };
        // (IOPS, requests completed)
        let (iops, ops) = match r.name {
            "udm" => {
                let v = json(text);
                let iops = v["iops"].as_f64().unwrap_or(0.0);
                (iops, iops * v["seconds"].as_f64().unwrap_or(0.0))
            }
            "kernel" => {
                let v = json(text);
                let j = &v["jobs"][0];
                (
                    j["read"]["iops"].as_f64().unwrap_or(0.0) + j["write"]["iops"].as_f64().unwrap_or(0.0),
                    j["read"]["total_ios"].as_f64().unwrap_or(0.0) + j["write"]["total_ios"].as_f64().unwrap_or(0.0),
                )
            }
            _ => {
                // "Run completed in 12.345 seconds."
                let secs = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Run completed in ").and_then(|r| r.split_whitespace().next()))
                    .and_then(|s| s.parse::<f64>().ok());
                let count: f64 = r
                    .command
                    .split_whitespace()
                    .skip_while(|w| *w != "-c")
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(0.0);
                secs.map(|s| (count / s, count)).unwrap_or((0.0, 0.0))
            }
        };
        let status = field("status=");
        let per_cpu = if cpu_s > 0.0 { ops / cpu_s } else { 0.0 };
        let note = if status == "0" {
            String::new()
        } else {
            format!(" (exit {status}: {})", text.lines().last().unwrap_or(""))
        };
        println!(
            "| {} | {}{} | {:.0} | {:.2} of {:.1} s | {:.0} |",
            r.name, r.workload, note, iops, cpu_s, wall_s, per_cpu
        );
    }
    if std::env::var_os("UDM_BENCH_CONSOLE").is_some() {
        println!("{}", out.console);
    }
}

/// The JSON object in a tool's output (from the first `{` to the last `}`).
fn json(text: &str) -> serde_json::Value {
    let (Some(s), Some(e)) = (text.find('{'), text.rfind('}')) else { return serde_json::Value::Null };
    serde_json::from_str(&text[s..=e]).unwrap_or(serde_json::Value::Null)
}
