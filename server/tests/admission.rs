//! Admission control beyond the in-flight limits (tests/limits.rs): the bounded queue with
//! its timeout, the per-token rate limit, the idle timeout, and a flood of idle or
//! trickling sockets at twice max-connections against a real kv-server process, whose
//! open file descriptors must return to their baseline.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use capkv::ErrorCode;
use capkv_client::{Client, ClientOptions, RetryPolicy};

/// Bound on every wait here; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(30);

#[test]
fn a_full_server_queues_calls_briefly_then_refuses() {
    let mut config = common::test_config();
    config.limits.max_in_flight = 1;
    config.limits.queue_depth = 1;
    config.limits.queue_timeout_ms = 200;
    // Every get holds its slot for 600 ms.
    config.faults.plan = "get latency=600ms".into();
    let server = common::start(config);
    let addr = server.addr();
    let shared = server.shared();
    common::local(async move {
        let (a, b, c) = (
            common::plain_client(addr).await,
            common::plain_client(addr).await,
            common::plain_client(addr).await,
        );
        // Make sure each connection is open (open is not delayed) before the race.
        for cl in [&a, &b, &c] {
            cl.put(b"k", b"v").await.unwrap();
        }
        let holder = tokio::task::spawn_local(async move { a.get(b"k").await });
        // Wait (bounded) until the holder has the only slot.
        let started = Instant::now();
        while shared.in_flight() == 0 {
            assert!(started.elapsed() < PATIENCE, "the get never started");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let queued = tokio::task::spawn_local(async move {
            let t = Instant::now();
            (b.put(b"k2", b"v").await, t.elapsed())
        });
        let third = tokio::task::spawn_local(async move {
            let t = Instant::now();
            (c.put(b"k3", b"v").await, t.elapsed())
        });
        let (r2, waited2) = queued.await.unwrap();
        let (r3, waited3) = third.await.unwrap();
        assert!(holder.await.unwrap().is_ok());
        // One of the two puts waited in the queue and gave up at the queue timeout; the
        // other found the queue full and was refused at once. (Which one is which depends
        // on the order they arrived.)
        let mut outcomes = [(r2, waited2), (r3, waited3)];
        outcomes.sort_by_key(|(_, w)| *w);
        let (fast, slow) = (&outcomes[0], &outcomes[1]);
        let fast_err = fast.0.as_ref().unwrap_err();
        let slow_err = slow.0.as_ref().unwrap_err();
        assert_eq!(fast_err.code, ErrorCode::Overloaded, "{fast_err}");
        assert!(fast_err.message.contains("queue_full"), "{fast_err}");
        assert_eq!(slow_err.code, ErrorCode::Overloaded, "{slow_err}");
        assert!(slow_err.message.contains("queue_timeout"), "{slow_err}");
        assert!(slow_err.retry_after_ms > 0);
        assert!(
            slow.1 >= Duration::from_millis(150),
            "gave up after {:?}, before the queue timeout",
            slow.1
        );
        eprintln!(
            "queue full refused after {:?}; queue timeout after {:?} (holder started {:?} ago)",
            fast.1,
            slow.1,
            started.elapsed()
        );
    });
}

#[test]
fn a_queued_call_is_served_when_a_slot_frees() {
    let mut config = common::test_config();
    config.limits.max_in_flight = 1;
    config.limits.queue_timeout_ms = 5_000;
    config.faults.plan = "get latency=200ms".into();
    let server = common::start(config);
    let addr = server.addr();
    common::local(async move {
        let (a, b) = (
            common::plain_client(addr).await,
            common::plain_client(addr).await,
        );
        a.put(b"k", b"v").await.unwrap();
        b.put(b"k", b"v").await.unwrap();
        let first = tokio::task::spawn_local(async move { a.get(b"k").await });
        let second = tokio::task::spawn_local(async move { b.get(b"k").await });
        assert!(first.await.unwrap().is_ok());
        assert!(second.await.unwrap().is_ok(), "the queued call was served");
    });
}

#[test]
fn the_rate_limit_is_per_token_and_reloadable() {
    let mut config = common::test_config();
    config.auth.token = Some(capkv_server::config::Secret::new("rate-token"));
    config.limits.rate_per_token = 5;
    config.limits.rate_burst = 5;
    let server = common::start(config.clone());
    let addr = server.addr();
    let shared = server.shared();
    common::local(async move {
        let options = ClientOptions {
            token: "rate-token".into(),
            retry: RetryPolicy::none(),
            ..ClientOptions::default()
        };
        let c1 = Client::connect(&addr.to_string(), options.clone())
            .await
            .unwrap();
        let c2 = Client::connect(&addr.to_string(), options).await.unwrap();
        // The bucket holds 5 (open is not charged); two connections share it.
        let mut ok = 0;
        let mut refused = None;
        for i in 0..20 {
            let c = if i % 2 == 0 { &c1 } else { &c2 };
            match c.get(b"k").await {
                Ok(_) => ok += 1,
                Err(e) => {
                    refused = Some(e);
                    break;
                }
            }
        }
        // At 5/s, a refill may add one token during the loop on a slow machine.
        assert!((5..=6).contains(&ok), "{ok} calls passed a bucket of 5");
        let e = refused.expect("the bucket ran out");
        assert_eq!(e.code, ErrorCode::Overloaded, "{e}");
        assert!(e.message.contains("rate limit"), "{e}");
        assert!(
            (1..=200).contains(&e.retry_after_ms),
            "retry after {} ms at 5/s",
            e.retry_after_ms
        );
        // Lifting the limit by reload takes effect on the next call.
        let mut lifted = config.clone();
        lifted.limits.rate_per_token = 0;
        let changes = shared.apply_config(lifted).unwrap();
        assert!(changes.contains("limits changed"), "{changes}");
        for _ in 0..50 {
            c1.get(b"k").await.expect("no rate limit after the reload");
        }
    });
}

#[test]
fn idle_connections_are_closed_and_busy_ones_kept() {
    let mut config = common::test_config();
    config.limits.idle_timeout_ms = 300;
    let server = common::start(config);
    let addr = server.addr();
    // A socket that never sends a thing is closed by the server after the timeout.
    let mut idle = TcpStream::connect(addr).unwrap();
    idle.set_read_timeout(Some(PATIENCE)).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 64];
    assert_eq!(idle.read(&mut buf).unwrap(), 0, "closed by the server");
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "{:?}",
        t.elapsed()
    );
    common::local(async move {
        // A raw connection (no reconnects) calling every 100 ms for over 1 s stays open.
        let gw = common::raw_gateway(addr).await;
        for _ in 0..12 {
            let mut req = gw.health_request();
            req.get().init_ctx();
            req.send().promise.await.expect("still connected");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// What each open descriptor is, for a failure message.
fn fd_targets(pid: u32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| {
                    std::fs::read_link(e.path())
                        .map(|t| t.display().to_string())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn twice_max_connections_of_idle_and_trickling_sockets() {
    const MAX_CONNECTIONS: usize = 16;
    let (server, addr, _logs) = common::spawn_memory_server(
        &[],
        &[
            (
                "CAPKV_LIMITS__MAX_CONNECTIONS",
                &MAX_CONNECTIONS.to_string(),
            ),
            ("CAPKV_LIMITS__IDLE_TIMEOUT_MS", "1000"),
        ],
    );
    let pid = server.id();
    let baseline = open_fds(pid);
    let baseline_fds = fd_targets(pid);

    // Half never send a byte; half trickle a frame header, a byte at a time.
    let mut socks: Vec<TcpStream> = (0..2 * MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    for (i, s) in socks.iter_mut().enumerate() {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        if i % 2 == 1 {
            let _ = s.write_all(&[0]);
        }
    }

    // A well-behaved client now: refused at once, with words.
    let t = Instant::now();
    let refused = common::local_result(async {
        let options = ClientOptions {
            retry: RetryPolicy::none(),
            ..ClientOptions::default()
        };
        let c = Client::connect(&addr, options).await?;
        c.get(b"k").await.map(|_| ())
    });
    let took = t.elapsed();
    let e = refused.expect_err("all connection slots are taken");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("too many connections"), "{e}");
    assert!(took < Duration::from_secs(2), "refusal took {took:?}");

    // Trickle on while the idle timeout runs; every socket gets closed by the server
    // (the refused ones at once, the accepted ones after 1 s without a call).
    let mut closed = 0;
    for s in socks.iter_mut() {
        let _ = s.write_all(&[0]);
        let mut buf = [0u8; 256];
        let t = Instant::now();
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {} // the refusal's Abort frame
            }
            assert!(t.elapsed() < PATIENCE, "socket never closed");
        }
        closed += 1;
    }
    assert_eq!(closed, 2 * MAX_CONNECTIONS);
    drop(socks);

    // The server's descriptors return to their baseline (bounded poll).
    let t = Instant::now();
    while open_fds(pid) > baseline {
        assert!(
            t.elapsed() < PATIENCE,
            "fds {:?} > baseline {baseline_fds:?}",
            fd_targets(pid)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // And a well-behaved client is served again.
    common::local_result(async {
        let c = Client::connect(&addr, ClientOptions::default()).await?;
        c.put(b"k", b"v").await.map(|_| ())
    })
    .expect("served once the idle sockets are gone");
    eprintln!(
        "{} sockets at max_connections={MAX_CONNECTIONS}: refusal in {took:?}; fds back to {baseline}",
        2 * MAX_CONNECTIONS
    );
}

#[test]
fn the_drain_timeout_ends_a_stalled_read_with_a_clear_error() {
    let mut config = common::test_config();
    config.shutdown.drain_timeout_ms = 300;
    config.faults.plan = "get stall".into();
    let server = common::start(config);
    let addr = server.addr();
    let shared = server.shared();
    let (put_done, put_done_rx) = std::sync::mpsc::channel();
    let client = std::thread::spawn(move || {
        common::local_result(async move {
            let c = common::plain_client(addr).await;
            c.put(b"k", b"v").await.expect("puts are not stalled");
            let _ = put_done.send(());
            c.get(b"k").await
        })
    });
    // Wait (bounded) until the put is done and the get is in flight, stalled.
    put_done_rx
        .recv_timeout(PATIENCE)
        .expect("the put finished");
    let t = Instant::now();
    while shared.in_flight() == 0 {
        assert!(t.elapsed() < PATIENCE, "the get never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let t = Instant::now();
    server.stop().expect("clean stop");
    let stopped_after = t.elapsed();
    let e = client
        .join()
        .unwrap()
        .expect_err("a stalled get never succeeds");
    assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
    assert!(e.message.contains("drain timeout"), "{e}");
    assert!(
        !e.outcome_unknown,
        "a reply, not a dropped connection: {e:?}"
    );
    assert!(
        stopped_after >= Duration::from_millis(300),
        "stopped after {stopped_after:?}, before the drain timeout"
    );
}

/// Peak resident set (VmHWM) of a process, in bytes.
fn peak_rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[test]
fn many_clients_at_the_value_limit_keep_memory_bounded_and_small_calls_served() {
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 8;
    let (server, addr, _logs) = common::spawn_memory_server(&[], &[]);
    let pid = server.id();
    let before = peak_rss_bytes(pid);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let limit = capkv::Limits::default().max_value_bytes;
    let (canary_calls, canary_failures, canary_max) = rt.block_on(async {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut writers = Vec::new();
        for w in 0..CLIENTS {
            let addr = addr.clone();
            writers.push(tokio::spawn(async move {
                let options = ClientOptions {
                    timeout: Duration::from_secs(60),
                    ..ClientOptions::default()
                };
                let c = Client::connect(&addr, options).await.expect("connect");
                let value = vec![w as u8; limit];
                for _ in 0..ROUNDS {
                    c.put(format!("big{w}").as_bytes(), &value)
                        .await
                        .expect("a value at the limit is accepted");
                }
            }));
        }
        let canary = {
            let (addr, done) = (addr.clone(), std::sync::Arc::clone(&done));
            tokio::spawn(async move {
                let c = Client::connect(&addr, ClientOptions::default())
                    .await
                    .expect("connect");
                let (mut calls, mut failures, mut max) = (0u64, 0u64, Duration::ZERO);
                // Bounded: until the writers are done, at most 1,000,000 calls.
                while !done.load(std::sync::atomic::Ordering::Acquire) && calls < 1_000_000 {
                    let t = Instant::now();
                    if c.get(b"small").await.is_err() {
                        failures += 1;
                    }
                    max = max.max(t.elapsed());
                    calls += 1;
                }
                (calls, failures, max)
            })
        };
        for w in writers {
            w.await.expect("writer");
        }
        done.store(true, std::sync::atomic::Ordering::Release);
        canary.await.expect("canary")
    });
    let peak = peak_rss_bytes(pid);
    assert!(kill_zero(pid), "the server is up");
    assert_eq!(canary_failures, 0, "small calls kept being served");
    assert!(canary_calls > 0);
    // 32 MiB stored plus what is in flight: the bound is generous, the figure reported.
    assert!(
        peak < 1024 * 1024 * 1024,
        "peak RSS {} MiB",
        peak / (1024 * 1024)
    );
    eprintln!(
        "{CLIENTS} clients x {ROUNDS} puts of {limit} bytes: server peak RSS {} MiB \
         (at start {} MiB); canary: {canary_calls} gets, 0 failed, slowest {canary_max:?}",
        peak / (1024 * 1024),
        before / (1024 * 1024)
    );
}

fn kill_zero(pid: u32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok()
}
