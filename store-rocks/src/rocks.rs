//! The durable engine: RocksDB, with group commit.
//!
//! On-disk layout (column families):
//! - `data`: user key → `[version u64 BE][mod_revision u64 BE][value bytes]`.
//! - `meta`: `revision` → u64 BE (written in the same WriteBatch as the data it counts, so
//!   the two can never disagree); `format` → u64 BE, the layout version of this file.
//! - `idempotency`: record key → `[expires_at_unix_ms u64 BE][payload]`. A compaction filter
//!   drops records whose expiry has passed, so they cost nothing once compacted away.
//! - `history`: the watch history (see `capkv_store::history`), `[revision u64 BE][index
//!   u32 BE]` → `[kind u8: 1 put, 0 delete][version u64 BE][key length u32 BE][key][value]`,
//!   written in the same WriteBatch as the write whose events they are. The committer keeps
//!   the latest `history_revisions` revisions and at most `history_events` events (a batch
//!   of a thousand puts is one revision of a thousand events): past either (and a tenth
//!   more, so that trimming is one range delete per many commits) it deletes the oldest
//!   revisions, whole, in the batch of a commit, with `meta`'s `history_compacted`, the
//!   revision through which history is gone. It counts events per kept revision in memory
//!   (rebuilt from the keys of `history` at open).
//! - `leases`: lease id u64 BE → TTL ms u64 BE; `lease_keys`: `[lease id u64 BE][key]` →
//!   empty, each key's lease (see `capkv_store::lease`). Written by the writes that grant,
//!   attach, detach and revoke; loaded at open, when every lease starts its full TTL again.
//!
//! Writes: every write is sent, over a bounded queue, to one committer thread. The
//! committer takes what is queued (up to `group_commit_max_writes`, waiting at most
//! `group_commit_max_wait_us` for more), checks each write's condition against the stored
//! state plus the writes before it in the same group, and commits the whole group as one
//! WriteBatch with one WAL sync. Only then is any write of the group acknowledged. One
//! writer thread is what makes versions, conditions and the revision counter simple: there
//! is no read-modify-write race to lock against. A full queue refuses a write at once
//! ([`StoreError::Busy`]) instead of blocking a server thread.
//!
//! Disk space: a [`SpaceGuard`] refuses writes (not deletes) before the disk is full and
//! keeps a reserve file to release when it is (see [`crate::space`]). When RocksDB cannot
//! even recover on a full disk, [`open_or_read_only`] serves reads from a read-only
//! instance and reopens read-write once there is room ([`crate::recovering`]).
//!
//! Reads go straight to RocksDB from the caller's thread. `get_many` and `scan` read through
//! one snapshot, which also supplies the revision they report, so a page and its revision
//! always match.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rocksdb::compaction_filter::Decision;
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, ErrorKind, Options,
    ReadOptions, WriteBatch, WriteOptions, DB,
};

use crate::space::{SpaceGuard, SpaceOptions};
use capkv_store::history;
use capkv_store::lease::{LeaseInfo, Leases};
use capkv_store::write::{self, incremented, now_unix_ms, recordable, Record};
use capkv_store::write::{Attach, LeaseGranted, RevokeOutcome};
use capkv_store::Completer;
use capkv_store::{
    BatchOutcome, Changes, DeleteOutcome, Entry, Event, EventPage, IdempotencyKey,
    IncrementOutcome, KeyRange, PageLimits, Pending, PutOutcome, ScanPage, ScanRequest, Store,
    StoreError, StoreStats, WriteOp, WriteOutcome,
};

const CF_DATA: &str = "data";
const CF_META: &str = "meta";
const CF_IDEMPOTENCY: &str = "idempotency";
const CF_HISTORY: &str = "history";
const CF_LEASES: &str = "leases";
const CF_LEASE_KEYS: &str = "lease_keys";
const KEY_REVISION: &[u8] = b"revision";
const KEY_FORMAT: &[u8] = b"format";
const KEY_SECRET: &[u8] = b"instance_secret";
const KEY_HISTORY_COMPACTED: &[u8] = b"history_compacted";
/// Layout version written by this build; bump it when the encoding above changes.
const FORMAT_VERSION: u64 = 1;
/// Least `max_total_wal_bytes`: below it memtables would be flushed every few writes.
pub const MIN_TOTAL_WAL_BYTES: u64 = 1 << 20;
/// Most `wal_recycle_files`: each keeps up to a WAL file's size of disk.
pub const MAX_WAL_RECYCLE_FILES: usize = 16;
/// The idempotency records' memtable bloom filter, as a share of the write buffer.
const RECORDS_MEMTABLE_BLOOM_RATIO: f64 = 0.1;
/// Bytes before the value in a `data` record.
const HEADER_BYTES: usize = 16;
/// Revisions of watch history kept by default: at a few thousand writes a second, minutes
/// of it, for watchers that reconnect; on disk, about its writes' own size.
pub const DEFAULT_HISTORY_REVISIONS: u64 = 1_000_000;
/// Events of watch history kept by default: about a hundred-odd megabytes on disk with
/// 100-byte values, however large the batches.
pub const DEFAULT_HISTORY_EVENTS: u64 = 1_000_000;

/// How to open and run the engine. [`RocksOptions::new`] gives the production defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RocksOptions {
    pub path: PathBuf,
    /// Sync the WAL before acknowledging a write. Off, an acknowledged write survives a
    /// process crash (it is in the OS page cache) but not a power loss.
    pub sync: bool,
    /// Most writes (batch items count each) gathered into one commit; 1 = no group commit.
    pub group_commit_max_writes: usize,
    /// How long the committer waits for more writes once it has one; 0 = take only what is
    /// already queued (the writes that arrived during the previous sync).
    pub group_commit_max_wait_us: u64,
    /// Writes waiting for the committer; past it writes are refused with `Busy`.
    pub write_queue_depth: usize,
    /// Full compaction every this many seconds; 0 = only RocksDB's own compactions.
    pub compaction_interval_s: u64,
    /// Shared block cache for reads.
    pub block_cache_bytes: usize,
    /// Free-space watermark, reserve file and how often space is measured.
    pub space: SpaceOptions,
    /// Revisions whose events the watch history keeps (at least 1).
    pub history_revisions: u64,
    /// Events the watch history keeps at most (at least 1), whatever the revisions.
    pub history_events: u64,
    /// WAL bytes past which RocksDB flushes the memtables holding the oldest WAL file, so
    /// that it can go (or be recycled): bounds recovery time and the WAL's disk.
    pub max_total_wal_bytes: u64,
    /// Retired WAL files kept to be written over by new ones; 0 = none (see `open`).
    pub wal_recycle_files: usize,
    /// Run the committer as batch work, which does not preempt a worker when woken (see
    /// [`capkv_store::committer::yield_to_workers`]; off by default).
    pub committer_sched_batch: bool,
}

impl RocksOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            sync: true,
            group_commit_max_writes: 1024,
            group_commit_max_wait_us: 0,
            write_queue_depth: 16_384,
            compaction_interval_s: 6 * 3600,
            block_cache_bytes: 256 << 20,
            space: SpaceOptions::default(),
            history_revisions: DEFAULT_HISTORY_REVISIONS,
            history_events: DEFAULT_HISTORY_EVENTS,
            max_total_wal_bytes: 256 << 20,
            wal_recycle_files: 4,
            committer_sched_batch: false,
        }
    }

    fn validate(&self) -> Result<(), OpenError> {
        if self.max_total_wal_bytes < MIN_TOTAL_WAL_BYTES {
            return Err(OpenError::Options(format!(
                "max_total_wal_bytes must be at least {MIN_TOTAL_WAL_BYTES}"
            )));
        }
        if self.wal_recycle_files > MAX_WAL_RECYCLE_FILES {
            return Err(OpenError::Options(format!(
                "wal_recycle_files must be at most {MAX_WAL_RECYCLE_FILES}"
            )));
        }
        if self.group_commit_max_writes == 0 || self.group_commit_max_writes > 1_000_000 {
            return Err(OpenError::Options(
                "group_commit_max_writes must be in 1..=1000000".into(),
            ));
        }
        if self.group_commit_max_wait_us > 1_000_000 {
            return Err(OpenError::Options(
                "group_commit_max_wait_us must be at most 1000000 (1 s)".into(),
            ));
        }
        if self.write_queue_depth == 0 || self.write_queue_depth > 1_000_000 {
            return Err(OpenError::Options(
                "write_queue_depth must be in 1..=1000000".into(),
            ));
        }
        if self.history_events == 0 {
            return Err(OpenError::Options(
                "history_events must be at least 1".into(),
            ));
        }
        if self.history_revisions == 0 {
            return Err(OpenError::Options(
                "history_revisions must be at least 1".into(),
            ));
        }
        if self.space.check_interval.is_zero() {
            return Err(OpenError::Options(
                "the free-space check interval must be > 0".into(),
            ));
        }
        Ok(())
    }
}

/// Why the engine could not open. Each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("data directory {path} is in use by another process (its LOCK file is held); stop that process or choose another data directory ({detail})")]
    Locked { path: String, detail: String },
    #[error("data in {path} is corrupt ({detail}); restore it from a backup, or move the directory aside to start empty")]
    Corrupt { path: String, detail: String },
    #[error("cannot open data directory {path}: {detail}")]
    Io { path: String, detail: String },
    #[error("the disk holding {path} is full ({detail}); free space on it")]
    NoSpace { path: String, detail: String },
    #[error(
        "data directory {path} holds storage format {found}; this build reads format {expected}"
    )]
    Format {
        path: String,
        found: u64,
        expected: u64,
    },
    #[error("data directory {path} holds a memory-log engine's log; start with --engine memory-log, or choose another data directory")]
    WrongEngine { path: String },
    #[error("invalid storage options: {0}")]
    Options(String),
    #[error("cannot start a storage thread: {0}")]
    Thread(std::io::Error),
}

impl OpenError {
    fn from_rocks(path: &Path, e: rocksdb::Error) -> Self {
        let path = path.display().to_string();
        let detail = e.into_string();
        // RocksDB reports a held lock as an IO error naming the LOCK file, both for another
        // process ("While lock file") and for this one ("lock hold by current process").
        if detail.contains("lock file") || detail.contains("lock hold") {
            return OpenError::Locked { path, detail };
        }
        if detail.starts_with("Corruption") {
            return OpenError::Corrupt { path, detail };
        }
        if is_no_space(&detail) {
            return OpenError::NoSpace { path, detail };
        }
        OpenError::Io { path, detail }
    }
}

