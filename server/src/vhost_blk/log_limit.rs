//! Rate-limited logging of guest-caused errors: a misbehaving guest must not be able to
//! flood the host's logs (or slow the data path with formatting).

use std::time::{Duration, Instant};

/// Lets one message through per interval and counts the ones it held back.
#[derive(Debug)]
pub struct LogLimit {
    interval: Duration,
    last: Option<Instant>,
    suppressed: u64,
}

impl LogLimit {
    /// At most one message per `interval`.
    pub fn new(interval: Duration) -> Self {
        LogLimit { interval, last: None, suppressed: 0 }
    }

    /// Whether to log now; if so, also how many messages were dropped since the last one.
    pub fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        match self.last {
            Some(t) if now.duration_since(t) < self.interval => {
                self.suppressed += 1;
                None
            }
            _ => {
                self.last = Some(now);
                Some(std::mem::take(&mut self.suppressed))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_bursts_and_reports_the_count() {
        let mut l = LogLimit::new(Duration::from_secs(3600));
        assert_eq!(l.allow(), Some(0));
        assert_eq!(l.allow(), None);
        assert_eq!(l.allow(), None);
        l.last = Some(Instant::now() - Duration::from_secs(7200));
        assert_eq!(l.allow(), Some(2));
    }
}
