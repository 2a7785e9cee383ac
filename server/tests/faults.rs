//! Deadlines, retries and fault injection, end to end: the Admin capability arms fault
//! plans on a real server and the client library's retry policy meets them.

mod common;

use std::time::Duration;

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions, RetryPolicy};
use capkv_server::{Config, RunningServer};
use tokio::time::Instant;

const ADMIN: &str = "admin-secret";

fn server_with(f: impl FnOnce(&mut Config)) -> RunningServer {
    let mut config = common::admin_config(ADMIN);
    f(&mut config);
    common::start(config)
}

fn server() -> RunningServer {
    server_with(|_| {})
}

async fn client(server: &RunningServer, retry: RetryPolicy) -> Client {
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        retry,
        ..ClientOptions::default()
    };
    Client::connect(&server.addr().to_string(), options)
        .await
        .expect("connect")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Far below the 30 s of injected latency, far above a loaded machine's scheduling delays.
const LATENCY_BOUND: Duration = Duration::from_secs(10);

#[test]
fn a_spent_budget_ends_the_call_and_stops_the_work() {
    let mut config = common::admin_config(ADMIN);
    // One call at a time per connection: a second call can only be admitted once the
    // first call's work is gone.
    config.limits.max_in_flight_per_connection = 1;
    let server = common::start(config);
    rt().block_on(async {
        let c = client(&server, RetryPolicy::none()).await;
        // The injected latency is far past the budget, so that "ended by the deadline"
        // and "the work was dropped" hold whatever this machine's load: only a server that
        // waited out the latency, or kept running the work, takes anywhere near it.
        c.set_faults(ADMIN, "put latency=30s").await.unwrap();
        let started = Instant::now();
        let e = c
            .with_timeout(Duration::from_millis(100))
            .put(b"slow", b"v")
            .await
            .unwrap_err();
        let elapsed = started.elapsed();
        assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{e}");
        // Not before the budget: the budget travels in whole milliseconds, truncated, so
        // the server's own deadline may end the call a millisecond before the client's
        // timer would (it once did: 99.86 ms). A lower bound only a broken deadline
        // misses; a slow machine only makes the call longer.
        assert!(elapsed >= Duration::from_millis(90), "{elapsed:?}");
        assert!(
            elapsed < LATENCY_BOUND,
            "ended by the deadline, not by the latency: {elapsed:?}"
        );
        // The slot is freed by the server's own deadline, which runs from the call's
        // arrival and so ends a moment after the client's: wait (bounded) for it, long
        // before the injected latency ends: the work was dropped, not left running.
        let shared = server.shared();
        while shared.in_flight() > 0 {
            assert!(
                started.elapsed() < LATENCY_BOUND,
                "the slot was still held after {:?}",
                started.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(c.get(b"slow").await.unwrap(), None, "the put never ran");
        c.clear_faults(ADMIN).await.unwrap();
        assert_eq!(c.get(b"slow").await.unwrap(), None);
    });
}

#[test]
fn reads_succeed_through_30_percent_unavailable() {
    let server = server();
    rt().block_on(async {
        // Five attempts (the cap): with p = 0.3 per attempt a read fails all five with
        // probability 0.3^5 = 0.24%. The plan is seeded and the calls sequential, so the
        // run is reproducible.
        let policy = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        };
        let c = client(&server, policy).await;
        c.put(b"k", b"v").await.unwrap();
        let plan = c
            .set_faults(ADMIN, "seed=42; get fail=unavailable p=0.3")
            .await
            .unwrap();
        assert_eq!(plan.rules, 1);
        let before = c.stats();
        let mut failed = Vec::new();
        let mut most = 0;
        for i in 0..1000 {
            let a = c.stats().attempts;
            let r = c.get(b"k").await;
            let used = c.stats().attempts - a;
            most = most.max(used);
            match r {
                Ok(e) => assert_eq!(e.unwrap().value, b"v"),
                Err(e) => failed.push((i, used, e)),
            }
        }
        assert!(failed.is_empty(), "every read succeeds: {failed:?}");
        eprintln!("most attempts of one call: {most}");
        assert!(most <= 5);
        let s = c.stats();
        let (calls, attempts) = (s.calls - before.calls, s.attempts - before.attempts);
        eprintln!("1000 reads, {attempts} attempts");
        assert_eq!(calls, 1000);
        assert!(attempts > 1100, "faults were injected: {attempts}");
        assert!(
            attempts as f64 / calls as f64 <= 1.5,
            "about 1/(1-0.3) attempts per call: {attempts}"
        );

        c.set_faults(ADMIN, "get fail=invalid_argument")
            .await
            .unwrap();
        let before = c.stats();
        let e = c.get(b"k").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        assert_eq!(c.stats().attempts - before.attempts, 1, "not retried");
    });
}

#[test]
fn a_failing_server_sees_few_retries_and_recovers() {
    let server = server();
    rt().block_on(async {
        let admin = client(&server, RetryPolicy::none()).await;
        let c = client(&server, RetryPolicy::default()).await;
        c.get(b"warm").await.unwrap();
        admin
            .set_faults(ADMIN, "* fail=unavailable for=5s")
            .await
            .unwrap();
        let cleared_at = Instant::now() + Duration::from_secs(5);
        let before = c.stats();
        // Four callers hammer the failing server until their first success after the
        // faults expire; bounded by time.
        let give_up = cleared_at + Duration::from_secs(20);
        let tasks: Vec<_> = (0..4)
            .map(|_| {
                let c = c.clone();
                tokio::spawn(async move {
                    loop {
                        match c.get(b"warm").await {
                            Ok(_) if Instant::now() >= cleared_at => return Instant::now(),
                            _ if Instant::now() > give_up => panic!("never recovered"),
                            _ => {}
                        }
                    }
                })
            })
            .collect();
        let mut recovered = Vec::new();
        for t in tasks {
            recovered.push(t.await.unwrap());
        }
        let s = c.stats();
        let (calls, attempts) = (s.calls - before.calls, s.attempts - before.attempts);
        let ratio = attempts as f64 / calls as f64;
        let last = recovered.iter().max().unwrap().duration_since(cleared_at);
        eprintln!("storm: {calls} calls, {attempts} attempts ({ratio:.3}); recovered {last:?} after the faults ended");
        assert!(calls > 100, "the storm was exercised: {calls}");
        assert!(ratio <= 1.3, "attempts per call {ratio}");
        assert!(last < Duration::from_secs(2), "recovered in {last:?}");
    });
}

#[test]
fn admin_needs_its_token_and_rules_expire() {
    let server = server();
    rt().block_on(async {
        let c = client(&server, RetryPolicy::none()).await;
        let e = c.show_faults("wrong").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        let e = c.set_faults("", "get stall").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        let e = c.set_faults(ADMIN, "get explode").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        let e = c.set_faults(ADMIN, "nosuch stall").await.unwrap_err();
        assert!(e.message.contains("not a data method"), "{e}");
        let e = c.set_faults(ADMIN, "get fail=bogus").await.unwrap_err();
        assert!(e.message.contains("unknown error code"), "{e}");

        c.set_faults(ADMIN, "get fail=unavailable for=300ms")
            .await
            .unwrap();
        assert_eq!(c.get(b"x").await.unwrap_err().code, ErrorCode::Unavailable);
        let started = Instant::now();
        // Bounded loop: the rule ends by itself, no clear needed.
        loop {
            match c.get(b"x").await {
                Ok(_) => break,
                Err(e) => assert_eq!(e.code, ErrorCode::Unavailable),
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "rule never expired"
            );
        }
        assert_eq!(c.show_faults(ADMIN).await.unwrap().rules, 0);
    });
    // No admin token configured: admin is refused outright.
    let closed = common::start(common::test_config());
    rt().block_on(async {
        let c = client(&closed, RetryPolicy::none()).await;
        let e = c.show_faults("anything").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
    });
    // ...unless the dev flag opens it.
    let dev = common::start(Config {
        admin: capkv_server::config::AdminConfig {
            token: None,
            dev_open: true,
        },
        ..common::test_config()
    });
    rt().block_on(async {
        let c = client(&dev, RetryPolicy::none()).await;
        assert_eq!(c.show_faults("").await.unwrap().rules, 0);
    });
}

#[test]
fn no_data_capability_yields_admin() {
    // Structural: in the contract, only Gateway.admin returns an Admin.
    let schema = include_str!("../../schema/kv.capnp");
    let mentions: Vec<&str> = schema
        .lines()
        .map(str::trim)
        .filter(|l| {
            !l.starts_with('#')
                && [":Admin;", ":Admin)", ":Admin,"]
                    .iter()
                    .any(|t| l.contains(t))
        })
        .collect();
    assert_eq!(
        mentions,
        vec!["admin @0 :Admin;", "adminCap @2 :Admin;"],
        "{mentions:?}"
    );
    // Both are fields of AdminResult (in and outside its union), which only
    // Gateway.admin returns.
    let start = schema.find("struct AdminResult {").expect("AdminResult");
    let block = &schema[start..start + schema[start..].find("\n}").expect("its end")];
    assert!(block.contains("admin @0 :Admin;") && block.contains("adminCap @2 :Admin;"));
    assert_eq!(schema.matches(":AdminResult").count(), 1);
    assert!(schema
        .contains("admin @3 (ctx :RequestContext, adminToken :Text) -> (result :AdminResult);"));
}

/// Forwards each connection `listener` accepts to `to` (16 at most), from threads of its
/// own.
fn proxy(listener: std::net::TcpListener, to: std::net::SocketAddr) {
    use std::net::{Shutdown, TcpStream};
    std::thread::spawn(move || {
        for client in listener.incoming().take(16) {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(to) else {
                continue;
            };
            let (Ok(mut from_client), Ok(mut to_server)) = (client.try_clone(), server.try_clone())
            else {
                continue;
            };
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_client, &mut to_server);
                let _ = to_server.shutdown(Shutdown::Write);
            });
            let (mut from_server, mut to_client) = (server, client);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut from_server, &mut to_client);
                let _ = to_client.shutdown(Shutdown::Write);
            });
        }
    });
}

