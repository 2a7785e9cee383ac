//! Durability of the durable engines (RocksDB; the memory engine with its log), through
//! the real binary:
//! - a clean restart keeps keys, values, versions and the revision;
//! - SIGKILL while 8 clients write with sync on loses no acknowledged write and invents no
//!   value, over 5 trials, each killed at a random moment after ≥ 10,000 acknowledged keys;
//! - SIGTERM while 8 clients write: exit 0 within the drain timeout, every call answered
//!   or ended with a clean `unavailable`, no acknowledged write lost, over 10 trials.
//!
//! Each key is written once with a value unique to it, so after the restart every key is
//! either exactly its value or (only if its write was never acknowledged) absent.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv_client::{Client, ClientOptions, Condition, ScanOptions};
use rand::Rng;

const WRITERS: usize = 8;
const TRIALS: usize = 5;
const MIN_ACKED: u64 = 10_000;
/// Each trial kills at a random count of acknowledged writes in MIN_ACKED..MAX_KILL_AT.
const MAX_KILL_AT: u64 = 12_000;
/// Bound on any wait in this test; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(120);

/// A kv-server process on a free loopback port; killed (by PID) when dropped (`Proc`).
struct ServerProcess {
    child: common::Proc,
    addr: String,
}

impl ServerProcess {
    fn start(data_dir: &Path) -> Self {
        Self::start_with(data_dir, &[])
    }

    /// [`start`](Self::start) with more environment (configuration) for the server.
    fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_engine(data_dir, "rocksdb", env)
    }

    /// [`start_with`](Self::start_with) on `engine`.
    fn start_engine(data_dir: &Path, engine: &str, env: &[(&str, &str)]) -> Self {
        let data_dir = data_dir.to_string_lossy();
        let drain_timeout_ms = DRAIN_TIMEOUT_MS.to_string();
        let (child, addr, _logs) = common::spawn_kv_server(
            &[
                "--engine",
                engine,
                "--listen",
                "127.0.0.1:0",
                "--workers",
                "2",
                "--log-level",
                "warn,capkv_server=info",
                "--data-dir",
                &data_dir,
            ],
            &[
                ("CAPKV_STORAGE__COMPACTION_INTERVAL_S", "0"),
                ("CAPKV_SHUTDOWN__DRAIN_TIMEOUT_MS", &drain_timeout_ms),
            ]
            .iter()
            .chain(env)
            .copied()
            .collect::<Vec<_>>(),
        );
        Self { child, addr }
    }

    fn kill9(&mut self) {
        // SIGKILL by PID: no drain, no flush, no destructor.
        self.child.kill().expect("SIGKILL kv-server");
        self.child.wait().expect("reap kv-server");
    }

    fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let status = self.child.wait().expect("reap kv-server");
        assert!(status.success(), "kv-server exited with {status}");
    }
}

async fn connect(addr: &str) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(30),
        ..ClientOptions::default()
    };
    Client::connect(addr, options).await.expect("connect")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn clean_restart_keeps_keys_values_versions_and_revision() {
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let mut server = ServerProcess::start(dir.path());
    let revision = rt.block_on(async {
        let c = connect(&server.addr).await;
        c.put(b"a", b"1").await.unwrap();
        c.put(b"a", b"2").await.unwrap();
        c.put(b"gone", b"x").await.unwrap();
        c.delete(b"gone").await.unwrap();
        c.put_many(vec![
            (b"b".to_vec(), b"3".to_vec(), Condition::None),
            (b"c".to_vec(), vec![0, 255], Condition::IfAbsent),
        ])
        .await
        .unwrap()
        .revision
    });
    server.terminate();
    let server = ServerProcess::start(dir.path());
    rt.block_on(async {
        let c = connect(&server.addr).await;
        let a = c.get(b"a").await.unwrap().expect("a survives");
        assert_eq!(
            (a.value.as_slice(), a.version, a.mod_revision),
            (&b"2"[..], 2, 2)
        );
        assert!(c.get(b"gone").await.unwrap().is_none());
        let cc = c.get(b"c").await.unwrap().expect("c survives");
        assert_eq!((cc.value, cc.mod_revision), (vec![0, 255], revision));
        let out = c.put(b"a", b"after").await.unwrap();
        assert_eq!(out.version, 3, "versions continue");
        assert_eq!(out.revision, revision + 1, "the revision continues");
    });
}

/// How a trial stops the server.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Stop {
    Kill9,
    /// SIGTERM: a graceful drain.
    Term,
}

