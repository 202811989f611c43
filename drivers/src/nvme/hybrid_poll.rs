//! Hybrid polling: when a polled queue's owner would rather not spin
//! ([`crate::IoQueue::wait`]), sleep through part of the time the outstanding commands
//! take, then poll; still no interrupts.
//!
//! Why: a spinning thread holds a CPU the device may need. Under emulation (QEMU with
//! TCG, where the emulated controller runs on the same host cores as the guest's vCPUs)
//! a vCPU spinning on the completion queue takes host CPU from the device model that
//! executes the commands; sleeping gives it back, and each wake-up then finds a batch
//! of completions (fewer doorbells and polls per command).
//!
//! How long: the nap adapts to what the first poll after it finds, with no clock read
//! (under TCG a guest's clock source may be an emulated HPET, whose every read is a
//! trip into the device model). Finding fewer than a quarter of the outstanding
//! commands complete means the nap was too short: it grows by a quarter; finding three
//! quarters or more means the queue was draining while the thread slept: it shrinks by
//! a quarter. So a wake-up lands when about half of a deep queue is done, and with one
//! command out near its completion (like Linux's hybrid polling). After a nap the
//! queue spins until the next completion.

use std::time::Duration;

/// Shortest nap (the first one is longer; most systems overshoot short sleeps anyway).
const MIN_NAP_NS: u32 = 5_000;
/// First nap, before anything has been learnt.
const FIRST_NAP_NS: u32 = 50_000;
/// Longest nap, whatever the history says (a device that stalled must not teach the
/// queue to sleep for long).
const MAX_NAP_NS: u32 = 2_000_000;

/// The nap length and state of one queue's hybrid polling.
#[derive(Debug, Clone)]
pub struct HybridPoll {
    nap_ns: u32,
    /// Slept since the last completion: spin until the next one.
    napped: bool,
    /// Commands outstanding when the last nap began, while the poll that judges it is
    /// still to come; 0 otherwise.
    judging: usize,
    /// Naps taken.
    naps: u64,
}

impl Default for HybridPoll {
    fn default() -> Self {
        HybridPoll { nap_ns: FIRST_NAP_NS, napped: false, judging: 0, naps: 0 }
    }
}

impl HybridPoll {
    /// How long to sleep with `outstanding` commands out, at most `limit`; `None` to
    /// keep polling (nothing out, or a nap since the last completion already).
    pub fn nap(&mut self, outstanding: usize, limit: Duration) -> Option<Duration> {
        if self.napped || outstanding == 0 {
            return None;
        }
        self.napped = true;
        self.judging = outstanding;
        self.naps += 1;
        Some(Duration::from_nanos(u64::from(self.nap_ns)).min(limit))
    }

    /// A poll reaped `n` completions (called for every poll, also when `n` is 0).
    #[inline]
    pub fn polled(&mut self, n: usize) {
        if self.judging > 0 {
            if n * 4 < self.judging {
                self.nap_ns = (self.nap_ns + self.nap_ns / 4).min(MAX_NAP_NS);
            } else if n * 4 >= self.judging * 3 {
                self.nap_ns = (self.nap_ns - self.nap_ns / 4).max(MIN_NAP_NS);
            }
            self.judging = 0;
        }
        if n > 0 {
            self.napped = false;
        }
    }

    /// Naps taken so far.
    pub fn naps(&self) -> u64 {
        self.naps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    fn ns(n: u32) -> Option<Duration> {
        Some(Duration::from_nanos(u64::from(n)))
    }

    #[test]
    fn one_nap_per_completion_then_spin() {
        let mut h = HybridPoll::default();
        assert_eq!(h.nap(0, SECOND), None, "nothing to wait for");
        assert_eq!(h.nap(8, SECOND), ns(FIRST_NAP_NS));
        assert_eq!(h.nap(8, SECOND), None, "spin after a nap");
        h.polled(0);
        assert_eq!(h.nap(8, SECOND), None, "still nothing completed: spin");
        h.polled(1);
        assert!(h.nap(7, SECOND).is_some());
        assert_eq!(h.naps(), 2);
    }

    #[test]
    fn grows_when_too_little_completed_and_shrinks_when_too_much() {
        let mut h = HybridPoll::default();
        // 32 out, 4 done at the wake-up: too early, a quarter longer.
        h.nap(32, SECOND);
        h.polled(4);
        assert_eq!(h.nap(32, SECOND), ns(62_500));
        // 16 of 32: about right, kept.
        h.polled(16);
        assert_eq!(h.nap(32, SECOND), ns(62_500));
        // 30 of 32: the queue was nearly drained, a quarter shorter.
        h.polled(30);
        assert_eq!(h.nap(32, SECOND), ns(46_875));
        // Only the first poll after a nap judges it.
        h.polled(0);
        h.polled(0);
        h.polled(1);
        assert_eq!(h.nap(32, SECOND), ns(58_593));
    }

    #[test]
    fn one_command_out_converges_on_its_latency() {
        let mut h = HybridPoll::default();
        // A device that answers in 200 us: a nap shorter than that finds nothing.
        for _ in 0..200 {
            let nap = h.nap(1, SECOND).unwrap();
            h.polled(usize::from(nap >= Duration::from_micros(200)));
            h.polled(1);
        }
        let nap = h.nap(1, SECOND).unwrap();
        assert!(nap >= Duration::from_micros(150) && nap <= Duration::from_micros(260), "{nap:?}");
    }

    #[test]
    fn bounded_by_the_limits_and_the_callers_timeout() {
        let mut h = HybridPoll::default();
        for _ in 0..100 {
            h.nap(32, SECOND);
            h.polled(0);
            h.polled(1);
        }
        assert_eq!(h.nap(32, SECOND), ns(MAX_NAP_NS));
        h.polled(32);
        for _ in 0..100 {
            h.nap(32, SECOND);
            h.polled(32);
        }
        assert_eq!(h.nap(32, SECOND), ns(MIN_NAP_NS));
        h.polled(1);
        assert_eq!(h.nap(32, Duration::from_nanos(100)), Some(Duration::from_nanos(100)));
    }
}
