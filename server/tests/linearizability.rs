//! Contention: 16 clients race get / put / conditional put / delete on 5 keys across the
//! server's workers; the history (invoke and return times, outcomes) is checked for
//! per-key linearizability, on every engine (etcd's while its members are killed).
//!
//! The checker uses the store's own witness: every write returns the global revision it
//! was committed at, so the linearization order of writes is known, and a read names the
//! write it saw (`mod_revision`). What remains to check is that this order respects real
//! time and the register semantics:
//! - writes: distinct revisions; a write that returned before another was invoked has the
//!   smaller revision;
//! - versions: replaying a key's writes in revision order reproduces every version a put
//!   returned (+1 per put, 1 after a delete), every conditional put's condition held, and
//!   a delete that found nothing came when the key was absent;
//! - reads: a read returns exactly the value of the write it names; that write was not
//!   invoked after the read returned; no later write to the key had returned before the
//!   read was invoked (no stale read); a read of "absent" had a moment in its interval
//!   when the key was absent.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use capkv_client::{Client, ClientOptions, Condition};
use capkv_server::config::Engine;
use capkv_server::Config;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

const CLIENTS: usize = 16;
const OPS_PER_CLIENT: usize = 400;
const KEYS: usize = 5;

#[derive(Debug, Clone)]
enum Outcome {
    /// A successful put (conditional or not): the version and revision it produced.
    Put {
        value: Vec<u8>,
        version: u64,
        revision: u64,
        cond: Condition,
    },
    /// A conditional put whose condition failed: nothing written.
    CondFailed,
    Delete {
        existed: bool,
        revision: u64,
    },
    Get(Option<(Vec<u8>, u64, u64)>),
}

#[derive(Debug, Clone)]
struct Op {
    key: usize,
    invoke: Instant,
    ret: Instant,
    outcome: Outcome,
}

async fn run_client(addr: String, id: usize, seed: u64) -> Vec<Op> {
    let options = ClientOptions {
        timeout: Duration::from_secs(20),
        ..ClientOptions::default()
    };
    let c = Client::connect(&addr, options).await.expect("connect");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut seen_version: HashMap<usize, u64> = HashMap::new();
    let mut ops = Vec::with_capacity(OPS_PER_CLIENT);
    for i in 0..OPS_PER_CLIENT {
        let key = rng.random_range(0..KEYS);
        let k = format!("lin-{key}").into_bytes();
        let roll = rng.random_range(0..100);
        let invoke = Instant::now();
        let outcome = if roll < 40 {
            let e = settle("get", || c.get(&k)).await;
            if let Some(e) = &e {
                seen_version.insert(key, e.version);
            }
            Outcome::Get(e.map(|e| (e.value, e.version, e.mod_revision)))
        } else if roll < 85 {
            let value = format!("c{id}-{i}").into_bytes();
            let cond = if roll < 65 {
                Condition::None
            } else {
                Condition::IfVersion(*seen_version.get(&key).unwrap_or(&0))
            };
            // One idempotency key for every try: a put retried after an unknown outcome
            // is answered by its record, never applied twice.
            let (once, _) = c.for_one_write();
            let put = settle_or(
                "put",
                || once.put_if(&k, &value, cond),
                |e| e.code == capkv::ErrorCode::ConditionFailed,
            )
            .await;
            match put {
                Ok(o) => Outcome::Put {
                    value,
                    version: o.version,
                    revision: o.revision,
                    cond,
                },
                Err(e) if e.code == capkv::ErrorCode::ConditionFailed => Outcome::CondFailed,
                Err(e) => panic!("put: {e}"),
            }
        } else {
            let (once, _) = c.for_one_write();
            let o = settle("delete", || once.delete(&k)).await;
            Outcome::Delete {
                existed: o.existed,
                revision: o.revision,
            }
        };
        ops.push(Op {
            key,
            invoke,
            ret: Instant::now(),
            outcome,
        });
    }
    ops
}

/// The call's answer, sent again while it fails (only while a test kills what serves it:
/// an `unavailable` after the client's own retries; at most 200 tries, 50 ms apart).
async fn settle<T, F, Fut>(what: &str, call: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, capkv::ApiError>>,
{
    match settle_or(what, call, |_| false).await {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e}"),
    }
}

/// [`settle`], but an error `is_answer` says is the outcome ends the tries.
async fn settle_or<T, F, Fut>(
    what: &str,
    mut call: F,
    is_answer: impl Fn(&capkv::ApiError) -> bool,
) -> Result<T, capkv::ApiError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, capkv::ApiError>>,
{
    for _ in 0..200 {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if is_answer(&e) => return Err(e),
            Err(e) if e.code == capkv::ErrorCode::Unavailable => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("{what}: {e}"),
        }
    }
    panic!("{what}: no answer in 200 tries");
}