/// Counters shared by the committer and readers of [`Store::stats`].
#[derive(Debug, Default)]
struct Counters {
    /// The revision of the last committed group.
    revision: AtomicU64,
    wal_syncs: AtomicU64,
    commit_groups: AtomicU64,
    commits: AtomicU64,
    queued: AtomicU64,
    /// Writes answered from an idempotency record.
    replays: AtomicU64,
    /// Failpoint: the next commit fails as RocksDB's write would (tests only).
    #[cfg(test)]
    fail_next_commit: std::sync::atomic::AtomicBool,
    /// Failpoint: the Nth version lookup from now fails as a RocksDB read would; 0 is off
    /// (tests only).
    #[cfg(test)]
    fail_version_lookup: AtomicU64,
}

/// The durable engine. Dropping it commits what is queued and closes the database.
pub struct RocksStore {
    db: Arc<DB>,
    counters: Arc<Counters>,
    space: Arc<SpaceGuard>,
    /// Opened read-only (the disk was too full to recover): every write is refused.
    read_only: bool,
    /// Dropping it stops the free-space checks.
    stop_space: Option<mpsc::Sender<()>>,
    space_checker: Option<JoinHandle<()>>,
    /// `None` only while dropping.
    writes: Option<SyncSender<Op>>,
    committer: Option<JoinHandle<()>>,
    /// Dropping it stops the compaction thread.
    stop_compactor: Option<mpsc::Sender<()>>,
    compactor: Option<JoinHandle<()>>,
    sync: bool,
    path: PathBuf,
    secret: [u8; 32],
    /// Published by the committer after each commit (shared with a `Recovering` wrapper,
    /// so that watchers keep waiting on one across a reopen).
    changes: Arc<Changes>,
    /// Opened read-only from files without a history column family.
    no_history: bool,
    /// Lease state, shared with the committer (which changes it with the writes).
    leases: Arc<std::sync::Mutex<Leases>>,
}

impl std::fmt::Debug for RocksStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksStore")
            .field("path", &self.path)
            .field("sync", &self.sync)
            .finish_non_exhaustive()
    }
}

fn expired_record_filter(_level: u32, _key: &[u8], value: &[u8]) -> Decision {
    match value.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
        Some(b) if u64::from_be_bytes(b) > now_unix_ms() => Decision::Keep,
        // Expired, or too short to hold an expiry: no reader could use it.
        _ => Decision::Remove,
    }
}

/// Reads the `meta` records an open needs: checks the layout version and returns the
/// revision, the instance secret and the revision through which the watch history is gone
/// (for files from before the history, the revision at this open: their history starts
/// now). `writable`: a new database gets its version, a fresh secret and that revision
/// written; read-only, a missing version or secret is corruption.
fn read_meta(db: &DB, path: &Path, writable: bool) -> Result<(u64, [u8; 32], u64), OpenError> {
    let shown = path.display().to_string();
    let corrupt = |detail: String| OpenError::Corrupt {
        path: shown.clone(),
        detail,
    };
    let meta = db
        .cf_handle(CF_META)
        .ok_or_else(|| corrupt("column family `meta` missing".into()))?;
    let put_synced = |key: &[u8], value: &[u8]| {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.put_cf_opt(meta, key, value, &wo)
            .map_err(|e| OpenError::from_rocks(path, e))
    };
    match read_u64(db, meta, KEY_FORMAT).map_err(corrupt)? {
        Some(FORMAT_VERSION) => {}
        None if writable => put_synced(KEY_FORMAT, &FORMAT_VERSION.to_be_bytes())?,
        found => {
            return Err(OpenError::Format {
                path: shown,
                found: found.unwrap_or(0),
                expected: FORMAT_VERSION,
            })
        }
    }
    let revision = read_u64(db, meta, KEY_REVISION)
        .map_err(corrupt)?
        .unwrap_or(0);
    let secret = match db.get_pinned_cf(meta, KEY_SECRET) {
        Ok(Some(v)) => <[u8; 32]>::try_from(&v[..])
            .map_err(|_| corrupt("instance secret is not 32 bytes".into()))?,
        Ok(None) if writable => {
            let fresh: [u8; 32] = rand::random();
            put_synced(KEY_SECRET, &fresh)?;
            fresh
        }
        Ok(None) => return Err(corrupt("instance secret missing".into())),
        Err(e) => return Err(OpenError::from_rocks(path, e)),
    };
    let history_compacted = match read_u64(db, meta, KEY_HISTORY_COMPACTED).map_err(corrupt)? {
        Some(r) => r,
        None if writable => {
            put_synced(KEY_HISTORY_COMPACTED, &revision.to_be_bytes())?;
            revision
        }
        None => revision,
    };
    Ok((revision, secret, history_compacted))
}

fn read_u64(db: &DB, cf: &ColumnFamily, key: &[u8]) -> Result<Option<u64>, String> {
    match db.get_pinned_cf(cf, key).map_err(|e| e.into_string())? {
        None => Ok(None),
        Some(v) => <[u8; 8]>::try_from(&v[..])
            .map(|b| Some(u64::from_be_bytes(b)))
            .map_err(|_| {
                format!(
                    "meta record {:?} is not 8 bytes",
                    String::from_utf8_lossy(key)
                )
            }),
    }
}

impl RocksStore {
    /// Opens (creating if needed) the database at `opts.path` and starts its threads.
    pub fn open(opts: RocksOptions) -> Result<Self, OpenError> {
        Self::open_with_changes(opts, Arc::default())
    }

