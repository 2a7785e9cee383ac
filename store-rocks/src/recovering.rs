//! Starting on a full disk: serve reads at once, take writes once there is room.
//!
//! RocksDB's recovery writes (it flushes the WAL into a new table file at open), so on a
//! disk with no room left it cannot open read-write at all, and a restarted server had no
//! service, not even reads. [`open_or_read_only`] opens read-write when it can (the space
//! guard has released the reserve file first, which is usually enough); when RocksDB
//! still reports no space, it opens the same data read-only and serves reads from it,
//! while a thread measures free space and, once there is room, opens read-write and swaps
//! the new instance in. Calls in flight on the read-only instance finish on it; from the
//! swap on every call goes to the read-write one.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;

use arc_swap::ArcSwap;

use crate::rocks::{OpenError, RocksOptions, RocksStore};
use capkv_store::{
    Changes, Entry, EventPage, IdempotencyKey, KeyRange, PageLimits, Pending, ScanPage,
    ScanRequest, Store, StoreError, StoreStats, WriteOp, WriteOutcome,
};

/// The RocksDB engine at `opts.path`: read-write, or read-only until a full disk has room
/// again (see the module docs). Every other open failure is returned.
pub fn open_or_read_only(opts: RocksOptions) -> Result<Arc<dyn Store>, OpenError> {
    match RocksStore::open(opts.clone()) {
        Ok(store) => Ok(Arc::new(store)),
        Err(OpenError::NoSpace { path, detail }) => {
            let read_only = RocksStore::open_read_only(&opts)?;
            tracing::error!(
                path = %path, error = %detail,
                "disk full: rocksdb cannot recover read-write; serving reads read-only, writes refused until there is room"
            );
            Ok(Arc::new(Recovering::start(read_only, opts)?))
        }
        Err(e) => Err(e),
    }
}

/// A store that is read-only until its reopen thread swaps a read-write one in.
struct Recovering {
    current: Arc<ArcSwap<RocksStore>>,
    /// Every instance's, so that watchers waiting on it see writes after the reopen.
    changes: Arc<Changes>,
    /// Dropping it stops the reopen thread.
    stop: Option<mpsc::Sender<()>>,
    reopener: Option<JoinHandle<()>>,
}

impl Recovering {
    fn start(read_only: RocksStore, opts: RocksOptions) -> Result<Self, OpenError> {
        let changes = read_only.changes_shared();
        let shared_changes = Arc::clone(&changes);
        let current = Arc::new(ArcSwap::from_pointee(read_only));
        let (stop, stopped) = mpsc::channel::<()>();
        let swap_into = Arc::clone(&current);
        let every = opts.space.check_interval;
        let reopener = std::thread::Builder::new()
            .name("capkv-reopen".into())
            .spawn(move || loop {
                match stopped.recv_timeout(every) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                let space = Arc::clone(swap_into.load().space());
                space.check();
                if space.is_low() {
                    continue;
                }
                match RocksStore::open_with_changes(opts.clone(), Arc::clone(&changes)) {
                    Ok(rw) => {
                        swap_into.store(Arc::new(rw));
                        tracing::info!(
                            "disk space back: rocksdb reopened read-write; writes resume"
                        );
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rocksdb cannot reopen read-write yet");
                        if matches!(e, OpenError::NoSpace { .. }) {
                            // Recovery needs more than the watermark: give it the reserve
                            // back and wait for more room.
                            space.write_failed_for_space();
                        }
                    }
                }
            })
            .map_err(OpenError::Thread)?;
        Ok(Self {
            current,
            changes: shared_changes,
            stop: Some(stop),
            reopener: Some(reopener),
        })
    }
}

impl Drop for Recovering {
    fn drop(&mut self) {
        self.stop = None;
        if let Some(h) = self.reopener.take() {
            if h.join().is_err() {
                tracing::error!("the storage reopen thread panicked");
            }
        }
    }
}

impl Store for Recovering {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.current.load().get(key)
    }

    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        self.current.load().write(op, idem)
    }

    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.current.load().scan(req)
    }

    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.current.load().get_many(keys)
    }

    fn get_many_within(
        &self,
        keys: &[&[u8]],
        max_payload_bytes: usize,
    ) -> Result<Option<capkv_store::ManyRead>, StoreError> {
        self.current.load().get_many_within(keys, max_payload_bytes)
    }

    fn revision(&self) -> Result<u64, StoreError> {
        self.current.load().revision()
    }

    fn events(
        &self,
        range: &KeyRange,
        after: u64,
        max: PageLimits,
    ) -> Result<EventPage, StoreError> {
        self.current.load().events(range, after, max)
    }

    fn changes(&self) -> &Changes {
        &self.changes
    }

    fn lease_keep_alive(&self, id: u64) -> Result<capkv_store::LeaseInfo, StoreError> {
        self.current.load().lease_keep_alive(id)
    }

    fn lease_info(&self, id: u64) -> Result<capkv_store::LeaseInfo, StoreError> {
        self.current.load().lease_info(id)
    }

    fn lease_clock(&self) -> (usize, Option<std::time::Instant>) {
        self.current.load().lease_clock()
    }

    fn engine_name(&self) -> &'static str {
        self.current.load().engine_name()
    }

    fn stats(&self) -> StoreStats {
        self.current.load().stats()
    }

    fn instance_secret(&self) -> [u8; 32] {
        self.current.load().instance_secret()
    }

    fn compact(&self) -> Result<(), StoreError> {
        self.current.load().compact()
    }

    fn checkpoint(&self, dir: &std::path::Path) -> Result<(), StoreError> {
        self.current.load().checkpoint(dir)
    }

    fn write_refusal(&self) -> Option<String> {
        self.current.load().write_refusal()
    }
}