type Written = Vec<(Vec<u8>, Vec<u8>)>;

/// What the writers of one trial saw.
struct TrialOutcome {
    acked: Written,
    /// The write each writer had in flight when its first error came.
    unknown: Written,
    errors: Vec<capkv::ApiError>,
    /// Signal to exit (SIGTERM trials).
    exit_after: Duration,
}

/// Runs WRITERS writers, each putting unique keys, stops the server `how` once `stop_at`
/// writes are acknowledged, and collects what each writer saw until its first error.
fn write_until_stopped(
    rt: &tokio::runtime::Runtime,
    trial: usize,
    server: &mut ServerProcess,
    stop_at: u64,
    max_writes: u64,
    how: Stop,
) -> TrialOutcome {
    let acked_count = Arc::new(AtomicU64::new(0));
    let reached = Arc::new(tokio::sync::Notify::new());
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let addr = server.addr.clone();
            let (acked_count, reached, stop) = (
                Arc::clone(&acked_count),
                Arc::clone(&reached),
                Arc::clone(&stop),
            );
            rt.spawn(async move {
                let client = connect(&addr).await;
                let mut acked: Written = Vec::new();
                let mut unknown = None;
                // Bounded: the server is stopped after at most max_writes acks in all.
                for i in 0..max_writes {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    let key = format!("w{w}/{i:06}").into_bytes();
                    let value = format!("trial{trial}-w{w}-{i}-{}", rand::random::<u64>());
                    match client.put(&key, value.as_bytes()).await {
                        Ok(_) => {
                            acked.push((key, value.into_bytes()));
                            if acked_count.fetch_add(1, Ordering::AcqRel) + 1 == stop_at {
                                reached.notify_one();
                            }
                        }
                        Err(e) => {
                            unknown = Some(((key, value.into_bytes()), e));
                            break;
                        }
                    }
                }
                (acked, unknown)
            })
        })
        .collect();
    rt.block_on(async {
        tokio::time::timeout(PATIENCE, reached.notified())
            .await
            .expect("writers reached the stop point in time");
    });
    let signalled = std::time::Instant::now();
    match how {
        Stop::Kill9 => server.kill9(),
        Stop::Term => server.terminate(),
    }
    let exit_after = signalled.elapsed();
    // SIGTERM trials let the writers run on: they must each end with a clean error.
    if how == Stop::Kill9 {
        stop.store(true, Ordering::Release);
    }
    let mut out = TrialOutcome {
        acked: Vec::new(),
        unknown: Vec::new(),
        errors: Vec::new(),
        exit_after,
    };
    for w in writers {
        let (a, u) = rt.block_on(w).expect("writer task");
        out.acked.extend(a);
        if let Some((write, e)) = u {
            out.unknown.push(write);
            out.errors.push(e);
        }
    }
    assert!(out.acked.len() as u64 >= stop_at);
    out
}

/// Restarts on `dir` and checks: every acknowledged write is there with its value, and
/// every stored key was written (acknowledged or in flight). Returns how many in-flight
/// writes were stored.
fn verify_after_restart(
    rt: &tokio::runtime::Runtime,
    dir: &Path,
    (engine, env): (&str, &[(&str, &str)]),
    trial: usize,
    out: &TrialOutcome,
) -> (usize, usize) {
    let server = ServerProcess::start_engine(dir, engine, env);
    let stored = rt.block_on(async {
        common::read_all(&connect(&server.addr).await, ScanOptions::default().bounds).await
    });
    let mut lost = 0;
    for (key, value) in &out.acked {
        match stored.get(key) {
            Some((v, version)) => {
                assert_eq!(v, value, "acknowledged key {key:?} has another value");
                assert_eq!(*version, 1);
            }
            None => lost += 1,
        }
    }
    assert_eq!(lost, 0, "trial {trial}: {lost} acknowledged writes lost");
    let attempted: HashMap<&Vec<u8>, &Vec<u8>> = out
        .acked
        .iter()
        .chain(out.unknown.iter())
        .map(|(k, v)| (k, v))
        .collect();
    for (key, (value, _)) in &stored {
        assert_eq!(
            attempted.get(key).copied(),
            Some(value),
            "trial {trial}: key {key:?} holds a value never written"
        );
    }
    assert!(
        out.unknown.len() <= WRITERS,
        "more unknown outcomes than writes in flight"
    );
    let unknown_written = out
        .unknown
        .iter()
        .filter(|(k, _)| stored.contains_key(k))
        .count();
    (stored.len(), unknown_written)
}