    /// [`open`](Self::open), publishing its revisions to `changes` (which watchers of an
    /// earlier instance of the same data may be waiting on).
    pub fn open_with_changes(opts: RocksOptions, changes: Arc<Changes>) -> Result<Self, OpenError> {
        opts.validate()?;
        let path = opts.path.clone();
        let shown = path.display().to_string();
        if path.exists() && !path.is_dir() {
            return Err(OpenError::Io {
                path: shown,
                detail: "it exists and is not a directory".into(),
            });
        }
        // An empty store opened over another engine's files would look like lost data.
        if capkv_store::logged::holds_a_log(&path) {
            return Err(OpenError::WrongEngine { path: shown });
        }
        std::fs::create_dir_all(&path).map_err(|e| OpenError::Io {
            path: shown.clone(),
            detail: e.to_string(),
        })?;
        // Measured before RocksDB opens: on a low disk the reserve goes first, so that
        // recovery finds room.
        let space = Arc::new(SpaceGuard::new(&path, opts.space.clone()));

        let mut db_opts = Options::default();
        db_opts.create_if_missing(true);
        db_opts.create_missing_column_families(true);
        db_opts.set_max_background_jobs(2);
        db_opts.set_keep_log_file_num(5);
        // Bounds recovery time and WAL disk use: past it, RocksDB flushes the oldest
        // memtables so their WAL files can go. The families that hardly grow (`meta`'s one
        // revision key, leases) are flushed only by this, and until they are every WAL
        // file stays: the bound is also when WAL files first retire and can be recycled.
        db_opts.set_max_total_wal_size(opts.max_total_wal_bytes);
        // A new WAL file written over a retired one, rather than grown from nothing: its
        // size does not change with each append, so each sync writes the data and not the
        // file's inode too (on this VM's ext4, a file growing by 350 bytes a sync took
        // 4-5k syncs a second, one already full-sized 6-8k). It starts once WAL files
        // retire (after `max_total_wal_bytes` of WAL): four kept cover the WAL files a
        // 256 MiB bound holds with 64 MiB memtables. Measured after a 40 s warm-up, 50
        // durable writers over 100k keys: 1.04-1.38x puts/s against no recycling (4 A/B
        // rounds, same binary), server CPU per put equal or lower in each; one writer
        // 0.90-1.23x (noise). A 64 MiB bound starts it sooner but added ~1 ms to the p99
        // at 50 writers (more flushes), so the bound stays at 256 MiB.
        db_opts.set_recycle_log_file_num(opts.wal_recycle_files);

        let cache = Cache::new_lru_cache(opts.block_cache_bytes);
        let mut table = BlockBasedOptions::default();
        table.set_block_cache(&cache);
        // Point reads dominate: a bloom filter skips files that cannot hold the key.
        table.set_bloom_filter(10.0, false);
        let mut data_opts = Options::default();
        data_opts.set_block_based_table_factory(&table);
        let mut idem_opts = Options::default();
        idem_opts.set_compaction_filter("capkv-expired-records", expired_record_filter);
        // Every keyed write looks its record up first, and almost always finds none: a
        // bloom filter answers that without reading each file's index (once records have
        // left the memtable, on any run longer than a few minutes), from the same cache.
        idem_opts.set_block_based_table_factory(&table);
        // ... and before that, in the memtable: a whole-key bloom filter there answers the
        // usual miss without a skiplist search through every record written since the last
        // flush (that search was ~10% of a keyed durable put's server CPU). 10% of the
        // write buffer: ~100 bits a record at 64 MiB of ~120-byte records. Measured, 50
        // keyed writers over 100k keys: server user CPU per put lower in 9 of 9 A/B rounds
        // (e.g. 17.2 against 18.8 us), puts/s 0.98-1.09x. Without whole-key filtering a
        // memtable bloom serves only prefix seeks, which capkv never makes.
        idem_opts.set_memtable_prefix_bloom_ratio(RECORDS_MEMTABLE_BLOOM_RATIO);
        idem_opts.set_memtable_whole_key_filtering(true);

        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_DATA, data_opts),
            ColumnFamilyDescriptor::new(CF_META, Options::default()),
            ColumnFamilyDescriptor::new(CF_IDEMPOTENCY, idem_opts),
            ColumnFamilyDescriptor::new(CF_HISTORY, Options::default()),
            ColumnFamilyDescriptor::new(CF_LEASES, Options::default()),
            ColumnFamilyDescriptor::new(CF_LEASE_KEYS, Options::default()),
        ];
        let db = DB::open_cf_descriptors(&db_opts, &path, cfs)
            .map_err(|e| OpenError::from_rocks(&path, e))?;
        let db = Arc::new(db);

        let (revision, secret, history_compacted) = read_meta(&db, &path, true)?;
        let leases = Arc::new(std::sync::Mutex::new(load_leases(&db).map_err(
            |detail| OpenError::Corrupt {
                path: shown.clone(),
                detail,
            },
        )?));

        let counters = Arc::new(Counters::default());
        counters.revision.store(revision, Ordering::Release);
        changes.publish(revision);
        let (tx, rx) = mpsc::sync_channel(opts.write_queue_depth);
        let committer = Committer {
            db: Arc::clone(&db),
            rx,
            counters: Arc::clone(&counters),
            revision,
            sync: opts.sync,
            max_writes: opts.group_commit_max_writes,
            max_wait: Duration::from_micros(opts.group_commit_max_wait_us),
            space: Arc::clone(&space),
            changes: Arc::clone(&changes),
            history_revisions: opts.history_revisions,
            history_events_max: opts.history_events,
            history_index: history_index(&db).map_err(|detail| OpenError::Corrupt {
                path: shown.clone(),
                detail,
            })?,
            history_compacted,
            leases: Arc::clone(&leases),
            versions: Default::default(),
        };
        let batch = opts.committer_sched_batch;
        let committer = std::thread::Builder::new()
            .name("capkv-committer".into())
            .spawn(move || {
                capkv_store::committer::start_committer_thread(batch);
                committer.run()
            })
            .map_err(OpenError::Thread)?;

        let (stop_compactor, compactor) = if opts.compaction_interval_s > 0 {
            let db = Arc::clone(&db);
            let every = Duration::from_secs(opts.compaction_interval_s);
            let (stop, handle) = periodic("capkv-compactor", every, move || {
                let started = Instant::now();
                compact_all(&db);
                tracing::info!(
                    elapsed_ms = started.elapsed().as_millis() as u64,
                    "scheduled compaction done"
                );
            })?;
            (Some(stop), Some(handle))
        } else {
            (None, None)
        };
        let (stop_space, space_checker) = space_checks(&space)?;

        tracing::info!(path = %shown, revision, sync = opts.sync, "rocksdb opened");
        Ok(Self {
            db,
            counters,
            space,
            read_only: false,
            stop_space: Some(stop_space),
            space_checker: Some(space_checker),
            writes: Some(tx),
            committer: Some(committer),
            stop_compactor,
            compactor,
            sync: opts.sync,
            path,
            secret,
            changes,
            no_history: false,
            leases,
        })
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        cf(&self.db, name)
    }

    /// Opens the database at `opts.path` read-only: for a disk too full for RocksDB to
    /// recover read-write. Reads work; every write is refused with `StorageFull`.
    pub fn open_read_only(opts: &RocksOptions) -> Result<Self, OpenError> {
        let path = opts.path.clone();
        let shown = path.display().to_string();
        let space = Arc::new(SpaceGuard::new(&path, opts.space.clone()));
        let mut cfs = vec![CF_DATA, CF_META, CF_IDEMPOTENCY];
        // Files written before the watch history (and leases, which came with it) have
        // none to open.
        let no_history = !DB::list_cf(&Options::default(), &path)
            .map_err(|e| OpenError::from_rocks(&path, e))?
            .iter()
            .any(|cf| cf == CF_HISTORY);
        if !no_history {
            cfs.extend([CF_HISTORY, CF_LEASES, CF_LEASE_KEYS]);
        }
        let db = DB::open_cf_for_read_only(&Options::default(), &path, cfs, false)
            .map_err(|e| OpenError::from_rocks(&path, e))?;
        // Reads of the history take its compacted revision from `meta` in their snapshot.
        let (revision, secret, _) = read_meta(&db, &path, false)?;
        let counters = Arc::new(Counters::default());
        counters.revision.store(revision, Ordering::Release);
        let changes = Arc::new(Changes::new(revision));
        // Files from before leases have none.
        let leases = if no_history {
            Leases::default()
        } else {
            load_leases(&db).map_err(|detail| OpenError::Corrupt {
                path: shown.clone(),
                detail,
            })?
        };
        let leases = Arc::new(std::sync::Mutex::new(leases));
        tracing::warn!(path = %shown, revision, "rocksdb opened read-only");
        Ok(Self {
            db: Arc::new(db),
            counters,
            space,
            read_only: true,
            // The caller (`open_or_read_only`) checks space while it waits for room.
            stop_space: None,
            space_checker: None,
            writes: None,
            committer: None,
            stop_compactor: None,
            compactor: None,
            sync: opts.sync,
            path,
            secret,
            changes,
            no_history,
            leases,
        })
    }

    /// What watchers wait on, to share with a later instance of the same data.
    pub(crate) fn changes_shared(&self) -> Arc<Changes> {
        Arc::clone(&self.changes)
    }

    /// The free-space state of this store's disk.
    pub fn space(&self) -> &Arc<SpaceGuard> {
        &self.space
    }

    fn submit(&self, make: impl FnOnce(Completer<WriteOutcome>) -> Op) -> Pending<WriteOutcome> {
        if self.read_only {
            return Pending::ready(Err(StoreError::StorageFull(
                "the disk is full: storage is open read-only until there is room".into(),
            )));
        }
        let Some(tx) = &self.writes else {
            return Pending::ready(Err(StoreError::Unavailable("storage is closed".into())));
        };
        let (done, pending) = Pending::channel();
        self.counters.queued.fetch_add(1, Ordering::Relaxed);
        match tx.try_send(make(done)) {
            Ok(()) => pending,
            Err(e) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Pending::ready(Err(capkv_store::queue_refusal(&e)))
            }
        }
    }

    /// Writes an idempotency record directly (tests of the compaction filter).
    #[cfg(test)]
    fn put_record(&self, key: &[u8], expires_at_unix_ms: u64, payload: &[u8]) {
        let mut v = expires_at_unix_ms.to_be_bytes().to_vec();
        v.extend_from_slice(payload);
        self.db
            .put_cf(self.cf(CF_IDEMPOTENCY).unwrap(), key, v)
            .unwrap();
    }

    #[cfg(test)]
    fn has_record(&self, key: &[u8]) -> bool {
        self.db
            .get_pinned_cf(self.cf(CF_IDEMPOTENCY).unwrap(), key)
            .unwrap()
            .is_some()
    }

    fn snapshot_revision(&self, ro: &ReadOptions) -> Result<u64, StoreError> {
        self.snapshot_meta(ro, KEY_REVISION).map(|r| r.unwrap_or(0))
    }

    /// A `meta` counter as of `ro`'s snapshot.
    fn snapshot_meta(&self, ro: &ReadOptions, key: &[u8]) -> Result<Option<u64>, StoreError> {
        let meta = self.cf(CF_META)?;
        match self.db.get_pinned_cf_opt(meta, key, ro) {
            Ok(None) => Ok(None),
            Ok(Some(v)) => <[u8; 8]>::try_from(&v[..])
                .map(|b| Some(u64::from_be_bytes(b)))
                .map_err(|_| StoreError::Internal("meta counter is not 8 bytes".into())),
            Err(e) => Err(read_error(e)),
        }
    }
}

/// A thread named `name` that runs `f` every `every` until the returned sender is dropped.
fn periodic(
    name: &str,
    every: Duration,
    mut f: impl FnMut() + Send + 'static,
) -> Result<(mpsc::Sender<()>, JoinHandle<()>), OpenError> {
    let (stop, stopped) = mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // Any message or a dropped sender stops the loop.
            while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(every) {
                f();
            }
        })
        .map_err(OpenError::Thread)?;
    Ok((stop, handle))
}

/// The thread that measures free space every `check_interval`.
fn space_checks(space: &Arc<SpaceGuard>) -> Result<(mpsc::Sender<()>, JoinHandle<()>), OpenError> {
    let space = Arc::clone(space);
    periodic("capkv-space", space.check_interval(), move || space.check())
}

fn compact_all(db: &DB) {
    for name in [CF_DATA, CF_META, CF_IDEMPOTENCY] {
        if let Some(cf) = db.cf_handle(name) {
            db.compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
    }
}

impl Drop for RocksStore {
    fn drop(&mut self) {
        self.stop_space = None;
        if let Some(h) = self.space_checker.take() {
            if h.join().is_err() {
                tracing::error!("the free-space thread panicked");
            }
        }
        // Closing the queue lets the committer commit what is queued, then stop.
        self.writes = None;
        if let Some(h) = self.committer.take() {
            if h.join().is_err() {
                tracing::error!("the storage committer thread panicked");
            }
        }
        self.stop_compactor = None;
        if let Some(h) = self.compactor.take() {
            if h.join().is_err() {
                tracing::error!("the storage compaction thread panicked");
            }
        }
        if !self.sync && !self.read_only {
            if let Err(e) = self.db.flush_wal(true) {
                tracing::error!(error = %e, "syncing the WAL at close failed");
            }
        }
    }
}

/// A failed read, passed up with its detail: the server logs it where it handles it.
fn read_error(e: rocksdb::Error) -> StoreError {
    StoreError::Internal(format!("rocksdb read failed: {}", e.into_string()))
}

/// Splits a `data` record into (version, mod_revision, value).
fn decode(record: &[u8]) -> Result<(u64, u64, &[u8]), StoreError> {
    if record.len() < HEADER_BYTES {
        return Err(StoreError::Internal(format!(
            "data record of {} bytes is shorter than its header",
            record.len()
        )));
    }
    let (head, value) = record.split_at(HEADER_BYTES);
    let word = |i: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&head[i * 8..i * 8 + 8]);
        u64::from_be_bytes(b)
    };
    Ok((word(0), word(1), value))
}

fn entry(key: &[u8], record: &[u8], with_value: bool) -> Result<Entry, StoreError> {
    let (version, mod_revision, value) = decode(record)?;
    Ok(Entry {
        key: key.to_vec(),
        value: if with_value {
            value.to_vec()
        } else {
            Vec::new()
        },
        version,
        mod_revision,
    })
}

/// Every lease and its keys as `leases` and `lease_keys` hold them, each with its full TTL
/// from now (see `capkv_store::lease`).
fn load_leases(db: &DB) -> Result<Leases, String> {
    let mut leases = Leases::default();
    let now = Instant::now();
    let cf_of = |name| {
        db.cf_handle(name)
            .ok_or_else(|| format!("column family `{name}` missing"))
    };
    let word = |b: &[u8]| -> Result<u64, String> {
        b.get(..8)
            .and_then(|w| <[u8; 8]>::try_from(w).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| "malformed lease record".to_string())
    };
    for item in db.iterator_cf(cf_of(CF_LEASES)?, rocksdb::IteratorMode::Start) {
        let (k, v) = item.map_err(|e| e.into_string())?;
        leases.insert(word(&k)?, word(&v)?, now);
    }
    for item in db.iterator_cf(cf_of(CF_LEASE_KEYS)?, rocksdb::IteratorMode::Start) {
        let (k, _) = item.map_err(|e| e.into_string())?;
        let id = word(&k)?;
        if leases.contains(id) {
            leases.attach(&k[8..], Some(id));
        }
    }
    Ok(leases)
}

