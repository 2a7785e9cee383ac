//! The memory engines' idempotency records (see [`crate::write`]): by record key, at most
//! `max` of them.
//!
//! Records live for `idempotency.ttl_s` (24 h by default). On RocksDB they are on disk; in
//! memory, keyed writes (what `Client` sends by default) would otherwise grow the process
//! by ~200 bytes a write for a day: 60k keyed puts/s is ~40 GiB an hour. Past `max`, the
//! oldest tenth goes, oldest by insertion (each record carries its sequence number, 8
//! bytes), found with one pass over the sequence numbers, so that eviction costs O(1) a
//! write amortized (a queue of keys in insertion order cost ~140 bytes a record and
//! 0.93-0.95x the keyed puts/s). Not by expiry: records outlive each other in insertion
//! order only while the TTL and the clock stay put; after the TTL was lowered (it reloads)
//! or the wall clock stepped back, the newest records expired first, went first, and a
//! retry of a write acknowledged a moment before was applied again. A snapshot lists the
//! records in insertion order, so that a recovery inserts them in it again. A retry of a
//! write whose record went is applied again, so the replay window is about `max` divided by
//! the keyed write rate (1M records at 10k keyed writes/s: 90-100 s, longer than any
//! client's retries).
//! Evictions are counted (a metric).

use std::collections::HashMap;

use crate::write::Record;

/// Records kept before expired ones are first swept on an insert; after a sweep, the next
/// comes when the records have doubled (a sweep that frees little is not repeated at every
/// insert: each walks every record).
pub(crate) const SWEEP_AT: usize = 100_000;

/// Records a memory engine keeps by default.
pub const DEFAULT_MAX_RECORDS: usize = 1_000_000;

#[derive(Debug)]
pub(crate) struct Records {
    /// Each record with its sequence number (insertion order).
    by_key: HashMap<Vec<u8>, (u64, Record)>,
    /// The sequence number of the next record inserted.
    next_seq: u64,
    max: usize,
    /// The record count at which expired records are swept next.
    sweep_at: usize,
    evicted: u64,
}

impl Default for Records {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_RECORDS)
    }
}

impl Records {
    pub(crate) fn new(max: usize) -> Self {
        Self {
            by_key: HashMap::new(),
            next_seq: 0,
            max: max.max(1),
            sweep_at: SWEEP_AT,
            evicted: 0,
        }
    }

    pub(crate) fn set_max(&mut self, max: usize) {
        self.max = max.max(1);
    }

    pub(crate) fn get(&self, key: &[u8]) -> Option<&Record> {
        self.by_key.get(key).map(|(_, r)| r)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Every record, in insertion order (a snapshot's: see the module docs).
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&Vec<u8>, &Record)> {
        let mut all: Vec<_> = self.by_key.iter().collect();
        all.sort_unstable_by_key(|(_, (seq, _))| *seq);
        all.into_iter().map(|(k, (_, r))| (k, r))
    }

    /// Records evicted for room since open.
    pub(crate) fn evicted(&self) -> u64 {
        self.evicted
    }

    /// Adds `record` under `key` (a record made now, or one replayed at recovery), sweeping
    /// expired records when due and evicting the oldest tenth past `max`.
    pub(crate) fn insert(&mut self, key: Vec<u8>, record: Record, now_unix_ms: u64) {
        if self.by_key.len() >= self.sweep_at {
            self.by_key
                .retain(|_, (_, r)| r.expires_at_unix_ms > now_unix_ms);
            self.sweep_at = SWEEP_AT.max(2 * self.by_key.len());
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_key.insert(key, (seq, record));
        if self.by_key.len() > self.max {
            let before = self.by_key.len();
            let keep = self.max - self.max / 10;
            let mut seqs: Vec<u64> = self.by_key.values().map(|(seq, _)| *seq).collect();
            let (_, &mut threshold, _) = seqs.select_nth_unstable(before - keep - 1);
            self.by_key.retain(|_, (seq, _)| *seq > threshold);
            self.evicted += (before - self.by_key.len()) as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DeleteOutcome, WriteOutcome};

    fn rec(expires_at_unix_ms: u64) -> Record {
        Record {
            expires_at_unix_ms,
            fingerprint: [0; 16],
            outcome: Ok(WriteOutcome::Delete(DeleteOutcome {
                existed: false,
                revision: 0,
            })),
        }
    }

    #[test]
    fn past_max_the_oldest_records_go_first() {
        let mut r = Records::new(3);
        for k in 0u8..5 {
            r.insert(vec![k], rec(100 + u64::from(k)), 0);
        }
        assert_eq!(r.len(), 3);
        assert_eq!(r.evicted(), 2);
        assert!(r.get(&[0]).is_none() && r.get(&[1]).is_none());
        assert!((2u8..5).all(|k| r.get(&[k]).is_some()));
        // At scale a tenth goes at once, so the next evictions wait for a tenth more.
        let mut r = Records::new(1_000);
        for k in 0u32..1_001 {
            r.insert(k.to_le_bytes().to_vec(), rec(u64::from(k) + 10), 0);
        }
        assert_eq!((r.len(), r.evicted()), (900, 101));
        assert!(r.get(&100u32.to_le_bytes()).is_none());
        assert!(r.get(&101u32.to_le_bytes()).is_some());
    }

    /// Records go oldest first by insertion, whatever their expiries (a TTL lowered by a
    /// reload, or a clock stepped back, gives newer records earlier expiries: by expiry,
    /// the newest went first), and a snapshot lists them in that order.
    #[test]
    fn past_max_the_first_inserted_go_first_whatever_their_expiries() {
        let mut r = Records::new(3);
        for k in 0u8..5 {
            r.insert(vec![k], rec(1_000 - u64::from(k)), 0);
        }
        assert_eq!((r.len(), r.evicted()), (3, 2));
        assert!(r.get(&[0]).is_none() && r.get(&[1]).is_none());
        assert!((2u8..5).all(|k| r.get(&[k]).is_some()));
        let order: Vec<u8> = r.iter().map(|(k, _)| k[0]).collect();
        assert_eq!(order, [2, 3, 4]);
    }

    /// A sweep that frees nothing moves the next one to twice the records: without that,
    /// every keyed write past SWEEP_AT walked every record (keyed puts at 50 writers fell
    /// from ~60k/s to ~10k/s once 100k records were live).
    #[test]
    fn a_sweep_that_frees_nothing_is_not_repeated_at_each_insert() {
        let mut r = Records::new(usize::MAX);
        for i in 0..=SWEEP_AT {
            r.insert(i.to_le_bytes().to_vec(), rec(u64::MAX), 1);
        }
        assert_eq!(r.len(), SWEEP_AT + 1);
        assert_eq!(r.sweep_at, 2 * SWEEP_AT);
        // Expired records go at the next sweep.
        let mut r = Records::new(usize::MAX);
        for i in 0..SWEEP_AT {
            r.insert(i.to_le_bytes().to_vec(), rec(5), 1);
        }
        r.insert(b"fresh".to_vec(), rec(100), 10);
        assert_eq!(r.len(), 1);
    }
}
