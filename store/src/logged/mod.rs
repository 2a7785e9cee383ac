//! The logged memory engine: the memory engine's state, made durable by a log of each
//! write group's effects, synced before any write of the group is answered (Redis's AOF
//! with `appendfsync always`, without its fork and with group commit).
//!
//! - [`LoggedStore`]: the engine. Reads go to the memory state from the caller's thread, as
//!   with `--engine memory`. Writes go over a bounded queue to one committer thread, which
//!   takes what is queued (up to `group_commit_max_writes`), applies it to the state under
//!   one write lock while capturing its effects, writes the effects as one record, syncs it,
//!   and only then lets reads see the group and answers its writes.
//! - Visibility: while a group is applied but not durable, each key it changed reads as it
//!   was before (its pre-image, kept by the state), and the store's revision, scans and
//!   watch pages stop before it. A read never sees what a crash could take back.
//! - A log that cannot be written or synced fails the group's writes, and the store takes
//!   no further writes (`unavailable`) while reads go on from what is durable; a restart
//!   recovers from the log. There is no undoing a group in memory, and a failed `fsync`
//!   leaves the file's state unknown (PostgreSQL's rule), so carrying on would risk
//!   answering writes that are not on disk.
//! - [`effects`]: the record's contents. [`files`]: segments, records, snapshots.
//! - Snapshots: once the log since the last snapshot outgrows `max(snapshot_min_log_bytes,
//!   the last snapshot's size)`, the committer starts a new segment and a thread writes
//!   the state as of that segment's start: leases and idempotency records (taken by the
//!   committer between groups, when all are durable), then the keys in chunks under short
//!   read locks, each key as durable. Writes go on meanwhile; a key written after the
//!   segment started is in the log too, and replaying it over the snapshot sets it again
//!   (effects are absolute). Then the segments before go.
//! - Recovery: the newest snapshot, then every segment from its own on, each record checked;
//!   the log ends at the first record that does not hold in the last segment (a torn write
//!   that was never acknowledged: an acknowledged one was synced whole), and its bytes are
//!   zeroed; also in an earlier segment when every later one is empty (a segment started
//!   for a snapshot just before a crash), and those go. A bad record anywhere else, a
//!   missing segment, or a log without a snapshot that does not start at segment 1 is
//!   corruption: the open fails.
//! - Checkpoints (`Admin.checkpoint`), one at a time: the committer starts a segment and
//!   hands over the leases and records; a snapshot goes into the new directory, then the live
//!   log from that segment up to its last whole record (pinned against pruning meanwhile).
//! - Space: a segment is made (zero-filled) in the background before it is needed; when
//!   the current one is nearly full, a group waits for that making to end and is refused
//!   with `storage full`, before it touches the state, unless it worked (tried again once a
//!   second).

pub(crate) mod effects;
mod files;

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::memory::MemoryStore;
use crate::{
    Completer, Entry, Found, IdempotencyKey, Pending, ScanPage, ScanRequest, Store, StoreError,
    StoreStats, WriteOp, WriteOutcome,
};

/// Smallest segment allowed (a test can use this; production wants tens of MiB).
pub const MIN_SEGMENT_BYTES: u64 = 64 << 10;
/// Keys per chunk of a snapshot: one short read lock each.
const SNAPSHOT_CHUNK_KEYS: usize = 1_024;
/// A group stops taking writes past this many bytes of keys and values (a tenth of a
/// segment at most), so that a record fits a segment.
const GROUP_BYTES_PER_SEGMENT: u64 = 10;
/// How long a checkpoint waits for the committer to finish its group and start a segment.
const CHECKPOINT_HEAD_WAIT: Duration = Duration::from_secs(30);
/// How often an idle committer looks for work of its own (a snapshot asked for).
const IDLE_CHECK: Duration = Duration::from_millis(200);

/// How the logged engine is set up.
#[derive(Debug, Clone)]
pub struct LogOptions {
    pub dir: PathBuf,
    /// Size of each log segment.
    pub segment_bytes: u64,
    /// The log may grow to this before the first snapshot (later: the last snapshot's size,
    /// if larger).
    pub snapshot_min_log_bytes: u64,
    pub group_commit_max_writes: usize,
    /// The longest a write queued by a server worker waits for the end of that worker's
    /// pass (its run through every ready connection) before its group is committed anyway
    /// (see [`Wake`]).
    pub group_wait_max_us: u64,
    pub write_queue_depth: usize,
    pub history_events: usize,
    pub history_bytes: usize,
    /// Idempotency records kept at most (see [`crate::records`]).
    pub max_records: usize,
    /// Run the committer as batch work, which does not preempt a worker when woken (see
    /// [`crate::committer::yield_to_workers`]; off by default).
    pub committer_sched_batch: bool,
}

