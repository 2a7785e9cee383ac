//! The in-memory engine: a hash set for point reads plus an ordered index for scans
//! (`Sorted`, see [`crate::sorted`]), both holding the same entries, under one `RwLock`.
//!
//! Why two indexes: point reads dominate a key-value workload, and a `BTreeMap` lookup in
//! 100k keys walks ~7 nodes with dozens of key comparisons (about 6% of the server's CPU
//! per get in a kv-loadgen profile); a hash lookup is one hash and one comparison.
//!
//! Why one allocation per key, shared by both (`Stored`, a thin reference-counted pointer
//! to its version, revision, key and value): a read of a random key among 100k misses the
//! CPU cache at each place it touches, so the key and value sit together; and memory per
//! key is what a large keyspace costs. Measured with 1M keys of 100 bytes
//! (bench/keyspace.sh, RSS per key; Redis 210 in the same runs): key copied into a
//! `BTreeMap` and a 40-byte hash entry, 271; an 8-byte pointer in each index and the key
//! stored once, 239; the entry's own 32-byte header instead of `triomphe::ThinArc`'s (the
//! entry drops from the allocator's 192-byte size class to 160) and chunks of 256 pointers
//! instead of a `BTreeSet` (8 bytes a key against ~20), 194. What is left: 160 for the
//! entry, ~19 for the hash table (2^21 slots of 9 bytes at 1M keys), ~8 for the order,
//! and the fixed history and idempotency records. An overwrite with a
//! value of the same length rewrites the entry in place (see `Stored`); any other puts a
//! new entry in both indexes.
//!
//! One lock for the indexes and the revision counter makes every operation atomic
//! and keeps revisions in commit order. A std `RwLock` (not an async one) is right here:
//! no critical section awaits or does I/O, they are all short map operations, so readers
//! on different workers run in parallel and writers wait only for microseconds.

use std::alloc::{self, Layout};
use std::borrow::Borrow;
use std::cell::Cell;
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::mem::{align_of, size_of};
use std::ops::Bound;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicU32, Ordering as AtomicOrdering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::history::{Changes, EventPage, KeyRange, PageLimits};
use crate::lease::{LeaseInfo, Leases};
use crate::logged::effects;
use crate::records::Records;
use crate::ring::Ring;
use crate::sorted::Sorted;
use crate::write::{self, incremented, now_unix_ms, recordable, Record};
use crate::write::{Attach, LeaseGranted, RevokeOutcome};
use crate::{
    BatchOutcome, Condition, DeleteOutcome, Entry, Found, IdempotencyKey, IncrementOutcome,
    Pending, PutItem, PutOutcome, ScanPage, ScanRequest, Store, StoreError, WriteOp, WriteOutcome,
};
use std::time::Instant;

/// History events kept by default (see [`MemoryStore::with_history`]): a fixed ~2 MiB with
/// 100-byte values. The memory engine is for development and tests; its history is a
/// fixed cost that a keyspace of 100,000 keys would otherwise double (100,000 events took
/// ~24 MiB).
pub const DEFAULT_HISTORY_EVENTS: usize = 10_000;
/// Bytes of keys and values the history keeps by default.
pub const DEFAULT_HISTORY_BYTES: usize = 8 << 20;

/// What a key's allocation holds before its bytes. `repr(C)`, and its size (32) is a
/// multiple of its alignment, so the bytes start right after it.
#[repr(C)]
struct Header {
    version: Cell<u64>,
    mod_revision: Cell<u64>,
    /// Handles to the allocation: one per index that holds it.
    refs: AtomicU32,
    /// Keys and values are bounded far below 4 GiB by the contract's limits, and the
    /// engine refuses longer ones ([`Stored::fits`]).
    key_len: u32,
    value_len: u32,
}

/// One live key: its header, then its bytes followed by its value's, in one allocation
/// both indexes point to (see the module docs). Hashes, compares and orders as its key, so
/// both sets are looked up by `&[u8]`.
///
/// Its own allocation rather than `triomphe::ThinArc`: with a 16-byte key and a 100-byte
/// value, ThinArc's header (count, then the header with its length) made the entry one
/// allocator size class larger (192 bytes instead of 160), 32 bytes a key.
///
/// An overwrite with a value of the same length rewrites the value and metadata in place
/// (no allocation, and neither index changes: a replaced entry would have to be found again
/// in the ordered set, a walk of cache misses that cost a quarter of PUT's throughput at 1M
/// keys). Hence the `Cell`s, and the rule that makes sharing them sound: a `Stored` lives
/// only inside `Inner`, which only the store's `RwLock` hands out. Readers hold `&Inner`
/// (no writer meanwhile); [`Stored::overwrite`] is called only with `&mut Inner` held, so
/// no read of the same entry, on any thread, overlaps it. The key bytes are never written.
struct Stored(NonNull<Header>);

// SAFETY: see the type's docs. Every write to the header's `Cell`s and to the value bytes
// happens while the caller holds `&mut Inner` (the store's write lock), which excludes
// every other access to the entry; the count is atomic.
unsafe impl Send for Stored {}
// SAFETY: as above; shared access (`&Inner`, the read lock) never mutates.
unsafe impl Sync for Stored {}

impl Clone for Stored {
    fn clone(&self) -> Self {
        // As `Arc` does: a new handle is made from an existing one, so no ordering is needed.
        self.header().refs.fetch_add(1, AtomicOrdering::Relaxed);
        Stored(self.0)
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        if self.header().refs.fetch_sub(1, AtomicOrdering::Release) != 1 {
            return;
        }
        // Every other handle's uses happen before the memory goes (as in `Arc`).
        std::sync::atomic::fence(AtomicOrdering::Acquire);
        let layout = Self::layout(self.bytes().len());
        // SAFETY: the last handle is going; the allocation was made by `new` with this
        // layout (the lengths never change).
        unsafe { alloc::dealloc(self.0.as_ptr().cast::<u8>(), layout) }
    }
}

