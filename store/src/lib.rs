//! capkv storage, behind one trait.
//!
//! - [`Store`]: what the server needs from an engine. Plain Rust types only: no engine type
//!   (and no wire type) appears in it, so engines can be swapped and tested alike.
//! - [`memory::MemoryStore`]: an ordered, concurrency-safe in-memory engine (dev, tests).
//! - [`logged::LoggedStore`]: the memory engine made durable by a write-ahead log of each
//!   write group's effects, with snapshots (data that fits in memory, at Redis's cost).
//! - The durable engine (RocksDB) is the crate `capkv-store-rocks`, beside this one, and
//!   the replicated one (an etcd cluster) `capkv-store-etcd`: this crate links no engine,
//!   so what needs only the trait escapes RocksDB's C++ build and etcd's gRPC client.
//! - [`ring`]: a watch history in memory (the memory engine's, and each etcd gateway's).
//! - [`write`](mod@write): writes as values, one type per kind (`write::Put`, ...) with its outcome
//!   type; `store.apply(write::Put { .. }, idem)` answers with a [`PutOutcome`]. Engines
//!   take them as one [`WriteOp`] enum (their commit queues hold every kind).
//! - [`Pending`]: what a write returns, a future of its outcome, so that a server can have
//!   many writes waiting on one group commit without blocking its threads.
//! - [`history`]: the events writes produce, kept for a window, which watchers read in
//!   revision order ([`Store::events`]), and [`Changes`], what they wait on.
//! - [`committer`]: the scheduling policy of the engines' committer threads.
//! - [`conformance`]: the behaviour every engine must show, written once and run against
//!   each engine from `tests/`.
//!
//! Semantics (shared by every engine):
//! - Keys are ordered by their bytes. Each key has a `version`: 1 after its first put,
//!   +1 per later put; a delete ends it and a later put starts again at 1.
//! - The store has one `revision` counter, +1 for every write that changes something.
//!   A put records the revision it produced as the key's `mod_revision`. A batch
//!   (`put_many`) is one write: all its keys share one new revision.
//! - A write with a condition that does not hold changes nothing; in a batch, nothing of
//!   the batch.
//!
//! The engine does not validate sizes: the server's limits do that before any work.

pub mod committer;
pub mod conformance;
pub mod history;
pub mod lease;
pub mod logged;
pub mod memory;
mod pending;
pub mod records;
pub mod ring;
mod sorted;
pub mod write;

pub use history::{Changes, Event, EventKind, EventPage, KeyRange, PageLimits};
pub use lease::LeaseInfo;
pub use memory::MemoryStore;
pub use pending::{Completer, Pending};
pub use write::{IdempotencyKey, IncrementOutcome, Write, WriteOp, WriteOutcome};

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    /// Empty when the scan asked for keys only.
    pub value: Vec<u8>,
    pub version: u64,
    pub mod_revision: u64,
}

/// What [`Store::get_into`] read of an entry besides its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub version: u64,
    pub mod_revision: u64,
}

/// Precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    None,
    /// The key's version must equal this; 0 means the key must not exist.
    IfVersion(u64),
    /// The key must not exist.
    IfAbsent,
}

