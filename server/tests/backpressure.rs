//! One client cannot grow the server's memory: replies it does not read stop its
//! connection from being read (and close it after `limits.slow_reader_timeout_ms`), and
//! the capabilities it may hold are bounded (`limits.max_capabilities_per_connection`).
//!
//! The memory checks run against a real kv-server process and read its peak resident set
//! (`VmHWM`) from /proc; the clients that never read their replies sit behind a proxy that
//! forwards their calls and never reads the server's answers.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use capkv::kv_capnp::{get_result, kv_store, session_result, write_session};
use capkv::{ApiError, CallMeta, ErrorCode};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const MIB: u64 = 1024 * 1024;
/// Bound on every wait here; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(60);
/// The per-connection bound on unsent replies in these tests.
const MAX_UNSENT_BYTES: u64 = 4 * MIB;
/// A value of the largest size (`limits.max_value_bytes`).
const BIG: usize = 1024 * 1024;

struct Server {
    proc: Proc,
    addr: String,
    logs: std::sync::mpsc::Receiver<String>,
    metrics_addr: String,
}

impl Server {
    fn start(envs: &[(&str, &str)]) -> Self {
        let mut envs = envs.to_vec();
        envs.push(("CAPKV_STORAGE__STATS_INTERVAL_MS", "100"));
        let mut args = MEMORY_SERVER_ARGS.to_vec();
        args.extend(["--log-level", "warn,capkv_server=info"]);
        let (proc, addr, metrics_addr, logs) = spawn_kv_server_with_metrics(&args, &envs);
        Server {
            proc,
            addr,
            logs,
            metrics_addr,
        }
    }

    /// Open file descriptors of the server process (its sockets among them).
    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.proc.id())).map_or(0, |d| d.count())
    }

    /// Waits (bounded) until the server's metrics show `line` (a sample, e.g.
    /// `capkv_unsent_reply_bytes 0`).
    fn await_metric(&self, line: &str) {
        use std::io::{Read, Write};
        let until = Instant::now() + PATIENCE;
        loop {
            let mut body = String::new();
            if let Ok(mut s) = std::net::TcpStream::connect(&self.metrics_addr) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
                let _ = s.read_to_string(&mut body);
            }
            if body.lines().any(|l| l == line) {
                return;
            }
            assert!(
                Instant::now() < until,
                "metrics never showed `{line}`:\n{body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Resident set now (`VmRSS:`) or at its peak so far (`VmHWM:`), bytes.
    fn status_bytes(&self, field: &str) -> u64 {
        proc_status_bytes(self.proc.id(), field)
    }

    /// Waits (bounded) for `n` log lines containing `text`.
    fn await_log_lines(&self, text: &str, n: usize) {
        let until = Instant::now() + PATIENCE;
        let mut seen = 0;
        while seen < n {
            let left = until.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) if line.contains(text) => seen += 1,
                Ok(_) => {}
                Err(_) => panic!("saw {seen} of {n} log lines with `{text}`"),
            }
        }
    }
}

fn ctx() -> CallMeta {
    CallMeta {
        budget_ms: Some(60_000),
        ..CallMeta::default()
    }
}

/// A proxy to `upstream` that forwards what clients send and never reads what the server
/// answers: a client that does not read its replies. Serves any number of connections
/// until the runtime ends.
async fn blackhole_proxy(upstream: String) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (unread, mut to_server) = server.into_split();
            tokio::spawn(async move {
                let _unread = unread; // held open, never read
                let _ = tokio::io::copy(&mut client, &mut to_server).await;
            });
        }
    });
    addr
}