/// Returns every violation found in one key's history.
fn check_key(ops: &[Op]) -> Vec<String> {
    let mut bad = Vec::new();
    // Writes that changed something, in revision (= linearization) order.
    let mut writes: Vec<&Op> = ops
        .iter()
        .filter(|o| {
            matches!(
                o.outcome,
                Outcome::Put { .. } | Outcome::Delete { existed: true, .. }
            )
        })
        .collect();
    let rev = |o: &Op| match o.outcome {
        Outcome::Put { revision, .. } | Outcome::Delete { revision, .. } => revision,
        _ => 0,
    };
    writes.sort_by_key(|o| rev(o));
    for w in writes.windows(2) {
        if rev(w[0]) == rev(w[1]) {
            bad.push(format!("two writes share revision {}", rev(w[0])));
        }
    }
    for a in &writes {
        for b in &writes {
            if a.ret < b.invoke && rev(a) > rev(b) {
                bad.push(format!(
                    "write at revision {} returned before the write at revision {} began",
                    rev(a),
                    rev(b)
                ));
            }
        }
    }
    // Replay in revision order: versions, conditions, and each write's value by revision.
    let mut version = 0u64;
    let mut by_revision: HashMap<u64, &Op> = HashMap::new();
    // (revision, present) after each write, to answer "was the key absent at revision r?"
    let mut timeline: Vec<(u64, bool)> = vec![(0, false)];
    for w in &writes {
        match &w.outcome {
            Outcome::Put {
                version: v, cond, ..
            } => {
                if let Condition::IfVersion(want) = cond {
                    if *want != version {
                        bad.push(format!(
                            "put if version {want} succeeded at version {version}"
                        ));
                    }
                }
                if *v != version + 1 {
                    bad.push(format!("put returned version {v} after version {version}"));
                }
                version = *v;
                timeline.push((rev(w), true));
            }
            Outcome::Delete { .. } => {
                if version == 0 {
                    bad.push(format!("delete at revision {} of an absent key", rev(w)));
                }
                version = 0;
                timeline.push((rev(w), false));
            }
            _ => {}
        }
        by_revision.insert(rev(w), w);
    }
    let present_at = |r: u64| -> bool {
        timeline
            .iter()
            .rev()
            .find(|(at, _)| *at <= r)
            .is_some_and(|(_, p)| *p)
    };
    for op in ops {
        match &op.outcome {
            Outcome::Delete {
                existed: false,
                revision,
            } if present_at(*revision) => {
                bad.push(format!(
                    "delete found nothing at revision {revision}, but the key was present"
                ));
            }
            Outcome::Get(Some((value, version, m))) => {
                let Some(w) = by_revision.get(m) else {
                    bad.push(format!("read names revision {m}, which no put produced"));
                    continue;
                };
                match &w.outcome {
                    Outcome::Put {
                        value: wv,
                        version: wver,
                        ..
                    } if wv == value && wver == version => {}
                    _ => bad.push(format!("read of revision {m} does not match its write")),
                }
                if w.invoke > op.ret {
                    bad.push(format!("read saw revision {m} before its write began"));
                }
                // No stale read: no later write had returned before the read began.
                if let Some(later) = writes.iter().find(|x| rev(x) > *m && x.ret < op.invoke) {
                    bad.push(format!(
                        "stale read: saw revision {m}, but revision {} had returned before",
                        rev(later)
                    ));
                }
            }
            Outcome::Get(None) => {
                // Some moment in [invoke, return] when the key was absent: the last write
                // returned before the read began is a delete (or none), or a delete of a
                // later revision began before the read returned.
                let last_done = writes
                    .iter()
                    .filter(|x| x.ret < op.invoke)
                    .map(|x| rev(x))
                    .max();
                let absent_possible = match last_done {
                    None => true,
                    Some(r) => {
                        !present_at(r)
                            || writes.iter().any(|x| {
                                rev(x) > r
                                    && matches!(x.outcome, Outcome::Delete { .. })
                                    && x.invoke < op.ret
                            })
                    }
                };
                if !absent_possible {
                    bad.push("read of an absent key while it was present throughout".to_string());
                }
            }
            _ => {}
        }
    }
    bad
}

fn contention(config: Config) {
    contention_with(config, |_| {});
}