/// A `lease_keys` record's key.
fn lease_key(id: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// A history record's key: its revision, then its place in the revision.
fn history_key(revision: u64, index: u32) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&revision.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// A history record's value (see the module docs).
fn history_value(into: &mut Vec<u8>, key: &[u8], value: &[u8], version: Option<u64>) {
    into.clear();
    into.push(u8::from(version.is_some()));
    into.extend_from_slice(&version.unwrap_or(0).to_be_bytes());
    into.extend_from_slice(&(key.len() as u32).to_be_bytes());
    into.extend_from_slice(key);
    into.extend_from_slice(value);
}

/// A history record as `history::page` takes it: its revision, and its event when its key
/// is in `range` (decoded only then).
fn decode_event(k: &[u8], v: &[u8], range: &KeyRange) -> Result<(u64, Option<Event>), StoreError> {
    let bad = || StoreError::Internal("malformed history record".into());
    let revision = u64::from_be_bytes(k.get(..8).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let kind = *v.first().ok_or_else(bad)?;
    let version = u64::from_be_bytes(v.get(1..9).ok_or_else(bad)?.try_into().map_err(|_| bad())?);
    let key_len = u32::from_be_bytes(
        v.get(9..13)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let key = v.get(13..13 + key_len).ok_or_else(bad)?;
    if !range.contains(key) {
        return Ok((revision, None));
    }
    let value = &v[13 + key_len..];
    Ok((
        revision,
        Some(match kind {
            1 => Event::put(key, value, version, revision),
            0 => Event::delete(key, revision),
            _ => return Err(bad()),
        }),
    ))
}

impl Store for RocksStore {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        match self.db.get_pinned_cf(self.cf(CF_DATA)?, key) {
            Ok(Some(rec)) => entry(key, &rec, true).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }

    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        // Deletes free space (after compaction): they go on when space is low, and so do
        // revokes and expiries, which only delete.
        if !matches!(
            op,
            WriteOp::Delete(_) | WriteOp::RevokeLease(_) | WriteOp::ExpireLeases(_)
        ) {
            if let Err(e) = self.space.admit_write() {
                return Pending::ready(Err(e));
            }
        }
        self.submit(|done| Op {
            write: op,
            idem,
            done,
        })
    }

    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        let data = self.cf(CF_DATA)?;
        let snapshot = self.db.snapshot();
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snapshot);
        let revision = self.snapshot_revision(&ro)?;
        let mut page = ScanPage {
            revision,
            ..ScanPage::default()
        };
        if let Some(end) = &req.end {
            if end.as_slice() <= req.start.as_slice() {
                return Ok(page);
            }
        }
        let mut iter_ro = ReadOptions::default();
        iter_ro.set_snapshot(&snapshot);
        if let Some(end) = &req.end {
            iter_ro.set_iterate_upper_bound(end.clone());
        }
        let mut it = self.db.raw_iterator_cf_opt(data, iter_ro);
        it.seek(&req.start);
        let mut bytes = 0usize;
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            let e = entry(k, v, !req.keys_only)?;
            bytes += e.key.len() + e.value.len();
            page.entries.push(e);
            it.next();
            if page.entries.len() >= req.limit.max(1) || bytes >= req.max_bytes {
                break;
            }
        }
        page.more = it.valid();
        it.status().map_err(read_error)?;
        Ok(page)
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        capkv_store::get_many_unbounded(self, keys)
    }

    /// Counts the records RocksDB pinned before copying any.
    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<capkv_store::ManyRead>, StoreError> {
        let data = self.cf(CF_DATA)?;
        let snapshot = self.db.snapshot();
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snapshot);
        let revision = self.snapshot_revision(&ro)?;
        let found = self.db.batched_multi_get_cf_opt(data, keys, false, &ro);
        let payload = keys
            .iter()
            .zip(&found)
            .map(|(key, r)| match r {
                Ok(Some(rec)) => key.len() + rec.len().saturating_sub(HEADER_BYTES),
                _ => 0,
            })
            .fold(0usize, usize::saturating_add);
        if payload > max_payload_bytes {
            return Ok(None);
        }
        let entries = keys
            .iter()
            .zip(found)
            .map(|(key, r)| match r {
                Ok(Some(rec)) => entry(key, &rec, true).map(Some),
                Ok(None) => Ok(None),
                Err(e) => Err(read_error(e)),
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Some((entries, revision)))
    }

    fn revision(&self) -> Result<u64, StoreError> {
        Ok(self.counters.revision.load(Ordering::Acquire))
    }

    fn events(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
    ) -> Result<EventPage, StoreError> {
        let snapshot = self.db.snapshot();
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snapshot);
        let head = self.snapshot_revision(&ro)?;
        let compacted = if self.no_history {
            head
        } else {
            self.snapshot_meta(&ro, KEY_HISTORY_COMPACTED)?
                .unwrap_or(head)
        };
        if after < compacted {
            return Err(StoreError::Compacted {
                oldest_revision: compacted + 1,
            });
        }
        if self.no_history {
            return history::page(std::iter::empty(), after, max, head);
        }
        let mut iter_ro = ReadOptions::default();
        iter_ro.set_snapshot(&snapshot);
        let mut it = self.db.raw_iterator_cf_opt(self.cf(CF_HISTORY)?, iter_ro);
        it.seek(history_key(after.saturating_add(1), 0));
        let events = std::iter::from_fn(|| {
            let (k, v) = (it.key()?, it.value()?);
            let item = decode_event(k, v, range);
            it.next();
            Some(item)
        });
        let page = history::page(events, after, max, head)?;
        it.status().map_err(read_error)?;
        Ok(page)
    }

    fn changes(&self) -> &Changes {
        &self.changes
    }

    fn lease_keep_alive(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        lock(&self.leases)
            .keep_alive(id, Instant::now())
            .ok_or(StoreError::LeaseNotFound { id })
    }

    fn lease_info(&self, id: u64) -> Result<LeaseInfo, StoreError> {
        lock(&self.leases)
            .info(id, Instant::now())
            .ok_or(StoreError::LeaseNotFound { id })
    }

    fn lease_clock(&self) -> (usize, Option<Instant>) {
        let leases = lock(&self.leases);
        (leases.len(), leases.next_deadline())
    }

    fn engine_name(&self) -> &'static str {
        "rocksdb"
    }

    fn stats(&self) -> StoreStats {
        let db = &self.db;
        let int = |name: &str| db.property_int_value(name).ok().flatten().unwrap_or(0);
        let per_cf = |name: &str| -> u64 {
            [CF_DATA, CF_META, CF_IDEMPOTENCY]
                .iter()
                .filter_map(|cf| db.cf_handle(cf))
                .map(|cf| {
                    db.property_int_value_cf(cf, name)
                        .ok()
                        .flatten()
                        .unwrap_or(0)
                })
                .sum()
        };
        let c = &self.counters;
        StoreStats {
            live_data_bytes: per_cf("rocksdb.estimate-live-data-size"),
            pending_compaction_bytes: per_cf("rocksdb.estimate-pending-compaction-bytes"),
            memtable_bytes: per_cf("rocksdb.cur-size-all-mem-tables"),
            wal_syncs: c.wal_syncs.load(Ordering::Relaxed),
            commit_groups: c.commit_groups.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            write_stopped: int("rocksdb.is-write-stopped"),
            delayed_write_rate: int("rocksdb.actual-delayed-write-rate"),
            write_queue_len: c.queued.load(Ordering::Relaxed),
            idempotent_replays: c.replays.load(Ordering::Relaxed),
            records_evicted: 0,
            space: Some(capkv_store::SpaceStats {
                free_bytes: self.space.free_bytes(),
                low: self.space.is_low() || self.read_only,
                read_only: self.read_only,
                refused_writes: self.space.refused(),
                reserve_bytes: self.space.reserve_held_bytes(),
            }),
        }
    }

    fn compact(&self) -> Result<(), StoreError> {
        compact_all(&self.db);
        Ok(())
    }

    fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        capkv_store::checkpoint_target_is_free(dir)?;
        // Hard links where it can (same filesystem), copies otherwise; every column family,
        // so the copy has the data, the revision, the instance secret and the idempotency
        // records, consistent with each other.
        rocksdb::checkpoint::Checkpoint::new(&self.db)
            .and_then(|c| c.create_checkpoint(dir))
            .map_err(|e| {
                StoreError::Invalid(format!("checkpoint into {} failed: {e}", dir.display()))
            })
    }

    fn instance_secret(&self) -> [u8; 32] {
        self.secret
    }

    fn write_refusal(&self) -> Option<String> {
        if self.read_only {
            Some("disk full: storage is open read-only, writes are refused".into())
        } else if self.space.is_low() {
            Some("disk space low: writes are refused".into())
        } else {
            None
        }
    }
}

/// A write on its way to the committer.
struct Op {
    write: WriteOp,
    idem: Option<IdempotencyKey>,
    done: Completer<WriteOutcome>,
}

impl Op {
    /// How much of a group's `max_writes` this op uses.
    fn weight(&self) -> usize {
        match &self.write {
            WriteOp::PutMany(write::PutMany { items }) => items.len().max(1),
            _ => 1,
        }
    }
}

struct Committer {
    db: Arc<DB>,
    rx: Receiver<Op>,
    counters: Arc<Counters>,
    /// The revision of the last committed group.
    revision: u64,
    sync: bool,
    max_writes: usize,
    max_wait: Duration,
    /// Told when a commit fails for space.
    space: Arc<SpaceGuard>,
    /// Told each committed revision, for watchers.
    changes: Arc<Changes>,
    /// Revisions of history kept, and the revision through which it is gone.
    history_revisions: u64,
    history_compacted: u64,
    /// Most events kept, and how many each kept revision has, oldest first.
    history_events_max: u64,
    history_index: HistoryIndex,
    /// Lease state, changed here with the writes that change it (and reloaded from disk
    /// when a commit fails, so that it never holds what was not written).
    leases: Arc<std::sync::Mutex<Leases>>,
    /// Versions of keys this committer committed lately (see [`VersionCache`]).
    versions: std::cell::RefCell<VersionCache>,
}

/// The versions of keys the committer has committed lately (`None`: deleted). A put's
/// version lookup was the committer's costliest step: a memtable search past every version
/// of every key written since the last flush (~17% of the server's samples, durable puts
/// from 50 writers over 10k keys). The committer is the only writer of `data`, so what it
/// committed is what the database holds until its next commit, which updates the cache on
/// success and empties it on failure.
#[derive(Default)]
struct VersionCache {
    map: HashMap<Vec<u8>, Option<u64>>,
    /// What the entries hold, counted as their keys plus [`VERSION_CACHE_ENTRY_BYTES`].
    bytes: usize,
}

/// Bytes the version cache may hold: 300k-odd entries of short keys. Past it, half the
/// entries go (every other one in the map's hash order: about a random half), so a working
/// set somewhat larger than the cache still mostly hits.
const VERSION_CACHE_BYTES: usize = 24 << 20;
/// What one entry costs beside its key's bytes: the map's slot and the key's allocation.
const VERSION_CACHE_ENTRY_BYTES: usize = 64;