impl Stored {
    /// Whether an entry can hold `key` and `value` (lengths below 4 GiB).
    fn fits(key: &[u8], value: &[u8]) -> Result<(), StoreError> {
        if u32::try_from(key.len()).is_err() || u32::try_from(value.len()).is_err() {
            return Err(StoreError::Invalid(
                "the memory engine stores keys and values shorter than 4 GiB".into(),
            ));
        }
        Ok(())
    }

    fn layout(bytes: usize) -> Layout {
        match Layout::from_size_align(size_of::<Header>() + bytes, align_of::<Header>()) {
            Ok(layout) => layout,
            // `bytes` is two u32 lengths at most (`fits`): far below isize::MAX.
            Err(_) => unreachable!("an entry of {bytes} bytes"),
        }
    }

    /// An entry holding `key` and `value`; callers check [`fits`](Self::fits) first.
    fn new(key: &[u8], value: &[u8], version: u64, mod_revision: u64) -> Self {
        let layout = Self::layout(key.len() + value.len());
        // SAFETY: the layout is not zero-sized (it holds the header).
        let raw = unsafe { alloc::alloc(layout) }.cast::<Header>();
        let Some(header) = NonNull::new(raw) else {
            alloc::handle_alloc_error(layout)
        };
        // SAFETY: the allocation holds a header and then `key.len() + value.len()` bytes;
        // it is new, so nothing else refers to it.
        unsafe {
            header.as_ptr().write(Header {
                version: Cell::new(version),
                mod_revision: Cell::new(mod_revision),
                refs: AtomicU32::new(1),
                key_len: key.len() as u32,
                value_len: value.len() as u32,
            });
            let bytes = Self::bytes_at(header);
            ptr::copy_nonoverlapping(key.as_ptr(), bytes, key.len());
            ptr::copy_nonoverlapping(value.as_ptr(), bytes.add(key.len()), value.len());
        }
        Stored(header)
    }

    /// Where an entry's bytes start: right after its header (see [`Header`]).
    fn bytes_at(header: NonNull<Header>) -> *mut u8 {
        // In bounds of the allocation: it holds the header, then the bytes.
        header.as_ptr().wrapping_add(1).cast::<u8>()
    }

    fn header(&self) -> &Header {
        // SAFETY: the allocation lives while any handle does; the header is initialised.
        unsafe { self.0.as_ref() }
    }

    fn version(&self) -> u64 {
        self.header().version.get()
    }

    fn bytes(&self) -> &[u8] {
        let h = self.header();
        let len = h.key_len as usize + h.value_len as usize;
        // SAFETY: `len` initialised bytes follow the header (see `new`); no write to them
        // can happen while the returned borrow lives (see the type's docs: writes need
        // `&mut Inner`).
        unsafe { std::slice::from_raw_parts(Self::bytes_at(self.0), len) }
    }

    fn key(&self) -> &[u8] {
        &self.bytes()[..self.header().key_len as usize]
    }

    fn value(&self) -> &[u8] {
        &self.bytes()[self.header().key_len as usize..]
    }

    /// Rewrites the value and metadata in place when `value` has the current value's
    /// length; `false` (nothing changed) otherwise. Callers hold `&mut Inner`.
    fn overwrite(&self, value: &[u8], version: u64, mod_revision: u64) -> bool {
        let h = self.header();
        if h.value_len as usize != value.len() {
            return false;
        }
        // SAFETY: the value's bytes lie inside the allocation, after the key; the caller
        // holds `&mut Inner`, so no borrow of them (`bytes`) is alive on any thread.
        unsafe {
            let at = Self::bytes_at(self.0).add(h.key_len as usize);
            ptr::copy_nonoverlapping(value.as_ptr(), at, value.len());
        }
        h.version.set(version);
        h.mod_revision.set(mod_revision);
        true
    }

    fn entry(&self, with_value: bool) -> Entry {
        Entry {
            key: self.key().to_vec(),
            value: if with_value {
                self.value().to_vec()
            } else {
                Vec::new()
            },
            version: self.version(),
            mod_revision: self.header().mod_revision.get(),
        }
    }
}

impl std::fmt::Debug for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stored")
            .field("key_len", &self.header().key_len)
            .field("value_len", &self.value().len())
            .field("version", &self.version())
            .finish()
    }
}

impl Borrow<[u8]> for Stored {
    fn borrow(&self) -> &[u8] {
        self.key()
    }
}

// Must hash and order exactly as the borrowed `[u8]` does, or lookups by `&[u8]` would miss.
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

impl PartialOrd for Stored {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Stored {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.key().cmp(other.key())
    }
}

/// The hash index: `hashbrown`'s table (what std's `HashSet` is built on) with std's keyed
/// SipHash, since keys come from the network and a per-process seed keeps collision floods
/// out. Its own type rather than a `HashSet` for [`Index::prefetch`], a lookup that stops
/// at the entry's address.
#[derive(Default)]
struct Index {
    table: hashbrown::HashTable<Stored>,
    hasher: RandomState,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index").field("len", &self.len()).finish()
    }
}

impl Index {
    fn hash(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn get(&self, key: &[u8]) -> Option<&Stored> {
        self.find(self.hash(key), key)
    }

    /// [`Self::get`] with the key's hash already taken (a put takes it once for its
    /// version check and its write: with three SipHashes a put, hashing was 4% of the
    /// server's time at 16 puts in flight).
    fn find(&self, hash: u64, key: &[u8]) -> Option<&Stored> {
        self.table.find(hash, |s| s.key() == key)
    }

    /// Inserts `stored` (whose key hashes to `hash`), replacing the entry of the same key
    /// if there is one.
    fn replace(&mut self, hash: u64, stored: Stored) {
        let Index { table, hasher } = self;
        match table.entry(
            hash,
            |s| s.key() == stored.key(),
            |s| hasher.hash_one(s.key()),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut o) => *o.get_mut() = stored,
            hashbrown::hash_table::Entry::Vacant(v) => {
                v.insert(stored);
            }
        }
    }

    fn remove(&mut self, key: &[u8]) -> bool {
        match self.table.find_entry(self.hash(key), |s| s.key() == key) {
            Ok(o) => {
                o.remove();
                true
            }
            Err(_) => false,
        }
    }

