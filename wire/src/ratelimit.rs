//! Keyed token buckets with time passed in: `capacity` requests per
//! `period`, refilled evenly.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct RateLimiter<K> {
    capacity: u32,
    /// Time to earn one token.
    per_token: Duration,
    buckets: HashMap<K, Bucket>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    /// Tokens available at `at`.
    tokens: f64,
    at: Instant,
}

impl<K: Eq + Hash> RateLimiter<K> {
    pub fn new(capacity: u32, period: Duration) -> RateLimiter<K> {
        let capacity = capacity.max(1);
        RateLimiter {
            capacity,
            per_token: period / capacity,
            buckets: HashMap::new(),
        }
    }

    fn level(&self, b: &Bucket, now: Instant) -> f64 {
        let earned =
            now.saturating_duration_since(b.at).as_secs_f64() / self.per_token.as_secs_f64();
        (b.tokens + earned).min(self.capacity as f64)
    }

    /// How long until one request for `key` is allowed (zero if now).
    pub fn wait_time(&self, key: &K, now: Instant) -> Duration {
        let Some(b) = self.buckets.get(key) else {
            return Duration::ZERO;
        };
        let level = self.level(b, now);
        if level >= 1.0 {
            Duration::ZERO
        } else {
            // Round up to whole seconds: Retry-After is in seconds.
            let secs = ((1.0 - level) * self.per_token.as_secs_f64()).ceil();
            Duration::from_secs(secs as u64)
        }
    }

    /// Takes one token if available; returns whether it did.
    pub fn take(&mut self, key: K, now: Instant) -> bool {
        let cap = self.capacity as f64;
        let level = match self.buckets.get(&key) {
            Some(b) => self.level(b, now),
            None => cap,
        };
        if level < 1.0 {
            return false;
        }
        self.buckets.insert(
            key,
            Bucket {
                tokens: level - 1.0,
                at: now,
            },
        );
        true
    }

    /// Forgets keys whose buckets are full again.
    pub fn prune(&mut self, now: Instant) {
        let full = self.per_token * self.capacity;
        self.buckets
            .retain(|_, b| now.saturating_duration_since(b.at) < full);
    }

    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_refills_evenly() {
        let mut r = RateLimiter::new(3, Duration::from_secs(60));
        let t = Instant::now();
        assert!(r.take("a", t) && r.take("a", t) && r.take("a", t));
        assert!(!r.take("a", t));
        assert_eq!(r.wait_time(&"a", t), Duration::from_secs(20));
        assert_eq!(r.wait_time(&"b", t), Duration::ZERO);
        let t2 = t + Duration::from_secs(20);
        assert_eq!(r.wait_time(&"a", t2), Duration::ZERO);
        assert!(r.take("a", t2));
        assert!(!r.take("a", t2));
        r.prune(t + Duration::from_secs(79));
        assert_eq!(r.len(), 1);
        r.prune(t2 + Duration::from_secs(60));
        assert!(r.is_empty());
    }
}
