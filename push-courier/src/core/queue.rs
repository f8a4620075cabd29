//! The offline queue policy: what a device has waiting, in memory.
//!
//! The database holds the payloads; this index holds what the policy needs
//! (a few dozen bytes per message) so that admitting a push is one lookup,
//! not a query. Rules:
//! - a new message with the same collapse id (APNs `apns-collapse-id`, Web
//!   Push `Topic`) on the same token replaces the older one;
//! - at most `cap` messages per device; past that the oldest non-VoIP
//!   message is dropped (the oldest message if all are VoIP), and the drop
//!   is reported;
//! - delivery order is VoIP and priority-10 messages first, then the rest,
//!   each oldest first;
//! - a message past its expiry is never delivered.

use std::collections::{BTreeSet, HashMap};
use wire::push::{DeviceToken, NotificationId};
use wire::DeviceId;

/// What the policy knows about one stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: NotificationId,
    /// Admission order, unique and increasing.
    pub seq: u64,
    pub token: DeviceToken,
    /// Empty = none.
    pub collapse: Box<str>,
    pub priority: u8,
    pub voip: bool,
    /// Unix seconds; 0 = never.
    pub expires: u64,
}

impl Entry {
    fn urgent(&self) -> bool {
        self.voip || self.priority >= 10
    }

    pub fn expired(&self, now_unix: u64) -> bool {
        self.expires != 0 && self.expires <= now_unix
    }
}

fn expiry_key(device: DeviceId, e: &Entry) -> Option<(u64, u64, DeviceId)> {
    (e.expires != 0).then_some((e.expires, e.seq, device))
}

/// What admitting a message displaced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Admission {
    /// Older messages with the same collapse id.
    pub replaced: Vec<Entry>,
    /// Messages dropped because the queue was full.
    pub dropped: Vec<Entry>,
}

#[derive(Debug)]
pub struct Queues {
    cap: usize,
    devices: HashMap<DeviceId, Vec<Entry>>,
    total: usize,
    /// (expires, seq, device) of every stored message that expires, so
    /// expiry looks only at what is due instead of at every message.
    by_expiry: BTreeSet<(u64, u64, DeviceId)>,
}

impl Queues {
    pub fn new(cap: usize) -> Queues {
        Queues {
            cap: cap.max(1),
            devices: HashMap::new(),
            total: 0,
            by_expiry: BTreeSet::new(),
        }
    }

    /// Adds a message for `device`, applying collapse and the cap.
    pub fn admit(&mut self, device: DeviceId, entry: Entry) -> Admission {
        let q = self.devices.entry(device).or_default();
        let before = q.len();
        let mut adm = Admission::default();
        if !entry.collapse.is_empty() {
            q.retain(|e| {
                let same = e.token == entry.token && e.collapse == entry.collapse;
                if same {
                    adm.replaced.push(e.clone());
                }
                !same
            });
        }
        let added = expiry_key(device, &entry);
        q.push(entry);
        while q.len() > self.cap {
            let victim = q.iter().position(|e| !e.voip).unwrap_or(0);
            adm.dropped.push(q.remove(victim));
        }
        self.total = self.total + q.len() - before;
        self.by_expiry.extend(added);
        for e in adm.replaced.iter().chain(&adm.dropped) {
            self.forget_expiry(device, e);
        }
        adm
    }

    /// Forgets a message (acked, expired or cancelled). Returns it if known.
    pub fn remove(&mut self, device: &DeviceId, id: &NotificationId) -> Option<Entry> {
        let q = self.devices.get_mut(device)?;
        let i = q.iter().position(|e| e.id == *id)?;
        let e = q.remove(i);
        self.total -= 1;
        if q.is_empty() {
            self.devices.remove(device);
        }
        self.forget_expiry(*device, &e);
        Some(e)
    }

    /// Forgets every message on a revoked token.
    pub fn remove_token(&mut self, device: &DeviceId, token: &DeviceToken) -> Vec<Entry> {
        let Some(q) = self.devices.get_mut(device) else {
            return Vec::new();
        };
        let mut gone = Vec::new();
        q.retain(|e| {
            let hit = e.token == *token;
            if hit {
                gone.push(e.clone());
            }
            !hit
        });
        self.total -= gone.len();
        if q.is_empty() {
            self.devices.remove(device);
        }
        for e in &gone {
            self.forget_expiry(*device, e);
        }
        gone
    }