/// A call whose connection is gone, and whose first reconnect failed (every address
/// refused), reaches a server that is back a moment later: its retries are told to wait
/// out the reconnect interval, then reconnect. They had come within the interval (short
/// backoffs), were dropped unsent without a try, and the call failed.
#[test]
fn retries_after_a_failed_reconnect_reach_a_server_that_is_back() {
    let gone = server();
    let back = server();
    // The client's second address: a socket bound but not listening, so connections to
    // it are refused, until it listens below with a proxy to `back` behind it. Held all
    // along, the port cannot be taken by anything else meanwhile (released and bound
    // again, it could).
    let spare_socket = tokio::net::TcpSocket::new_v4().expect("a socket");
    spare_socket
        .bind("127.0.0.1:0".parse().expect("an address"))
        .expect("a spare port");
    let spare = spare_socket.local_addr().expect("its address");
    let options = ClientOptions {
        timeout: Duration::from_secs(10),
        retry: RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(1),
            max_backoff: Duration::from_millis(2),
            ..RetryPolicy::default()
        },
        ..ClientOptions::default()
    };
    let rt = rt();
    let c = rt.block_on(async {
        let c = Client::connect(&format!("{},{spare}", gone.addr()), options)
            .await
            .expect("connect");
        c.put(b"k", b"on the first server").await.unwrap();
        c
    });
    gone.stop().expect("a clean stop");
    rt.block_on(async {
        let before = c.stats().attempts;
        let get = tokio::spawn({
            let c = c.clone();
            async move { c.get(b"k").await }
        });
        // A retry has begun: a reconnect failed (both addresses refused) before it.
        let started = Instant::now();
        while c.stats().attempts < before + 2 {
            assert!(started.elapsed() < Duration::from_secs(10), "no retry");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let listener = spare_socket.listen(16).expect("the spare port listens");
        let listener = listener.into_std().expect("a std listener");
        // The proxy's thread accepts in blocking mode (tokio's sockets are not).
        listener.set_nonblocking(false).expect("blocking");
        proxy(listener, back.addr());
        let got = get.await.unwrap().expect("served after the reconnect");
        assert_eq!(got, None, "read on the other server");
    });
}

