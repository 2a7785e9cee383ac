//! The conformance suite against the RocksDB engine, each case in its own temp directory.

use capkv_store::{
    Entry, IdempotencyKey, Pending, ScanPage, ScanRequest, Store, StoreError, WriteOp, WriteOutcome,
};
use capkv_store_rocks::{RocksOptions, RocksStore};

/// A store that owns its temp directory, so the directory outlives the database.
struct TempRocks {
    // Field order matters: the store closes before the directory is removed.
    store: RocksStore,
    _dir: tempfile::TempDir,
}

fn temp_rocks() -> TempRocks {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts = RocksOptions::new(dir.path());
    opts.compaction_interval_s = 0;
    TempRocks {
        store: RocksStore::open(opts).expect("open rocksdb"),
        _dir: dir,
    }
}

impl Store for TempRocks {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.store.get(key)
    }
    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        self.store.write(op, idem)
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.store.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.store.get_many(keys)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.store.revision()
    }
    capkv_store::forward_history_and_leases!(store);
    fn engine_name(&self) -> &'static str {
        self.store.engine_name()
    }
    fn compact(&self) -> Result<(), StoreError> {
        self.store.compact()
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.store.instance_secret()
    }
}

capkv_store::conformance_tests!(temp_rocks());