    fn len(&self) -> usize {
        self.table.len()
    }

    /// Starts loading the entries of `keys` into the CPU cache without waiting. A get of a
    /// random key among many misses the cache twice, at the table's slot and at the entry
    /// (about a sixth of the server's CPU at 16 gets in flight, 100k keys); a prefetch
    /// issued when a call arrives overlaps the second miss with the work before the lookup,
    /// and with the other prefetches of calls that arrived together. The walk stops at the
    /// first slot whose 7-bit hash tag matches, without comparing keys (that would wait for
    /// the entry): one probe in 128 matches a stranger, whose lines are then loaded for
    /// nothing.
    ///
    /// The keys are taken in chunks, each hashed first and then walked back to back, so
    /// that the loads of one chunk overlap. Callers hold the store's lock once around it
    /// (each acquisition's atomic would order the loads around it).
    fn prefetch(&self, keys: &[&[u8]]) {
        const CHUNK: usize = 16;
        for chunk in keys.chunks(CHUNK) {
            let mut hashes = [0u64; CHUNK];
            for (h, key) in hashes.iter_mut().zip(chunk) {
                *h = self.hash(key);
            }
            for &hash in &hashes[..chunk.len()] {
                let _ = self.table.find(hash, |s| {
                    prefetch_lines(s.0.as_ptr().cast_const().cast());
                    true
                });
            }
        }
    }
}

/// Lines of an entry worth loading ahead: its header and key, and a 100-byte value
/// (the rest of a longer value follows from the hardware's own stride prefetch).
const PREFETCH_LINES: usize = 3;

