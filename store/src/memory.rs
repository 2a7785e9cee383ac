//! The in-memory engine: a hash map for point reads plus an ordered key set for scans,
//! under one `RwLock`.
//!
//! Why two indexes: point reads dominate a key-value workload, and a `BTreeMap` lookup in
//! 100k keys walks ~7 nodes with dozens of key comparisons (about 6% of the server's CPU
//! per get in a kv-loadgen profile); a hash lookup is one hash and one comparison.
//!
//! Why a key and its value share one allocation (`Stored`): a read of a random key among
//! 100k misses the CPU cache at each place it touches. With the key and the value in
//! separate allocations that was three misses per read (the table's bucket, the key it
//! compares, the value it copies): in a profile of `getMany` batches, about a quarter of
//! the server's CPU, and most of what capkv cost beyond the bare capnp-rpc runtime
//! per key. The ordered index keeps its own copy of each key (scans only).
//!
//! One lock for the indexes and the revision counter makes every operation atomic
//! and keeps revisions in commit order. A std `RwLock` (not an async one) is right here:
//! no critical section awaits or does I/O, they are all short map operations, so readers
//! on different workers run in parallel and writers wait only for microseconds.

use std::borrow::Borrow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::ops::Bound;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::write::{self, incremented, now_unix_ms, recordable, Record};
use crate::{
    BatchOutcome, Condition, DeleteOutcome, Entry, IdempotencyKey, IncrementOutcome, Pending,
    PutItem, PutOutcome, ScanPage, ScanRequest, Store, StoreError, WriteOp, WriteOutcome,
};

/// Idempotency records kept before expired ones are swept on the next insert.
const RECORD_SWEEP_AT: usize = 100_000;

/// One live key: its bytes followed by its value's, in one allocation (see the module
/// docs). Hashes and compares as its key, so the table is looked up by `&[u8]`.
#[derive(Debug, Clone)]
struct Stored {
    bytes: Box<[u8]>,
    key_len: usize,
    version: u64,
    mod_revision: u64,
}

impl Stored {
    fn new(key: &[u8], value: &[u8], version: u64, mod_revision: u64) -> Self {
        let mut bytes = Vec::with_capacity(key.len() + value.len());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(value);
        Self {
            bytes: bytes.into_boxed_slice(),
            key_len: key.len(),
            version,
            mod_revision,
        }
    }

    fn key(&self) -> &[u8] {
        &self.bytes[..self.key_len]
    }

    fn value(&self) -> &[u8] {
        &self.bytes[self.key_len..]
    }
}

impl Borrow<[u8]> for Stored {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

// Must hash exactly as the borrowed `[u8]` does, or lookups by `&[u8]` would miss.
impl Hash for Stored {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for Stored {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Stored {}

#[derive(Debug, Default)]
struct Inner {
    /// Every live key and its data.
    map: HashSet<Stored>,
    /// The same keys, ordered (invariant: exactly the keys of `map`).
    order: BTreeSet<Box<[u8]>>,
    revision: u64,
    /// Idempotency records by record key (see [`crate::write`]).
    records: HashMap<Vec<u8>, Record>,
}

impl Inner {
    fn version(&self, key: &[u8]) -> Option<u64> {
        self.map.get(key).map(|s| s.version)
    }

    fn entry(&self, key: &[u8], with_value: bool) -> Option<Entry> {
        self.map.get(key).map(|s| Entry {
            key: key.to_vec(),
            value: if with_value {
                s.value().to_vec()
            } else {
                Vec::new()
            },
            version: s.version,
            mod_revision: s.mod_revision,
        })
    }

    /// Adds or replaces `stored` (whose key is `key`) with one hash lookup; a new key's
    /// bytes are copied into the ordered index only then.
    fn insert(&mut self, key: &[u8], stored: Stored) {
        if self.map.replace(stored).is_none() {
            self.order.insert(key.into());
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        let existed = self.map.remove(key);
        if existed {
            self.order.remove(key);
        }
        existed
    }
}

/// Ordered, concurrency-safe, volatile engine.
#[derive(Debug)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    /// Lives and dies with the data, like everything here.
    secret: [u8; 32],
    /// Writes answered from an idempotency record.
    replays: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            secret: rand::random(),
            replays: Default::default(),
        }
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    // A poisoned lock means a panic happened while holding it; every critical section
    // below leaves the map consistent at each step, so the data is still valid and we
    // keep serving rather than turning one bug into a dead server.
    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|p| p.into_inner())
    }
}

fn put_locked(
    inner: &mut Inner,
    key: &[u8],
    value: &[u8],
    cond: Condition,
) -> Result<PutOutcome, StoreError> {
    let current = inner.version(key);
    if !cond.holds(current) {
        return Err(StoreError::ConditionFailed {
            index: 0,
            current_version: current,
        });
    }
    inner.revision += 1;
    let revision = inner.revision;
    let version = current.unwrap_or(0) + 1;
    inner.insert(key, Stored::new(key, value, version, revision));
    Ok(PutOutcome { version, revision })
}

