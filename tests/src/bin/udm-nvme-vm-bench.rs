//! `udm-nvme-vm-bench`: udm's NVMe driver beside QEMU's userspace NVMe driver and the
//! Linux kernel's, on the same emulated controller in one QEMU guest (TCG), in one run.
//!
//! ```text
//! cargo build --release -p udm-server -p udm-tests --bins
//! target/release/udm-nvme-vm-bench [--secs 10] [--only TEXT] [--doorbells]
//! ```
//!
//! Workloads, 4 KiB requests: random read at QD 1 and 32, random write at QD 32, and the
//! same sequentially (QEMU's `qemu-img bench` has no random mode, so its rows are
//! sequential and the sequential udm rows are the like-for-like comparison). udm runs
//! each workload twice: busy-polling (`udm bench`'s default) and with `--wait` (hybrid
//! polling: the driver sleeps through part of the expected service time, still without
//! interrupts). Each run reports IOPS and the guest CPU time it consumed (from
//! /proc/stat: user, nice, system, irq, softirq of both vCPUs), so drivers compare by
//! requests per guest CPU-second: under TCG the device model shares the host's cores
//! with the guest and absolute IOPS mean little. A table of ratios follows.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use udm_tests::vm::{modules, shell, Backing, Guest, NvmeController, NvmeNamespace};

const BDF: &str = "0000:00:04.0";

/// Benchmarks udm's NVMe driver against QEMU's userspace driver and the guest kernel's,
/// in one TCG guest.
#[derive(Debug, Parser)]
struct Args {
    /// Seconds per run (qemu-img runs a request count sized for about as long).
    #[arg(long, default_value_t = 10)]
    secs: u64,
    /// Only the runs whose label (e.g. "udm wait randread qd32", "kernel read qd1")
    /// contains this text; repeatable.
    #[arg(long)]
    only: Vec<String>,
    /// Shadow against MMIO doorbells only (udm, randread QD32), alternating, 3 rounds.
    #[arg(long)]
    doorbells: bool,
    /// Print the guest's whole console after the tables.
    #[arg(long)]
    console: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Driver {
    Udm,
    QemuImg,
    Kernel,
}

/// One workload: direction, pattern, queue depth.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Workload {
    write: bool,
    random: bool,
    qd: u32,
}

impl Workload {
    fn rw(&self) -> &'static str {
        match (self.random, self.write) {
            (true, false) => "randread",
            (true, true) => "randwrite",
            (false, false) => "read",
            (false, true) => "write",
        }
    }

    fn label(&self) -> String {
        format!("{} qd{}", self.rw(), self.qd)
    }
}

struct Run {
    driver: Driver,
    /// udm's polling mode or variant ("spin", "wait", ...); empty for the peers.
    mode: &'static str,
    workload: Workload,
    command: String,
}

impl Run {
    fn label(&self) -> String {
        let driver = match self.driver {
            Driver::Udm => "udm",
            Driver::QemuImg => "qemu-img",
            Driver::Kernel => "kernel",
        };
        if self.mode.is_empty() {
            format!("{driver} {}", self.workload.label())
        } else {
            format!("{driver} {} {}", self.mode, self.workload.label())
        }
    }
}

/// What one run measured.
#[derive(Clone, Copy, Default)]
struct Measured {
    iops: f64,
    per_cpu_s: f64,
    cpu_s: f64,
    wall_s: f64,
    /// udm's own user and system CPU seconds (its report): where `--wait` spends its
    /// guest CPU (system time is mostly the naps).
    process: Option<(f64, f64)>,
    ok: bool,
}

fn sibling(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let p = exe.parent().expect("target dir").join(name);
    assert!(p.is_file(), "{} is missing: cargo build --release -p udm-server", p.display());
    p
}

const WORKLOADS: [Workload; 6] = [
    Workload { write: false, random: true, qd: 1 },
    Workload { write: false, random: true, qd: 32 },
    Workload { write: true, random: true, qd: 32 },
    Workload { write: false, random: false, qd: 1 },
    Workload { write: false, random: false, qd: 32 },
    Workload { write: true, random: false, qd: 32 },
];