/// Asks the CPU to load the cache lines from `p` on. A hint: never faults, never waits.
#[inline]
fn prefetch_lines(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    for line in 0..PREFETCH_LINES {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        // SAFETY: SSE is part of every x86_64 target; a prefetch reads nothing into the
        // program and cannot fault, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(line * 64).cast()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

#[derive(Debug, Default)]
struct Inner {
    /// Every live key and its data.
    map: Index,
    /// The same entries, ordered (invariant: the same allocations as `map`'s).
    order: Sorted<Stored>,
    revision: u64,
    /// Idempotency records by record key, bounded (see [`crate::records`]).
    records: Records,
    /// Every change's event, for watchers (see [`crate::history`]).
    history: Ring,
    /// Leases and the keys attached to them (see [`crate::lease`]).
    leases: Leases,
    /// The logged engine's capture of a group's effects and what they hid (see
    /// [`crate::logged`]); `None` for the volatile engine, which pays one branch for it.
    log: Option<Box<Capture>>,
}

/// What the group being committed changed, kept while its log record is written and synced.
#[derive(Debug, Default)]
pub(crate) struct Capture {
    /// The group's effects, encoded as the log stores them ([`crate::logged::effects`]).
    pub(crate) effects: Vec<u8>,
    /// Each key the group changed, as it was before (`None`: absent). Reads answer from
    /// here while the group is not durable, so nothing a crash could take back is seen.
    pre: std::collections::BTreeMap<Vec<u8>, Option<Stored>>,
    /// The revision before the group: what reads report while it is in flight.
    durable: u64,
    /// Each lease the group granted (`None`: it did not exist) or revoked (as it was, and
    /// when), so that lease reads answer as before the group too.
    leases_before: Vec<(u64, Option<LeaseInfo>, Instant)>,
}

impl Inner {
    fn version(&self, key: &[u8]) -> Option<u64> {
        self.map.get(key).map(Stored::version)
    }

    /// The entry of `key` that reads may see: the latest, except while a logged group is
    /// in flight, when a key it changed reads as it was before the group.
    fn visible(&self, key: &[u8]) -> Option<&Stored> {
        match self.log.as_deref().filter(|l| !l.pre.is_empty()) {
            Some(log) => match log.pre.get(key) {
                Some(before) => before.as_ref(),
                None => self.map.get(key),
            },
            None => self.map.get(key),
        }
    }

    /// The revision reads report: the latest, or the one before a logged group in flight.
    fn head(&self) -> u64 {
        match self.log.as_deref() {
            Some(log) if !log.pre.is_empty() => log.durable,
            _ => self.revision,
        }
    }

    /// The visible entries from `start` up to `upper`, in key order: the ordered index,
    /// with the keys a logged group in flight changed read as they were before it (keys it
    /// deleted come back from the pre-images, keys it created are left out).
    fn visible_range<'a>(
        &'a self,
        start: &'a [u8],
        upper: Bound<&'a [u8]>,
    ) -> Box<dyn Iterator<Item = &'a Stored> + 'a> {
        let Some(log) = self.log.as_deref().filter(|l| !l.pre.is_empty()) else {
            return Box::new(self.order.range(start, upper));
        };
        let mut hidden = log
            .pre
            .range::<[u8], _>((Bound::Included(start), upper))
            .filter_map(|(k, before)| before.as_ref().filter(|_| self.map.get(k).is_none()))
            .peekable();
        let mut live = self
            .order
            .range(start, upper)
            .filter_map(move |s| match log.pre.get(s.key()) {
                Some(before) => before.as_ref(),
                None => Some(s),
            })
            .peekable();
        Box::new(std::iter::from_fn(move || {
            match (live.peek(), hidden.peek()) {
                (Some(l), Some(h)) if h.key() < l.key() => hidden.next(),
                (Some(_), _) => live.next(),
                (None, _) => hidden.next(),
            }
        }))
    }

    /// Notes `key`'s state before the group's first change of it (logged engine only).
    /// `rewrite_len`: the length of the value about to be set, if one is; an entry that
    /// will be rewritten in place (same value length, see `Stored::overwrite`) is copied,
    /// one about to be replaced or removed is kept as it is.
    fn note_before(&mut self, key: &[u8], rewrite_len: Option<usize>) {
        let Inner { map, log, .. } = self;
        let Some(log) = log.as_deref_mut().filter(|l| !l.pre.contains_key(key)) else {
            return;
        };
        let before = match map.get(key) {
            Some(s) if Some(s.value().len()) == rewrite_len => Some(Stored::new(
                s.key(),
                s.value(),
                s.version(),
                s.header().mod_revision.get(),
            )),
            other => other.cloned(),
        };
        log.pre.insert(key.to_vec(), before);
    }

    fn entry(&self, key: &[u8], with_value: bool) -> Option<Entry> {
        self.visible(key).map(|s| s.entry(with_value))
    }

    /// Sets `key`'s value: in place when the key exists with a value of the same length,
    /// else as a new entry in both indexes. Its event joins the history.
    fn insert(&mut self, key: &[u8], value: &[u8], version: u64, mod_revision: u64) {
        let hash = self.map.hash(key);
        self.insert_hashed(hash, key, value, version, mod_revision);
    }

    /// [`Self::insert`] of a key whose hash the caller has taken.
    fn insert_hashed(
        &mut self,
        hash: u64,
        key: &[u8],
        value: &[u8],
        version: u64,
        mod_revision: u64,
    ) {
        self.history.push(key, value, Some(version), mod_revision);
        self.note_before(key, Some(value.len()));
        if let Some(log) = self.log.as_deref_mut() {
            effects::put(&mut log.effects, key, value, version, mod_revision);
        }
        self.set_hashed(hash, key, value, version, mod_revision);
    }

    /// Sets `key`'s entry, without history or log (what [`Self::insert`] and a replay share).
    fn set(&mut self, key: &[u8], value: &[u8], version: u64, mod_revision: u64) {
        let hash = self.map.hash(key);
        self.set_hashed(hash, key, value, version, mod_revision);
    }

    fn set_hashed(&mut self, hash: u64, key: &[u8], value: &[u8], version: u64, mod_revision: u64) {
        if let Some(s) = self.map.find(hash, key) {
            if s.overwrite(value, version, mod_revision) {
                return;
            }
        }
        let stored = Stored::new(key, value, version, mod_revision);
        self.map.replace(hash, stored.clone());
        self.order.replace(stored);
    }

    /// Deletes `key` at `revision`, with its event; whether it existed.
    fn remove(&mut self, key: &[u8], revision: u64) -> bool {
        if self.map.get(key).is_none() {
            return false;
        }
        self.note_before(key, None);
        if let Some(log) = self.log.as_deref_mut() {
            effects::delete(&mut log.effects, key, revision);
        }
        self.unset(key);
        self.history.push(key, &[], None, revision);
        true
    }

    /// Removes `key`'s entry from both indexes, without history or log (what
    /// [`Self::remove`] and a replay share); whether it was there.
    fn unset(&mut self, key: &[u8]) -> bool {
        let existed = self.map.remove(key);
        if existed {
            self.order.remove(key);
        }
        existed
    }

    fn grant(&mut self, ttl_ms: u64) -> u64 {
        let now = Instant::now();
        let id = self.leases.grant(ttl_ms, now);
        if let Some(log) = self.log.as_deref_mut() {
            effects::grant(&mut log.effects, id, ttl_ms);
            log.leases_before.push((id, None, now));
        }
        id
    }

    /// Lease `id` as a logged group in flight found it, when the group granted (`None`) or
    /// revoked it, with when.
    fn lease_before(&self, id: u64) -> Option<(Option<LeaseInfo>, Instant)> {
        self.log.as_deref().and_then(|l| {
            l.leases_before
                .iter()
                .find(|(i, _, _)| *i == id)
                .map(|&(_, info, at)| (info, at))
        })
    }

    /// Lease `id` as reads may see it: as before a logged group in flight that granted or
    /// revoked it, else as it is.
    fn lease_visible(&self, id: u64, now: Instant) -> Option<LeaseInfo> {
        match self.lease_before(id) {
            Some((info, at)) => info.map(|i| LeaseInfo {
                remaining_ms: i
                    .remaining_ms
                    .saturating_sub(now.saturating_duration_since(at).as_millis() as u64),
                ..i
            }),
            None => self.leases.info(id, now),
        }
    }

    fn attach(&mut self, key: &[u8], lease: Option<u64>) {
        let before = self.leases.attach(key, lease);
        if let Some(log) = self.log.as_deref_mut().filter(|_| before != lease) {
            effects::attach(&mut log.effects, key, lease.unwrap_or(0));
        }
    }

    fn revoke_lease(&mut self, id: u64) -> Option<Vec<Vec<u8>>> {
        let now = Instant::now();
        let info = self.leases.info(id, now);
        let keys = self.leases.remove(id)?;
        if let Some(log) = self.log.as_deref_mut() {
            effects::revoke(&mut log.effects, id);
            log.leases_before.push((id, info, now));
        }
        Some(keys)
    }

    fn insert_record(&mut self, record_key: Vec<u8>, record: Record, now_unix_ms: u64) {
        if let Some(log) = self.log.as_deref_mut() {
            effects::record(&mut log.effects, &record_key, &record);
        }
        self.records.insert(record_key, record, now_unix_ms);
    }

    /// Both indexes hold the same entries (the same allocations).
    #[cfg(test)]
    fn consistent(&self) -> bool {
        self.map.len() == self.order.len()
            && self.order.iter().all(|s| {
                self.map
                    .get(s.key())
                    .is_some_and(|m| std::ptr::eq(m.0.as_ptr(), s.0.as_ptr()))
            })
    }
}

/// Ordered, concurrency-safe, volatile engine.
#[derive(Debug)]
pub struct MemoryStore {
    inner: RwLock<Inner>,
    changes: Changes,
    /// Lives and dies with the data, like everything here.
    secret: [u8; 32],
    /// Writes answered from an idempotency record.
    replays: std::sync::atomic::AtomicU64,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::with_history(DEFAULT_HISTORY_EVENTS, DEFAULT_HISTORY_BYTES)
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store whose watch history keeps the events of the latest revisions, at most
    /// `max_events` of them and `max_bytes` of their keys and values (each at least 1).
    pub fn with_history(max_events: usize, max_bytes: usize) -> Self {
        let inner = Inner {
            history: Ring::new(max_events, max_bytes),
            ..Inner::default()
        };
        Self {
            inner: RwLock::new(inner),
            changes: Changes::new(0),
            secret: rand::random(),
            replays: Default::default(),
        }
    }

    /// Keeps at most `max` idempotency records (the oldest go first; see
    /// [`crate::records`]).
    pub fn set_max_records(&self, max: usize) {
        self.lock_write().records.set_max(max);
    }

    /// Runs `write` under the write lock; a write that made a revision has its history
    /// trimmed and its revision published once the lock is released.
    fn writing<T>(&self, write: impl FnOnce(&mut Inner) -> T) -> T {
        let mut inner = self.lock_write();
        let before = inner.revision;
        let outcome = write(&mut inner);
        if inner.revision != before {
            inner.history.trim();
            let revision = inner.revision;
            // Visible to readers once the lock is released; a watcher woken before that
            // waits on the lock to read it.
            drop(inner);
            self.changes.publish(revision);
        }
        outcome
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
    attach: Attach,
) -> Result<PutOutcome, StoreError> {
    if let Attach::Lease(id) = attach {
        if !inner.leases.contains(id) {
            return Err(StoreError::LeaseNotFound { id });
        }
    }
    Stored::fits(key, value)?;
    let hash = inner.map.hash(key);
    let current = inner.map.find(hash, key).map(Stored::version);
    if !cond.holds(current) {
        return Err(StoreError::ConditionFailed {
            index: 0,
            current_version: current,
        });
    }
    inner.revision += 1;
    let revision = inner.revision;
    let version = current.unwrap_or(0) + 1;
    inner.insert_hashed(hash, key, value, version, revision);
    let lease = match attach {
        Attach::None => None,
        Attach::Lease(id) => Some(id),
        Attach::NewLease { ttl_ms } => Some(inner.grant(ttl_ms)),
    };
    inner.attach(key, lease);
    Ok(PutOutcome {
        version,
        revision,
        lease: lease.unwrap_or(0),
    })
}

/// Revokes lease `id`: its keys are deleted at one new revision (none when it has none).
fn revoke_locked(inner: &mut Inner, id: u64) -> Result<RevokeOutcome, StoreError> {
    let keys = inner
        .revoke_lease(id)
        .ok_or(StoreError::LeaseNotFound { id })?;
    if keys.is_empty() {
        return Ok(RevokeOutcome {
            deleted: 0,
            revision: inner.revision,
        });
    }
    inner.revision += 1;
    let revision = inner.revision;
    let mut deleted = 0;
    for key in keys {
        if inner.remove(&key, revision) {
            deleted += 1;
        }
    }
    Ok(RevokeOutcome { deleted, revision })
}

/// Most leases one `ExpireLeases` revokes (the reaper sends another for the rest).
const EXPIRE_BATCH: usize = 1_000;

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
    let existed = inner.remove(key, inner.revision + 1);
    if existed {
        inner.revision += 1;
        inner.attach(key, None);
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
        Stored::fits(item.key, item.value)?;
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
        inner.insert(item.key, item.value, version, revision);
        inner.attach(item.key, None);
    }
    Ok(BatchOutcome { versions, revision })
}

impl MemoryStore {
    fn apply(&self, inner: &mut Inner, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::Put(write::Put {
                key,
                value,
                cond,
                attach,
            }) => put_locked(inner, key, value, *cond, *attach).map(WriteOutcome::Put),
            WriteOp::GrantLease(write::GrantLease { ttl_ms }) => {
                Ok(WriteOutcome::GrantLease(LeaseGranted {
                    id: inner.grant(*ttl_ms),
                    ttl_ms: *ttl_ms,
                }))
            }
            WriteOp::RevokeLease(write::RevokeLease { id }) => {
                revoke_locked(inner, *id).map(WriteOutcome::RevokeLease)
            }
            WriteOp::ExpireLeases(write::ExpireLeases) => {
                let expired = inner.leases.expired(Instant::now(), EXPIRE_BATCH);
                for &id in &expired {
                    revoke_locked(inner, id)?;
                }
                Ok(WriteOutcome::ExpireLeases(expired.len() as u64))
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
                let version = current.map_or(0, Stored::version) + 1;
                inner.revision += 1;
                let revision = inner.revision;
                inner.insert(key, value.to_string().as_bytes(), version, revision);
                Ok(WriteOutcome::Increment(IncrementOutcome {
                    value,
                    version,
                    revision,
                }))
            }
        }
    }
}