    /// Removes and returns every message past its expiry.
    pub fn take_expired(&mut self, now_unix: u64) -> Vec<(DeviceId, Entry)> {
        let mut out = Vec::new();
        while let Some(&(expires, seq, device)) = self.by_expiry.first() {
            if expires > now_unix {
                break;
            }
            self.by_expiry.pop_first();
            let Some(q) = self.devices.get_mut(&device) else {
                continue;
            };
            if let Some(i) = q.iter().position(|e| e.seq == seq) {
                out.push((device, q.remove(i)));
                self.total -= 1;
            }
            if q.is_empty() {
                self.devices.remove(&device);
            }
        }
        out
    }

    /// The device's live messages in delivery order.
    pub fn delivery_order(&self, device: &DeviceId, now_unix: u64) -> Vec<&Entry> {
        let Some(q) = self.devices.get(device) else {
            return Vec::new();
        };
        let live = || q.iter().filter(|e| !e.expired(now_unix));
        live()
            .filter(|e| e.urgent())
            .chain(live().filter(|e| !e.urgent()))
            .collect()
    }

    /// Sequence numbers of the device's live messages, in delivery order.
    pub fn delivery_seqs(&self, device: &DeviceId, now_unix: u64) -> Vec<u64> {
        self.delivery_order(device, now_unix)
            .into_iter()
            .map(|e| e.seq)
            .collect()
    }

    /// Puts back entries an admission displaced, when the admission is
    /// undone (its commit failed). No policy applies.
    pub fn restore(&mut self, device: DeviceId, entries: Vec<Entry>) {
        self.by_expiry
            .extend(entries.iter().filter_map(|e| expiry_key(device, e)));
        let q = self.devices.entry(device).or_default();
        self.total += entries.len();
        q.extend(entries);
        q.sort_by_key(|e| e.seq);
    }

    fn forget_expiry(&mut self, device: DeviceId, e: &Entry) {
        if let Some(k) = expiry_key(device, e) {
            self.by_expiry.remove(&k);
        }
    }

    /// Forgets every message of the devices `gone` picks (a shard this
    /// node no longer holds).
    pub fn drop_devices(&mut self, gone: impl Fn(&DeviceId) -> bool) {
        let mut dropped = 0;
        self.devices.retain(|d, q| {
            let g = gone(d);
            if g {
                dropped += q.len();
            }
            !g
        });
        self.total -= dropped;
        self.by_expiry.retain(|(_, _, d)| !gone(d));
    }

    pub fn len(&self, device: &DeviceId) -> usize {
        self.devices.get(device).map_or(0, Vec::len)
    }

    /// Messages stored across all devices.
    pub fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn dev(n: u8) -> DeviceId {
        DeviceId([n; 16])
    }

    fn entry(seq: u64, collapse: &str, priority: u8, voip: bool, expires: u64) -> Entry {
        let mut id = [0u8; 16];
        id[8..].copy_from_slice(&seq.to_be_bytes());
        Entry {
            id: NotificationId(id),
            seq,
            token: DeviceToken([1; 32]),
            collapse: collapse.into(),
            priority,
            voip,
            expires,
        }
    }

    fn ids(v: &[Entry]) -> Vec<NotificationId> {
        v.iter().map(|e| e.id).collect()
    }

    #[test]
    fn collapse_replaces_the_older_message_on_the_same_token() {
        let mut q = Queues::new(100);
        let a = entry(1, "score", 5, false, 0);
        let b = entry(2, "score", 5, false, 0);
        let mut c = entry(3, "score", 5, false, 0);
        c.token = DeviceToken([2; 32]);
        assert_eq!(q.admit(dev(1), a.clone()), Admission::default());
        assert_eq!(ids(&q.admit(dev(1), b.clone()).replaced), vec![a.id]);
        assert!(q.admit(dev(1), c).replaced.is_empty(), "other token");
        assert_eq!(q.len(&dev(1)), 2);
        assert!(q
            .admit(dev(2), entry(4, "score", 5, false, 0))
            .replaced
            .is_empty());
    }

