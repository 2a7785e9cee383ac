//! The conformance suite against the RocksDB engine, each case in its own temp directory.

use capkv_store::{
    BatchOutcome, Condition, DeleteOutcome, Entry, Pending, PutItem, PutOutcome, RocksOptions,
    RocksStore, ScanPage, ScanRequest, Store, StoreError,
};

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
    fn put(&self, key: &[u8], value: &[u8], cond: Condition) -> Pending<PutOutcome> {
        self.store.put(key, value, cond)
    }
    fn delete(&self, key: &[u8], cond: Condition) -> Pending<DeleteOutcome> {
        self.store.delete(key, cond)
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.store.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.store.get_many(keys)
    }
    fn put_many(&self, items: &[PutItem<'_>]) -> Pending<BatchOutcome> {
        self.store.put_many(items)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.store.revision()
    }
    fn engine_name(&self) -> &'static str {
        self.store.engine_name()
    }
}

capkv_store::conformance_tests!(temp_rocks());