impl Condition {
    /// Whether the condition holds for a key whose current version is `current`
    /// (`None` = absent).
    pub fn holds(self, current: Option<u64>) -> bool {
        match self {
            Condition::None => true,
            Condition::IfVersion(v) => current.unwrap_or(0) == v,
            Condition::IfAbsent => current.is_none(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub version: u64,
    pub revision: u64,
    /// The lease the key is attached to now (0: none).
    pub lease: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub existed: bool,
    /// The store revision after the call (unchanged when nothing was deleted).
    pub revision: u64,
}

/// What to scan. Bounds are byte strings; `start` is inclusive, `end` exclusive.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanRequest {
    pub start: Vec<u8>,
    /// `None` = no upper bound.
    pub end: Option<Vec<u8>>,
    /// At most this many entries (must be ≥ 1).
    pub limit: usize,
    /// Stop after the entry that brings the page's key + value bytes to this or more.
    /// Always at least one entry is returned when one exists, so a scan makes progress.
    pub max_bytes: usize,
    pub keys_only: bool,
    /// Read the range as it was at this store revision (a later page of a scan whose
    /// first page was read there). Only engines that can read the past honour it
    /// ([`Store::scans_pin_revision`]); the others read the latest state.
    pub revision: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ScanPage {
    pub entries: Vec<Entry>,
    /// Whether keys remain in the range after the last entry.
    pub more: bool,
    /// The store revision the page was read at.
    pub revision: u64,
}

/// One write of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutItem<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub cond: Condition,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Each key's new version, in item order.
    pub versions: Vec<u64>,
    /// The revision of the batch.
    pub revision: u64,
}

/// Failures of an engine. Condition failures are not errors of the engine: they are part
/// of the outcome and reported as [`StoreError::ConditionFailed`] so that callers cannot
/// mistake them for success.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// `index` is the item of a batch whose condition failed (0 for single writes).
    #[error("condition failed at item {index} (current version {current_version:?})")]
    ConditionFailed {
        index: usize,
        current_version: Option<u64>,
    },
    /// The idempotency key was used before, in this session, for a different write.
    #[error("idempotency key reused with different parameters")]
    IdempotencyKeyReused,
    /// An increment met a value that is not a decimal i64, or would overflow one.
    #[error("value is not an integer, or the result would overflow")]
    NotAnInteger,
    /// The engine's write queue is full: back off and retry (nothing was written).
    #[error("storage busy: {0}")]
    Busy(String),
    /// The engine cannot serve right now (closed, a failing disk...): retry later.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The disk is (nearly) full: the write was refused before it reached the engine (or
    /// failed for space) and nothing was written. Reads and deletes go on.
    #[error("storage full: {0}")]
    StorageFull(String),
    /// The request cannot be done as asked (e.g. a checkpoint into an existing directory,
    /// or on an engine without files); the message is safe to show the caller.
    #[error("{0}")]
    Invalid(String),
    /// The lease named does not exist (never granted, expired or revoked).
    #[error("lease {id:x} not found")]
    LeaseNotFound { id: u64 },
    /// The history no longer holds every revision after the one asked for; a watch can
    /// start at `oldest_revision` at the earliest (see [`history`]).
    #[error("history compacted: the oldest revision still available is {oldest_revision}")]
    Compacted { oldest_revision: u64 },
    /// An unexpected failure (corruption, a bug). The message is for logs, not clients.
    #[error("storage failure: {0}")]
    Internal(String),
}

/// Engine statistics for metrics. Engines without a notion report 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StoreStats {
    /// Estimated bytes of live data on disk.
    pub live_data_bytes: u64,
    /// Bytes compaction still has to rewrite to reach its targets.
    pub pending_compaction_bytes: u64,
    /// Bytes in memtables (active and immutable).
    pub memtable_bytes: u64,
    /// WAL syncs (fsyncs) since open.
    pub wal_syncs: u64,
    /// Write groups committed since open (one WriteBatch each).
    pub commit_groups: u64,
    /// Writes (single or batch calls) committed since open.
    pub commits: u64,
    /// 1 while the engine stops writes to let compaction catch up, else 0.
    pub write_stopped: u64,
    /// The rate (bytes/s) writes are being slowed to; 0 when not slowed.
    pub delayed_write_rate: u64,
    /// Writes waiting for the committer right now.
    pub write_queue_len: u64,
    /// Writes answered from an idempotency record since open (nothing written again).
    pub idempotent_replays: u64,
    /// Idempotency records a memory engine dropped for room (`storage.memory_max_records`)
    /// before they expired, since open.
    pub records_evicted: u64,
    /// Free-space state, for engines that keep files.
    pub space: Option<SpaceStats>,
}

