//! Per-thread counters the workers bump without sharing cache lines, and the live
//! progress line printed from them on a terminal.

use std::io::Write;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// One counter on its own cache line (two lines: adjacent-line prefetch).
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Publishes the owner's running total.
    #[inline(always)]
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }

    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Prints `[ 3.0s / 10.0s ] 1.23M IOPS, 4.8 GB/s` once a second on stderr until every
/// worker has finished its timed phase (`finished == workers`).
pub fn show(counters: &[Counter], finished: &AtomicUsize, total: Duration, bytes_per_io: u64, live: bool) {
    let start = Instant::now();
    let mut last = (Instant::now(), 0u64);
    let mut printed = false;
    while finished.load(Ordering::Acquire) < counters.len() {
        std::thread::sleep(Duration::from_millis(10));
        if !live || last.0.elapsed() < Duration::from_secs(1) {
            continue;
        }
        let now = Instant::now();
        let ios: u64 = counters.iter().map(Counter::get).sum();
        let rate = (ios - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
        last = (now, ios);
        eprint!(
            "\r[ {:5.1}s / {:.1}s ] {} IOPS, {:.1} MB/s   ",
            start.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            super::report::si(rate),
            rate * bytes_per_io as f64 / 1e6
        );
        let _ = std::io::stderr().flush();
        printed = true;
    }
    if printed {
        eprint!("\r{:70}\r", "");
    }
}