impl LogOptions {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            segment_bytes: 64 << 20,
            snapshot_min_log_bytes: 256 << 20,
            group_commit_max_writes: 1_024,
            group_wait_max_us: 500,
            write_queue_depth: 16_384,
            history_events: crate::memory::DEFAULT_HISTORY_EVENTS,
            history_bytes: crate::memory::DEFAULT_HISTORY_BYTES,
            max_records: crate::records::DEFAULT_MAX_RECORDS,
            committer_sched_batch: false,
        }
    }

    fn validate(&self) -> Result<(), LogError> {
        let bad = |m: String| Err(LogError::Invalid(m));
        if self.segment_bytes < MIN_SEGMENT_BYTES || self.segment_bytes > u32::MAX as u64 {
            return bad(format!(
                "log segment_bytes must be {MIN_SEGMENT_BYTES}..={}, not {}",
                u32::MAX,
                self.segment_bytes
            ));
        }
        if self.snapshot_min_log_bytes < self.segment_bytes {
            return bad("log snapshot_min_log_bytes must be at least segment_bytes".into());
        }
        if self.group_commit_max_writes == 0 || self.write_queue_depth == 0 {
            return bad("group_commit_max_writes and write_queue_depth must be at least 1".into());
        }
        if self.group_wait_max_us > 100_000 {
            return bad("group_wait_max_us must be at most 100000".into());
        }
        if self.history_events == 0 || self.history_bytes == 0 {
            return bad("history_events and history_bytes must be at least 1".into());
        }
        Ok(())
    }
}

/// Why the log could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("invalid log options: {0}")]
    Invalid(String),
    #[error("log directory {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("log directory {0} is in use by another process")]
    Locked(PathBuf),
    #[error("the log in {path} is damaged: {detail}")]
    Corrupt { path: PathBuf, detail: String },
}

#[derive(Debug, Default)]
struct Counters {
    syncs: AtomicU64,
    groups: AtomicU64,
    commits: AtomicU64,
    queued: AtomicU64,
    log_bytes: AtomicU64,
    /// Tests: the next syncs fail.
    #[cfg(test)]
    fail_syncs: AtomicBool,
    /// Tests: making the next segment fails.
    #[cfg(test)]
    fail_prepare: Arc<AtomicBool>,
}

/// When the committer takes a group. A write submitted from a server worker does not wake
/// it: the worker calls [`Store::worker_idle`] when it has run through every ready
/// connection and is about to wait for I/O, and that wakes it, once, for everything the
/// pass submitted (as Redis syncs once per pass of its event loop). Under load a pass
/// gathers the writes of many connections into one group, one sync; under light load
/// passes are short and nothing waits. A write from any other thread (the lease reaper,
/// an embedding program) wakes the committer at once.
#[derive(Debug, Default)]
struct Wake {
    /// Set with an unpark when the committer should take what is queued now.
    go: AtomicBool,
    /// Writes submitted by a worker since its last `worker_idle`.
    deferred: AtomicU64,
    /// The store is being dropped: the committer drains the queue and ends.
    closed: AtomicBool,
    /// The committer is parked with nothing queued (a worker's first write then unparks it,
    /// so that the write waits at most `group_wait_max_us` however long the worker stays
    /// busy; an unpark at any other time would end its wait for the pass early).
    idle: AtomicBool,
    /// A checkpoint waiting for the committer to start a segment and hand it the state
    /// the log after that segment's start replays over (see `LoggedStore::checkpoint`).
    checkpoint: std::sync::Mutex<Option<SyncSender<Result<Head, String>>>>,
    /// A checkpoint is copying segments: a snapshot of the live log keeps every segment
    /// (it still drops older snapshots).
    pinned: AtomicBool,
}

/// Where a snapshot starts: its segment, the revision then, and the leases and records as
/// effects.
type Head = (u64, u64, Vec<u8>);

