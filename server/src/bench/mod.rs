//! `udm bench`: a closed-loop load generator in the spirit of fio and SPDK's perf.
//!
//! Each thread opens its own queue on the device and keeps `--qd` requests in flight:
//! as one completes, the next is submitted. Buffers come from DMA memory allocated up
//! front, each slot has its own scatter-gather list, timestamps are CPU ticks and the
//! random generator is one multiply, so the loop itself costs tens of nanoseconds per
//! I/O and the device is what gets measured.

mod clock;
mod device;
mod pattern;
mod progress;
mod report;
mod rng;
mod worker;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use clap::ValueEnum;
use udm_drivers::units::parse_size;
use udm_drivers::{DeviceError, SECTOR_SIZE};

pub use device::open_bench_device;
use report::{Cpu, OpReport, Report, VerifyReport};

/// Access pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RwMode {
    /// Sequential reads.
    Read,
    /// Sequential writes.
    Write,
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Random mix of reads and writes (see --rwmixread).
    Randrw,
}

impl RwMode {
    fn is_random(self) -> bool {
        matches!(self, RwMode::Randread | RwMode::Randwrite | RwMode::Randrw)
    }

    fn writes(self) -> bool {
        !matches!(self, RwMode::Read | RwMode::Randread)
    }

    fn name(self) -> &'static str {
        match self {
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Randrw => "randrw",
        }
    }
}

const AFTER_HELP: &str = "\
Examples:
  udm bench --device null:1G --rw randread --bs 4k --qd 128 --time 5
  udm bench --device mem:1G --rw randrw --rwmixread 70 --threads 2 --json
  udm bench --device file:/var/tmp/disk.img --rw randwrite --qd 32 --verify
  udm bench --device fault:corrupt=2048@mem:64M --rw randwrite --verify --time 1
  udm bench --device dm:vol.table --device disk0=mem:1G --device disk1=mem:1G --threads 2

Device specs: null:<size> (stores nothing, reads zeroes); mem:<size> (RAM disk);
file:<path> (regular file or block device through io_uring, O_DIRECT when possible;
options ,ro  ,direct=off  ,bs=<logical block size>); fault:<faults>@<spec> wraps any of
them, faults being fail-after=N (every request fails after N writes), power-loss=N[,seed=S]
(write N torn, later writes acknowledged but dropped), corrupt=SECTOR (repeatable: reads
of that sector return one byte inverted).

--verify first writes a pattern over the whole device (every sector carries its sector
number and a generation), runs the workload with writes bumping the generation and reads
checking it, then reads every block back. Each thread works on its own slice of the
device. The first bad sector is reported.

Exit status: 0 success; 1 bad arguments or the device could not be opened; 2 an I/O
request failed; 3 --verify found wrong data.";

/// Arguments of `udm bench`.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct BenchArgs {
    /// Device to measure: null:<size>, mem:<size>, file:<path>[,ro][,direct=off][,bs=<n>],
    /// fault:<faults>@<spec>, or dm:<table-file> (a device-mapper table naming the other
    /// devices, given as name=<spec> or name=dm:<table-file>; or a stack file of
    /// `<name>: <table line>` lines, the last device measured). Sizes take K/M/G/T suffixes.
    #[arg(long = "device", short = 'd', value_name = "SPEC", required = true)]
    pub devices: Vec<String>,

    /// Access pattern.
    #[arg(long, value_enum, default_value_t = RwMode::Randread)]
    pub rw: RwMode,

    /// Percentage of reads in --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,

    /// Request size (a multiple of the device's logical block size), e.g. 4k, 64k, 1M.
    #[arg(long, default_value = "4k", value_parser = parse_size_arg)]
    pub bs: u64,

    /// Requests each thread keeps in flight.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub qd: u32,

    /// How long to measure: seconds (`10`, `2.5`) or with a unit (`500ms`, `10s`, `1m`).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub time: Duration,

    /// Threads, each with its own queue on the device.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,

    /// Write a checkable pattern first, check every read, read everything back at the end.
    #[arg(long)]
    pub verify: bool,

    /// Print the results as one JSON object instead of the human summary.
    #[arg(long)]
    pub json: bool,

    /// Sleep in the device's wait whenever every request is in flight, instead of
    /// busy-polling a whole core (the default, like SPDK): file: devices block in
    /// io_uring_enter (like fio); nvme: queues nap for part of the expected service
    /// time, then poll (hybrid polling, still no interrupts). Fewer CPU-seconds per
    /// request, and more device throughput where the device shares the CPUs (an
    /// emulated NVMe under QEMU TCG); spinning keeps the lowest latency at QD 1.
    #[arg(long)]
    pub wait: bool,

    /// Seed of the random offsets and read/write mix (runs with one seed issue the same
    /// sequence per thread).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The device could not be opened.
    #[error("cannot open --device {spec}: {source}")]
    Device {
        /// The spec given.
        spec: String,
        /// Why.
        #[source]
        source: DeviceError,
    },
    /// Preparing a thread (queue, buffers) failed.
    #[error("benchmark set-up failed: {0}")]
    Setup(String),
    /// The arguments do not fit the device.
    #[error("{0}")]
    Usage(String),
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("`{s}` is not a duration: use e.g. 10, 2.5s, 500ms or 1m"))?;
    if !(v > 0.0 && v * scale < 1e7) {
        return Err(format!("`{s}`: the duration must be positive and under a few months"));
    }
    Ok(Duration::from_secs_f64(v * scale))
}