impl MemoryStore {
    /// A write under the lock, idempotently when `idem` is given.
    fn write_locked(
        &self,
        inner: &mut Inner,
        op: WriteOp,
        idem: Option<IdempotencyKey>,
    ) -> Result<WriteOutcome, StoreError> {
        let Some(idem) = idem else {
            return self.apply(inner, &op);
        };
        let now = now_unix_ms();
        let record_key = idem.record_key();
        let fingerprint = op.fingerprint();
        if let Some(r) = inner.records.get(&record_key) {
            if r.expires_at_unix_ms > now {
                self.replays
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return r.replay(&fingerprint);
            }
        }
        let outcome = self.apply(inner, &op);
        if recordable(&outcome) {
            inner.insert_record(
                record_key,
                Record {
                    expires_at_unix_ms: idem.expires_at_unix_ms,
                    fingerprint,
                    outcome: outcome.clone(),
                },
                now,
            );
        }
        outcome
    }
}

/// A group being applied by the logged engine's committer, under the write lock.
pub(crate) struct Applying<'a> {
    store: &'a MemoryStore,
    inner: RwLockWriteGuard<'a, Inner>,
}

impl Applying<'_> {
    pub(crate) fn write(
        &mut self,
        op: WriteOp,
        idem: Option<IdempotencyKey>,
    ) -> Result<WriteOutcome, StoreError> {
        self.store.write_locked(&mut self.inner, op, idem)
    }

    /// Releases the lock: the group's effects (empty when it changed nothing) and the
    /// revision after it. Reads see the state before the group until [`MemoryStore::end_group`].
    pub(crate) fn done(mut self) -> (Vec<u8>, u64) {
        let revision = self.inner.revision;
        let effects = self
            .inner
            .log
            .as_deref_mut()
            .map(|l| std::mem::take(&mut l.effects))
            .unwrap_or_default();
        (effects, revision)
    }
}