thread_local! {
    /// Whether this thread is a server worker that calls [`Store::worker_idle`].
    static PASSES: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// See the module's documentation.
pub struct LoggedStore {
    mem: Arc<MemoryStore>,
    writes: Option<SyncSender<Op>>,
    committer: Option<JoinHandle<()>>,
    counters: Arc<Counters>,
    /// Set when the log failed: writes are refused until a restart.
    failed: Arc<AtomicBool>,
    /// Asks the committer for a snapshot at its next group (`compact`).
    snapshot_now: Arc<AtomicBool>,
    /// Held while open (`LOCK`).
    _lock: nix::fcntl::Flock<File>,
    wake: Arc<Wake>,
    /// The committer's thread, to unpark.
    committer_thread: std::thread::Thread,
    dir: PathBuf,
    /// One checkpoint at a time (the committer's hand-over and the segment pin are single).
    checkpointing: std::sync::Mutex<()>,
}

impl LoggedStore {
    fn go(&self) {
        self.wake.go.store(true, Ordering::Release);
        self.committer_thread.unpark();
    }
}

impl std::fmt::Debug for LoggedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoggedStore").finish_non_exhaustive()
    }
}

struct Op {
    op: WriteOp,
    idem: Option<IdempotencyKey>,
    done: Completer<WriteOutcome>,
}

impl Op {
    /// Bytes the op adds to a group record, at least: the room a group is refused without
    /// when the next segment cannot be made (a full disk). An estimate short of the record
    /// let a group through that then needed that segment, and failed the log until a
    /// restart: each change's own bytes count, its idempotency record too, and a lease's
    /// revoke or expiry, whose deletes the op does not name, counts as many.
    fn weight(&self) -> u64 {
        /// A change's bytes beyond its key and value (effect tag, lengths, version, lease).
        const PER_CHANGE: usize = 48;
        /// An idempotency record beyond its key: the outcome, expiry and fingerprint.
        const PER_RECORD: usize = 128;
        /// A revoke or an expiry: the deletes of the keys of the leases it ends.
        const LEASE_ENDS: usize = 64 * 1024;
        let changes = match &self.op {
            WriteOp::Put(p) => p.key.len() + p.value.len() + PER_CHANGE,
            WriteOp::Delete(d) => d.key.len() + PER_CHANGE,
            WriteOp::PutMany(m) => m
                .items
                .iter()
                .map(|(k, v, _)| k.len() + v.len() + PER_CHANGE)
                .sum(),
            WriteOp::Increment(i) => i.key.len() + 20 + PER_CHANGE,
            WriteOp::GrantLease(_) => PER_CHANGE,
            WriteOp::RevokeLease(_) | WriteOp::ExpireLeases(_) => LEASE_ENDS,
        };
        let record = self
            .idem
            .as_ref()
            .map_or(0, |k| k.session.len() + k.key.len() + PER_RECORD);
        (changes + record + 64) as u64
    }
}

fn io_error(path: &Path) -> impl Fn(std::io::Error) -> LogError + '_ {
    move |source| LogError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The instance secret, made once and kept in `secret`.