#[test]
fn a_dropped_reply_is_an_unknown_outcome_and_the_client_reconnects() {
    let server = server_with(|c| c.faults.plan = "put drop-reply".into());
    rt().block_on(async {
        // Without idempotency keys a write of unknown outcome is not repeated.
        let options = ClientOptions {
            timeout: Duration::from_secs(10),
            idempotent_writes: false,
            ..ClientOptions::default()
        };
        let c = Client::connect(&server.addr().to_string(), options)
            .await
            .unwrap();
        let before = c.stats();
        let e = c.put(b"k", b"committed").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        assert!(e.outcome_unknown, "{e:?}");
        assert_eq!(
            c.stats().attempts - before.attempts,
            1,
            "a write of unknown outcome is not repeated"
        );
        // The next call reconnects by itself and finds the write committed.
        let got = c.get(b"k").await.expect("reconnected");
        assert_eq!(got.unwrap().value, b"committed");

        // With a key (the default) it is retried, on a new connection resuming the same
        // session, and its recorded outcome comes back: one write, one version.
        let policy = RetryPolicy {
            max_attempts: 5,
            ..RetryPolicy::default()
        };
        let keyed = client(&server, policy).await;
        keyed
            .set_faults(ADMIN, "seed=1; put drop-reply p=0.3")
            .await
            .unwrap();
        for i in 0..20u8 {
            let out = keyed
                .put(&[b'n', i], b"v")
                .await
                .unwrap_or_else(|e| panic!("put {i}: {e:?} {:?}", keyed.stats()));
            assert_eq!(out.version, 1, "applied once");
        }
        keyed.clear_faults(ADMIN).await.unwrap();
        keyed.put(b"k2", b"v").await.unwrap();
    });
}

#[test]
fn a_closed_connection_before_the_work_is_retried_for_reads() {
    let server = server_with(|c| c.faults.plan = "seed=3; get close p=0.2".into());
    rt().block_on(async {
        let c = client(
            &server,
            RetryPolicy {
                max_attempts: 5,
                ..RetryPolicy::default()
            },
        )
        .await;
        let mut ok = 0;
        for _ in 0..20 {
            if c.get(b"nothing").await.is_ok() {
                ok += 1;
            }
        }
        let s = c.stats();
        eprintln!(
            "20 reads over closing connections: {ok} ok, {} attempts",
            s.attempts
        );
        assert!(
            s.attempts > s.calls,
            "some attempts met a closed connection"
        );
        assert!(ok >= 18, "reads are retried across reconnects: {ok}/20");
    });
}