/// Pipelines `n` gets of `key` on a connection through `proxy` and leaves them
/// unanswered until `stop`.
fn attacker(proxy: String, n: usize, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        local(async move {
            let gw = raw_gateway(proxy.parse().unwrap()).await;
            let mut open = gw.open_request();
            ctx().write(open.get().init_ctx());
            let kv = open.send().pipeline.get_result().get_kv_cap();
            let mut pending = Vec::with_capacity(n);
            for _ in 0..n {
                let mut get = kv.get_request();
                ctx().write(get.get().init_ctx());
                get.get().set_key(b"big");
                pending.push(get.send().promise);
            }
            // Bounded: until told to stop, at most PATIENCE * 2.
            let until = Instant::now() + PATIENCE * 2;
            while !stop.load(Ordering::Acquire) && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            drop(pending);
        })
    })
}

/// A well-behaved client calling on its own connection until `stop`; returns its
/// successes and failures.
fn canary(addr: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        local_result(async move {
            let c = client(addr.parse().unwrap()).await;
            c.put(b"canary", b"v").await.expect("canary put");
            let (mut ok, mut failed) = (0u64, 0u64);
            let until = Instant::now() + PATIENCE * 2;
            while !stop.load(Ordering::Acquire) && Instant::now() < until {
                match c.get(b"canary").await {
                    Ok(Some(_)) => ok += 1,
                    _ => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (ok, failed)
        })
    })
}

/// Puts a value of `BIG` bytes under `big`.
fn seed_big(addr: &str) {
    local(async {
        let c = client(addr.parse().unwrap()).await;
        c.put(b"big", &vec![7u8; BIG]).await.expect("seed");
    });
}

