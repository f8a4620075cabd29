//! The one place where the core keeps its deadlines.

use std::collections::BTreeMap;
use std::time::Instant;

/// Deadlines in order. Entries are never cancelled: when one fires, its
/// owner checks that it still applies (a transaction that moved on
/// ignores a stale timer), which keeps arming a timer O(log n) and free of
/// bookkeeping.
#[derive(Debug)]
pub struct Timers<K> {
    due: BTreeMap<(Instant, u64), K>,
    seq: u64,
}

impl<K> Default for Timers<K> {
    fn default() -> Self {
        Timers {
            due: BTreeMap::new(),
            seq: 0,
        }
    }
}

impl<K> Timers<K> {
    pub fn at(&mut self, when: Instant, key: K) {
        self.seq += 1;
        self.due.insert((when, self.seq), key);
    }

    pub fn next(&self) -> Option<Instant> {
        self.due.keys().next().map(|(t, _)| *t)
    }

    /// The earliest timer due at `now`, removed.
    pub fn pop_due(&mut self, now: Instant) -> Option<K> {
        let first = *self.due.keys().next()?;
        if first.0 > now {
            return None;
        }
        self.due.remove(&first)
    }

    pub fn len(&self) -> usize {
        self.due.len()
    }

    pub fn is_empty(&self) -> bool {
        self.due.is_empty()
    }
}