impl VersionCache {
    fn get(&self, key: &[u8]) -> Option<Option<u64>> {
        self.map.get(key).copied()
    }

    fn insert(&mut self, key: Vec<u8>, version: Option<u64>) {
        let cost = key.len() + VERSION_CACHE_ENTRY_BYTES;
        if self.bytes + cost > VERSION_CACHE_BYTES && !self.map.contains_key(&key) {
            let mut keep = false;
            self.map.retain(|_, _| {
                keep = !keep;
                keep
            });
            self.bytes = self
                .map
                .keys()
                .map(|k| k.len() + VERSION_CACHE_ENTRY_BYTES)
                .sum();
        }
        if self.map.insert(key, version).is_none() {
            self.bytes += cost;
        }
    }

    fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

/// One commit group being decided: its batch, and what the writes decided so far changed,
/// so that later writes of the group see them.
struct Group {
    batch: WriteBatch,
    /// Each touched key's (version, value) after the group's writes so far; `None` = deleted.
    latest: HashMap<Vec<u8>, Option<(u64, Vec<u8>)>>,
    /// Idempotency records written by the group, by record key.
    records: HashMap<Vec<u8>, Record>,
    revision: u64,
    record: Vec<u8>,
    /// The next history record's place within the group's current revision.
    event_index: u32,
    event_revision: u64,
    /// Events the group wrote, per revision, in order.
    events: Vec<(u64, u64)>,
    /// A write failed after it changed the group (see [`Committer::apply_whole`]).
    partial: Option<StoreError>,
}

/// The events of each revision the history keeps, oldest first, and their sum.
#[derive(Debug, Default)]
struct HistoryIndex {
    revisions: std::collections::VecDeque<(u64, u64)>,
    events: u64,
}

impl HistoryIndex {
    fn push(&mut self, revision: u64, events: u64) {
        match self.revisions.back_mut() {
            Some((r, n)) if *r == revision => *n += events,
            _ => self.revisions.push_back((revision, events)),
        }
        self.events += events;
    }

    /// Forgets the revisions up to `to` (trimmed).
    fn trim(&mut self, to: u64) {
        while let Some(&(r, n)) = self.revisions.front() {
            if r > to {
                break;
            }
            self.revisions.pop_front();
            self.events -= n;
        }
    }

    /// The revision to trim through so that, with `adding` more events, at most `max` stay;
    /// `None` until they pass `max` by a tenth.
    fn trim_for(&self, adding: u64, max: u64) -> Option<u64> {
        let total = self.events + adding;
        if total <= max + max / 10 {
            return None;
        }
        let mut over = total - max;
        let mut to = None;
        for &(r, n) in &self.revisions {
            if over == 0 {
                break;
            }
            to = Some(r);
            over = over.saturating_sub(n);
        }
        to
    }
}

/// The history index of the events on disk (the keys of `history`).
fn history_index(db: &DB) -> Result<HistoryIndex, String> {
    let cf = db
        .cf_handle(CF_HISTORY)
        .ok_or_else(|| format!("column family `{CF_HISTORY}` missing"))?;
    let mut index = HistoryIndex::default();
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let Some(k) = it.key() {
        let revision = k
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| "malformed history key".to_string())?;
        index.push(revision, 1);
        it.next();
    }
    it.status().map_err(|e| e.into_string())?;
    Ok(index)
}

/// The lease state. A poisoned lock only means a panic elsewhere mid-change; the committer
/// reloads the state from disk after any failed commit, so go on with what is there.
fn lock(leases: &std::sync::Mutex<Leases>) -> std::sync::MutexGuard<'_, Leases> {
    leases.lock().unwrap_or_else(|p| p.into_inner())
}

/// Most leases one `ExpireLeases` revokes (the reaper sends another for the rest).
const EXPIRE_BATCH: usize = 1_000;

fn cf<'a>(db: &'a DB, name: &str) -> Result<&'a ColumnFamily, StoreError> {
    db.cf_handle(name)
        .ok_or_else(|| StoreError::Internal(format!("column family `{name}` missing")))
}

impl Committer {
    fn run(mut self) {
        let mut group = Vec::new();
        // Ends when every sender is gone (the store is dropping) and the queue is empty.
        while let Ok(first) = self.rx.recv() {
            let mut weight = first.weight();
            group.push(first);
            let gather_until = Instant::now() + self.max_wait;
            while weight < self.max_writes {
                let next = match self.rx.try_recv() {
                    Ok(op) => op,
                    Err(TryRecvError::Disconnected) => break,
                    Err(TryRecvError::Empty) => {
                        let left = gather_until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        match self.rx.recv_timeout(left) {
                            Ok(op) => op,
                            Err(_) => break,
                        }
                    }
                };
                weight += next.weight();
                group.push(next);
            }
            self.counters
                .queued
                .fetch_sub(group.len() as u64, Ordering::Relaxed);
            self.commit(&mut group);
        }
    }

