//! Idempotent writes end to end: per-session idempotency keys, replays, reuse, expiry,
//! retries through dropped replies, and a replay after a restart on RocksDB.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions, RetryPolicy};
use capkv_server::config::Engine;
use capkv_server::{Config, RunningServer};
use tokio::time::Instant;

const ADMIN: &str = "admin-secret";

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn client_at(addr: SocketAddr, retry: RetryPolicy) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(20),
        retry,
        ..ClientOptions::default()
    };
    Client::connect(&addr.to_string(), options)
        .await
        .expect("connect")
}

#[test]
fn one_hundred_concurrent_duplicates_write_once() {
    let server = common::start(common::test_config());
    rt().block_on(async {
        let c = client_at(server.addr(), RetryPolicy::default()).await;
        let same = c.with_idempotency_key([9; 16]);
        let tasks: Vec<_> = (0..100)
            .map(|_| {
                let same = same.clone();
                tokio::spawn(async move { same.increment(b"ctr", 1).await })
            })
            .collect();
        let mut outcomes = Vec::new();
        for t in tasks {
            outcomes.push(t.await.unwrap().expect("increment"));
        }
        assert!(outcomes.iter().all(|o| *o == outcomes[0]), "{outcomes:?}");
        assert_eq!(outcomes[0].value, 1);
        let e = c.get(b"ctr").await.unwrap().unwrap();
        assert_eq!((e.value.as_slice(), e.version), (&b"1"[..], 1));
    });
}

#[test]
fn reuse_with_other_parameters_is_refused_every_time() {
    let server = common::start(common::test_config());
    rt().block_on(async {
        let c = client_at(server.addr(), RetryPolicy::default()).await;
        let k = c.with_idempotency_key([1; 16]);
        let first = k.put(b"a", b"1").await.unwrap();
        assert_eq!(k.put(b"a", b"1").await.unwrap(), first, "replay");
        for _ in 0..3 {
            let e = k.put(b"a", b"2").await.unwrap_err();
            assert_eq!(e.code, ErrorCode::IdempotencyKeyReused);
            let e = k.increment(b"a", 1).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::IdempotencyKeyReused);
        }
        assert_eq!(c.get(b"a").await.unwrap().unwrap().version, 1);
        let e = c.increment(b"a", 1).await;
        assert!(e.is_ok(), "a fresh key writes: {e:?}");
        c.put(b"text", b"abc").await.unwrap();
        let e = c.increment(b"text", 1).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::NotAnInteger);
    });
}

#[test]
fn exactly_once_increments_through_30_percent_dropped_replies() {
    let server = common::start(common::admin_config(ADMIN));
    const CLIENTS: usize = 10;
    const PER_CLIENT: usize = 1000;
    const COUNTERS: usize = 100;
    rt().block_on(async {
        let admin = client_at(server.addr(), RetryPolicy::none()).await;
        admin
            .set_faults(ADMIN, "seed=11; increment drop-reply p=0.3")
            .await
            .unwrap();
        let policy = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        };
        let tasks: Vec<_> = (0..CLIENTS)
            .map(|t| {
                let addr = server.addr();
                let policy = policy.clone();
                tokio::spawn(async move {
                    let c = client_at(addr, policy).await;
                    let mut reissued = 0u32;
                    for i in 0..PER_CLIENT {
                        let counter = format!("counter-{:03}", (t * PER_CLIENT + i) % COUNTERS);
                        // One key per logical increment; if even the retries run out, the
                        // same key is sent again until an answer comes back (bounded).
                        let key: [u8; 16] = rand::random();
                        let mut tries = 0;
                        loop {
                            match c.with_idempotency_key(key).increment(counter.as_bytes(), 1).await {
                                Ok(_) => break,
                                Err(e) => {
                                    assert!(e.code == ErrorCode::Unavailable, "{e}");
                                    tries += 1;
                                    reissued += 1;
                                    assert!(tries < 50, "no answer after 50 re-issues");
                                }
                            }
                        }
                    }
                    (c.stats(), reissued)
                })
            })
            .collect();
        let (mut calls, mut attempts, mut reissued) = (0, 0, 0);
        for t in tasks {
            let (s, r) = t.await.unwrap();
            calls += s.calls;
            attempts += s.attempts;
            reissued += r;
        }
        admin.clear_faults(ADMIN).await.unwrap();
        let mut total = 0;
        for i in 0..COUNTERS {
            let e = admin
                .get(format!("counter-{i:03}").as_bytes())
                .await
                .unwrap()
                .expect("counter exists");
            let v: i64 = String::from_utf8(e.value).unwrap().parse().unwrap();
            assert_eq!(v, (CLIENTS * PER_CLIENT / COUNTERS) as i64, "counter {i}");
            total += v;
        }
        eprintln!(
            "{} increments: {calls} calls, {attempts} attempts, {reissued} re-issued; total {total}",
            CLIENTS * PER_CLIENT
        );
        assert_eq!(total, (CLIENTS * PER_CLIENT) as i64, "0 duplicates, 0 lost");
        assert!(attempts > calls, "replies were dropped and retried");
    });
}

#[test]
fn keys_expire_after_their_ttl() {
    let mut config = common::test_config();
    config.idempotency.ttl_s = 1;
    let server = common::start(config);
    rt().block_on(async {
        let c = client_at(server.addr(), RetryPolicy::default()).await;
        let k = c.with_idempotency_key([3; 16]);
        assert_eq!(k.increment(b"n", 1).await.unwrap().value, 1);
        assert_eq!(k.increment(b"n", 1).await.unwrap().value, 1, "replayed");
        // Bounded poll: once the record has expired the same key writes again.
        let started = Instant::now();
        loop {
            let v = k.increment(b"n", 1).await.unwrap().value;
            if v == 2 {
                break;
            }
            assert_eq!(v, 1);
            assert!(started.elapsed() < Duration::from_secs(30), "never expired");
            tokio::task::yield_now().await;
        }
        assert!(started.elapsed() >= Duration::from_millis(500));
    });
}

#[test]
fn a_replay_after_a_restart_returns_the_recorded_outcome() {
    let dir = tempfile::tempdir().unwrap();
    // A fixed port, so that the client reconnects (and resumes its session) by itself.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = || Config {
        engine: Engine::Rocksdb,
        data_dir: dir.path().to_path_buf(),
        listen: SocketAddr::from(([127, 0, 0, 1], port)),
        ..common::test_config()
    };
    let rt = rt();
    let server = RunningServer::start(config()).expect("start");
    let c = rt.block_on(client_at(server.addr(), RetryPolicy::default()));
    let k = c.with_idempotency_key([5; 16]);
    let first = rt.block_on(k.increment(b"n", 7)).unwrap();
    drop(server); // graceful stop, RocksDB closed
    let server = RunningServer::start(config()).expect("restart");
    rt.block_on(async {
        let again = k.increment(b"n", 7).await.expect("replayed after restart");
        assert_eq!(again, first);
        let e = c.get(b"n").await.unwrap().unwrap();
        assert_eq!(
            (e.value.as_slice(), e.version),
            (&b"7"[..], 1),
            "written once"
        );
    });
    drop(server);
}
