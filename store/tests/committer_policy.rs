//! The memory-log engine's committer thread runs as batch work when told to, and not
//! otherwise (its own test binary: it finds the thread by name, and no other store may run
//! beside it).

#![cfg(target_os = "linux")]

use capkv_store::logged::{LogOptions, LoggedStore};
use capkv_store::Store;

/// The scheduling policy of this process's thread named `name` (the only one).
fn policy_of(name: &str) -> i32 {
    let mut found = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").expect("tasks") {
        let task = task.expect("task");
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == name {
            let tid: i32 = task.file_name().to_string_lossy().parse().expect("tid");
            // SAFETY: reads another thread's policy by its id.
            found.push(unsafe { libc::sched_getscheduler(tid) });
        }
    }
    assert_eq!(found.len(), 1, "one thread named {name}: {found:?}");
    found[0]
}

#[test]
fn the_log_committer_runs_as_batch_work_unless_told_not_to() {
    for (batch, want) in [(true, libc::SCHED_BATCH), (false, libc::SCHED_OTHER)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut opts = LogOptions::new(dir.path());
        opts.committer_sched_batch = batch;
        let store = LoggedStore::open(opts).expect("open");
        // The thread sets its policy first thing; a write through it proves it has started.
        store
            .put(b"k", b"v", capkv_store::Condition::None)
            .wait()
            .expect("put");
        assert_eq!(
            policy_of("capkv-log"),
            want,
            "committer_sched_batch = {batch}"
        );
        drop(store);
    }
}
