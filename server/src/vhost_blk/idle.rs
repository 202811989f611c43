//! What an event-mode queue worker does when its virtqueue runs empty: nap, poll, or arm
//! guest notifications and sleep until the next kick.
//!
//! Sleeping on the kick is the expensive choice when the guest comes back soon: the
//! guest pays a notification (a syscall or a VM exit), the worker a wake-up and a
//! context switch, and notifications must be re-armed and checked again. So, like QEMU's
//! adaptive polling (`poll-max-ns`), the worker first keeps looking at the ring for an
//! adapted window; and, like Linux's hybrid NVMe polling, it spends the first half of the
//! gap it expects (the recent average between running empty and the next request)
//! asleep on a short timer rather than spinning, so a busy queue costs little CPU while
//! the guest never needs to kick. Guest notifications stay off for the whole window.
//!
//! A nap only pays when the host's timers are precise. Under some hypervisors a 10 us
//! sleep lasts 30 us and costs 20 us of CPU (timer programming and the wake-up each
//! leave the VM), which makes napping dearer than polling and slower too; so the policy
//! measures how far its naps overshoot and stops napping while they overshoot by more
//! than they sleep, probing again now and then in case the host got better.

use std::time::Duration;

/// First polling window once polling has proved useful.
const WINDOW_START: Duration = Duration::from_micros(4);
/// Shortest nap worth a timer: below this a spin is cheaper than the sleep's own cost.
const MIN_NAP: Duration = Duration::from_micros(5);
/// While naps overshoot, one idle period in this many naps anyway, to measure again.
const NAP_PROBE_EVERY: u32 = 256;

/// The next thing an idle worker does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdleStep {
    /// Sleep this long with notifications off, then look at the ring again.
    Nap(Duration),
    /// Look at the ring again at once.
    Poll,
    /// Arm notifications and sleep until kicked.
    Sleep,
}

/// Adapted per worker from what the guest did recently.
#[derive(Debug, Clone)]
pub struct IdlePolicy {
    max: Duration,
    window: Duration,
    /// Average time from running empty to the next request, over gaps shorter than `max`.
    gap: Duration,
    napped: bool,
    /// Average time a nap lasted beyond what it asked for.
    overshoot: Duration,
    /// Idle periods since the last nap.
    since_nap: u32,
}

impl IdlePolicy {
    /// A policy polling at most `max` (zero: always sleep at once).
    pub fn new(max: Duration) -> Self {
        IdlePolicy {
            max,
            window: Duration::ZERO,
            gap: Duration::ZERO,
            napped: false,
            overshoot: Duration::ZERO,
            since_nap: 0,
        }
    }

    /// What to do after `idle_for` without a request.
    pub fn step(&mut self, idle_for: Duration) -> IdleStep {
        if idle_for >= self.window {
            return IdleStep::Sleep;
        }
        let nap = (self.gap / 2).min(self.window - idle_for);
        if !self.napped && nap >= MIN_NAP {
            self.napped = true;
            self.since_nap = self.since_nap.saturating_add(1);
            if self.overshoot <= nap || self.since_nap >= NAP_PROBE_EVERY {
                self.since_nap = 0;
                return IdleStep::Nap(nap);
            }
        }
        IdleStep::Poll
    }

    /// A nap asked for `asked` lasted `took`.
    pub fn on_nap(&mut self, asked: Duration, took: Duration) {
        self.overshoot = (self.overshoot * 7 + took.saturating_sub(asked)) / 8;
    }

    /// A request arrived after `idle_for` of polling or napping (not after a sleep).
    pub fn on_request(&mut self, idle_for: Duration) {
        self.napped = false;
        if idle_for < self.max {
            self.gap = (self.gap * 7 + idle_for) / 8;
        }
    }