fn secret(dir: &Path) -> Result<[u8; 32], LogError> {
    let path = dir.join("secret");
    match fs::read(&path) {
        Ok(b) => b.try_into().map_err(|_| LogError::Corrupt {
            path: path.clone(),
            detail: "the secret is not 32 bytes".into(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s: [u8; 32] = rand::random();
            let tmp = dir.join("secret.tmp");
            let write = || -> std::io::Result<()> {
                let mut f = File::create(&tmp)?;
                std::io::Write::write_all(&mut f, &s)?;
                f.sync_all()?;
                fs::rename(&tmp, &path)?;
                files::sync_dir(dir)
            };
            write().map_err(io_error(&path))?;
            Ok(s)
        }
        Err(e) => Err(io_error(&path)(e)),
    }
}

impl LoggedStore {
    /// Opens (or creates) the log in `opts.dir` and recovers the state it holds.
    pub fn open(opts: LogOptions) -> Result<Self, LogError> {
        opts.validate()?;
        let dir = opts.dir.clone();
        fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        if dir.join("CURRENT").exists() {
            return Err(LogError::Invalid(format!(
                "{} holds a RocksDB database (engine = \"rocksdb\"), not a log",
                dir.display()
            )));
        }
        let lock_path = dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(io_error(&lock_path))?;
        let lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
            .map_err(|_| LogError::Locked(dir.clone()))?;
        let secret = secret(&dir)?;
        let checkpointing = std::sync::Mutex::new(());
        let mem = Arc::new(MemoryStore::logging(
            opts.history_events,
            opts.history_bytes,
            secret,
        ));
        mem.set_max_records(opts.max_records);
        let corrupt = |detail: String| LogError::Corrupt {
            path: dir.clone(),
            detail,
        };
        for entry in fs::read_dir(&dir).map_err(io_error(&dir))? {
            let path = entry.map_err(io_error(&dir))?.path();
            if path.extension().is_some_and(|e| e == "tmp") {
                fs::remove_file(&path).map_err(io_error(&path))?;
            }
        }
        // The newest snapshot, then the segments from its own on.
        let snapshots = files::numbered(&dir, "snapshot-").map_err(io_error(&dir))?;
        let mut base = None;
        let mut snapshot_bytes = 0;
        if let Some(&seq) = snapshots.last() {
            let path = files::snapshot_path(&dir, seq);
            snapshot_bytes = fs::metadata(&path).map_err(io_error(&path))?.len();
            let mut revision = None;
            files::read_snapshot(&path, |kind, payload| match kind {
                files::FRAME_HEADER => {
                    let r = payload
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map(u64::from_le_bytes)
                        .ok_or("a short snapshot header")?;
                    revision = Some(r);
                    Ok(())
                }
                files::FRAME_EFFECTS => mem.replay(payload, revision.unwrap_or(0), false),
                other => Err(format!("unknown snapshot frame kind {other}")),
            })
            .map_err(corrupt)?;
            base = Some((seq, revision.unwrap_or(0)));
        }
        let segments: Vec<u64> = files::numbered(&dir, "log-")
            .map_err(io_error(&dir))?
            .into_iter()
            .filter(|&s| base.is_none_or(|(b, _)| s >= b))
            .collect();
        // A snapshot's own segment is made before the snapshot; without a snapshot the log
        // starts at segment 1 (segments go only once a snapshot covers them).
        match (base, segments.first()) {
            (Some((b, _)), first) if first != Some(&b) => {
                return Err(corrupt(format!("segment {b} (the snapshot's) is missing")));
            }
            (None, Some(&first)) if first != 1 => {
                return Err(corrupt(format!(
                    "the log starts at segment {first} and there is no snapshot"
                )));
            }
            _ => {}
        }
        let mut end = None;
        let mut log_bytes = 0u64;
        for (i, &seq) in segments.iter().enumerate() {
            if i > 0 && segments[i - 1] + 1 != seq {
                return Err(corrupt(format!(
                    "segment {} is missing",
                    segments[i - 1] + 1
                )));
            }
            let path = files::segment_path(&dir, seq);
            let buf = fs::read(&path).map_err(io_error(&path))?;
            let (records, at, why) = files::records(seq, &buf);
            for r in &records {
                mem.replay(r.effects, r.revision, true)
                    .map_err(|e| corrupt(format!("segment {seq}: {e}")))?;
            }
            let mut last = i + 1 == segments.len();
            if why.is_some() && !last && later_segments_are_empty(&dir, &segments[i + 1..])? {
                // A segment started after this one (a snapshot's, a checkpoint's) before
                // the crash, with nothing in it: this one's torn end is still the log's.
                for &later in &segments[i + 1..] {
                    let path = files::segment_path(&dir, later);
                    fs::remove_file(&path).map_err(io_error(&path))?;
                }
                files::sync_dir(&dir).map_err(io_error(&dir))?;
                last = true;
            }
            match why {
                Some(why) if !last => return Err(corrupt(format!("segment {seq}: {why}"))),
                Some(why) => {
                    tracing::warn!(segment = seq, offset = at, reason = %why,
                        "the log ends in a torn record (never acknowledged); it is dropped");
                }
                None => {}
            }
            log_bytes += at as u64;
            if last {
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .map_err(io_error(&path))?;
                files::zero_tail(&file, &buf, at).map_err(io_error(&path))?;
                end = Some((seq, at as u64));
                // The log ends here (later segments, if any, were empty and are gone).
                break;
            }
        }
        mem.recovered(base.map_or(0, |(_, r)| r));
        let writer = match end {
            Some((seq, at)) => files::Writer::resume(&dir, seq, at, opts.segment_bytes),
            None => files::Writer::create(&dir, base.map_or(1, |(b, _)| b), opts.segment_bytes),
        }
        .map_err(io_error(&dir))?;
        let counters = Arc::new(Counters::default());
        #[cfg(test)]
        let writer = {
            let mut writer = writer;
            writer.fail_prepare = Some(Arc::clone(&counters.fail_prepare));
            writer
        };
        counters
            .log_bytes
            .store(files::disk_bytes(&dir), Ordering::Relaxed);
        let failed = Arc::new(AtomicBool::new(false));
        let snapshot_now = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel(opts.write_queue_depth);
        let wake = Arc::new(Wake::default());
        let committer = Committer {
            mem: Arc::clone(&mem),
            rx,
            writer,
            opts: opts.clone(),
            counters: Arc::clone(&counters),
            failed: Arc::clone(&failed),
            snapshot_now: Arc::clone(&snapshot_now),
            since_snapshot_bytes: log_bytes,
            snapshot_bytes: Arc::new(AtomicU64::new(snapshot_bytes)),
            snapshot: None,
            outcomes: Vec::new(),
            wake: Arc::clone(&wake),
        };
        let batch = opts.committer_sched_batch;
        let handle = std::thread::Builder::new()
            .name("capkv-log".into())
            .spawn(move || {
                crate::committer::start_committer_thread(batch);
                committer.run()
            })
            .map_err(io_error(&dir))?;
        tracing::info!(dir = %dir.display(), revision = mem.revision().unwrap_or(0),
            segments = segments.len(), "log recovered");
        let committer_thread = handle.thread().clone();
        Ok(Self {
            mem,
            writes: Some(tx),
            committer: Some(handle),
            wake,
            committer_thread,
            dir: opts.dir.clone(),
            checkpointing,
            counters,
            failed,
            snapshot_now,
            _lock: lock,
        })
    }

    fn submit(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        if self.failed.load(Ordering::Acquire) {
            return Pending::ready(Err(failed_error()));
        }
        let Some(tx) = &self.writes else {
            return Pending::ready(Err(StoreError::Unavailable("storage is closed".into())));
        };
        let (done, pending) = Pending::channel();
        let queued_before = self.counters.queued.fetch_add(1, Ordering::SeqCst);
        match tx.try_send(Op { op, idem, done }) {
            Ok(()) => {
                if PASSES.with(|p| p.get()) {
                    self.wake.deferred.fetch_add(1, Ordering::Relaxed);
                    if queued_before == 0 && self.wake.idle.load(Ordering::SeqCst) {
                        // The committer may be parked idle: it now waits for this
                        // worker's pass to end, at most `group_wait_max_us`, however
                        // long the worker stays busy.
                        self.committer_thread.unpark();
                    }
                } else {
                    self.go();
                }
                pending
            }
            Err(e) => {
                self.counters.queued.fetch_sub(1, Ordering::Relaxed);
                Pending::ready(Err(crate::queue_refusal(&e)))
            }
        }
    }
}

/// Whether `dir` holds a log of this engine (so that another engine does not start an
/// empty store over it).
pub fn holds_a_log(dir: &Path) -> bool {
    dir.join("secret").exists() && files::numbered(dir, "log-").is_ok_and(|s| !s.is_empty())
}

fn failed_error() -> StoreError {
    StoreError::Unavailable(
        "the write-ahead log failed; writes are refused until the server restarts".into(),
    )
}

impl Drop for LoggedStore {
    fn drop(&mut self) {
        // The committer drains what is queued, then ends.
        self.writes = None;
        self.wake.closed.store(true, Ordering::Release);
        self.go();
        if let Some(h) = self.committer.take() {
            let _ = h.join();
        }
    }
}

struct Committer {
    mem: Arc<MemoryStore>,
    rx: Receiver<Op>,
    writer: files::Writer,
    opts: LogOptions,
    counters: Arc<Counters>,
    failed: Arc<AtomicBool>,
    snapshot_now: Arc<AtomicBool>,
    /// Log bytes written since the last snapshot started.
    since_snapshot_bytes: u64,
    /// The size of the last snapshot written.
    snapshot_bytes: Arc<AtomicU64>,
    snapshot: Option<JoinHandle<()>>,
    outcomes: Vec<Result<WriteOutcome, StoreError>>,
    wake: Arc<Wake>,
}

impl Committer {
    fn run(mut self) {
        let mut group: Vec<Op> = Vec::new();
        let pass_wait = Duration::from_micros(self.opts.group_wait_max_us);
        loop {
            self.serve_checkpoint();
            if self.counters.queued.load(Ordering::Acquire) == 0 {
                if self.wake.closed.load(Ordering::Acquire) {
                    break;
                }
                self.wake.idle.store(true, Ordering::SeqCst);
                if self.counters.queued.load(Ordering::SeqCst) == 0 {
                    std::thread::park_timeout(IDLE_CHECK);
                }
                self.wake.idle.store(false, Ordering::SeqCst);
                // Idle: a snapshot `compact` asked for need not wait for a write.
                self.maybe_snapshot();
                continue;
            }
            // Writes are queued. Unless a worker has said its pass is over (or a thread
            // that is not a worker wrote), wait for that, at most `group_wait_max_us`.
            if !self.wake.go.swap(false, Ordering::AcqRel) {
                std::thread::park_timeout(pass_wait);
                self.wake.go.store(false, Ordering::Release);
            }
            let budget = self.opts.segment_bytes / GROUP_BYTES_PER_SEGMENT;
            let mut bytes = 0;
            while group.len() < self.opts.group_commit_max_writes && bytes < budget {
                match self.rx.try_recv() {
                    Ok(op) => {
                        bytes += op.weight();
                        group.push(op);
                    }
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            if group.is_empty() {
                // Counted but not yet in the queue (a submit between its count and its
                // send): the next look finds it.
                std::thread::yield_now();
                continue;
            }
            self.counters
                .queued
                .fetch_sub(group.len() as u64, Ordering::AcqRel);
            self.commit(&mut group, bytes);
            group.clear();
            self.maybe_snapshot();
        }
        if let Some(h) = self.snapshot.take() {
            let _ = h.join();
        }
    }

    fn commit(&mut self, group: &mut Vec<Op>, bytes: u64) {
        if self.failed.load(Ordering::Acquire) {
            group
                .drain(..)
                .for_each(|op| op.done.complete(Err(failed_error())));
            return;
        }
        // Refused before the state is touched: the group might not fit what is left of
        // this segment, and the next one could not be made (a full disk).
        if self.writer.room() < bytes.saturating_mul(2) && !self.writer.next_is_ready() {
            group.drain(..).for_each(|op| {
                op.done.complete(Err(StoreError::StorageFull(
                    "the disk is full: the log's next segment cannot be made".into(),
                )))
            });
            return;
        }
        let mut applying = self.mem.begin_group();
        self.outcomes.clear();
        for op in group.iter_mut() {
            let write = std::mem::replace(
                &mut op.op,
                WriteOp::ExpireLeases(crate::write::ExpireLeases),
            );
            let idem = op.idem.take();
            self.outcomes.push(applying.write(write, idem));
        }
        let (effects, revision) = applying.done();
        if !effects.is_empty() {
            let logged = self
                .writer
                .append(revision, &effects)
                .and_then(|()| self.writer.sync());
            #[cfg(test)]
            let logged =
                logged.and_then(
                    |()| match self.counters.fail_syncs.load(Ordering::Acquire) {
                        true => Err(std::io::Error::other("injected sync failure")),
                        false => Ok(()),
                    },
                );
            if let Err(e) = logged {
                tracing::error!(error = %e, revision,
                    "the write-ahead log could not be written or synced: writes are refused until a restart");
                self.failed.store(true, Ordering::Release);
                // The group stays hidden from reads (its pre-images are kept).
                group
                    .drain(..)
                    .for_each(|op| op.done.complete(Err(failed_error())));
                return;
            }
            let record = (effects.len() + 16) as u64;
            self.since_snapshot_bytes += record;
            self.counters.log_bytes.fetch_add(record, Ordering::Relaxed);
            self.counters.syncs.fetch_add(1, Ordering::Relaxed);
        }
        self.mem.end_group(effects);
        self.counters.groups.fetch_add(1, Ordering::Relaxed);
        self.counters
            .commits
            .fetch_add(group.len() as u64, Ordering::Relaxed);
        for (op, outcome) in group.drain(..).zip(self.outcomes.drain(..)) {
            op.done.complete(outcome);
        }
    }

    /// Starts a new segment and takes the state a snapshot from its start needs. Between
    /// groups: everything applied is durable, so the head is too.
    fn head(&mut self) -> std::io::Result<Head> {
        self.writer.roll(0)?;
        let seq = self.writer.seq();
        let mut head = Vec::new();
        let revision = self.mem.snapshot_head(&mut head);
        Ok((seq, revision, head))
    }

    /// Answers a checkpoint waiting for a head, if one is.
    fn serve_checkpoint(&mut self) {
        let waiting = self
            .wake
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(tx) = waiting {
            let head = if self.failed.load(Ordering::Acquire) {
                Err("the write-ahead log failed; restart the server first".to_string())
            } else {
                self.head()
                    .map_err(|e| format!("starting a log segment: {e}"))
            };
            let _ = tx.send(head);
        }
    }

    /// Starts a snapshot when the log has outgrown the last one (or `compact` asked).
    fn maybe_snapshot(&mut self) {
        if self.snapshot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        if let Some(h) = self.snapshot.take() {
            let _ = h.join();
        }
        let threshold = self
            .opts
            .snapshot_min_log_bytes
            .max(self.snapshot_bytes.load(Ordering::Relaxed));
        let asked = self.snapshot_now.swap(false, Ordering::AcqRel);
        if !asked && self.since_snapshot_bytes < threshold {
            return;
        }
        if self.failed.load(Ordering::Acquire) {
            return;
        }
        let (seq, revision, head) = match self.head() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "could not start a log segment for a snapshot");
                return;
            }
        };
        self.since_snapshot_bytes = 0;
        let wake = Arc::clone(&self.wake);
        let mem = Arc::clone(&self.mem);
        let dir = self.opts.dir.clone();
        let sizes = Arc::clone(&self.snapshot_bytes);
        let log_bytes = Arc::clone(&self.counters);
        let spawned = std::thread::Builder::new()
            .name("capkv-snapshot".into())
            .spawn(move || {
                let started = Instant::now();
                let written = write_snapshot(&mem, &dir, seq, revision, &head).inspect(|_| {
                    let keep_from = match wake.pinned.load(Ordering::SeqCst) {
                        true => 0,
                        false => seq,
                    };
                    if let Err(e) = prune(&dir, keep_from) {
                        tracing::warn!(error = %e, seq, "removing what the snapshot replaced failed; tried again after the next");
                    }
                });
                match written {
                    Ok(bytes) => {
                        sizes.store(bytes, Ordering::Relaxed);
                        log_bytes
                            .log_bytes
                            .store(files::disk_bytes(&dir), Ordering::Relaxed);
                        tracing::info!(
                            seq,
                            revision,
                            bytes,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "snapshot written"
                        );
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, seq, "snapshot failed; the log is kept whole")
                    }
                }
            });
        match spawned {
            Ok(h) => self.snapshot = Some(h),
            Err(e) => tracing::warn!(error = %e, "could not start the snapshot thread"),
        }
    }
}

