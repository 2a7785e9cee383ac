//! Leases: keys that live only as long as a lease is kept alive.
//!
//! A lease is granted with a TTL and a random id; a put may attach its key to one (a key
//! has at most one lease: a put with another lease moves it, a put without one detaches
//! it, as in etcd; an increment leaves it where it is, as Redis's INCR keeps a TTL). A
//! lease not kept alive for its TTL expires; expired and revoked leases take every key
//! still attached to them, deleted at one new revision (watchers see the deletes).
//!
//! [`Leases`] is the state both engines keep, under their write path's exclusion (the
//! memory engine's lock, the RocksDB committer's mutex): ids, TTLs, deadlines, and the
//! keys of each lease both ways. Deadlines live only in memory: RocksDB stores each
//! lease's id and TTL and its keys with the writes that make them, and after a restart
//! every lease runs again with its full TTL, as etcd does. Keep-alives are frequent (a
//! client renews every third of its TTL), and making each a synced write would cost more
//! than the lease it keeps; the price is that a lease whose holder died may outlive a
//! restart by up to one TTL.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

/// Longest TTL a lease may have.
pub const MAX_LEASE_TTL_MS: u64 = 30 * 24 * 3600 * 1000;

/// What a lease is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseInfo {
    pub id: u64,
    pub ttl_ms: u64,
    /// Until it expires, unless kept alive (0: expiring now).
    pub remaining_ms: u64,
    /// Keys attached to it.
    pub keys: u64,
}

#[derive(Debug)]
struct Lease {
    ttl_ms: u64,
    deadline: Instant,
    keys: BTreeSet<Vec<u8>>,
}

/// Every live lease, and the lease of every attached key.
#[derive(Debug, Default)]
pub struct Leases {
    by_id: HashMap<u64, Lease>,
    by_key: HashMap<Vec<u8>, u64>,
    /// Every lease by deadline, so that the reaper's questions (what has expired, when is
    /// the next deadline) cost a walk of the expired ones, not of every lease, under the
    /// store's lock.
    by_deadline: BTreeSet<(Instant, u64)>,
}

impl Leases {
    /// Grants a lease of `ttl_ms` from `now`: a new id, random, non-zero, not in use.
    pub fn grant(&mut self, ttl_ms: u64, now: Instant) -> u64 {
        let id = self.new_id();
        self.insert(id, ttl_ms, now);
        id
    }

    fn new_id(&self) -> u64 {
        loop {
            let id: u64 = rand::random();
            if id != 0 && !self.by_id.contains_key(&id) {
                return id;
            }
        }
    }

    /// Adds lease `id` (granted now, or found at open) with its full TTL from `now`.
    pub fn insert(&mut self, id: u64, ttl_ms: u64, now: Instant) {
        let deadline = now + Duration::from_millis(ttl_ms);
        let old = self.by_id.insert(
            id,
            Lease {
                ttl_ms,
                deadline,
                keys: BTreeSet::new(),
            },
        );
        if let Some(old) = old {
            self.by_deadline.remove(&(old.deadline, id));
        }
        self.by_deadline.insert((deadline, id));
    }

    pub fn contains(&self, id: u64) -> bool {
        self.by_id.contains_key(&id)
    }

    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Lease `id` as of `now`.
    pub fn info(&self, id: u64, now: Instant) -> Option<LeaseInfo> {
        self.by_id.get(&id).map(|l| LeaseInfo {
            id,
            ttl_ms: l.ttl_ms,
            remaining_ms: l.deadline.saturating_duration_since(now).as_millis() as u64,
            keys: l.keys.len() as u64,
        })
    }

    /// Renews lease `id` to its full TTL from `now`.
    pub fn keep_alive(&mut self, id: u64, now: Instant) -> Option<LeaseInfo> {
        let l = self.by_id.get_mut(&id)?;
        self.by_deadline.remove(&(l.deadline, id));
        l.deadline = now + Duration::from_millis(l.ttl_ms);
        self.by_deadline.insert((l.deadline, id));
        self.info(id, now)
    }

    /// The lease `key` is attached to.
    pub fn of_key(&self, key: &[u8]) -> Option<u64> {
        self.by_key.get(key).copied()
    }

    /// Attaches `key` to lease `id` (`None`: detaches it); returns the lease it was
    /// attached to before. `id` must be a live lease.
    pub fn attach(&mut self, key: &[u8], id: Option<u64>) -> Option<u64> {
        // The common case, a write without leases around: nothing to detach, and no
        // hashing of the key to learn it.
        if id.is_none() && self.by_key.is_empty() {
            return None;
        }
        let before = match id {
            Some(id) => self.by_key.insert(key.to_vec(), id),
            None => self.by_key.remove(key),
        };
        if before != id {
            if let Some(old) = before.and_then(|b| self.by_id.get_mut(&b)) {
                old.keys.remove(key);
            }
            if let Some(new) = id.and_then(|i| self.by_id.get_mut(&i)) {
                new.keys.insert(key.to_vec());
            }
        }
        before
    }

    /// Removes lease `id`; returns its keys, in order, now detached.
    pub fn remove(&mut self, id: u64) -> Option<Vec<Vec<u8>>> {
        let lease = self.by_id.remove(&id)?;
        self.by_deadline.remove(&(lease.deadline, id));
        for key in &lease.keys {
            self.by_key.remove(key);
        }
        Some(lease.keys.into_iter().collect())
    }

    /// Leases past their deadline at `now`, at most `limit`.
    pub fn expired(&self, now: Instant, limit: usize) -> Vec<u64> {
        self.by_deadline
            .iter()
            .take_while(|(deadline, _)| *deadline <= now)
            .map(|&(_, id)| id)
            .take(limit)
            .collect()
    }

    /// The earliest deadline of any lease.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.by_deadline.first().map(|&(deadline, _)| deadline)
    }

    /// Every lease: its id, TTL and keys (what a snapshot of the logged engine writes).
    pub(crate) fn each(&self) -> impl Iterator<Item = (u64, u64, &BTreeSet<Vec<u8>>)> {
        self.by_id.iter().map(|(&id, l)| (id, l.ttl_ms, &l.keys))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_move_between_leases_and_go_with_theirs() {
        let now = Instant::now();
        let mut l = Leases::default();
        let (a, b) = (l.grant(1_000, now), l.grant(5_000, now));
        assert_eq!(l.attach(b"k1", Some(a)), None);
        assert_eq!(l.attach(b"k2", Some(a)), None);
        assert_eq!(l.attach(b"k2", Some(b)), Some(a), "moved");
        assert_eq!(l.attach(b"k3", Some(b)), None);
        assert_eq!(l.attach(b"k3", None), Some(b), "detached");
        assert_eq!(l.info(a, now).unwrap().keys, 1);
        assert_eq!(l.info(b, now).unwrap().keys, 1);
        let later = now + Duration::from_millis(2_000);
        assert_eq!(l.expired(later, 10), vec![a]);
        assert_eq!(l.next_deadline(), Some(now + Duration::from_millis(1_000)));
        l.keep_alive(a, later);
        assert!(l.expired(later, 10).is_empty());
        assert_eq!(l.info(a, later).unwrap().remaining_ms, 1_000);
        assert_eq!(l.remove(a), Some(vec![b"k1".to_vec()]));
        assert_eq!(l.of_key(b"k1"), None);
        assert_eq!(l.of_key(b"k2"), Some(b));
        assert_eq!(l.remove(a), None);
        assert_eq!(l.by_deadline.len(), l.len(), "one deadline entry per lease");
    }
}