/// [`contention`] while `faults` runs on a thread of its own, told by its flag when the
/// clients are done.
fn contention_with(config: Config, faults: impl FnOnce(&AtomicBool) + Send) {
    let server = common::start(config);
    let addr = server.addr().to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let done = AtomicBool::new(false);
    let history: Vec<Op> = std::thread::scope(|scope| {
        scope.spawn(|| faults(&done));
        let history = rt.block_on(async {
            let tasks: Vec<_> = (0..CLIENTS)
                .map(|id| tokio::spawn(run_client(addr.clone(), id, 1000 + id as u64)))
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.extend(t.await.unwrap());
            }
            all
        });
        done.store(true, Ordering::Release);
        history
    });
    assert_eq!(history.len(), CLIENTS * OPS_PER_CLIENT);
    let mut violations = Vec::new();
    for key in 0..KEYS {
        let ops: Vec<Op> = history.iter().filter(|o| o.key == key).cloned().collect();
        violations.extend(
            check_key(&ops)
                .into_iter()
                .map(|v| format!("key {key}: {v}")),
        );
    }
    let writes = history
        .iter()
        .filter(|o| !matches!(o.outcome, Outcome::Get(_)))
        .count();
    eprintln!(
        "{} operations ({writes} writes) on {KEYS} keys from {CLIENTS} clients: {} violations",
        history.len(),
        violations.len()
    );
    assert!(violations.is_empty(), "{violations:#?}");
}

#[test]
fn memory_engine_is_linearizable_under_contention() {
    contention(common::test_config());
}

#[test]
fn rocksdb_engine_is_linearizable_under_contention() {
    let dir = tempfile::tempdir().unwrap();
    contention(Config {
        engine: Engine::Rocksdb,
        data_dir: dir.path().to_path_buf(),
        ..common::test_config()
    });
}

#[test]
fn memory_log_engine_is_linearizable_under_contention() {
    let dir = tempfile::tempdir().unwrap();
    contention(Config {
        engine: Engine::MemoryLog,
        data_dir: dir.path().to_path_buf(),
        ..common::test_config()
    });
}

/// On a gateway over a 3-member etcd cluster whose leader, then a follower, is killed
/// (SIGKILL) and restarted, over and over, while the clients run.
#[test]
fn etcd_engine_is_linearizable_while_members_are_killed() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = std::sync::Mutex::new(
        capkv_store_etcd::cluster::Cluster::start(dir.path(), 3).expect("etcd cluster"),
    );
    let mut config = common::test_config();
    config.engine = Engine::Etcd;
    config.storage.etcd.endpoints = cluster.lock().unwrap().endpoints();
    config.limits.max_batch_items = 127;
    let rounds = std::sync::atomic::AtomicUsize::new(0);
    contention_with(config, |done| {
        // Bounded: 20 rounds at most, each a kill and a restart.
        for round in 0..20 {
            if done.load(Ordering::Acquire) {
                break;
            }
            let mut c = cluster.lock().unwrap();
            let victim = match round % 2 {
                0 => c.leader().unwrap_or(0),
                _ => (0..3).find(|&i| Some(i) != c.leader()).unwrap_or(1),
            };
            c.kill(victim);
            std::thread::sleep(Duration::from_millis(300));
            c.restart(victim).expect("restart a member");
            rounds.fetch_add(1, Ordering::AcqRel);
            drop(c);
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    let rounds = rounds.load(Ordering::Acquire);
    eprintln!("{rounds} members killed and restarted meanwhile");
    assert!(rounds >= 1, "a member was killed meanwhile");
}

#[test]
fn the_checker_catches_a_stale_read() {
    let t0 = Instant::now();
    let at = |ms: u64| t0 + Duration::from_millis(ms);
    let put = |value: &[u8], version, revision, invoke, ret| Op {
        key: 0,
        invoke: at(invoke),
        ret: at(ret),
        outcome: Outcome::Put {
            value: value.to_vec(),
            version,
            revision,
            cond: Condition::None,
        },
    };
    let read = |value: &[u8], version, m, invoke, ret| Op {
        key: 0,
        invoke: at(invoke),
        ret: at(ret),
        outcome: Outcome::Get(Some((value.to_vec(), version, m))),
    };
    let fine = vec![
        put(b"a", 1, 1, 0, 1),
        put(b"b", 2, 2, 2, 3),
        read(b"b", 2, 2, 4, 5),
    ];
    assert!(check_key(&fine).is_empty(), "{:?}", check_key(&fine));
    let stale = vec![
        put(b"a", 1, 1, 0, 1),
        put(b"b", 2, 2, 2, 3),
        read(b"a", 1, 1, 4, 5),
    ];
    assert!(check_key(&stale).iter().any(|v| v.contains("stale read")));
    let reordered = vec![put(b"a", 1, 2, 0, 1), put(b"b", 2, 1, 2, 3)];
    assert!(
        !check_key(&reordered).is_empty(),
        "real-time order of writes"
    );
    let bad_version = vec![put(b"a", 1, 1, 0, 1), put(b"b", 3, 2, 2, 3)];
    assert!(!check_key(&bad_version).is_empty(), "version skipped");
}