/// `attackers` connections each pipeline 2,000 gets of a 1 MiB value and never read; the
/// server's peak RSS grows by less than 64 MiB plus `bound_bytes` plus one reply per
/// connection, the canary keeps being served, and every attacking connection is closed as
/// a slow reader.
fn unread_replies_stay_bounded(attackers: usize, bound_bytes: u64, envs: &[(&str, &str)]) {
    let server = Server::start(envs);
    seed_big(&server.addr);
    let before = server.status_bytes("VmRSS:");
    let fds_before = server.open_fds();
    let stop = Arc::new(AtomicBool::new(false));
    let canary = canary(server.addr.clone(), Arc::clone(&stop));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let proxy = rt.block_on(blackhole_proxy(server.addr.clone()));
    let attackers_n = attackers;
    let attackers: Vec<_> = (0..attackers)
        .map(|_| attacker(proxy.clone(), 2_000, Arc::clone(&stop)))
        .collect();
    server.await_log_lines("slow reader", attackers.len());
    // Closing them gave everything back, while their peers still hold their sockets open
    // without reading: their unsent bytes, their pauses, their sockets (a writer still
    // trying to drain to such a peer would keep all three).
    server.await_metric("capkv_unsent_reply_bytes 0");
    server.await_metric("capkv_connections_paused 0");
    // Their calls are gone too (the gauge is set from the chain's count at each scrape).
    server.await_metric("capkv_in_flight_requests 0");
    let until = Instant::now() + PATIENCE;
    while server.open_fds() > fds_before + 2 {
        assert!(
            Instant::now() < until,
            "{} fds open after the slow readers were closed, {fds_before} before",
            server.open_fds()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Release);
    let (served, failed) = canary.join().unwrap();
    for a in attackers {
        a.join().unwrap();
    }
    let peak = server.status_bytes("VmHWM:");
    let growth = peak.saturating_sub(before);
    eprintln!(
        "RSS before {} MiB, peak {} MiB; canary {served} ok, {failed} failed",
        before / MIB,
        peak / MIB
    );
    // The design's bound (see `capkv_rpc::backlog`): the budget, plus one reply per
    // connection (a connection with nothing unsent may take a call while the budget is
    // spent, so that none starves), plus 64 MiB for the allocator and the test's own
    // traffic. Twenty attackers measured 86-96 MiB of growth against a bound of 96 MiB
    // before the per-connection term was written here, which failed a CI run.
    let bound = 64 * MIB + bound_bytes + attackers_n as u64 * BIG as u64;
    assert!(
        growth < bound,
        "the server grew by {} MiB (bound {} MiB)",
        growth / MIB,
        bound / MIB
    );
    assert!(served > 0, "the canary was never served");
    assert_eq!(failed, 0, "the canary's calls failed");
}

#[test]
fn a_client_that_never_reads_is_paused_then_closed_with_memory_bounded() {
    unread_replies_stay_bounded(
        1,
        MAX_UNSENT_BYTES,
        &[
            (
                "CAPKV_LIMITS__MAX_UNSENT_REPLY_BYTES",
                &MAX_UNSENT_BYTES.to_string(),
            ),
            ("CAPKV_LIMITS__SLOW_READER_TIMEOUT_MS", "2000"),
        ],
    );
}

#[test]
fn twenty_such_clients_stay_within_the_server_wide_bound() {
    let budget = 32 * MIB;
    unread_replies_stay_bounded(
        20,
        budget,
        &[
            (
                "CAPKV_LIMITS__MAX_UNSENT_REPLY_BYTES",
                &MAX_UNSENT_BYTES.to_string(),
            ),
            (
                "CAPKV_LIMITS__UNSENT_REPLY_BUDGET_BYTES",
                &budget.to_string(),
            ),
            ("CAPKV_LIMITS__SLOW_READER_TIMEOUT_MS", "2000"),
            ("CAPKV_LIMITS__MAX_IN_FLIGHT_PER_CONNECTION", "4096"),
        ],
    );
}

/// A client that reads, slowly (a pause after every 64 KiB), gets every reply in full
/// and is never closed, although its unsent replies are over the bound most of the time.
#[test]
fn a_slow_but_reading_client_gets_every_reply_in_full() {
    let mut config = test_config();
    config.limits.max_unsent_reply_bytes = 2 * MIB as usize;
    config.limits.slow_reader_timeout_ms = 3_000;
    let server = start(config);
    let addr = server.addr();
    local(async move {
        let c = client(addr).await;
        c.put(b"big", &vec![9u8; BIG]).await.unwrap();
        let proxy = slow_reading_proxy(addr).await;
        let gw = raw_gateway(proxy).await;
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        let kv = open.send().pipeline.get_result().get_kv_cap();
        let calls: Vec<_> = (0..24)
            .map(|_| {
                let mut get = kv.get_request();
                ctx().write(get.get().init_ctx());
                get.get().set_key(b"big");
                get.send().promise
            })
            .collect();
        for (i, call) in calls.into_iter().enumerate() {
            let resp = tokio::time::timeout(PATIENCE, call)
                .await
                .expect("bounded wait")
                .unwrap_or_else(|e| panic!("reply {i} failed: {e}"));
            match resp.get().unwrap().get_result().unwrap().which().unwrap() {
                get_result::Which::Ok(e) => {
                    let v = e.unwrap().get_value().unwrap();
                    assert_eq!(v.len(), BIG, "reply {i} in full");
                    assert!(v.iter().all(|b| *b == 9));
                }
                get_result::Which::Error(e) => {
                    panic!("reply {i}: {:?}", ApiError::read(e.unwrap()))
                }
            }
        }
    });
}

/// A proxy that reads the server's answers slowly: 64 KiB, then a 5 ms pause.
async fn slow_reading_proxy(upstream: std::net::SocketAddr) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::task::spawn_local(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(upstream).await else {
                continue;
            };
            let (mut from_client, mut to_client) = client.into_split();
            let (mut from_server, mut to_server) = server.into_split();
            tokio::task::spawn_local(async move {
                let _ = tokio::io::copy(&mut from_client, &mut to_server).await;
            });
            tokio::task::spawn_local(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match from_server.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if to_client.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            });
        }
    });
    addr
}