/// Writes `snapshot-<seq>` into `dir`: the header, `head` (leases and records), every key as
/// durable. Its size in bytes.
fn write_snapshot(
    mem: &MemoryStore,
    dir: &Path,
    seq: u64,
    revision: u64,
    head: &[u8],
) -> std::io::Result<u64> {
    let mut w = files::SnapshotWriter::create(dir, seq)?;
    let mut bytes = 0u64;
    let mut body = || -> std::io::Result<()> {
        w.frame(files::FRAME_HEADER, &revision.to_le_bytes())?;
        w.frame(files::FRAME_EFFECTS, head)?;
        bytes += head.len() as u64;
        let mut chunk = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            chunk.clear();
            let next = mem.snapshot_keys(after.as_deref(), SNAPSHOT_CHUNK_KEYS, &mut chunk);
            if !chunk.is_empty() {
                w.frame(files::FRAME_EFFECTS, &chunk)?;
                bytes += chunk.len() as u64;
            }
            match next {
                Some(last) => after = Some(last),
                None => return Ok(()),
            }
        }
    };
    if let Err(e) = body() {
        w.abandon();
        return Err(e);
    }
    w.finish()?;
    Ok(bytes)
}

/// Whether every segment in `seqs` holds no record (made, never written).
fn later_segments_are_empty(dir: &Path, seqs: &[u64]) -> Result<bool, LogError> {
    for &s in seqs {
        let path = files::segment_path(dir, s);
        let buf = fs::read(&path).map_err(io_error(&path))?;
        if !files::records(s, &buf).0.is_empty() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Removes the segments before `seq` and the snapshots before the newest.
fn prune(dir: &Path, seq: u64) -> std::io::Result<()> {
    for old in files::numbered(dir, "log-")?
        .into_iter()
        .filter(|&s| s < seq)
    {
        fs::remove_file(files::segment_path(dir, old))?;
    }
    let snapshots = files::numbered(dir, "snapshot-")?;
    if let Some(&newest) = snapshots.last() {
        for old in snapshots.into_iter().filter(|&s| s < newest) {
            fs::remove_file(files::snapshot_path(dir, old))?;
        }
    }
    files::sync_dir(dir)
}

impl Store for LoggedStore {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.mem.get(key)
    }

    fn get_into(&self, key: &[u8], value: &mut Vec<u8>) -> Result<Option<Found>, StoreError> {
        self.mem.get_into(key, value)
    }

    fn prefetch(&self, keys: &[&[u8]]) {
        self.mem.prefetch(keys)
    }

    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        self.submit(op, idem)
    }

    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.mem.scan(req)
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.mem.get_many(keys)
    }

    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<crate::ManyRead>, StoreError> {
        self.mem.get_many_within(keys, max_payload_bytes)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.mem.revision()
    }

    crate::forward_history_and_leases!(mem);

    fn engine_name(&self) -> &'static str {
        "memory-log"
    }

    fn stats(&self) -> StoreStats {
        let c = &self.counters;
        let mem = self.mem.stats();
        StoreStats {
            live_data_bytes: c.log_bytes.load(Ordering::Relaxed),
            wal_syncs: c.syncs.load(Ordering::Relaxed),
            commit_groups: c.groups.load(Ordering::Relaxed),
            commits: c.commits.load(Ordering::Relaxed),
            write_queue_len: c.queued.load(Ordering::Relaxed),
            idempotent_replays: mem.idempotent_replays,
            records_evicted: mem.records_evicted,
            ..StoreStats::default()
        }
    }

    fn instance_secret(&self) -> [u8; 32] {
        self.mem.instance_secret()
    }

    fn write_refusal(&self) -> Option<String> {
        self.failed
            .load(Ordering::Acquire)
            .then(|| failed_error().to_string())
    }

    fn compact(&self) -> Result<(), StoreError> {
        self.snapshot_now.store(true, Ordering::Release);
        self.committer_thread.unpark();
        Ok(())
    }

    /// A snapshot written into `dir`, then the log from the snapshot's segment copied up
    /// to its last whole record: the copy opens to the state at the end of that log, with
    /// writes going on meanwhile (the snapshot's keys, read as durable at different times,
    /// are all set again by the log after them, as in recovery).
    fn checkpoint(&self, dir: &Path) -> Result<(), StoreError> {
        let _one = self.checkpointing.lock().unwrap_or_else(|p| p.into_inner());
        crate::checkpoint_target_is_free(dir)?;
        let failed = |what: &str, e: &dyn std::fmt::Display| {
            StoreError::Invalid(format!(
                "checkpoint into {} failed: {what}: {e}",
                dir.display()
            ))
        };
        // No snapshot of the live log may drop a segment the copy still needs.
        self.wake.pinned.store(true, Ordering::SeqCst);
        struct Unpin<'a>(&'a AtomicBool);
        impl Drop for Unpin<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _unpin = Unpin(&self.wake.pinned);
        let (tx, rx) = mpsc::sync_channel(1);
        *self
            .wake
            .checkpoint
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
        self.committer_thread.unpark();
        let (seq, revision, head) = rx
            .recv_timeout(CHECKPOINT_HEAD_WAIT)
            .map_err(|e| failed("waiting for the committer", &e))?
            .map_err(|e| failed("the log", &e))?;
        let live = self.dir.as_path();
        let copy = || -> std::io::Result<()> {
            fs::create_dir_all(dir)?;
            let secret = dir.join("secret");
            fs::copy(live.join("secret"), &secret)?;
            File::open(&secret)?.sync_all()?;
            write_snapshot(&self.mem, dir, seq, revision, &head)?;
            // A segment listed with a later one after it was whole before that one began.
            let segments: Vec<u64> = files::numbered(live, "log-")?
                .into_iter()
                .filter(|&s| s >= seq)
                .collect();
            let contiguous = segments
                .iter()
                .enumerate()
                .all(|(i, &s)| s == seq + i as u64);
            if segments.first() != Some(&seq) || !contiguous {
                return Err(std::io::Error::other(format!(
                    "the live log's segments from {seq} are not all there: {segments:?}"
                )));
            }
            for s in segments {
                let buf = fs::read(files::segment_path(live, s))?;
                let (_, end, _) = files::records(s, &buf);
                let mut f = File::create(files::segment_path(dir, s))?;
                std::io::Write::write_all(&mut f, &buf[..end])?;
                f.sync_all()?;
            }
            files::sync_dir(dir)
        };
        copy().map_err(|e| {
            tracing::warn!(error = %e, dir = %dir.display(), "checkpoint failed");
            failed("copying", &e)
        })
    }

    fn worker_started(&self) {
        PASSES.with(|p| p.set(true));
    }

    fn worker_idle(&self) {
        if self.wake.deferred.swap(0, Ordering::AcqRel) > 0 {
            self.go();
        }
    }
}

/// Shared by tests: the last snapshot's number, if any.
#[cfg(test)]
fn snapshots(dir: &Path) -> Vec<u64> {
    files::numbered(dir, "snapshot-").unwrap_or_default()
}

#[cfg(test)]
mod tests;
