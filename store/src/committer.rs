//! What a committer thread (the memory-log engine's, the RocksDB engine's) asks of the
//! kernel's scheduler.

/// Marks the calling thread as batch work (Linux's `SCHED_BATCH`, same priority): when it
/// is woken (a worker's pass ended, a sync completed) it does not preempt the thread that
/// runs on its core, usually the worker that woke it, but runs when that one waits or its
/// time slice ends. Without it, on a core shared with a worker, each wake of the committer
/// cost two context switches more (the worker preempted at once, the committer parking
/// again before the worker's pass ended). Measured with
/// `perf record -e raw_syscalls:sys_enter -e sched:sched_switch -p PID` (memory-log, 50
/// writers): context switches a put 0.257 -> 0.155 (Redis `appendfsync always`: 0.153).
///
/// Opt-in (`storage.committer_sched_batch`, off by default): a committer woken while every
/// core is busy then waits for a time slice before it commits. Measured with
/// `bench/commit-latency.sh` (a worker saturated by 50 readers, 10 durable writers beside
/// them, 2026-12-06): memory-log put p99 3.5-4.3 ms off, 24 ms on, puts/s down 2-3x;
/// RocksDB p50 1.2 -> 24 ms, 7.6k -> 0.45k puts/s. The CPU a put it saves when cores are
/// free (8-15%) is not worth that. (Threads spinning on the store once starved it past a
/// test's bounded rounds; that test is now bounded in time and its readers yield when
/// they find nothing new.)
///
/// Errors (another kernel, a sandbox that forbids it) leave the thread as it was: the
/// engine works the same, with more switches.
pub fn yield_to_workers() -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: `sched_setscheduler` reads `param` (a valid, initialised value) and
        // changes only the calling thread's (pid 0) policy.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// [`yield_to_workers`] for a committer thread at its start: a failure is logged (once,
/// per thread) and otherwise ignored.
pub fn start_committer_thread(enabled: bool) {
    if !enabled {
        return;
    }
    if let Err(e) = yield_to_workers() {
        tracing::warn!(error = %e, "the committer thread runs at the default scheduling policy");
    }
}

#[cfg(test)]
mod tests {
    /// The policy is one the kernel accepts for an unprivileged thread, and is set.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_committer_thread_runs_as_batch_work() {
        std::thread::spawn(|| {
            super::yield_to_workers().expect("SCHED_BATCH needs no privilege");
            // SAFETY: reads the calling thread's policy.
            let policy = unsafe { libc::sched_getscheduler(0) };
            assert_eq!(policy, libc::SCHED_BATCH);
        })
        .join()
        .expect("thread");
    }
}
