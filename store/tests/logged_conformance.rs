//! The conformance suite against the logged memory engine, each case in its own temp
//! directory (small segments, so that cases cross segment boundaries).

use capkv_store::conformance::Guarded;
use capkv_store::logged::{LogOptions, LoggedStore};

fn temp_logged() -> Guarded<LoggedStore, tempfile::TempDir> {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut opts = LogOptions::new(dir.path());
    opts.segment_bytes = capkv_store::logged::MIN_SEGMENT_BYTES;
    opts.snapshot_min_log_bytes = 4 * opts.segment_bytes;
    Guarded {
        store: LoggedStore::open(opts).expect("open log"),
        guard: dir,
    }
}

capkv_store::conformance_tests!(temp_logged());