fn runs(args: &Args) -> Vec<Run> {
    let secs = args.secs;
    let dev = format!("nvme:{BDF}/1");
    let udm = |w: Workload, extra: &str| {
        format!("udm bench --device {dev} --rw {} --bs 4k --qd {} --time {secs}s --json{extra}", w.rw(), w.qd)
    };
    let udm_mmio = |w: Workload| {
        format!("udm bench --device {dev},shadow=off --rw {} --bs 4k --qd {} --time {secs}s --json", w.rw(), w.qd)
    };
    // qemu-img bench counts requests, not time: sized for roughly `secs` seconds at
    // the rates this setup reaches. QEMU 7.2's driver sometimes hangs while opening the
    // controller (it enables MSI-X after creating its queues): such an attempt is
    // killed and retried (`qimg` in the script).
    let qimg = |w: Workload| {
        let count = secs * if w.qd == 1 { 1500 } else { 4000 };
        format!(
            "qimg {} -c {count} -d {} -s 4096 {} --image-opts driver=nvme,device={BDF},namespace=1",
            secs * 4,
            w.qd,
            if w.write { "-w" } else { "" }
        )
    };
    let fio = |w: Workload| {
        format!(
            "fio --name=k --filename=/dev/nvme0n1 --ioengine=io_uring --direct=1 --rw={} --bs=4k --iodepth={} \
             --runtime={secs} --time_based --norandommap --randrepeat=0 --output-format=json",
            w.rw(),
            w.qd
        )
    };
    if args.doorbells {
        let w = Workload { write: false, random: true, qd: 32 };
        return (0..3)
            .flat_map(|_| {
                [
                    Run { driver: Driver::Udm, mode: "shadow doorbells", workload: w, command: udm(w, "") },
                    Run { driver: Driver::Udm, mode: "MMIO doorbells", workload: w, command: udm_mmio(w) },
                ]
            })
            .collect();
    }
    let mut all = Vec::new();
    for w in WORKLOADS {
        all.push(Run { driver: Driver::Udm, mode: "spin", workload: w, command: udm(w, "") });
        all.push(Run { driver: Driver::Udm, mode: "wait", workload: w, command: udm(w, " --wait") });
    }
    // qemu-img is sequential whatever it is asked: its rows are the sequential workloads.
    for w in WORKLOADS.iter().filter(|w| !w.random) {
        all.push(Run { driver: Driver::QemuImg, mode: "", workload: *w, command: qimg(*w) });
    }
    for w in WORKLOADS {
        all.push(Run { driver: Driver::Kernel, mode: "", workload: w, command: fio(w) });
    }
    all.retain(|r| args.only.is_empty() || args.only.iter().any(|o| r.label().contains(o.as_str())));
    all
}

fn script(runs: &[Run]) -> String {
    let mut script = String::from(
        "set +e\ncpu() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }\n\
         measure() { name=$1; shift; echo \"RUN-BEGIN $name\"; t0=$(cpu); s0=$(cut -d' ' -f1 /proc/uptime); \"$@\" 2>&1; rc=$?; \
         s1=$(cut -d' ' -f1 /proc/uptime); t1=$(cpu); echo \"RUN-END $name status=$rc jiffies=$((t1-t0)) wall=$s0,$s1\"; }\n\
         qimg() { limit=$1; shift; for attempt in 1 2 3 4 5 6; do t0=$(cpu); s0=$(cut -d' ' -f1 /proc/uptime); \
         timeout $limit qemu-img bench \"$@\"; rc=$?; t1=$(cpu); s1=$(cut -d' ' -f1 /proc/uptime); \
         [ $rc -eq 0 ] && { echo \"ATTEMPT-OK jiffies=$((t1-t0)) wall=$s0,$s1\"; return 0; }; \
         echo \"qemu-img attempt $attempt did not finish\"; done; return 1; }\n\
         echo \"guest clocksource: $(cat /sys/devices/system/clocksource/clocksource0/current_clocksource)\"\n",
    );
    script.push_str(&shell::bind_vfio(BDF));
    for (i, r) in runs.iter().enumerate() {
        if r.driver == Driver::Kernel && (i == 0 || runs[i - 1].driver != Driver::Kernel) {
            // Back to the kernel's nvme driver.
            script.push_str(&format!(
                "echo {BDF} > /sys/bus/pci/drivers/vfio-pci/unbind\necho > /sys/bus/pci/devices/{BDF}/driver_override\n\
                 echo {BDF} > /sys/bus/pci/drivers_probe\ni=0; while [ ! -b /dev/nvme0n1 ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done\n"
            ));
        }
        script.push_str(&format!("measure run{i} {}\n", r.command));
    }
    script
}

fn main() {
    let args = Args::parse();
    let runs = runs(&args);
    assert!(!runs.is_empty(), "--only matched no run");
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
    let load = || std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load_before = load();
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
        .script(&script(&runs))
        .timeout(Duration::from_secs(60 + 20 * args.secs * runs.len() as u64))
        .run()
        .expect("the guest ran");
    println!("Host load average before: {}, after: {}", load_before.trim(), load().trim());
    if let Some(line) = out.output.lines().find(|l| l.starts_with("guest clocksource")) {
        println!("{line}");
    }
    println!();
    println!(
        "| driver | mode | workload | IOPS | guest CPU s (of wall s) | requests per guest CPU-s | udm user + sys s |"
    );
    println!("|---|---|---|---|---|---|---|");
    let measured: Vec<Measured> = runs
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let (m, note) = parse_run(&out.output, i, r);
            let driver = match r.driver {
                Driver::Udm => "udm",
                Driver::QemuImg => "qemu-img (sequential)",
                Driver::Kernel => "kernel + fio io_uring",
            };
            let process = m.process.map(|(u, s)| format!("{u:.2} + {s:.2}")).unwrap_or_default();
            println!(
                "| {driver} | {} | {}{note} | {:.0} | {:.2} of {:.1} s | {:.0} | {process} |",
                r.mode,
                r.workload.label(),
                m.iops,
                m.cpu_s,
                m.wall_s,
                m.per_cpu_s
            );
            m
        })
        .collect();
    ratios(&runs, &measured);
    if args.console {
        println!("{}", out.console);
    }
}