/// Effects past this size are not kept for the next group's capture.
const KEEP_EFFECTS_BYTES: usize = 1 << 20;

impl MemoryStore {
    /// The logged engine's state: every group's effects captured, reads kept to what is
    /// durable (see [`crate::logged`]).
    pub(crate) fn logging(max_events: usize, max_bytes: usize, secret: [u8; 32]) -> Self {
        let s = Self::with_history(max_events, max_bytes);
        s.lock_write().log = Some(Box::default());
        Self { secret, ..s }
    }

    /// Starts applying a group (the committer; nothing else writes a logged store).
    pub(crate) fn begin_group(&self) -> Applying<'_> {
        let mut inner = self.lock_write();
        let revision = inner.revision;
        if let Some(log) = inner.log.as_deref_mut() {
            log.durable = revision;
            log.effects.clear();
        }
        Applying { store: self, inner }
    }

    /// The group applied last is durable: reads see it, watchers hear of it. `effects` is
    /// the buffer [`Applying::done`] gave, back for the next group.
    pub(crate) fn end_group(&self, mut effects: Vec<u8>) {
        let mut inner = self.lock_write();
        let revision = inner.revision;
        let Some(log) = inner.log.as_deref_mut() else {
            return;
        };
        let changed = revision != log.durable;
        log.durable = revision;
        // The pre-images go here, under the lock, so no reader holds one.
        log.pre.clear();
        log.leases_before.clear();
        if effects.capacity() <= KEEP_EFFECTS_BYTES {
            effects.clear();
            log.effects = effects;
        }
        if changed {
            inner.history.trim();
            drop(inner);
            self.changes.publish(revision);
        }
    }

    /// Applies logged effects as they are (recovery), at group `revision`; with their
    /// watch events when `history` (the log's records, not a snapshot's).
    pub(crate) fn replay(
        &self,
        effects: &[u8],
        revision: u64,
        history: bool,
    ) -> Result<(), String> {
        use crate::logged::effects::Effect;
        let mut inner = self.lock_write();
        let log = inner.log.take();
        let now = Instant::now();
        let now_ms = now_unix_ms();
        let mut result = Ok(());
        for effect in crate::logged::effects::decode(effects) {
            let effect = match effect {
                Ok(e) => e,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            };
            match effect {
                Effect::Put {
                    key,
                    value,
                    version,
                    mod_revision,
                } => {
                    if let Err(e) = Stored::fits(key, value) {
                        result = Err(e.to_string());
                        break;
                    }
                    // The log is taken out above: `insert` is `set` with the event.
                    if history {
                        inner.insert(key, value, version, mod_revision);
                    } else {
                        inner.set(key, value, version, mod_revision);
                    }
                    inner.revision = inner.revision.max(mod_revision);
                }
                Effect::Delete { key, revision } => {
                    inner.unset(key);
                    if history {
                        inner.history.push(key, &[], None, revision);
                    }
                    inner.revision = inner.revision.max(revision);
                }
                Effect::Grant { id, ttl_ms } => inner.leases.insert(id, ttl_ms, now),
                Effect::Revoke { id } => {
                    inner.leases.remove(id);
                }
                Effect::Attach { key, lease } => {
                    // A lease revoked later in the log is gone already when a snapshot
                    // replays the attach; the revoke's deletes follow.
                    let lease = Some(lease).filter(|&l| l != 0 && inner.leases.contains(l));
                    inner.leases.attach(key, lease);
                }
                Effect::Record { key, record } => match Record::decode(record) {
                    Ok(r) if r.expires_at_unix_ms > now_ms => {
                        inner.records.insert(key.to_vec(), r, now_ms);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        result = Err(e.to_string());
                        break;
                    }
                },
            }
        }
        inner.revision = inner.revision.max(revision);
        if history {
            inner.history.trim();
        }
        inner.log = log;
        result
    }

    /// Recovery is over: the history starts after `snapshot_revision` (what a snapshot
    /// held has no events), and watchers start from the recovered revision.
    pub(crate) fn recovered(&self, snapshot_revision: u64) {
        let mut inner = self.lock_write();
        inner.history.forget_through(snapshot_revision);
        inner.history.trim();
        let revision = inner.revision;
        if let Some(log) = inner.log.as_deref_mut() {
            log.durable = revision;
        }
        drop(inner);
        self.changes.publish(revision);
    }

    /// The revision, leases and unexpired idempotency records, as effects. Taken by the
    /// committer between groups, when all of it is durable.
    pub(crate) fn snapshot_head(&self, out: &mut Vec<u8>) -> u64 {
        let inner = self.read();
        for (id, ttl_ms, keys) in inner.leases.each() {
            effects::grant(out, id, ttl_ms);
            for key in keys {
                effects::attach(out, key, id);
            }
        }
        let now = now_unix_ms();
        for (key, record) in inner.records.iter() {
            if record.expires_at_unix_ms > now {
                effects::record(out, key, record);
            }
        }
        inner.revision
    }

    /// Up to `max` durable entries after `after` (from the first when `None`), as put
    /// effects; the last key written when more may follow.
    pub(crate) fn snapshot_keys(
        &self,
        after: Option<&[u8]>,
        max: usize,
        out: &mut Vec<u8>,
    ) -> Option<Vec<u8>> {
        let inner = self.read();
        let start = after.unwrap_or(&[]);
        let mut n = 0;
        for s in inner.visible_range(start, Bound::Unbounded) {
            if after == Some(s.key()) {
                continue;
            }
            crate::logged::effects::put(
                out,
                s.key(),
                s.value(),
                s.version(),
                s.header().mod_revision.get(),
            );
            n += 1;
            if n >= max {
                return Some(s.key().to_vec());
            }
        }
        None
    }
}