    /// The key's (version, value) as the group sees it: its own writes, else the database.
    fn current(&self, g: &Group, key: &[u8]) -> Result<Option<(u64, Vec<u8>)>, StoreError> {
        if let Some(v) = g.latest.get(key) {
            return Ok(v.clone());
        }
        match self.db.get_pinned_cf(cf(&self.db, CF_DATA)?, key) {
            Ok(Some(rec)) => {
                decode(&rec).map(|(version, _, value)| Some((version, value.to_vec())))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }

    /// Like [`current`](Self::current) without copying the value: what puts and deletes
    /// need, once per write on the committer's hot path.
    fn version(&self, g: &Group, key: &[u8]) -> Result<Option<u64>, StoreError> {
        #[cfg(test)]
        if self.counters.fail_version_lookup.fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |n| n.checked_sub(1),
        ) == Ok(1)
        {
            return Err(StoreError::Unavailable("injected read failure".into()));
        }
        if let Some(v) = g.latest.get(key) {
            return Ok(v.as_ref().map(|(version, _)| *version));
        }
        if let Some(v) = self.versions.borrow().get(key) {
            return Ok(v);
        }
        // Not cached here: a write that reads a version commits the key, which caches it
        // (a second copy of the key per miss otherwise).
        match self.db.get_pinned_cf(cf(&self.db, CF_DATA)?, key) {
            Ok(Some(rec)) => decode(&rec).map(|(version, _, _)| Some(version)),
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }

    fn put(&self, g: &mut Group, key: &[u8], value: &[u8], version: u64) -> Result<(), StoreError> {
        let data = cf(&self.db, CF_DATA)?;
        g.record.clear();
        g.record.extend_from_slice(&version.to_be_bytes());
        g.record.extend_from_slice(&g.revision.to_be_bytes());
        g.record.extend_from_slice(value);
        g.batch.put_cf(data, key, &g.record);
        self.event(g, key, value, Some(version))?;
        g.latest
            .insert(key.to_vec(), Some((version, value.to_vec())));
        Ok(())
    }

    /// Adds the history record of a change at the group's current revision (`version`
    /// `None`: a delete).
    fn event(
        &self,
        g: &mut Group,
        key: &[u8],
        value: &[u8],
        version: Option<u64>,
    ) -> Result<(), StoreError> {
        if g.event_revision != g.revision {
            g.event_revision = g.revision;
            g.event_index = 0;
            g.events.push((g.revision, 0));
        }
        if let Some((_, n)) = g.events.last_mut() {
            *n += 1;
        }
        history_value(&mut g.record, key, value, version);
        g.batch.put_cf(
            cf(&self.db, CF_HISTORY)?,
            history_key(g.revision, g.event_index),
            &g.record,
        );
        g.event_index += 1;
        Ok(())
    }

    fn apply(&self, g: &mut Group, op: &WriteOp) -> Result<WriteOutcome, StoreError> {
        match op {
            WriteOp::Put(write::Put {
                key,
                value,
                cond,
                attach,
            }) => {
                if let Attach::Lease(id) = attach {
                    if !lock(&self.leases).contains(*id) {
                        return Err(StoreError::LeaseNotFound { id: *id });
                    }
                }
                let current = self.version(g, key)?;
                if !cond.holds(current) {
                    return Err(StoreError::ConditionFailed {
                        index: 0,
                        current_version: current,
                    });
                }
                g.revision += 1;
                let version = current.unwrap_or(0) + 1;
                self.put(g, key, value, version)?;
                let lease = match *attach {
                    Attach::None => None,
                    Attach::Lease(id) => Some(id),
                    Attach::NewLease { ttl_ms } => Some(self.grant(g, ttl_ms)?),
                };
                self.attach(g, key, lease)?;
                Ok(WriteOutcome::Put(PutOutcome {
                    version,
                    revision: g.revision,
                    lease: lease.unwrap_or(0),
                }))
            }
            WriteOp::Delete(write::Delete { key, cond }) => {
                let current = self.version(g, key)?;
                if !cond.holds(current) {
                    return Err(StoreError::ConditionFailed {
                        index: 0,
                        current_version: current,
                    });
                }
                if current.is_some() {
                    g.revision += 1;
                    g.batch.delete_cf(cf(&self.db, CF_DATA)?, key);
                    self.event(g, key, &[], None)?;
                    g.latest.insert(key.clone(), None);
                    self.attach(g, key, None)?;
                }
                Ok(WriteOutcome::Delete(DeleteOutcome {
                    existed: current.is_some(),
                    revision: g.revision,
                }))
            }
            WriteOp::PutMany(write::PutMany { items }) => {
                let mut versions = Vec::with_capacity(items.len());
                for (index, (key, _, cond)) in items.iter().enumerate() {
                    let current = self.version(g, key)?;
                    if !cond.holds(current) {
                        return Err(StoreError::ConditionFailed {
                            index,
                            current_version: current,
                        });
                    }
                    versions.push(current.unwrap_or(0) + 1);
                }
                g.revision += 1;
                for ((key, value, _), &version) in items.iter().zip(&versions) {
                    self.put(g, key, value, version)?;
                    self.attach(g, key, None)?;
                }
                Ok(WriteOutcome::PutMany(BatchOutcome {
                    versions,
                    revision: g.revision,
                }))
            }
            WriteOp::GrantLease(write::GrantLease { ttl_ms }) => {
                let id = self.grant(g, *ttl_ms)?;
                Ok(WriteOutcome::GrantLease(LeaseGranted {
                    id,
                    ttl_ms: *ttl_ms,
                }))
            }
            WriteOp::RevokeLease(write::RevokeLease { id }) => {
                self.revoke(g, *id).map(WriteOutcome::RevokeLease)
            }
            WriteOp::ExpireLeases(write::ExpireLeases) => {
                let expired = lock(&self.leases).expired(Instant::now(), EXPIRE_BATCH);
                for &id in &expired {
                    self.revoke(g, id)?;
                }
                Ok(WriteOutcome::ExpireLeases(expired.len() as u64))
            }
            WriteOp::Increment(write::Increment { key, delta }) => {
                let current = self.current(g, key)?;
                let value = incremented(current.as_ref().map(|(_, v)| v.as_slice()), *delta)?;
                let version = current.map_or(0, |(v, _)| v) + 1;
                g.revision += 1;
                self.put(g, key, value.to_string().as_bytes(), version)?;
                Ok(WriteOutcome::Increment(IncrementOutcome {
                    value,
                    version,
                    revision: g.revision,
                }))
            }
        }
    }

    /// Grants a lease of `ttl_ms` in this group; returns its id.
    fn grant(&self, g: &mut Group, ttl_ms: u64) -> Result<u64, StoreError> {
        let id = lock(&self.leases).grant(ttl_ms, Instant::now());
        g.batch.put_cf(
            cf(&self.db, CF_LEASES)?,
            id.to_be_bytes(),
            ttl_ms.to_be_bytes(),
        );
        Ok(id)
    }

    /// Leaves `key` attached to `lease` (`None`: to none), on disk as in memory.
    fn attach(&self, g: &mut Group, key: &[u8], lease: Option<u64>) -> Result<(), StoreError> {
        let before = lock(&self.leases).attach(key, lease);
        if before != lease {
            let keys = cf(&self.db, CF_LEASE_KEYS)?;
            if let Some(b) = before {
                g.batch.delete_cf(keys, lease_key(b, key));
            }
            if let Some(l) = lease {
                g.batch.put_cf(keys, lease_key(l, key), []);
            }
        }
        Ok(())
    }

    /// Revokes lease `id` in this group: its keys deleted at one new revision.
    fn revoke(&self, g: &mut Group, id: u64) -> Result<RevokeOutcome, StoreError> {
        let keys = lock(&self.leases)
            .remove(id)
            .ok_or(StoreError::LeaseNotFound { id })?;
        g.batch
            .delete_cf(cf(&self.db, CF_LEASES)?, id.to_be_bytes());
        let lease_keys = cf(&self.db, CF_LEASE_KEYS)?;
        for key in &keys {
            g.batch.delete_cf(lease_keys, lease_key(id, key));
        }
        let mut deleted = 0;
        if !keys.is_empty() {
            g.revision += 1;
            for key in keys {
                if self.version(g, &key)?.is_some() {
                    g.batch.delete_cf(cf(&self.db, CF_DATA)?, &key);
                    self.event(g, &key, &[], None)?;
                    g.latest.insert(key, None);
                    deleted += 1;
                }
            }
        }
        Ok(RevokeOutcome {
            deleted,
            revision: g.revision,
        })
    }

    /// The live record under `record_key`: the group's own, else the database's.
    fn record(&self, g: &Group, record_key: &[u8]) -> Result<Option<Record>, StoreError> {
        if let Some(r) = g.records.get(record_key) {
            return Ok(Some(r.clone()));
        }
        match self
            .db
            .get_pinned_cf(cf(&self.db, CF_IDEMPOTENCY)?, record_key)
        {
            Ok(Some(bytes)) => Record::decode(&bytes).map(Some),
            Ok(None) => Ok(None),
            Err(e) => Err(read_error(e)),
        }
    }

    fn decide(&self, g: &mut Group, op: &Op) -> Result<WriteOutcome, StoreError> {
        let Some(idem) = &op.idem else {
            return self.apply_whole(g, &op.write);
        };
        let record_key = idem.record_key();
        let fingerprint = op.write.fingerprint();
        if let Some(r) = self.record(g, &record_key)? {
            if r.expires_at_unix_ms > now_unix_ms() {
                self.counters.replays.fetch_add(1, Ordering::Relaxed);
                return r.replay(&fingerprint);
            }
        }
        let outcome = self.apply_whole(g, &op.write);
        if recordable(&outcome) {
            let r = Record {
                expires_at_unix_ms: idem.expires_at_unix_ms,
                fingerprint,
                outcome: outcome.clone(),
            };
            g.batch
                .put_cf(cf(&self.db, CF_IDEMPOTENCY)?, &record_key, r.encode());
            g.records.insert(record_key, r);
        }
        outcome
    }

    /// [`apply`](Self::apply), noting in the group a write that failed after it changed
    /// the group's batch or revision (a read error halfway through a lease's keys): its
    /// changes cannot be taken out of the batch alone, so the group is not written. A
    /// write refused before it changes anything (a condition, a missing lease) is an
    /// answer, recorded for its idempotency key like any other.
    fn apply_whole(&self, g: &mut Group, write: &WriteOp) -> Result<WriteOutcome, StoreError> {
        let before = (g.batch.len(), g.revision);
        let outcome = self.apply(g, write);
        if let Err(e) = &outcome {
            if (g.batch.len(), g.revision) != before && g.partial.is_none() {
                tracing::error!(error = %e, "a write failed partway; its group is not written");
                g.partial = Some(e.clone());
            }
        }
        outcome
    }

    /// Takes back what deciding a group that will not be written left outside its batch.
    fn forget_group(&mut self) {
        // Not needed for correctness (only commits update it), but a failed write may
        // leave the database in a state worth reading afresh.
        self.versions.borrow_mut().clear();
        // The group's lease changes were made in memory as it was decided: take the state
        // back to what is on disk.
        match load_leases(&self.db) {
            Ok(on_disk) => *lock(&self.leases) = on_disk,
            Err(detail) => {
                tracing::error!(error = %detail, "reloading leases after a group was not written")
            }
        }
    }

    fn commit(&mut self, ops: &mut Vec<Op>) {
        let mut g = Group {
            batch: WriteBatch::default(),
            latest: HashMap::with_capacity(ops.len()),
            records: HashMap::new(),
            revision: self.revision,
            record: Vec::new(),
            event_index: 0,
            event_revision: 0,
            events: Vec::new(),
            partial: None,
        };
        let count = ops.len() as u64;
        // A write that failed partway (`apply_whole`) fails its whole group, unwritten,
        // as when the commit itself fails; the writes after it are not decided.
        let decided: Vec<(Op, Result<WriteOutcome, StoreError>)> = ops
            .drain(..)
            .map(|op| {
                if g.partial.is_some() {
                    return (op, Err(StoreError::Unavailable("not decided".into())));
                }
                let r = self.decide(&mut g, &op);
                (op, r)
            })
            .collect();
        let mut failure = g.partial.take();
        if failure.is_some() {
            self.forget_group();
        }
        // History older than the window goes in this batch, once it is a tenth past it: in
        // revisions, or in events.
        let by_revisions = g
            .revision
            .checked_sub(self.history_revisions)
            .filter(|&to| to > self.history_compacted + self.history_revisions / 10);
        let adding: u64 = g.events.iter().map(|&(_, n)| n).sum();
        let by_events = self.history_index.trim_for(adding, self.history_events_max);
        let trim_to = by_revisions.max(by_events);
        if failure.is_none() && !g.batch.is_empty() {
            let written = cf(&self.db, CF_META).and_then(|meta| {
                if g.revision != self.revision {
                    g.batch.put_cf(meta, KEY_REVISION, g.revision.to_be_bytes());
                }
                if let Some(to) = trim_to {
                    g.batch.delete_range_cf(
                        cf(&self.db, CF_HISTORY)?,
                        history_key(0, 0),
                        history_key(to + 1, 0),
                    );
                    g.batch
                        .put_cf(meta, KEY_HISTORY_COMPACTED, to.to_be_bytes());
                }
                #[cfg(test)]
                if self.counters.fail_next_commit.swap(false, Ordering::AcqRel) {
                    return Err(StoreError::Unavailable("injected commit failure".into()));
                }
                let mut wo = WriteOptions::default();
                wo.set_sync(self.sync);
                self.db
                    .write_opt(g.batch, &wo)
                    .map_err(|e| write_error(e, &self.space))
            });
            match written {
                Ok(()) => {
                    let mut versions = self.versions.borrow_mut();
                    for (key, latest) in g.latest.drain() {
                        versions.insert(key, latest.map(|(version, _)| version));
                    }
                    drop(versions);
                    self.revision = g.revision;
                    self.counters.revision.store(g.revision, Ordering::Release);
                    if let Some(to) = trim_to {
                        self.history_compacted = to;
                        self.history_index.trim(to);
                    }
                    for &(revision, n) in &g.events {
                        self.history_index.push(revision, n);
                    }
                    self.changes.publish(g.revision);
                    self.counters.commit_groups.fetch_add(1, Ordering::Relaxed);
                    self.counters.commits.fetch_add(count, Ordering::Relaxed);
                    if self.sync {
                        self.counters.wal_syncs.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Err(e) => {
                    self.forget_group();
                    failure = Some(e)
                }
            }
        }
        for (op, r) in decided {
            // A failed commit fails every write of the group, whatever it decided.
            op.done.complete(match &failure {
                Some(e) => Err(e.clone()),
                None => r,
            });
        }
    }
}

fn is_no_space(detail: &str) -> bool {
    detail.contains("No space") || detail.contains("NoSpace")
}

/// A failed commit, passed up to every write of the group with its detail (the server
/// logs it where it handles it).
fn write_error(e: rocksdb::Error, space: &SpaceGuard) -> StoreError {
    let io = e.kind() == ErrorKind::IOError;
    let detail = e.into_string();
    if is_no_space(&detail) {
        space.write_failed_for_space();
        StoreError::StorageFull(format!("disk full: {detail}"))
    } else if io {
        // The disk, not our data, failed: another attempt (here after repair, or elsewhere)
        // may succeed.
        StoreError::Unavailable(detail)
    } else {
        StoreError::Internal(detail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use capkv_store::{Condition, EventKind, PutItem};

    /// One batch putting `v` under each of `keys`.
    fn put_all(s: &RocksStore, keys: &[Vec<u8>]) {
        let items: Vec<PutItem<'_>> = keys
            .iter()
            .map(|k| PutItem {
                key: k,
                value: b"v",
                cond: Condition::None,
            })
            .collect();
        s.put_many(&items).wait().unwrap();
    }

    fn open(dir: &Path) -> RocksStore {
        let mut o = RocksOptions::new(dir);
        o.compaction_interval_s = 0;
        RocksStore::open(o).unwrap()
    }

    /// [`open`], with a group commit that waits long enough (300 ms) that writes queued at
    /// once form one group.
    fn open_grouping(dir: &Path) -> RocksStore {
        let mut o = RocksOptions::new(dir);
        o.compaction_interval_s = 0;
        o.group_commit_max_wait_us = 300_000;
        RocksStore::open(o).unwrap()
    }

    /// "Acknowledged means durable" needs its converse: when a group's commit fails, no
    /// write of the group is acknowledged, whatever each decided, and none is applied.
    #[test]
    fn a_failed_commit_fails_every_write_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_grouping(dir.path());
        s.counters.fail_next_commit.store(true, Ordering::Release);
        let keys: Vec<Vec<u8>> = (0..5).map(|i| format!("k{i}").into_bytes()).collect();
        let pending: Vec<_> = keys
            .iter()
            .map(|k| s.put(k, b"v", Condition::None))
            .collect();
        for p in pending {
            assert!(
                p.wait().is_err(),
                "a write of the failed group was acknowledged"
            );
        }
        for k in &keys {
            assert_eq!(
                s.get(k).unwrap(),
                None,
                "a write of the failed group was applied"
            );
        }
        assert_eq!(s.revision().unwrap(), 0);
        assert_eq!(s.stats().commit_groups, 0);
        // The next group commits.
        s.put(b"k0", b"v", Condition::None).wait().unwrap();
        assert_eq!(s.revision().unwrap(), 1);
    }

    #[test]
    fn the_version_cache_stays_within_its_bytes_and_keeps_what_it_keeps_exact() {
        let mut c = VersionCache::default();
        let key = |i: u32| format!("key-{i:08}").into_bytes();
        let n = 2 * (VERSION_CACHE_BYTES / (16 + VERSION_CACHE_ENTRY_BYTES)) as u32;
        for i in 0..n {
            c.insert(key(i), Some(u64::from(i)));
            assert!(c.bytes <= VERSION_CACHE_BYTES);
        }
        assert!(c.map.len() > 1000, "it keeps most of what fits");
        assert!(c.map.iter().all(|(k, v)| key(v.unwrap() as u32) == *k));
        // Overwriting an entry costs nothing more.
        let before = c.bytes;
        c.insert(key(n - 1), None);
        assert_eq!((c.bytes, c.get(&key(n - 1))), (before, Some(None)));
    }

    /// The committer's version cache (`VersionCache`) never answers a version the
    /// database does not hold: across groups, past a failed commit, past its bound, and
    /// after a delete.
    #[test]
    fn versions_stay_exact_through_the_committer_s_cache() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        let version = |k: &[u8]| s.put(k, b"v", Condition::None).wait().unwrap().version;
        assert_eq!(version(b"k"), 1);
        assert_eq!(version(b"k"), 2);
        // A failed group counts for nothing.
        s.counters.fail_next_commit.store(true, Ordering::Release);
        assert!(s.put(b"k", b"v", Condition::None).wait().is_err());
        assert_eq!(version(b"k"), 3);
        // More keys than the cache holds: it starts again, from the database.
        let fill: Vec<Vec<u8>> = (0..=VERSION_CACHE_BYTES / VERSION_CACHE_ENTRY_BYTES)
            .map(|i| format!("fill{i}").into_bytes())
            .collect();
        for chunk in fill.chunks(8192) {
            put_all(&s, chunk);
        }
        assert_eq!(version(b"k"), 4);
        assert_eq!(version(b"fill0"), 2);
        // A delete resets the version, cached or not.
        s.delete(b"k", Condition::None).wait().unwrap();
        assert_eq!(version(b"k"), 1);
        assert_eq!(s.get(b"k").unwrap().unwrap().version, 1);
    }

    #[test]
    fn keys_versions_and_revision_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            s.put(b"a", b"1", Condition::None).wait().unwrap();
            s.put(b"a", b"2", Condition::None).wait().unwrap();
            s.put(b"b", b"x", Condition::None).wait().unwrap();
            s.delete(b"b", Condition::None).wait().unwrap();
            assert_eq!(s.revision().unwrap(), 4);
        }
        let s = open(dir.path());
        assert_eq!(s.revision().unwrap(), 4);
        let e = s.get(b"a").unwrap().unwrap();
        assert_eq!(
            (e.value.as_slice(), e.version, e.mod_revision),
            (&b"2"[..], 2, 2)
        );
        assert_eq!(s.get(b"b").unwrap(), None);
        let out = s.put(b"a", b"3", Condition::IfVersion(2)).wait().unwrap();
        assert_eq!((out.version, out.revision), (3, 5));
    }

    /// Whether RocksDB's log says a retired WAL file was kept for reuse.
    fn a_wal_file_was_recycled(dir: &Path) -> bool {
        std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("LOG"))
            .any(|e| {
                std::fs::read_to_string(e.path())
                    .unwrap_or_default()
                    .contains("to recycle list")
            })
    }

    /// With the smallest WAL bound, WAL files retire within a few megabytes and are
    /// written over by new ones; every write survives a reopen, each key at its last
    /// version (recycled files hold old records past the new ones' end: recovery must
    /// stop where the new data does, and not replay the old).
    #[test]
    fn writes_survive_in_recycled_wal_files() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = RocksOptions::new(dir.path());
        o.compaction_interval_s = 0;
        o.max_total_wal_bytes = MIN_TOTAL_WAL_BYTES;
        o.wal_recycle_files = 2;
        const KEYS: u32 = 300;
        const ROUNDS: u32 = 12;
        let value = |k: u32, r: u32| format!("{k}-{r}-{}", "v".repeat(1000)).into_bytes();
        {
            let s = RocksStore::open(o.clone()).unwrap();
            for r in 0..ROUNDS {
                let pending: Vec<_> = (0..KEYS)
                    .map(|k| s.put(&k.to_be_bytes(), &value(k, r), Condition::None))
                    .collect();
                for p in pending {
                    p.wait().unwrap();
                }
            }
        }
        assert!(
            a_wal_file_was_recycled(dir.path()),
            "no WAL file was recycled: the test did not test recycling"
        );
        let s = RocksStore::open(o).unwrap();
        assert_eq!(s.revision().unwrap(), u64::from(KEYS * ROUNDS));
        for k in 0..KEYS {
            let e = s.get(&k.to_be_bytes()).unwrap().unwrap();
            assert_eq!(e.value, value(k, ROUNDS - 1));
            assert_eq!(e.version, u64::from(ROUNDS));
        }
    }