/// Run `i`'s figures from the guest's output, and a note when it failed.
fn parse_run(output: &str, i: usize, r: &Run) -> (Measured, String) {
    let begin = format!("RUN-BEGIN run{i}\n");
    let Some(start) = output.find(&begin) else { return (Measured::default(), " (missing)".into()) };
    let body = &output[start + begin.len()..];
    let end = body.find(&format!("RUN-END run{i} ")).unwrap_or(body.len());
    let text = &body[..end];
    let tail = body[end..].lines().next().unwrap_or("");
    let field_of =
        |line: &str, k: &str| line.split_whitespace().find_map(|w| w.strip_prefix(k)).unwrap_or("").to_string();
    let field = |k: &str| field_of(tail, k);
    // qemu-img attempts that hung while opening the controller were killed: only the
    // attempt that ran counts (its own CPU time and wall time).
    let timing = text.lines().find(|l| l.starts_with("ATTEMPT-OK ")).unwrap_or(tail);
    let cpu_s = field_of(timing, "jiffies=").parse::<f64>().unwrap_or(0.0) / 100.0;
    let wall: Vec<f64> = field_of(timing, "wall=").split(',').filter_map(|s| s.parse().ok()).collect();
    let wall_s = if wall.len() == 2 { wall[1] - wall[0] } else { 0.0 };
    let mut process = None;
    // (IOPS, requests completed)
    let (iops, ops) = match r.driver {
        Driver::Udm => {
            let v = json(text);
            let iops = v["iops"].as_f64().unwrap_or(0.0);
            process = v["cpu"]["user_s"].as_f64().zip(v["cpu"]["sys_s"].as_f64());
            (iops, iops * v["seconds"].as_f64().unwrap_or(0.0))
        }
        Driver::Kernel => {
            let v = json(text);
            let j = &v["jobs"][0];
            (
                j["read"]["iops"].as_f64().unwrap_or(0.0) + j["write"]["iops"].as_f64().unwrap_or(0.0),
                j["read"]["total_ios"].as_f64().unwrap_or(0.0) + j["write"]["total_ios"].as_f64().unwrap_or(0.0),
            )
        }
        Driver::QemuImg => {
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
    let ok = status == "0" && ops > 0.0;
    let retried = text.matches("did not finish").count();
    let note = if !ok {
        format!(" (exit {status}: {})", text.lines().last().unwrap_or(""))
    } else if retried > 0 {
        format!(" ({retried} hung attempts killed first)")
    } else {
        String::new()
    };
    let per_cpu_s = if cpu_s > 0.0 { ops / cpu_s } else { 0.0 };
    (Measured { iops, per_cpu_s, cpu_s, wall_s, process, ok }, note)
}

/// udm over each peer, per workload and polling mode: requests per guest CPU-second,
/// IOPS in brackets. qemu-img's peer row is the sequential workload of the same
/// direction and depth (it has no random mode).
fn ratios(runs: &[Run], measured: &[Measured]) {
    let find = |driver: Driver, w: Workload| {
        runs.iter().zip(measured).find(|(r, m)| r.driver == driver && r.workload == w && m.ok).map(|(_, m)| *m)
    };
    let ratio = |udm: &Measured, peer: Option<Measured>| match peer {
        Some(p) if p.per_cpu_s > 0.0 && p.iops > 0.0 => {
            format!("{:.2}x ({:.2}x)", udm.per_cpu_s / p.per_cpu_s, udm.iops / p.iops)
        }
        _ => "-".to_string(),
    };
    println!();
    println!("Ratios, udm over each peer: requests per guest CPU-second (IOPS in brackets).");
    println!();
    println!("| workload | udm mode | vs qemu-img (sequential, same direction and QD) | vs kernel + io_uring |");
    println!("|---|---|---|---|");
    for (r, m) in runs.iter().zip(measured) {
        if r.driver != Driver::Udm || !m.ok {
            continue;
        }
        let seq = Workload { random: false, ..r.workload };
        println!(
            "| {} | {} | {} | {} |",
            r.workload.label(),
            r.mode,
            ratio(m, find(Driver::QemuImg, seq)),
            ratio(m, find(Driver::Kernel, r.workload))
        );
    }
}

/// The JSON object in a tool's output (from the first `{` to the last `}`).
fn json(text: &str) -> serde_json::Value {
    let (Some(s), Some(e)) = (text.find('{'), text.rfind('}')) else { return serde_json::Value::Null };
    serde_json::from_str(&text[s..=e]).unwrap_or(serde_json::Value::Null)
}