impl Store for MemoryStore {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Ok(self.read().entry(key, true))
    }

    fn get_into(&self, key: &[u8], value: &mut Vec<u8>) -> Result<Option<Found>, StoreError> {
        value.clear();
        let inner = self.read();
        Ok(inner.visible(key).map(|s| {
            value.extend_from_slice(s.value());
            Found {
                version: s.version(),
                mod_revision: s.header().mod_revision.get(),
            }
        }))
    }

    fn prefetch(&self, keys: &[&[u8]]) {
        if !keys.is_empty() {
            self.read().map.prefetch(keys);
        }
    }

    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        Pending::ready(self.writing(|inner| self.write_locked(inner, op, idem)))
    }

    // A put or delete with nothing to record (the server's usual write) reads its key and
    // value where the caller has them: no `WriteOp` to build, copy into and drop.
    fn put(&self, key: &[u8], value: &[u8], cond: Condition) -> Pending<PutOutcome> {
        Pending::ready(self.writing(|inner| put_locked(inner, key, value, cond, Attach::None)))
    }

    fn delete(&self, key: &[u8], cond: Condition) -> Pending<DeleteOutcome> {
        Pending::ready(self.writing(|inner| delete_locked(inner, key, cond)))
    }

    fn events(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
    ) -> Result<EventPage, StoreError> {
        let inner = self.read();
        // A logged group in flight: its events are not durable yet, and the page stops
        // before them.
        inner.history.page(range, after, max, inner.head())
    }

    fn changes(&self) -> &Changes {
        &self.changes
    }

    fn lease_keep_alive(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        let mut inner = self.lock_write();
        let now = Instant::now();
        // A lease a logged group in flight granted is not there yet; one it revoked is
        // still there, and kept alive until the revoke is durable.
        if let Some((before, _)) = inner.lease_before(id) {
            return before
                .map(|i| LeaseInfo {
                    remaining_ms: i.ttl_ms,
                    ..i
                })
                .ok_or(StoreError::LeaseNotFound { id });
        }
        inner
            .leases
            .keep_alive(id, now)
            .ok_or(StoreError::LeaseNotFound { id })
    }

    fn lease_info(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        self.read()
            .lease_visible(id, Instant::now())
            .ok_or(StoreError::LeaseNotFound { id })
    }

    fn lease_clock(&self) -> (usize, Option<Instant>) {
        let inner = self.read();
        (inner.leases.len(), inner.leases.next_deadline())
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
                    revision: inner.head(),
                    ..ScanPage::default()
                });
            }
        }
        let mut range = inner.visible_range(req.start.as_slice(), upper);
        let mut page = ScanPage {
            revision: inner.head(),
            ..ScanPage::default()
        };
        let mut bytes = 0usize;
        for stored in range.by_ref() {
            let e = stored.entry(!req.keys_only);
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
        crate::get_many_unbounded(self, keys)
    }

    /// Counts the entries' bytes where they lie before copying any (all the entries'
    /// cache misses at once, then the counts, then the copies).
    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<crate::ManyRead>, StoreError> {
        let inner = self.read();
        inner.map.prefetch(keys);
        // Each key looked up once: counted, then copied from where it was found.
        let found: Vec<Option<&Stored>> = keys.iter().map(|key| inner.visible(key)).collect();
        let payload = found
            .iter()
            .flatten()
            .map(|s| s.key().len() + s.value().len())
            .fold(0usize, usize::saturating_add);
        if payload > max_payload_bytes {
            return Ok(None);
        }
        let entries = found.iter().map(|s| s.map(|s| s.entry(true))).collect();
        Ok(Some((entries, inner.head())))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.read().head())
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
            records_evicted: self.read().records.evicted(),
            ..crate::StoreStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_a_32_byte_header_then_its_bytes() {
        // The header's size decides the entry's allocator size class (see `Stored`).
        assert_eq!(size_of::<Header>(), 32);
        let s = Stored::new(b"key", b"value", 3, 9);
        assert_eq!(
            (s.key(), s.value(), s.version()),
            (&b"key"[..], &b"value"[..], 3)
        );
        let t = s.clone();
        assert!(s.overwrite(b"VALUE", 4, 10));
        assert!(!s.overwrite(b"longer value", 5, 11));
        drop(s);
        assert_eq!((t.value(), t.version()), (&b"VALUE"[..], 4));
        assert_eq!(t.header().mod_revision.get(), 10);
    }

    /// Every kind of write on the memory engine, keyed or not, failing or not, returns a
    /// ready outcome: the server answers it at once, as a read (never waiting in the RPC
    /// engine for a commit).
    #[test]
    fn every_write_completes_at_once() {
        let s = MemoryStore::new();
        let keyed = |k: &[u8]| {
            Some(IdempotencyKey {
                session: b"s".to_vec(),
                key: k.to_vec(),
                expires_at_unix_ms: u64::MAX,
            })
        };
        let put = |k: &[u8], cond| {
            WriteOp::Put(write::Put {
                key: k.to_vec(),
                value: b"v".to_vec(),
                cond,
                ..write::Put::default()
            })
        };
        let ops = [
            (put(b"a", Condition::None), None),
            (put(b"a", Condition::None), keyed(b"1")),
            (put(b"a", Condition::None), keyed(b"1")), // a replay
            (put(b"a", Condition::IfVersion(99)), None), // a failed condition
            (
                WriteOp::Increment(write::Increment {
                    key: b"n".to_vec(),
                    delta: 1,
                }),
                keyed(b"2"),
            ),
            (
                WriteOp::PutMany(write::PutMany {
                    items: vec![(b"b".to_vec(), b"v".to_vec(), Condition::None)],
                }),
                None,
            ),
            (
                WriteOp::Delete(write::Delete {
                    key: b"a".to_vec(),
                    cond: Condition::None,
                }),
                keyed(b"3"),
            ),
        ];
        for (op, idem) in ops {
            assert!(s.write(op, idem).now().is_ok(), "a write left pending");
        }
    }

    /// Every kind of write leaves both indexes holding the same entries (one allocation per
    /// key), and reads, scans and versions see the newest value, small or large.
    #[test]
    fn both_indexes_share_one_entry_per_key() {
        let s = MemoryStore::new();
        use futures::executor::block_on as wait;
        let big = vec![7u8; 2048];
        for round in 0..3u8 {
            for k in 0..50u8 {
                let value: &[u8] = if k % 10 == 0 { &big } else { &[round; 100] };
                wait(s.put(&[b'k', k], value, Condition::None)).unwrap();
            }
        }
        let items = [
            PutItem {
                key: b"k\x01",
                value: b"many",
                cond: Condition::None,
            },
            PutItem {
                key: b"new",
                value: b"one",
                cond: Condition::IfAbsent,
            },
        ];
        wait(s.put_many(&items)).unwrap();
        // Same length: rewritten in place (the same allocation in both indexes).
        let at = |s: &MemoryStore, k: &[u8]| s.read().map.get(k).map(|e| e.0.as_ptr());
        let before = at(&s, &[b'k', 5]);
        wait(s.put(&[b'k', 5], &[9; 100], Condition::None)).unwrap();
        assert_eq!(at(&s, &[b'k', 5]), before);
        assert_eq!(s.get(&[b'k', 5]).unwrap().unwrap().value, vec![9u8; 100]);
        wait(s.put(&[b'k', 5], &[2; 100], Condition::None)).unwrap();
        wait(s.delete(&[b'k', 2], Condition::None)).unwrap();
        assert!(s.read().consistent());
        assert_eq!(s.read().map.len(), 50);
        let e = s.get(&[b'k', 3]).unwrap().unwrap();
        assert_eq!((e.value, e.version), (vec![2u8; 100], 3));
        let e = s.get(&[b'k', 5]).unwrap().unwrap();
        assert_eq!((e.value, e.version), (vec![2u8; 100], 5));
        assert_eq!(s.get(&[b'k', 10]).unwrap().unwrap().value, big);
        assert_eq!(s.get(b"k\x01").unwrap().unwrap().value, b"many");
        assert!(s.get(&[b'k', 2]).unwrap().is_none());
        let page = s
            .scan(&ScanRequest {
                start: b"k".to_vec(),
                end: None,
                limit: 1000,
                max_bytes: usize::MAX,
                keys_only: false,
                revision: None,
            })
            .unwrap();
        assert_eq!(page.entries.len(), 50);
        assert!(page.entries.windows(2).all(|w| w[0].key < w[1].key));
        assert_eq!(
            page.entries[0].value, big,
            "k\\x00: the newest, large value"
        );
        assert_eq!(page.entries[1].value, b"many");
    }

    /// The hash index finds every key through its growth (rehashing), replacements and
    /// removals; prefetches of keys present, absent, empty, or more than one chunk of them
    /// change nothing.
    #[test]
    fn the_hash_index_finds_every_key_and_prefetch_changes_nothing() {
        use futures::executor::block_on as wait;
        let s = MemoryStore::new();
        let key = |i: u32| format!("key:{i:08}").into_bytes();
        for i in 0..5_000 {
            wait(s.put(&key(i), &i.to_le_bytes(), Condition::None)).unwrap();
        }
        for i in (0..5_000).step_by(3) {
            wait(s.delete(&key(i), Condition::None)).unwrap();
        }
        for i in (1..5_000).step_by(3) {
            // A longer value: a new entry replaces the old one in both indexes.
            wait(s.put(&key(i), &[1; 40], Condition::None)).unwrap();
        }
        let keys: Vec<Vec<u8>> = (0..5_100).map(key).collect();
        let mut asked: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
        asked.push(b"");
        s.prefetch(&asked);
        s.prefetch(&[]);
        assert!(s.read().consistent());
        assert_eq!(s.read().map.len(), 5_000 - 5_000usize.div_ceil(3));
        for i in 0..5_100u32 {
            let got = s.get(&key(i)).unwrap().map(|e| e.value);
            let want = match i {
                5_000.. => None,
                _ if i % 3 == 0 => None,
                _ if i % 3 == 1 => Some(vec![1; 40]),
                _ => Some(i.to_le_bytes().to_vec()),
            };
            assert_eq!(got, want, "key {i}");
        }
        let (many, _) = s.get_many(&asked[..100]).unwrap();
        assert_eq!(many.iter().filter(|e| e.is_some()).count(), 66);
    }

    /// The ring keeps at most its events, dropping the oldest revisions whole; a read from
    /// before them is `Compacted` with the oldest revision a watch can start at.
    #[test]
    fn history_keeps_a_window_of_whole_revisions() {
        use futures::executor::block_on as wait;
        let s = MemoryStore::with_history(3, usize::MAX);
        let all = KeyRange::default();
        wait(s.put(b"a", b"1", Condition::None)).unwrap(); // 1
        let items = [
            PutItem {
                key: b"b",
                value: b"2",
                cond: Condition::None,
            },
            PutItem {
                key: b"c",
                value: b"2",
                cond: Condition::None,
            },
        ];
        wait(s.put_many(&items)).unwrap(); // 2 (two events)
        assert_eq!(
            s.events(&all, 0, PageLimits::events(10))
                .unwrap()
                .events
                .len(),
            3
        );
        wait(s.put(b"d", b"3", Condition::None)).unwrap(); // 3: revision 1 goes
        assert_eq!(
            s.events(&all, 0, PageLimits::events(10)),
            Err(StoreError::Compacted { oldest_revision: 2 })
        );
        assert_eq!(
            s.events(&all, 1, PageLimits::events(10))
                .unwrap()
                .events
                .len(),
            3
        );
        wait(s.put(b"e", b"4", Condition::None)).unwrap(); // 4: revision 2 goes, whole
        assert_eq!(
            s.events(&all, 1, PageLimits::events(10)),
            Err(StoreError::Compacted { oldest_revision: 3 })
        );
        let page = s.events(&all, 2, PageLimits::events(10)).unwrap();
        assert_eq!(page.events.len(), 2);
        assert_eq!(page.through, 4);
        assert_eq!(s.read().history.len().0, 2);
    }
}
