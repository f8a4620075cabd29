//! A read cache that never shows a state the database has not committed,
//! and its two uses: akd tree records, and the devices requests are
//! authenticated against.
//!
//! akd's own cache is filled with a new epoch before the epoch reaches the
//! database, so a proof built in that window mixes the new tree header
//! with old value states and fails to verify. This cache is updated only
//! after the database transaction commits, all at once under its lock, and
//! a read that missed fills it only if no commit happened since the read
//! began (a generation counter), so it never reinstates a stale record.
//! Value states are not cached: their queries go to SQL.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hash};
use std::sync::RwLock;

use akd::storage::types::DbRecord;

/// Filled by reads, changed only after commits.
pub struct Cache<K, V, S = RandomState> {
    inner: RwLock<Inner<K, V, S>>,
    capacity: usize,
}

struct Inner<K, V, S> {
    generation: u64,
    map: HashMap<K, V, S>,
}

/// akd tree records by their binary id. A proof reads some sixty of them,
/// so the hash is FxHash rather than SipHash: the ids are tree labels,
/// VRF outputs and their prefixes, which no client can choose.
pub type RecordCache = Cache<Vec<u8>, DbRecord, rustc_hash::FxBuildHasher>;

impl<K, V, S> std::fmt::Debug for Cache<K, V, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cache")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// A read's starting point, to decide whether it may fill the cache.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl<K: Eq + Hash, V: Clone, S: BuildHasher + Default> Cache<K, V, S> {
    /// Holds at most `capacity` entries; once full, only entries already
    /// held are refreshed (for tree records: the tree's upper levels, read
    /// by every proof, arrive first and stay).
    pub fn new(capacity: usize) -> Cache<K, V, S> {
        Cache {
            inner: RwLock::new(Inner {
                generation: 0,
                map: HashMap::default(),
            }),
            capacity,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner<K, V, S>> {
        // A panic under this lock would leave a consistent map: every
        // mutation is a single insert.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner<K, V, S>> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `id` up; on a miss, the ticket to fill with after reading SQL.
    pub fn get<Q>(&self, id: &Q) -> Result<V, Ticket>
    where
        K: std::borrow::Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let g = self.read();
        g.map.get(id).cloned().ok_or(Ticket(g.generation))
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.read().generation)
    }

    /// Stores what a read found, unless a commit happened since `ticket`
    /// (then returns false).
    pub fn fill(&self, ticket: Ticket, records: impl IntoIterator<Item = (K, V)>) -> bool {
        let mut g = self.write();
        if g.generation != ticket.0 {
            return false;
        }
        for (id, r) in records {
            if g.map.len() < self.capacity || g.map.contains_key(&id) {
                g.map.insert(id, r);
            }
        }
        true
    }

    pub fn len(&self) -> usize {
        self.read().map.len()
    }

    pub fn is_full(&self) -> bool {
        self.read().map.len() >= self.capacity
    }

    /// Forgets everything: call after a commit that may change any entry.
    pub fn clear(&self) {
        let mut g = self.write();
        g.generation += 1;
        g.map.clear();
    }
}

impl RecordCache {
    /// Applies committed records: call after the database commit.
    pub fn committed<'a>(&self, records: impl IntoIterator<Item = &'a DbRecord>) {
        let mut g = self.write();
        g.generation += 1;
        for r in records {
            let id = r.get_full_binary_id();
            if g.map.len() < self.capacity || g.map.contains_key(&id) {
                g.map.insert(id, r.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azks(epoch: u64) -> DbRecord {
        DbRecord::Azks(DbRecord::build_azks(epoch, 1))
    }

    #[test]
    fn a_read_that_raced_a_commit_does_not_fill() {
        let c = RecordCache::new(10);
        let id = azks(1).get_full_binary_id();
        let Err(ticket) = c.get(&id) else {
            panic!("empty cache hit")
        };
        // The read saw epoch 1 in SQL; meanwhile epoch 2 commits.
        c.committed([&azks(2)]);
        c.fill(ticket, [(id.clone(), azks(1))]);
        assert_eq!(c.get(&id).ok(), Some(azks(2)), "the stale read was dropped");
        // A read after the commit fills normally.
        let t = c.ticket();
        c.fill(t, [(id.clone(), azks(3))]);
        assert_eq!(c.get(&id).ok(), Some(azks(3)));
    }

    #[test]
    fn capacity_bounds_new_entries_but_refreshes_old_ones() {
        let c = RecordCache::new(1);
        let a = azks(1);
        let node = DbRecord::build_user_state(b"x".to_vec(), vec![], 1, 0, [0; 32], 1);
        let node = DbRecord::ValueState(node);
        c.committed([&a, &node]);
        assert!(c.get(&a.get_full_binary_id()).is_ok());
        assert!(c.get(&node.get_full_binary_id()).is_err(), "full");
        c.committed([&azks(5)]);
        assert_eq!(c.get(&a.get_full_binary_id()).ok(), Some(azks(5)));
    }

    #[test]
    fn clear_forgets_and_stops_fills_from_reads_that_began_before() {
        let c: Cache<u8, &str> = Cache::new(10);
        let t = c.ticket();
        c.fill(t, [(1, "old")]);
        let before = c.ticket();
        c.clear();
        assert!(c.get(&1).is_err());
        c.fill(before, [(1, "read before the commit")]);
        assert!(c.get(&1).is_err(), "a read from before the clear was kept");
        c.fill(c.ticket(), [(1, "new")]);
        assert_eq!(c.get(&1).ok(), Some("new"));
    }
}