    /// A sleep on the kick lasted `slept`: had the window been that long, polling would
    /// have caught the request, so grow it; a guest that stayed away longer than any
    /// window shrinks it.
    pub fn on_wake(&mut self, slept: Duration) {
        self.napped = false;
        if slept < self.max {
            self.window = (self.window * 2).max(WINDOW_START).min(self.max);
        } else {
            self.window /= 2;
            if self.window < WINDOW_START {
                self.window = Duration::ZERO;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn sleeps_at_once_until_short_sleeps_open_the_window() {
        let mut p = IdlePolicy::new(32 * US);
        assert_eq!(p.step(Duration::ZERO), IdleStep::Sleep);
        p.on_wake(10 * US);
        assert_eq!(p.step(Duration::ZERO), IdleStep::Poll, "window 4 us after one short sleep");
        assert_eq!(p.step(4 * US), IdleStep::Sleep);
        for _ in 0..10 {
            p.on_wake(10 * US);
        }
        assert_eq!(p.step(31 * US), IdleStep::Poll, "window capped at the maximum");
        assert_eq!(p.step(32 * US), IdleStep::Sleep);
        for _ in 0..4 {
            p.on_wake(Duration::from_millis(5));
        }
        assert_eq!(p.step(Duration::ZERO), IdleStep::Sleep, "a guest away for long closes the window");
    }

    #[test]
    fn naps_half_the_usual_gap_once_per_idle_period() {
        let mut p = IdlePolicy::new(32 * US);
        for _ in 0..10 {
            p.on_wake(US);
        }
        for _ in 0..64 {
            p.on_request(20 * US);
        }
        let IdleStep::Nap(nap) = p.step(Duration::ZERO) else { panic!("expected a nap") };
        assert!(nap >= 9 * US && nap <= 10 * US, "{nap:?}");
        assert_eq!(p.step(nap), IdleStep::Poll, "one nap per idle period, then poll");
        p.on_request(12 * US);
        assert!(matches!(p.step(Duration::ZERO), IdleStep::Nap(_)));
        // Gaps too short for a timer: poll only.
        for _ in 0..64 {
            p.on_request(2 * US);
        }
        assert_eq!(p.step(Duration::ZERO), IdleStep::Poll);
        // A nap never runs past the window.
        for _ in 0..64 {
            p.on_request(30 * US);
        }
        assert_eq!(p.step(25 * US), IdleStep::Nap(7 * US));
    }

    #[test]
    fn stops_napping_while_naps_overshoot_and_probes_again_later() {
        let mut p = IdlePolicy::new(32 * US);
        for _ in 0..10 {
            p.on_wake(US);
        }
        for _ in 0..64 {
            p.on_request(20 * US);
        }
        // Precise timers so far: it naps.
        assert!(matches!(p.step(Duration::ZERO), IdleStep::Nap(_)));
        // The host's timer adds 21 us to every 10 us nap.
        for _ in 0..16 {
            p.on_nap(10 * US, 31 * US);
        }
        p.on_request(20 * US);
        let mut naps = 0;
        for _ in 0..NAP_PROBE_EVERY * 2 {
            if let IdleStep::Nap(_) = p.step(Duration::ZERO) {
                naps += 1;
                p.on_nap(10 * US, 31 * US);
            }
            p.on_request(20 * US);
        }
        assert_eq!(naps, 2, "one probing nap per {NAP_PROBE_EVERY} idle periods");
        // The timer got precise again: the probes bring the average down and naps return.
        for _ in 0..NAP_PROBE_EVERY * 8 {
            if let IdleStep::Nap(d) = p.step(Duration::ZERO) {
                p.on_nap(d, d + US);
            }
            p.on_request(20 * US);
        }
        assert!(matches!(p.step(Duration::ZERO), IdleStep::Nap(_)));
    }

    #[test]
    fn zero_maximum_never_polls() {
        let mut p = IdlePolicy::new(Duration::ZERO);
        p.on_wake(Duration::ZERO);
        p.on_request(Duration::ZERO);
        assert_eq!(p.step(Duration::ZERO), IdleStep::Sleep);
    }
}