#[test]
fn sigkill_loses_no_acknowledged_write() {
    sigkill_trials(TRIALS, ("rocksdb", &[]), |_| {});
}

/// The memory engine with its log, with small segments and snapshots, so that each trial
/// crosses segments and writes snapshots while the writers run: recovery from a snapshot
/// and the segments after it, ending at a record the kill tore.
#[test]
fn sigkill_loses_no_acknowledged_write_on_the_memory_log_engine() {
    let env = [
        ("CAPKV_STORAGE__LOG_SEGMENT_BYTES", "262144"),
        ("CAPKV_STORAGE__LOG_SNAPSHOT_MIN_BYTES", "524288"),
    ];
    sigkill_trials(TRIALS, ("memory-log", &env), |dir| {
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("snapshot-")),
            "no snapshot was written: the trial did not test recovery from one ({names:?})"
        );
    });
}

/// The same with the smallest WAL bound, so that WAL files retire within each trial and
/// new ones are written over them (`storage.wal_recycle_files`): recovery must stop where
/// a recycled file's new records end, and not replay what it held before.
#[test]
fn sigkill_loses_no_acknowledged_write_in_recycled_wal_files() {
    let env = [
        ("CAPKV_STORAGE__MAX_TOTAL_WAL_BYTES", "1048576"),
        ("CAPKV_STORAGE__WAL_RECYCLE_FILES", "2"),
    ];
    sigkill_trials(2, ("rocksdb", &env), |dir| {
        assert!(
            common::rocksdb_log_mentions(dir, "to recycle list"),
            "no WAL file was recycled: the trial did not test recycling"
        );
    });
}

/// `trials` times: writers on a fresh server (`env` added to its configuration), SIGKILL
/// at a random count of acknowledged writes, a restart, and every acknowledged write
/// checked; `after` then looks at the data directory.
fn sigkill_trials(trials: usize, (engine, env): (&str, &[(&str, &str)]), after: impl Fn(&Path)) {
    let mut rng = rand::rng();
    let rt = runtime();
    for trial in 0..trials {
        let kill_at = rng.random_range(MIN_ACKED..MAX_KILL_AT);
        let dir = tempfile::tempdir().unwrap();
        let mut server = ServerProcess::start_engine(dir.path(), engine, env);
        let out = write_until_stopped(&rt, trial, &mut server, kill_at, MAX_KILL_AT, Stop::Kill9);
        let (stored, unknown_written) =
            verify_after_restart(&rt, dir.path(), (engine, env), trial, &out);
        eprintln!(
            "trial {trial}: killed at {kill_at} acks; acked {}, lost 0, stored {stored}, \
             unknown outcome {} ({unknown_written} of them written)",
            out.acked.len(),
            out.unknown.len(),
        );
        after(dir.path());
    }
}

/// The drain timeout the SIGTERM trials run with.
const DRAIN_TIMEOUT_MS: u64 = 5_000;

#[test]
fn sigterm_under_load_answers_every_call_and_loses_nothing() {
    let mut rng = rand::rng();
    let rt = runtime();
    for trial in 0..10 {
        let term_at = rng.random_range(200..2_000);
        let dir = tempfile::tempdir().unwrap();
        let mut server = ServerProcess::start(dir.path());
        // Writers keep going through the drain; each ends at its first error.
        let out = write_until_stopped(&rt, trial, &mut server, term_at, 100_000, Stop::Term);
        // Exit 0 (checked by terminate) within the drain timeout, plus the time to close
        // connections and the store.
        assert!(
            out.exit_after < Duration::from_millis(DRAIN_TIMEOUT_MS) + Duration::from_secs(3),
            "trial {trial}: exit took {:?}",
            out.exit_after
        );
        // Every call ended with its reply or a clean error: `unavailable` (shutting down,
        // or the connection closed after the drain), never a hang or an internal error.
        assert_eq!(out.errors.len(), WRITERS, "every writer met the shutdown");
        for e in &out.errors {
            assert_eq!(e.code, capkv::ErrorCode::Unavailable, "trial {trial}: {e}");
        }
        let (stored, unknown_written) =
            verify_after_restart(&rt, dir.path(), ("rocksdb", &[]), trial, &out);
        eprintln!(
            "trial {trial}: SIGTERM at {term_at} acks, exit 0 after {:?}; acked {}, lost 0, \
             stored {stored}; writers' last errors: {:?} ({unknown_written} in-flight writes stored)",
            out.exit_after,
            out.acked.len(),
            out.errors.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
        );
    }
}