/// The free-space state of an engine's disk (capkv-store-rocks' `space` module).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpaceStats {
    /// Bytes free on the data directory's filesystem at the last check.
    pub free_bytes: u64,
    /// Writes are refused for space (below the watermark, or open read-only).
    pub low: bool,
    /// Opened read-only because the disk was too full to recover.
    pub read_only: bool,
    /// Writes refused for space since open.
    pub refused_writes: u64,
    /// Size of the reserve file now (0 once released).
    pub reserve_bytes: u64,
}

/// What a `getMany` reads: the entries in the keys' order (`None`: absent), and the
/// revision they were read at.
pub type ManyRead = (Vec<Option<Entry>>, u64);

/// [`Store::get_many`] of an engine whose own [`Store::get_many_within`] does the reading:
/// that, with no bound.
pub fn get_many_unbounded<S: Store + ?Sized>(
    store: &S,
    keys: &[&[u8]],
) -> Result<ManyRead, StoreError> {
    store
        .get_many_within(keys, usize::MAX)?
        .ok_or_else(|| StoreError::Internal("a read with no bound was over it".into()))
}

/// Key and value bytes of the entries found: what a `getMany` answer carries.
pub fn payload_bytes(entries: &[Option<Entry>]) -> usize {
    entries
        .iter()
        .flatten()
        .map(|e| e.key.len() + e.value.len())
        .sum()
}

