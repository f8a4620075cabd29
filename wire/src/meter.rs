//! Bytes counted over windows of at least a second: what a stream or a
//! room carries, in bits/s.

use std::time::{Duration, Instant};

/// The shortest window a rate is taken over.
pub const MEASURE_OVER: Duration = Duration::from_secs(1);

/// Bytes since the window began, and when the last came.
#[derive(Debug)]
pub struct Meter {
    bytes: u64,
    since: Instant,
    last: Instant,
}

impl Meter {
    pub fn new(now: Instant) -> Meter {
        Meter {
            bytes: 0,
            since: now,
            last: now,
        }
    }

    pub fn add(&mut self, bytes: u64, now: Instant) {
        self.bytes += bytes;
        self.last = now;
    }

    /// Whether nothing came for [`MEASURE_OVER`].
    pub fn silent(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.last) >= MEASURE_OVER
    }

    /// Bits/s over the window once it is [`MEASURE_OVER`] long (and a new
    /// one begins); `None` before.
    pub fn take(&mut self, now: Instant) -> Option<u64> {
        let over = now.saturating_duration_since(self.since);
        if over < MEASURE_OVER {
            return None;
        }
        let bps = (self.bytes as f64 * 8.0 / over.as_secs_f64()) as u64;
        self.bytes = 0;
        self.since = now;
        Some(bps)
    }
}