fn delete_locked(
    inner: &mut Inner,
    key: &[u8],
    cond: Condition,
) -> Result<DeleteOutcome, StoreError> {
    let current = inner.version(key);
    if !cond.holds(current) {
        return Err(StoreError::ConditionFailed {
            index: 0,
            current_version: current,
        });
    }
    let existed = inner.remove(key);
    if existed {
        inner.revision += 1;
    }
    Ok(DeleteOutcome {
        existed,
        revision: inner.revision,
    })
}

fn put_many_locked(inner: &mut Inner, items: &[PutItem<'_>]) -> Result<BatchOutcome, StoreError> {
    // Check every condition before touching anything: all or nothing.
    let mut versions = Vec::with_capacity(items.len());
    for (index, item) in items.iter().enumerate() {
        let current = inner.version(item.key);
        if !item.cond.holds(current) {
            return Err(StoreError::ConditionFailed {
                index,
                current_version: current,
            });
        }
        versions.push(current.unwrap_or(0) + 1);
    }
    inner.revision += 1;
    let revision = inner.revision;
    for (item, &version) in items.iter().zip(&versions) {
        inner.insert(
            item.key,
            Stored::new(item.key, item.value, version, revision),
        );
    }
    Ok(BatchOutcome { versions, revision })
}

impl MemoryStore {
    fn apply(&self, inner: &mut Inner, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::Put(write::Put { key, value, cond }) => {
                put_locked(inner, key, value, *cond).map(WriteOutcome::Put)
            }
            WriteOp::Delete(write::Delete { key, cond }) => {
                delete_locked(inner, key, *cond).map(WriteOutcome::Delete)
            }
            WriteOp::PutMany(write::PutMany { items }) => {
                let items: Vec<PutItem<'_>> = items
                    .iter()
                    .map(|(key, value, cond)| PutItem {
                        key,
                        value,
                        cond: *cond,
                    })
                    .collect();
                put_many_locked(inner, &items).map(WriteOutcome::PutMany)
            }
            WriteOp::Increment(write::Increment { key, delta }) => {
                let current = inner.map.get(key.as_slice());
                let value = incremented(current.map(|s| s.value()), *delta)?;
                let version = current.map_or(0, |s| s.version) + 1;
                inner.revision += 1;
                let revision = inner.revision;
                let stored = Stored::new(key, value.to_string().as_bytes(), version, revision);
                inner.insert(key, stored);
                Ok(WriteOutcome::Increment(IncrementOutcome {
                    value,
                    version,
                    revision,
                }))
            }
        }
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Ok(self.read().entry(key, true))
    }

    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        let mut inner = self.lock_write();
        let Some(idem) = idem else {
            return Pending::ready(self.apply(&mut inner, &op));
        };
        let now = now_unix_ms();
        let record_key = idem.record_key();
        let fingerprint = op.fingerprint();
        if let Some(r) = inner.records.get(&record_key) {
            if r.expires_at_unix_ms > now {
                self.replays
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Pending::ready(r.replay(&fingerprint));
            }
        }
        let outcome = self.apply(&mut inner, &op);
        if recordable(&outcome) {
            if inner.records.len() >= RECORD_SWEEP_AT {
                inner.records.retain(|_, r| r.expires_at_unix_ms > now);
            }
            inner.records.insert(
                record_key,
                Record {
                    expires_at_unix_ms: idem.expires_at_unix_ms,
                    fingerprint,
                    outcome: outcome.clone(),
                },
            );
        }
        Pending::ready(outcome)
    }

    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        let inner = self.read();
        let upper = match &req.end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        };
        if let Some(end) = &req.end {
            if end.as_slice() <= req.start.as_slice() {
                return Ok(ScanPage {
                    revision: inner.revision,
                    ..ScanPage::default()
                });
            }
        }
        let mut range = inner
            .order
            .range::<[u8], _>((Bound::Included(req.start.as_slice()), upper));
        let mut page = ScanPage {
            revision: inner.revision,
            ..ScanPage::default()
        };
        let mut bytes = 0usize;
        for k in range.by_ref() {
            let Some(e) = inner.entry(k, !req.keys_only) else {
                continue; // unreachable while the two indexes agree
            };
            bytes += e.key.len() + e.value.len();
            page.entries.push(e);
            if page.entries.len() >= req.limit.max(1) || bytes >= req.max_bytes {
                break;
            }
        }
        page.more = range.next().is_some();
        Ok(page)
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        let inner = self.read();
        let entries = keys.iter().map(|key| inner.entry(key, true)).collect();
        Ok((entries, inner.revision))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.read().revision)
    }

    fn engine_name(&self) -> &'static str {
        "memory"
    }

    fn instance_secret(&self) -> [u8; 32] {
        self.secret
    }

    fn stats(&self) -> crate::StoreStats {
        crate::StoreStats {
            idempotent_replays: self.replays.load(std::sync::atomic::Ordering::Relaxed),
            ..crate::StoreStats::default()
        }
    }
}
