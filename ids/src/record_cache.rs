//! A read cache of akd tree records that never shows a state the database
//! has not committed.
//!
//! akd's own cache is filled with a new epoch before the epoch reaches the
//! database, so a proof built in that window mixes the new tree header
//! with old value states and fails to verify. This cache is updated only
//! after the database transaction commits, all at once under its lock, and
//! a read that missed fills it only if no commit happened since the read
//! began (a generation counter), so it never reinstates a stale record.
//! Value states are not cached: their queries go to SQL.

use std::collections::HashMap;
use std::sync::RwLock;

use akd::storage::types::DbRecord;

#[derive(Debug)]
pub struct RecordCache {
    inner: RwLock<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    map: HashMap<Vec<u8>, DbRecord>,
}

/// A read's starting point, to decide whether it may fill the cache.
#[derive(Debug, Clone, Copy)]
pub struct Ticket(u64);

impl RecordCache {
    /// Holds at most `capacity` records; once full, only records already
    /// held are refreshed (the tree's upper levels, read by every proof,
    /// arrive first and stay).
    pub fn new(capacity: usize) -> RecordCache {
        RecordCache {
            inner: RwLock::new(Inner::default()),
            capacity,
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        // A panic under this lock would leave a consistent map: every
        // mutation is a single insert.
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Looks `id` up; on a miss, the ticket to fill with after reading SQL.
    pub fn get(&self, id: &[u8]) -> Result<DbRecord, Ticket> {
        let g = self.read();
        g.map.get(id).cloned().ok_or(Ticket(g.generation))
    }

    pub fn ticket(&self) -> Ticket {
        Ticket(self.read().generation)
    }

    /// Stores what a read found, unless a commit happened since `ticket`.
    pub fn fill(&self, ticket: Ticket, records: impl IntoIterator<Item = (Vec<u8>, DbRecord)>) {
        let mut g = self.write();
        if g.generation != ticket.0 {
            return;
        }
        for (id, r) in records {
            if g.map.len() < self.capacity || g.map.contains_key(&id) {
                g.map.insert(id, r);
            }
        }
    }

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
}