/// The storage contract. Implementations are shared by all server workers, hence
/// `Send + Sync`, and must make every method atomic with respect to the others.
///
/// Reads are synchronous for the local engines (memory or block-cache lookups); an engine
/// that reads over the network says so ([`reads_complete_at_once`](Store::reads_complete_at_once))
/// and the server uses its `_async` reads. Writes return a
/// [`Pending`], resolved once the write is durable as configured (for RocksDB with
/// `sync`, after its WAL is synced); dropping it does not cancel the write.
pub trait Store: Send + Sync {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError>;
    /// [`get`](Self::get) for the caller that has the key and a buffer: the value is
    /// written into `value` (cleared first), so that serving a get allocates nothing (the
    /// memory engine copies it once, under its lock). Default: by `get`.
    fn get_into(&self, key: &[u8], value: &mut Vec<u8>) -> Result<Option<Found>, StoreError> {
        value.clear();
        Ok(self.get(key)?.map(|e| {
            value.extend_from_slice(&e.value);
            Found {
                version: e.version,
                mod_revision: e.mod_revision,
            }
        }))
    }
    /// A hint that `keys` are about to be read or written: an engine may start loading
    /// them (the memory engine prefetches their entries into the CPU cache, all at once).
    /// Never blocks, never fails; the default does nothing.
    fn prefetch(&self, _keys: &[&[u8]]) {}
    /// Applies one write, idempotently when `idem` is given (see [`write`](mod@write)).
    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome>;
    /// Called once by each server worker thread before it serves: the thread will call
    /// [`worker_idle`](Self::worker_idle) whenever it runs out of ready work, so an engine
    /// may defer committing the writes it submits until then (the memory-log engine groups
    /// a worker's pass into one sync).
    fn worker_started(&self) {}
    /// The calling worker has run through its ready work and is about to wait for I/O.
    fn worker_idle(&self) {}
    fn put(&self, key: &[u8], value: &[u8], cond: Condition) -> Pending<PutOutcome> {
        let w = write::Put {
            key: key.to_vec(),
            value: value.to_vec(),
            cond,
            attach: write::Attach::None,
        };
        typed(w, |op| self.write(op, None))
    }
    fn delete(&self, key: &[u8], cond: Condition) -> Pending<DeleteOutcome> {
        let w = write::Delete {
            key: key.to_vec(),
            cond,
        };
        typed(w, |op| self.write(op, None))
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError>;
    /// Whether [`scan`](Self::scan) honours [`ScanRequest::revision`], so that the pages of
    /// one scan can all be read at its first page's revision (etcd keeps the past until
    /// it is compacted: a page whose revision is gone is [`StoreError::Compacted`]).
    /// Default: false, every page reads the latest state.
    fn scans_pin_revision(&self) -> bool {
        false
    }
    /// Reads several keys at one revision; returns them in `keys` order, and the revision.
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError>;
    /// [`get_many`](Self::get_many) for an answer of at most `max_payload_bytes` of keys
    /// and values (those found, counted by [`payload_bytes`]): `Ok(None)` when they hold
    /// more. Why: a thousand keys of a megabyte each would be copied, a gigabyte, before an
    /// answer a few megabytes long is refused; an engine that knows its entries' sizes
    /// before copying them counts first. The default reads, then counts.
    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<ManyRead>, StoreError> {
        let (entries, revision) = self.get_many(keys)?;
        Ok((payload_bytes(&entries) <= max_payload_bytes).then_some((entries, revision)))
    }
    /// Applies `items` atomically as one write. Keys must be distinct (callers check);
    /// conditions are checked against the state before the batch.
    fn put_many(&self, items: &[PutItem<'_>]) -> Pending<BatchOutcome> {
        let items = items
            .iter()
            .map(|i| (i.key.to_vec(), i.value.to_vec(), i.cond))
            .collect();
        typed(write::PutMany { items }, |op| self.write(op, None))
    }
    /// Whether reads are answered on the calling thread at once (memory or block-cache
    /// lookups: the local engines, the default). An engine that reads over the network
    /// (etcd) says false: the server then reads through the `_async` forms below, so that
    /// no worker thread ever blocks on a network read, and its synchronous reads, which
    /// block the caller, are left to tools and tests.
    fn reads_complete_at_once(&self) -> bool {
        true
    }
    /// [`get`](Self::get) as a [`Pending`]; the default answers at once.
    fn get_async(&self, key: &[u8]) -> Pending<Option<Entry>> {
        Pending::ready(self.get(key))
    }
    /// [`scan`](Self::scan) as a [`Pending`]; the default answers at once.
    fn scan_async(&self, req: &ScanRequest) -> Pending<ScanPage> {
        Pending::ready(self.scan(req))
    }
    /// [`get_many`](Self::get_many) as a [`Pending`]; the default answers at once.
    fn get_many_async(&self, keys: &[&[u8]]) -> Pending<(Vec<Option<Entry>>, u64)> {
        Pending::ready(self.get_many(keys))
    }
    /// [`lease_keep_alive`](Self::lease_keep_alive) as a [`Pending`]; the default answers
    /// at once.
    fn lease_keep_alive_async(&self, id: u64) -> Pending<LeaseInfo> {
        Pending::ready(self.lease_keep_alive(id))
    }
    /// [`lease_info`](Self::lease_info) as a [`Pending`]; the default answers at once.
    fn lease_info_async(&self, id: u64) -> Pending<LeaseInfo> {
        Pending::ready(self.lease_info(id))
    }
    /// The current store revision.
    fn revision(&self) -> Result<u64, StoreError>;
    /// Renews lease `id` to its full TTL ([`lease`]); not a write: deadlines live in memory.
    fn lease_keep_alive(&self, id: u64) -> Result<LeaseInfo, StoreError>;
    /// Lease `id` as it is now.
    fn lease_info(&self, id: u64) -> Result<LeaseInfo, StoreError>;
    /// Leases alive, and the earliest deadline among them (when the server's reaper should
    /// send the next `ExpireLeases`).
    fn lease_clock(&self) -> (usize, Option<std::time::Instant>);
    /// The events of the revisions after `after` for keys in `range`, in revision order,
    /// as one [`history::page`] within `max` (whole revisions); or
    /// [`StoreError::Compacted`] when some revision after `after` is no longer kept.
    fn events(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
    ) -> Result<EventPage, StoreError>;
    /// The revision watchers wait on (published once a write is visible to `events`).
    fn changes(&self) -> &Changes;
    /// A short engine name for logs and `--print-config`.
    fn engine_name(&self) -> &'static str;
    /// Engine statistics (cheap: a few property reads).
    fn stats(&self) -> StoreStats {
        StoreStats::default()
    }
    /// A secret of this store's data, created with it and kept as long as the data (the
    /// server signs session tokens with it, so a token outlives a restart exactly as long
    /// as the idempotency records it scopes).
    fn instance_secret(&self) -> [u8; 32];
    /// Why writes are refused right now (a full disk), or `None` when they are taken.
    /// Cheap: the server asks on every readiness probe.
    fn write_refusal(&self) -> Option<String> {
        None
    }
    /// Compacts everything now (blocking; run it off the serving threads). Engines without
    /// compaction return at once.
    fn compact(&self) -> Result<(), StoreError> {
        Ok(())
    }
    /// Writes a consistent copy of the whole store into `dir`, which must not exist yet,
    /// usable as the data dir of a new server (a backup). Blocking, like `compact`.
    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        let _ = dir;
        Err(StoreError::Invalid(format!(
            "the {} engine keeps no files to checkpoint",
            self.engine_name()
        )))
    }
}

/// The [`Store`] methods of history and leases, each forwarded to the store in `self.$field`:
/// for wrappers of a store that change some other method (tests, mostly).
#[macro_export]
macro_rules! forward_history_and_leases {
    ($field:tt) => {
        fn events(
            &self,
            range: &$crate::KeyRange,
            after: u64,
            max: $crate::PageLimits,
        ) -> Result<$crate::EventPage, $crate::StoreError> {
            self.$field.events(range, after, max)
        }
        fn changes(&self) -> &$crate::Changes {
            self.$field.changes()
        }
        fn lease_keep_alive(&self, id: u64) -> Result<$crate::LeaseInfo, $crate::StoreError> {
            self.$field.lease_keep_alive(id)
        }
        fn lease_info(&self, id: u64) -> Result<$crate::LeaseInfo, $crate::StoreError> {
            self.$field.lease_info(id)
        }
        fn lease_clock(&self) -> (usize, Option<std::time::Instant>) {
            self.$field.lease_clock()
        }
    };
}

/// A checkpoint goes into a directory that does not exist yet (every engine says it alike).
pub fn checkpoint_target_is_free(dir: &std::path::Path) -> Result<(), StoreError> {
    if dir.exists() {
        return Err(StoreError::Invalid(format!(
            "checkpoint directory {} already exists",
            dir.display()
        )));
    }
    Ok(())
}

/// What a write refused by a full or closed commit queue gets (every engine with a
/// committer thread says it alike).
pub fn queue_refusal<T>(e: &std::sync::mpsc::TrySendError<T>) -> StoreError {
    match e {
        std::sync::mpsc::TrySendError::Full(_) => {
            StoreError::Busy("the write queue is full; retry shortly".into())
        }
        std::sync::mpsc::TrySendError::Disconnected(_) => {
            StoreError::Unavailable("storage is closed".into())
        }
    }
}

impl dyn Store + '_ {
    /// Applies a write of one kind, idempotently when `idem` is given, and answers with
    /// that kind's outcome (`Put` → [`PutOutcome`], ...): what the server's handlers call.
    pub fn apply<W: Write>(&self, w: W, idem: Option<IdempotencyKey>) -> Pending<W::Outcome> {
        typed(w, |op| self.write(op, idem))
    }
}

/// Sends `w` through an engine's untyped `write` and takes its own outcome back out.
fn typed<W: Write>(
    w: W,
    write: impl FnOnce(WriteOp) -> Pending<WriteOutcome>,
) -> Pending<W::Outcome> {
    write(w.into()).map_write(W::outcome)
}
