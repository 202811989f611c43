//! Cheap timestamps for the hot loop: the CPU's time-stamp counter on x86-64 (a few
//! nanoseconds, no system call), `Instant` elsewhere. Calibrated once against the
//! monotonic clock; latencies are kept in ticks and converted when reported.

use std::time::{Duration, Instant};

/// Ticks of [`Clock::now`] and their length.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    ticks_per_ns: f64,
    origin: Instant,
}

impl Clock {
    /// Measures the tick rate over a few milliseconds.
    pub fn calibrate() -> Self {
        let origin = Instant::now();
        let t0 = raw_now(origin);
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(20));
        let t1 = raw_now(origin);
        let ns = start.elapsed().as_nanos() as f64;
        Clock { ticks_per_ns: ((t1 - t0) as f64 / ns).max(1e-9), origin }
    }

    /// The current tick.
    #[inline(always)]
    pub fn now(&self) -> u64 {
        raw_now(self.origin)
    }

    /// Ticks in `d`.
    pub fn ticks(&self, d: Duration) -> u64 {
        (d.as_nanos() as f64 * self.ticks_per_ns) as u64
    }

    /// Nanoseconds in `ticks`.
    pub fn nanos(&self, ticks: u64) -> f64 {
        ticks as f64 / self.ticks_per_ns
    }
}

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn raw_now(_origin: Instant) -> u64 {
    // Every x86-64 CPU has RDTSC; on the invariant-TSC CPUs of the last decade it ticks
    // at a constant rate on all cores.
    // SAFETY: RDTSC reads a counter; it has no preconditions and touches no memory.
    unsafe { std::arch::x86_64::_rdtsc() }
}

#[cfg(not(target_arch = "x86_64"))]
#[inline(always)]
fn raw_now(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}