    #[test]
    fn cap_drops_oldest_non_voip_first() {
        let mut q = Queues::new(3);
        let v = entry(1, "", 10, true, 0);
        let a = entry(2, "", 5, false, 0);
        let b = entry(3, "", 5, false, 0);
        q.admit(dev(1), v.clone());
        q.admit(dev(1), a.clone());
        q.admit(dev(1), b.clone());
        let adm = q.admit(dev(1), entry(4, "", 5, false, 0));
        assert_eq!(ids(&adm.dropped), vec![a.id]);
        assert_eq!(q.delivery_seqs(&dev(1), 0), vec![v.seq, b.seq, 4]);
        // All VoIP: the oldest goes.
        let mut q = Queues::new(2);
        let v1 = entry(1, "", 10, true, 0);
        q.admit(dev(1), v1.clone());
        q.admit(dev(1), entry(2, "", 10, true, 0));
        assert_eq!(
            ids(&q.admit(dev(1), entry(3, "", 10, true, 0)).dropped),
            vec![v1.id]
        );
    }

    #[test]
    fn urgent_messages_jump_the_queue_and_expired_ones_are_skipped() {
        let mut q = Queues::new(100);
        let a = entry(1, "", 5, false, 0);
        let b = entry(2, "", 10, false, 0);
        let c = entry(3, "", 5, false, 50);
        let d = entry(4, "", 5, true, 0);
        for e in [&a, &b, &c, &d] {
            q.admit(dev(1), e.clone());
        }
        assert_eq!(q.delivery_order(&dev(1), 10), vec![&b, &d, &a, &c]);
        assert_eq!(q.delivery_order(&dev(1), 50), vec![&b, &d, &a]);
        assert_eq!(q.take_expired(50), vec![(dev(1), c.clone())]);
        assert_eq!(q.total(), 3);
        assert_eq!(q.remove(&dev(1), &a.id), Some(a.clone()));
        assert_eq!(q.remove(&dev(1), &a.id), None);
        let gone = q.remove_token(&dev(1), &DeviceToken([1; 32]));
        assert_eq!(gone.len(), 2);
        // Undoing puts them back in sequence order.
        q.restore(dev(1), gone.clone());
        assert_eq!(q.delivery_seqs(&dev(1), 10), vec![2, 4]);
        assert_eq!(q.remove_token(&dev(1), &DeviceToken([1; 32])), gone);
        assert_eq!(q.total(), 0);
        assert_eq!(q.len(&dev(1)), 0);
    }

    proptest! {
        /// Against a plain model: the cap holds, nothing is lost without
        /// being reported, and totals stay consistent.
        #[test]
        fn never_exceeds_cap_and_accounts_for_every_message(
            ops in prop::collection::vec((0u8..3, 0u8..3, any::<bool>(), 0u8..4), 1..200),
            cap in 1usize..8,
        ) {
            let mut q = Queues::new(cap);
            let mut live = std::collections::HashSet::new();
            for (i, (d, c, voip, remove)) in ops.into_iter().enumerate() {
                let seq = i as u64;
                if remove == 0 && !live.is_empty() {
                    let (dv, id) = *live.iter().next().unwrap();
                    prop_assert!(q.remove(&dev(dv), &id).is_some());
                    live.remove(&(dv, id));
                    continue;
                }
                let collapse = if c == 0 { String::new() } else { format!("c{c}") };
                let e = entry(seq, &collapse, 5, voip, u64::from(c) * 10);
                let id = e.id;
                let adm = q.admit(dev(d), e);
                live.insert((d, id));
                for gone in adm.replaced.iter().chain(&adm.dropped) {
                    prop_assert!(live.remove(&(d, gone.id)));
                }
                prop_assert!(q.len(&dev(d)) <= cap);
                prop_assert_eq!(q.total(), live.len());
                // The expiry index holds exactly the stored expiring messages.
                let expiring = q.devices.values().flatten().filter(|e| e.expires != 0).count();
                prop_assert_eq!(q.by_expiry.len(), expiring);
            }
            // Expiry takes exactly the expiring messages, nothing twice.
            let expiring = q.devices.values().flatten().filter(|e| e.expires != 0).count();
            let before = q.total();
            let gone = q.take_expired(u64::MAX);
            prop_assert_eq!(gone.len(), expiring);
            prop_assert_eq!(q.total(), before - expiring);
            prop_assert!(q.by_expiry.is_empty());
            prop_assert!(q.devices.values().flatten().all(|e| e.expires == 0));
        }
    }
}