    #[test]
    fn wal_options_out_of_range_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = RocksOptions::new(dir.path());
        o.max_total_wal_bytes = MIN_TOTAL_WAL_BYTES - 1;
        assert!(matches!(RocksStore::open(o), Err(OpenError::Options(_))));
        let mut o = RocksOptions::new(dir.path());
        o.wal_recycle_files = MAX_WAL_RECYCLE_FILES + 1;
        assert!(matches!(RocksStore::open(o), Err(OpenError::Options(_))));
    }

    #[test]
    fn a_replay_after_reopen_returns_the_recorded_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let key = || {
            Some(IdempotencyKey {
                session: b"s".to_vec(),
                key: b"k".to_vec(),
                expires_at_unix_ms: now_unix_ms() + 3_600_000,
            })
        };
        let op = || {
            WriteOp::from(write::Increment {
                key: b"n".to_vec(),
                delta: 3,
            })
        };
        let first = {
            let s = open(dir.path());
            s.write(op(), key()).wait().unwrap()
        };
        let s = open(dir.path());
        assert_eq!(s.write(op(), key()).wait().unwrap(), first);
        assert_eq!(s.get(b"n").unwrap().unwrap().value, b"3", "written once");
        assert_eq!(s.stats().idempotent_replays, 1);
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused_clearly() {
        let dir = tempfile::tempdir().unwrap();
        let _first = open(dir.path());
        let e = RocksStore::open(RocksOptions::new(dir.path())).unwrap_err();
        assert!(matches!(e, OpenError::Locked { .. }), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
    }

    #[test]
    fn unusable_directories_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain-file");
        std::fs::write(&file, b"x").unwrap();
        let e = RocksStore::open(RocksOptions::new(&file)).unwrap_err();
        assert!(e.to_string().contains("not a directory"), "{e}");

        let db = dir.path().join("db");
        drop(open(&db));
        std::fs::write(db.join("CURRENT"), b"garbage-that-names-no-manifest\n").unwrap();
        let e = RocksStore::open(RocksOptions::new(&db)).unwrap_err();
        assert!(
            matches!(e, OpenError::Corrupt { .. } | OpenError::Io { .. }),
            "{e}"
        );

        let mut bad = RocksOptions::new(dir.path().join("x"));
        bad.group_commit_max_writes = 0;
        assert!(matches!(RocksStore::open(bad), Err(OpenError::Options(_))));
    }

    #[test]
    fn another_format_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = open(dir.path());
            let meta = s.cf(CF_META).unwrap();
            s.db.put_cf(meta, KEY_FORMAT, 99u64.to_be_bytes()).unwrap();
        }
        let e = RocksStore::open(RocksOptions::new(dir.path())).unwrap_err();
        assert!(matches!(e, OpenError::Format { found: 99, .. }), "{e}");
    }

    /// An embedder opening RocksDB over a memory-log directory is stopped, as the server
    /// is: an empty database there would hide every logged write.
    #[test]
    fn a_memory_log_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        drop(
            capkv_store::logged::LoggedStore::open(capkv_store::logged::LogOptions::new(
                dir.path(),
            ))
            .unwrap(),
        );
        let e = RocksStore::open(RocksOptions::new(dir.path())).unwrap_err();
        assert!(matches!(e, OpenError::WrongEngine { .. }), "{e}");
        assert!(e.to_string().contains("--engine memory-log"), "{e}");
        assert!(!dir.path().join("CURRENT").exists());
    }

    #[test]
    fn compaction_drops_expired_idempotency_records() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        s.put_record(b"old", 1, b"reply");
        s.put_record(b"new", now_unix_ms() + 3_600_000, b"reply");
        s.compact().unwrap();
        assert!(!s.has_record(b"old"));
        assert!(s.has_record(b"new"));
    }

    /// The records' memtable bloom filter is set, and set for whole keys: as RocksDB wrote
    /// the options it opened with (without whole-key filtering the filter would serve no
    /// lookup capkv makes, and cost every insert).
    #[test]
    fn the_records_memtable_answers_misses_from_a_whole_key_bloom_filter() {
        let dir = tempfile::tempdir().unwrap();
        let s = open(dir.path());
        drop(s);
        let options = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("OPTIONS-"))
            .max_by_key(|e| e.file_name())
            .expect("RocksDB writes an OPTIONS file");
        let text = std::fs::read_to_string(options.path()).unwrap();
        let family = |name: &str| {
            text.split("[CFOptions \"")
                .find(|s| s.starts_with(&format!("{name}\"")))
                .unwrap_or_else(|| panic!("the {name} family's options"))
        };
        let section = family(CF_IDEMPOTENCY);
        let setting = |name: &str| {
            section
                .lines()
                .map(str::trim)
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .map(str::to_owned)
        };
        assert_eq!(
            setting("memtable_whole_key_filtering").as_deref(),
            Some("true")
        );
        let ratio: f64 = setting("memtable_prefix_bloom_size_ratio")
            .and_then(|v| v.parse().ok())
            .expect("a bloom ratio");
        assert!(
            (ratio - RECORDS_MEMTABLE_BLOOM_RATIO).abs() < 1e-9,
            "{ratio}"
        );
        // The data family keeps none: its lookups are hits, served from the version cache.
        assert!(family(CF_DATA).contains("memtable_whole_key_filtering=false"));
    }

    #[test]
    fn group_commit_gathers_concurrent_writes() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = RocksOptions::new(dir.path());
        // A long gathering wait makes grouping certain without timing the test.
        o.group_commit_max_wait_us = 200_000;
        o.group_commit_max_writes = 8;
        let s = Arc::new(RocksStore::open(o).unwrap());
        let pending: Vec<_> = (0..8u8)
            .map(|i| s.put(&[i], b"v", Condition::None))
            .collect();
        for p in pending {
            p.wait().unwrap();
        }
        let st = s.stats();
        assert_eq!(st.commits, 8);
        assert_eq!(st.commit_groups, 1, "8 queued writes, one group: {st:?}");
        assert_eq!(st.wal_syncs, 1);
    }

    #[test]
    fn a_full_queue_refuses_writes_instead_of_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = RocksOptions::new(dir.path());
        o.write_queue_depth = 1;
        o.group_commit_max_writes = 1;
        let s = open_with(o);
        // Bounded: the committer drains one write per sync, so a burst overflows a 1-deep queue.
        let pending: Vec<_> = (0..1000u32)
            .map(|i| s.put(&i.to_be_bytes(), b"v", Condition::None))
            .collect();
        let busy = pending
            .into_iter()
            .map(Pending::wait)
            .filter(|r| matches!(r, Err(StoreError::Busy(_))))
            .count();
        assert!(busy > 0, "no write was refused");
    }

    fn open_with(o: RocksOptions) -> RocksStore {
        RocksStore::open(o).unwrap()
    }

    /// Grants a lease of a minute and puts `keys` under it; returns its id.
    fn lease_with_keys(store: &dyn Store, keys: &[&[u8]]) -> u64 {
        use capkv_store::write::{Attach, GrantLease};
        let id = store
            .apply(GrantLease { ttl_ms: 60_000 }, None)
            .wait()
            .unwrap()
            .id;
        for k in keys {
            let put = write::Put {
                key: k.to_vec(),
                value: b"v".to_vec(),
                cond: Condition::None,
                attach: Attach::Lease(id),
            };
            store.apply(put, None).wait().unwrap();
        }
        id
    }

    /// Leases and their keys survive a reopen, each with its full TTL again; revoking one
    /// after the reopen takes its keys.
    #[test]
    fn leases_and_their_keys_survive_reopen() {
        use capkv_store::write::RevokeLease;
        let dir = tempfile::tempdir().unwrap();
        let id = {
            let s = open(dir.path());
            let store: &dyn Store = &s;
            let id = lease_with_keys(store, &[b"x", b"y"]);
            store.delete(b"y", Condition::None).wait().unwrap();
            id
        };
        let s = open(dir.path());
        let store: &dyn Store = &s;
        let info = store.lease_info(id).unwrap();
        assert_eq!(
            (info.ttl_ms, info.keys),
            (60_000, 1),
            "y was deleted, so detached"
        );
        assert!(info.remaining_ms > 50_000, "a full TTL again");
        let revoked = store.apply(RevokeLease { id }, None).wait().unwrap();
        assert_eq!(revoked.deleted, 1);
        assert_eq!(store.get(b"x").unwrap(), None);
        drop(s);
        let s = open(dir.path());
        assert_eq!(
            (&s as &dyn Store).lease_info(id),
            Err(StoreError::LeaseNotFound { id }),
            "the revoke is durable"
        );
    }

    /// A write that fails halfway (here a read error at the second of a lease's three keys)
    /// leaves nothing behind, nor does any write of its group: the lease and its keys are
    /// all still there, in memory and on disk, and the revoke succeeds when tried again.
    #[test]
    fn a_write_that_fails_halfway_leaves_nothing_of_its_group() {
        use capkv_store::write::RevokeLease;
        let dir = tempfile::tempdir().unwrap();
        let s = open_grouping(dir.path());
        let store: &dyn Store = &s;
        let keys = [&b"a"[..], b"b", b"c"];
        let id = lease_with_keys(store, &keys);
        let revision = store.revision().unwrap();
        s.counters.fail_version_lookup.store(2, Ordering::Release);
        let revoke = store.apply(RevokeLease { id }, None);
        let other = store.put(b"other", b"v", Condition::None);
        assert!(revoke.wait().is_err(), "the revoke failed halfway");
        assert!(other.wait().is_err(), "its group was not written");
        assert_eq!(store.revision().unwrap(), revision);
        assert_eq!(store.get(b"other").unwrap(), None);
        for k in keys {
            assert!(store.get(k).unwrap().is_some(), "a key of the lease went");
        }
        assert_eq!(store.lease_info(id).unwrap().keys, 3, "the lease lost keys");
        drop(s);
        let s = open(dir.path());
        let store: &dyn Store = &s;
        assert_eq!(store.lease_info(id).unwrap().keys, 3, "on disk too");
        let revoked = store.apply(RevokeLease { id }, None).wait().unwrap();
        assert_eq!(revoked.deleted, 3);
    }

    /// A refusal is an answer, not a failure halfway: a keyed write whose condition fails
    /// (its outcome recorded, so the batch changes) leaves the other writes of its group
    /// written and answered. (The halfway rule once took the record for a half-done write
    /// and failed the whole group with the refusal; the linearizability test caught it.)
    #[test]
    fn a_recorded_refusal_leaves_the_rest_of_its_group_written() {
        let dir = tempfile::tempdir().unwrap();
        let s = open_grouping(dir.path());
        s.put(b"k", b"v", Condition::None).wait().unwrap();
        let key = Some(IdempotencyKey {
            session: b"s".to_vec(),
            key: b"w1".to_vec(),
            expires_at_unix_ms: now_unix_ms() + 3_600_000,
        });
        // A put whose condition cannot hold (the key is at version 1).
        let refused_put = || {
            WriteOp::from(write::Put {
                key: b"k".to_vec(),
                value: b"w".to_vec(),
                cond: Condition::IfVersion(7),
                attach: write::Attach::None,
            })
        };
        let refused = s.write(refused_put(), key.clone());
        let other = s.put(b"other", b"v", Condition::None);
        assert!(matches!(
            refused.wait(),
            Err(StoreError::ConditionFailed { .. })
        ));
        assert_eq!(other.wait().unwrap().version, 1, "the group was written");
        assert!(s.get(b"other").unwrap().is_some());
        // The refusal was recorded: its key replays it.
        let again = s.write(refused_put(), key);
        assert!(matches!(
            again.wait(),
            Err(StoreError::ConditionFailed { .. })
        ));
        assert_eq!(s.stats().idempotent_replays, 1);
    }

    /// A batch is one revision of many events: the history's event bound trims the oldest
    /// revisions, whole, however few they are, and the count survives a reopen.
    #[test]
    fn history_keeps_at_most_its_events_however_large_the_batches() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || {
            let mut o = RocksOptions::new(dir.path());
            o.compaction_interval_s = 0;
            o.history_events = 100;
            o
        };
        let all = KeyRange::default();
        let batch = |s: &RocksStore, round: u8| {
            let keys: Vec<Vec<u8>> = (0..40u8).map(|i| vec![round, i]).collect();
            put_all(s, &keys);
        };
        {
            let s = open_with(opts());
            for round in 0..3 {
                batch(&s, round); // revisions 1..=3, 40 events each
            }
            // 120 events: past 100 by more than a tenth, so revision 1 went.
            assert_eq!(
                s.events(&all, 0, PageLimits::events(1000)),
                Err(StoreError::Compacted { oldest_revision: 2 })
            );
            assert_eq!(
                s.events(&all, 1, PageLimits::events(1000))
                    .unwrap()
                    .events
                    .len(),
                80
            );
        }
        let s = open_with(opts());
        batch(&s, 3); // 4: 120 again, counted from disk at open
        assert_eq!(
            s.events(&all, 1, PageLimits::events(1000)),
            Err(StoreError::Compacted { oldest_revision: 3 })
        );
    }

    /// The history keeps its window of revisions across commits and reopens: older ones go
    /// in whole trims, a read from before them is `Compacted` with the oldest revision a
    /// watch can start at, and events after a reopen continue the same sequence.
    #[test]
    fn history_keeps_its_window_across_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let opts = || {
            let mut o = RocksOptions::new(dir.path());
            o.compaction_interval_s = 0;
            o.history_revisions = 10;
            o
        };
        let all = KeyRange::default();
        {
            let s = open_with(opts());
            for i in 0..11u8 {
                s.put(&[b'k', i], b"v", Condition::None).wait().unwrap();
            }
            // 11 revisions, window 10: not yet a tenth past it (trims go 1 at a time here,
            // since a tenth of 10 is 1: the first trim comes at revision 12).
            assert_eq!(
                s.events(&all, 0, PageLimits::events(100))
                    .unwrap()
                    .events
                    .len(),
                11
            );
            s.put(b"k", b"v", Condition::None).wait().unwrap(); // 12: history after 2
            assert_eq!(
                s.events(&all, 1, PageLimits::events(100)),
                Err(StoreError::Compacted { oldest_revision: 3 })
            );
            let page = s.events(&all, 2, PageLimits::events(100)).unwrap();
            assert_eq!((page.events.len(), page.through), (10, 12));
            assert_eq!(page.events[0].revision(), 3);
        }
        let s = open_with(opts());
        assert_eq!(
            s.events(&all, 0, PageLimits::events(100)),
            Err(StoreError::Compacted { oldest_revision: 3 }),
            "the trim is durable"
        );
        s.delete(b"k", Condition::None).wait().unwrap(); // 13
        let page = s.events(&all, 11, PageLimits::events(100)).unwrap();
        let got: Vec<_> = page
            .events
            .iter()
            .map(|e| (e.kind, e.entry.key.clone(), e.revision()))
            .collect();
        assert_eq!(
            got,
            vec![
                (EventKind::Put, b"k".to_vec(), 12),
                (EventKind::Delete, b"k".to_vec(), 13)
            ]
        );
        assert_eq!(s.changes().revision(), 13, "published, also after a reopen");
    }
}