/// Runs `udm bench` and turns the outcome into an exit status.
pub fn main(args: BenchArgs) -> ExitCode {
    match run(&args) {
        Ok(report) => {
            if args.json {
                println!("{}", serde_json::to_string_pretty(&report).expect("the report serialises"));
            } else {
                print!("{}", report.human());
            }
            if report.verify.as_ref().is_some_and(|v| v.mismatch.is_some()) {
                ExitCode::from(3)
            } else if report.failure.is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("udm bench: {e}");
            ExitCode::from(1)
        }
    }
}

/// Runs the benchmark described by `args`.
pub fn run(args: &BenchArgs) -> Result<Report, BenchError> {
    let device = open_bench_device(&args.devices)?;
    let info = device.info();
    let bs = args.bs;
    if bs == 0 || !bs.is_multiple_of(u64::from(info.logical_block_size)) || !bs.is_multiple_of(SECTOR_SIZE) {
        return Err(BenchError::Usage(format!(
            "--bs {bs} is not a multiple of the device's {}-byte logical block size",
            info.logical_block_size
        )));
    }
    if bs > u64::from(info.max_transfer) {
        return Err(BenchError::Usage(format!(
            "--bs {bs} is larger than the device's largest request ({} bytes)",
            info.max_transfer
        )));
    }
    if info.read_only && (args.rw.writes() || args.verify) {
        return Err(BenchError::Usage(format!(
            "the device is read-only: use --rw read or randread without --verify (asked: --rw {}{})",
            args.rw.name(),
            if args.verify { " --verify" } else { "" }
        )));
    }
    let nblocks = info.size_bytes() / bs;
    let threads = args.threads as usize;
    let qd = args.qd as usize;
    // Sequential and verifying threads each get their own slice; random threads roam
    // the whole device.
    let partition = args.verify || !args.rw.is_random();
    let per_thread = if partition { nblocks / threads as u64 } else { nblocks };
    let needed = if args.verify { qd as u64 + 1 } else { 1 };
    if per_thread < needed {
        return Err(BenchError::Usage(format!(
            "the device holds {nblocks} blocks of {bs} bytes: too few for {threads} thread(s){}; \
             use a bigger device, a smaller --bs, --qd or --threads",
            if args.verify {
                format!(" with --verify at --qd {qd} (each thread needs more blocks than --qd)")
            } else {
                String::new()
            }
        )));
    }

    let clock = clock::Clock::calibrate();
    let shared = Arc::new(worker::Shared {
        clock,
        stop: AtomicBool::new(false),
        start: Barrier::new(threads + 1),
        finished: AtomicUsize::new(0),
        progress: (0..threads).map(|_| progress::Counter::default()).collect(),
    });
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let start = if partition { t as u64 * per_thread } else { 0 };
            let job = worker::Job {
                rw: args.rw,
                rwmixread: args.rwmixread,
                bs_sectors: bs / SECTOR_SIZE,
                qd,
                blocks: start..start + per_thread,
                verify: args.verify,
                wait: args.wait,
                seed: args.seed.wrapping_add(t as u64 * 0x1_0000_0001),
                duration_ticks: clock.ticks(args.time),
            };
            let device = Arc::clone(&device);
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name(format!("bench-{t}"))
                .spawn(move || worker::run(t, device, job, shared))
                .expect("spawning a benchmark thread")
        })
        .collect();
    shared.start.wait();
    let t0 = Instant::now();
    let cpu0 = cpu_times();
    let live = std::io::stderr().is_terminal() && args.time > Duration::from_secs(2) && !args.json;
    progress::show(&shared.progress, &shared.finished, args.time, bs, live);
    let cpu1 = cpu_times();

    let mut outcomes = Vec::with_capacity(threads);
    let mut first_error = None;
    for h in handles {
        match h.join().expect("a benchmark thread panicked") {
            Ok(o) => outcomes.push(o),
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    // From the common start to the last thread's drain.
    let seconds = outcomes.iter().filter_map(|o| o.timed_end).max().map_or(0.0, |end| (end - t0).as_secs_f64());
    let seconds = seconds.max(1e-6);
    let mut merged = outcomes.pop().expect("at least one thread");
    for o in outcomes {
        merged.reads += o.reads;
        merged.writes += o.writes;
        merged.read_lat.add(&o.read_lat).expect("histograms with equal bounds add");
        merged.write_lat.add(&o.write_lat).expect("histograms with equal bounds add");
        merged.failure = merged.failure.or(o.failure);
        merged.mismatch = merged.mismatch.or(o.mismatch);
        merged.verified += o.verified;
    }
    let ios = merged.reads + merged.writes;
    Ok(Report {
        device: args.devices.join(" "),
        rw: args.rw.name().into(),
        rwmixread: (args.rw == RwMode::Randrw).then_some(args.rwmixread),
        bs,
        qd,
        threads,
        seconds,
        read: OpReport::new(merged.reads, &merged.read_lat, seconds, bs, &clock),
        write: OpReport::new(merged.writes, &merged.write_lat, seconds, bs, &clock),
        iops: ios as f64 / seconds,
        mb_per_s: ios as f64 * bs as f64 / seconds / 1e6,
        cpu: Cpu { user_s: cpu1.0 - cpu0.0, sys_s: cpu1.1 - cpu0.1 },
        failure: merged.failure,
        verify: args.verify.then_some(VerifyReport { checked_blocks: merged.verified, mismatch: merged.mismatch }),
    })
}

/// User and system CPU seconds of the whole process (io_uring workers included).
fn cpu_times() -> (f64, f64) {
    // SAFETY: an all-zero rusage is a valid value to be overwritten.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid out-pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    (secs(ru.ru_utime), secs(ru.ru_stime))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        for bad in ["", "x", "-1", "0", "5h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
