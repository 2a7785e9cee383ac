//! The conformance suite against the RocksDB engine, each case in its own temp directory.

use capkv_store::conformance::Guarded;
use capkv_store_rocks::{RocksOptions, RocksStore};

fn temp_rocks() -> Guarded<RocksStore, tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts = RocksOptions::new(dir.path());
    opts.compaction_interval_s = 0;
    Guarded {
        store: RocksStore::open(opts).expect("open rocksdb"),
        guard: dir,
    }
}

capkv_store::conformance_tests!(temp_rocks());
