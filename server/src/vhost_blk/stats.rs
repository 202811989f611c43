//! Per-queue counters and latency histograms for `udm stats`.
//!
//! Counters are relaxed atomics bumped by the queue's worker only. Latencies go into a
//! histogram the worker owns and merges into the shared one now and then (`try_lock`,
//! never waiting), so the data path takes no lock it could block on.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Counters of one virtqueue.
#[derive(Debug)]
pub struct QueueStats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
    latency_ns: Mutex<Histogram<u64>>,
}

/// A snapshot of [`QueueStats`], as the control socket reports it.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct QueueSnapshot {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards completed.
    pub discards: u64,
    /// Write-zeroes completed.
    pub write_zeroes: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Requests the device failed.
    pub errors: u64,
    /// Malformed or refused chains.
    pub rejected: u64,
    /// Latency percentiles in microseconds: p50, p99, p99.9, max.
    pub latency_us: [f64; 4],
}

/// Which counter a completion bumps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Read.
    Read,
    /// Write.
    Write,
    /// Flush.
    Flush,
    /// Discard.
    Discard,
    /// Write-zeroes.
    WriteZeroes,
    /// GET_ID and other requests answered by the export.
    Other,
}

impl Default for QueueStats {
    fn default() -> Self {
        Self::new()
    }
}

impl QueueStats {
    /// Zeroed counters.
    pub fn new() -> Self {
        QueueStats {
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            discards: AtomicU64::new(0),
            write_zeroes: AtomicU64::new(0),
            bytes_read: AtomicU64::new(0),
            bytes_written: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            latency_ns: Mutex::new(new_histogram()),
        }
    }

    /// Counts one completed request of `bytes`. Only the queue's worker counts (one
    /// writer at a time: a restarted worker starts after the old one stopped), so a load
    /// and a store do what a locked read-modify-write would, at a fraction of the cost.
    #[inline]
    pub fn complete(&self, kind: Kind, bytes: u64, ok: bool) {
        let bump = |c: &AtomicU64, n: u64| {
            c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
        };
        if !ok {
            bump(&self.errors, 1);
            return;
        }
        match kind {
            Kind::Read => {
                bump(&self.reads, 1);
                bump(&self.bytes_read, bytes);
            }
            Kind::Write => {
                bump(&self.writes, 1);
                bump(&self.bytes_written, bytes);
            }
            Kind::Flush => bump(&self.flushes, 1),
            Kind::Discard => bump(&self.discards, 1),
            Kind::WriteZeroes => bump(&self.write_zeroes, 1),
            Kind::Other => {}
        }
    }

    /// Counts a refused chain.
    pub fn reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Merges the worker's local histogram if the shared one is free; returns whether it
    /// did (the caller then resets its local copy).
    pub fn try_merge(&self, local: &Histogram<u64>) -> bool {
        match self.latency_ns.try_lock() {
            Ok(mut h) => {
                let _ = h.add(local);
                true
            }
            Err(_) => false,
        }
    }

    /// A snapshot for reporting.
    pub fn snapshot(&self) -> QueueSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let h = self.latency_ns.lock().unwrap_or_else(|e| e.into_inner());
        let us = |q: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(q) as f64 / 1000.0 };
        QueueSnapshot {
            reads: get(&self.reads),
            writes: get(&self.writes),
            flushes: get(&self.flushes),
            discards: get(&self.discards),
            write_zeroes: get(&self.write_zeroes),
            bytes_read: get(&self.bytes_read),
            bytes_written: get(&self.bytes_written),
            errors: get(&self.errors),
            rejected: get(&self.rejected),
            latency_us: [us(0.5), us(0.99), us(0.999), if h.is_empty() { 0.0 } else { h.max() as f64 / 1000.0 }],
        }
    }
}

/// A histogram of nanoseconds from 1 ns to 60 s with 2 significant digits (1% error is
/// plenty for percentiles, and merging walks every bucket).
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 2).expect("static histogram bounds are valid")
}

impl QueueSnapshot {
    /// Adds another queue's counters (latency: the worst of each percentile).
    pub fn accumulate(&mut self, o: &QueueSnapshot) {
        self.reads += o.reads;
        self.writes += o.writes;
        self.flushes += o.flushes;
        self.discards += o.discards;
        self.write_zeroes += o.write_zeroes;
        self.bytes_read += o.bytes_read;
        self.bytes_written += o.bytes_written;
        self.errors += o.errors;
        self.rejected += o.rejected;
        for (a, b) in self.latency_us.iter_mut().zip(o.latency_us) {
            *a = a.max(b);
        }
    }
}