/// The code in a session result's error arm, if any.
fn session_code(
    r: &capnp::capability::Response<kv_store::session_results::Owned>,
) -> Option<ErrorCode> {
    match r.get().unwrap().get_result().unwrap().which().unwrap() {
        session_result::Which::Error(e) => Some(ApiError::read(e.unwrap()).code),
        session_result::Which::Session(_) => None,
    }
}

/// A connection that hoards sessions reaches the capability bound and gets
/// `tooManyCapabilities` (also from calls pipelined on the refused session); releasing
/// some makes room again; the connection stays usable and the server's memory bounded.
#[test]
fn hoarded_capabilities_are_bounded_and_released_ones_make_room() {
    const LIMIT: usize = 1_000;
    let server = Server::start(&[(
        "CAPKV_LIMITS__MAX_CAPABILITIES_PER_CONNECTION",
        &LIMIT.to_string(),
    )]);
    let addr: std::net::SocketAddr = server.addr.parse().unwrap();
    local(async move {
        let gw = raw_gateway(addr).await;
        let mut open = gw.open_request();
        ctx().write(open.get().init_ctx());
        let kv = open.send().pipeline.get_result().get_kv_cap(); // one slot
        let session = || {
            let mut req = kv.session_request();
            ctx().write(req.get().init_ctx());
            req.send()
        };
        let mut held: Vec<write_session::Client> = Vec::new();
        for i in 0..LIMIT - 1 {
            let sent = session();
            let resp = sent.promise.await.unwrap();
            assert_eq!(session_code(&resp), None, "session {i} within the limit");
            held.push(
                resp.get()
                    .unwrap()
                    .get_result()
                    .unwrap()
                    .get_session_cap()
                    .unwrap(),
            );
        }
        let rss_full = server.status_bytes("VmRSS:");

        // At the limit: refused with the code, and so is a write pipelined on the refusal.
        let sent = session();
        let ws = sent.pipeline.get_result().get_session_cap();
        let mut put = ws.put_request();
        ctx().write(put.get().init_ctx());
        put.get().set_key(b"k");
        put.get().set_value(b"v");
        let put = put.send().promise.await.unwrap();
        match put.get().unwrap().get_result().unwrap().which().unwrap() {
            capkv::kv_capnp::put_result::Which::Error(e) => {
                assert_eq!(
                    ApiError::read(e.unwrap()).code,
                    ErrorCode::TooManyCapabilities
                )
            }
            _ => panic!("a write on a refused session succeeded"),
        }
        let resp = sent.promise.await.unwrap();
        assert_eq!(session_code(&resp), Some(ErrorCode::TooManyCapabilities));

        // Many more refusals cost the server nothing that stays.
        for _ in 0..5_000 {
            let resp = session().promise.await.unwrap();
            assert_eq!(session_code(&resp), Some(ErrorCode::TooManyCapabilities));
        }
        // The connection still serves reads.
        let mut get = kv.get_request();
        ctx().write(get.get().init_ctx());
        get.get().set_key(b"k");
        get.send().promise.await.unwrap();

        // Releasing 100 makes room for 100 (the releases reach the server before the next
        // call on this connection).
        held.truncate(held.len() - 100);
        for i in 0..100 {
            let resp = session().promise.await.unwrap();
            assert_eq!(session_code(&resp), None, "session {i} after releases");
            held.push(
                resp.get()
                    .unwrap()
                    .get_result()
                    .unwrap()
                    .get_session_cap()
                    .unwrap(),
            );
        }
        let resp = session().promise.await.unwrap();
        assert_eq!(session_code(&resp), Some(ErrorCode::TooManyCapabilities));
        let rss_after = server.status_bytes("VmRSS:");
        eprintln!(
            "RSS with {LIMIT} capabilities {} MiB, after 5,100 more calls {} MiB",
            rss_full / MIB,
            rss_after / MIB
        );
        assert!(
            rss_after < rss_full + 16 * MIB,
            "refused calls grew the server from {} to {} MiB",
            rss_full / MIB,
            rss_after / MIB
        );
    });
}
