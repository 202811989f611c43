//! The results: fio-like text for people, `--json` for scripts.

use std::fmt::Write as _;

use hdrhistogram::Histogram;
use serde::Serialize;

use super::clock::Clock;
use super::pattern::Mismatch;
use super::worker::Failure;

/// Latency percentiles in microseconds.
#[derive(Debug, Serialize)]
pub struct Latency {
    pub mean: f64,
    pub p50: f64,
    pub p99: f64,
    pub p99_9: f64,
    pub max: f64,
}

/// One direction's figures.
#[derive(Debug, Serialize)]
pub struct OpReport {
    pub ios: u64,
    pub iops: f64,
    pub mb_per_s: f64,
    pub lat_us: Latency,
}

impl OpReport {
    pub fn new(ios: u64, hist: &Histogram<u64>, seconds: f64, bs: u64, clock: &Clock) -> Option<Self> {
        if ios == 0 {
            return None;
        }
        let us = |ticks: u64| clock.nanos(ticks) / 1e3;
        let iops = ios as f64 / seconds;
        Some(OpReport {
            ios,
            iops,
            mb_per_s: iops * bs as f64 / 1e6,
            lat_us: Latency {
                mean: clock.nanos(hist.mean() as u64) / 1e3,
                p50: us(hist.value_at_quantile(0.50)),
                p99: us(hist.value_at_quantile(0.99)),
                p99_9: us(hist.value_at_quantile(0.999)),
                max: us(hist.max()),
            },
        })
    }
}

/// CPU time the process used during the timed phase.
#[derive(Debug, Serialize)]
pub struct Cpu {
    pub user_s: f64,
    pub sys_s: f64,
}

/// What `--verify` found.
#[derive(Debug, Serialize)]
pub struct VerifyReport {
    pub checked_blocks: u64,
    pub mismatch: Option<Mismatch>,
}

/// Everything a run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    pub device: String,
    pub rw: String,
    pub rwmixread: Option<u8>,
    pub bs: u64,
    pub qd: usize,
    pub threads: usize,
    pub seconds: f64,
    pub read: Option<OpReport>,
    pub write: Option<OpReport>,
    pub iops: f64,
    pub mb_per_s: f64,
    pub cpu: Cpu,
    pub failure: Option<Failure>,
    pub verify: Option<VerifyReport>,
}

/// `1234567.0` -> `1.23M`.
pub fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.2}G", v / 1e9),
        v if v >= 1e6 => format!("{:.2}M", v / 1e6),
        v if v >= 1e4 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

impl Report {
    /// The human summary, in fio's shape.
    pub fn human(&self) -> String {
        let mut s = String::new();
        let mix = self.rwmixread.map(|m| format!(" rwmixread={m}")).unwrap_or_default();
        let _ = writeln!(
            s,
            "udm bench: {} rw={}{mix} bs={} qd={} threads={} time={:.2}s",
            self.device, self.rw, self.bs, self.qd, self.threads, self.seconds
        );
        for (name, op) in [("read", &self.read), ("write", &self.write)] {
            let Some(op) = op else { continue };
            let _ = writeln!(
                s,
                "  {name}: IOPS={}, BW={:.1}MiB/s ({:.1}MB/s) ({} ios)",
                si(op.iops),
                op.mb_per_s * 1e6 / 1048576.0,
                op.mb_per_s,
                op.ios
            );
            let l = &op.lat_us;
            let _ = writeln!(
                s,
                "    lat (usec): mean={:.2}, p50={:.2}, p99={:.2}, p99.9={:.2}, max={:.2}",
                l.mean, l.p50, l.p99, l.p99_9, l.max
            );
        }
        if self.read.is_some() && self.write.is_some() {
            let _ = writeln!(s, "  total: IOPS={}, {:.1}MB/s", si(self.iops), self.mb_per_s);
        }
        let _ = writeln!(
            s,
            "  cpu: usr={:.2}s sys={:.2}s ({:.2} cores busy)",
            self.cpu.user_s,
            self.cpu.sys_s,
            (self.cpu.user_s + self.cpu.sys_s) / self.seconds.max(1e-9)
        );
        if let Some(f) = &self.failure {
            let _ = writeln!(s, "  I/O ERROR: {} at sector {} failed: {}", f.op, f.sector, f.error);
        }
        if let Some(v) = &self.verify {
            match &v.mismatch {
                None => {
                    let _ = writeln!(s, "  verify: {} blocks read back and checked, all correct", v.checked_blocks);
                }
                Some(m) => {
                    let _ = writeln!(
                        s,
                        "  VERIFY FAILED: first bad sector {} (byte {}): expected generation {}, found sector {} generation {}",
                        m.sector, m.byte, m.expected_generation, m.found_sector, m.found_generation
                    );
                }
            }
        }
        s
    }
}
