//! kv-loadgen against a real in-process server: closed loop, open loop and batches all
//! complete calls without errors, and the results carry what the reports need. Not a
//! performance test: nothing here asserts a rate or a latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv_loadgen::report;
use capkv_loadgen::run::{self, RunConfig};
use capkv_loadgen::target::TargetKind;
use capkv_server::{Config, RunningServer};
use capkv_store::conformance::Tapped;
use capkv_store::{IdempotencyKey, WriteOp};

fn config(addr: String) -> RunConfig {
    RunConfig {
        addr,
        connections: 4,
        keys: 1_000,
        warmup: Duration::from_millis(50),
        duration: Duration::from_millis(300),
        server_pid: Some(std::process::id() as i32),
        ..RunConfig::default()
    }
}

#[test]
fn closed_open_and_batched_runs_complete_without_errors() {
    let server = RunningServer::start(Config::local_ephemeral()).unwrap();
    let base = config(server.addr().to_string());
    run::preload(&base).unwrap();

    let closed = run::run(&RunConfig {
        in_flight: 4,
        ..base.clone()
    })
    .unwrap();
    let all = closed.all().unwrap();
    assert!(all.calls > 0);
    assert_eq!(all.error_count(), 0, "{:?}", all.errors);
    assert!(
        closed.ops.iter().any(|o| o.op == "get"),
        "95/5 mix has gets"
    );
    assert!(closed.server.is_some(), "server usage sampled");
    // The generator's own CPU per call, for the rows the client limits.
    assert!(closed.client.is_some(), "client usage sampled");
    let per_call = closed
        .client_cpu_us_per_call()
        .expect("client CPU per call");
    assert!(per_call.is_finite() && per_call >= 0.0, "{per_call}");
    // And the server's, which the results compare between servers.
    let server_per_call = closed
        .server_cpu_us_per_call()
        .expect("server CPU per call");
    assert!(server_per_call.is_finite() && server_per_call >= 0.0);
    let row = report::markdown_row("GET", &closed);
    assert_eq!(
        row.matches('|').count(),
        report::MARKDOWN_HEADER
            .lines()
            .next()
            .unwrap()
            .matches('|')
            .count(),
        "a row has the header's columns: {row}"
    );
    assert!(row.trim_end().ends_with(" us |"), "{row}");

    let open = run::run(&RunConfig {
        rate: Some(2_000.0),
        mix_read_percent: 50,
        ..base.clone()
    })
    .unwrap();
    let all = open.all().unwrap();
    // 2000/s for 0.3 s: about 600 calls are due; allow for timer granularity.
    assert!((300..=700).contains(&all.calls), "{} calls", all.calls);
    assert_eq!(all.error_count(), 0, "{:?}", all.errors);
    assert!(open.send_lag.is_some());
    assert!(
        open.client.is_none(),
        "an open loop's dispatcher spins between due times: no CPU per call"
    );

    let batched = run::run(&RunConfig {
        batch: 8,
        mix_read_percent: 50,
        ..base
    })
    .unwrap();
    assert_eq!(batched.all().unwrap().error_count(), 0);
    assert!(batched.keys_per_sec > batched.all().unwrap().ok_per_sec);

    let table = report::table(&batched);
    assert!(
        table.contains("batch=8") && table.contains("p99.9"),
        "{table}"
    );
    let csv = report::csv_rows(&batched);
    assert_eq!(
        csv.lines().next().unwrap().split(',').count(),
        report::CSV_HEADER.split(',').count()
    );
    serde_json::to_string(&batched).unwrap();
}

/// Rounds (redis-benchmark -P's shape): every call of a round shares its send time, so a
/// run counts whole rounds only; the library and the raw client both run them; a rate is
/// refused.
#[test]
fn rounds_send_whole_rounds_on_both_clients() {
    let server = RunningServer::start(Config::local_ephemeral()).unwrap();
    let base = config(server.addr().to_string());
    run::preload(&base).unwrap();
    for target in [TargetKind::Capkv, TargetKind::CapkvRaw] {
        let r = run::run(&RunConfig {
            target,
            in_flight: 6,
            rounds: true,
            mix_read_percent: 50,
            ..base.clone()
        })
        .unwrap();
        assert_eq!(r.mode, "rounds");
        let all = r.all().unwrap();
        assert!(all.calls > 0);
        assert_eq!(all.calls % 6, 0, "{} calls are not whole rounds", all.calls);
        assert_eq!(all.error_count(), 0, "{:?}", all.errors);
        // Only the raw client sees its own writes and reads, so only it times the wire.
        assert_eq!(all.wire.is_some(), target == TargetKind::CapkvRaw);
    }
    let err = run::run(&RunConfig {
        rounds: true,
        rate: Some(1_000.0),
        ..base
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("rounds"), "{err}");
}

#[test]
fn unreachable_server_is_an_error_not_a_hang() {
    let cfg = config("127.0.0.1:1".into());
    let err = run::run(&cfg).unwrap_err().to_string();
    assert!(err.contains("could not open"), "{err}");
}

#[test]
fn auto_batched_gets_complete_without_errors() {
    let server = RunningServer::start(Config::local_ephemeral()).unwrap();
    let base = config(server.addr().to_string());
    run::preload(&base).unwrap();
    let r = run::run(&RunConfig {
        in_flight: 8,
        auto_batch: 8,
        mix_read_percent: 100,
        ..base
    })
    .unwrap();
    let all = r.all().unwrap();
    assert!(all.calls > 0);
    assert_eq!(all.error_count(), 0, "{:?}", all.errors);
    let table = report::table(&r);
    assert!(table.contains("auto_batch=8"), "{table}");
}

/// Both floors (capkv's engine, capnp-rpc's `RpcSystem`) answer the client library's gets
/// and the raw client's.
#[test]
fn the_rpc_floors_answer_the_loadgen_s_gets() {
    use capkv_loadgen::floor::FloorEngine;
    use capkv_loadgen::target::TargetKind;
    for engine in [FloorEngine::Capkv, FloorEngine::CapnpRpc] {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Serves until the test process exits.
        std::thread::spawn(move || capkv_loadgen::floor::serve(listener, engine, 100, |_| {}));
        for target in [TargetKind::Capkv, TargetKind::CapkvRaw] {
            let r = run::run(&RunConfig {
                target,
                in_flight: 2,
                mix_read_percent: 100,
                ..config(addr.to_string())
            })
            .unwrap();
            let all = r.all().unwrap();
            assert!(all.calls > 0, "{engine:?} {target:?}");
            assert_eq!(
                all.error_count(),
                0,
                "{engine:?} {target:?}: {:?}",
                all.errors
            );
        }
    }
}

/// `--target capkv-raw` (no client RPC runtime) against both of the server's RPC engines:
/// gets and puts complete without errors, a batch is refused with its own code.
#[test]
fn raw_mode_runs_against_both_rpc_engines() {
    use capkv_loadgen::target::TargetKind;
    use capkv_server::config::RpcEngine;
    for engine in [RpcEngine::Capkv, RpcEngine::CapnpRpc] {
        let mut server_config = Config::local_ephemeral();
        server_config.rpc_engine = engine;
        let server = RunningServer::start(server_config).unwrap();
        let raw = RunConfig {
            target: TargetKind::CapkvRaw,
            in_flight: 4,
            mix_read_percent: 50,
            ..config(server.addr().to_string())
        };
        let result = run::run(&raw).unwrap();
        let all = result.all().unwrap();
        assert!(all.calls > 0, "{engine:?}");
        assert_eq!(all.error_count(), 0, "{engine:?}: {:?}", all.errors);
        assert!(result.ops.iter().any(|o| o.op == "put"), "{engine:?}");
        // Every call's wire time (its write to its reply's read) lies inside the time its
        // caller waited, so its mean and maximum do too.
        let wire = all.wire.expect("the raw client times the wire");
        assert!(wire.mean_us > 0.0, "{engine:?}: {wire:?}");
        assert!(
            wire.mean_us <= all.latency.mean_us && wire.max_us <= all.latency.max_us,
            "{engine:?}: wire {wire:?} against the caller's {:?}",
            all.latency
        );

        let batched = run::run(&RunConfig { batch: 2, ..raw }).unwrap();
        let all = batched.all().unwrap();
        assert!(
            all.errors
                .keys()
                .all(|code| code == "raw_mode_single_keys_only"),
            "{:?}",
            all.errors
        );
    }
}

/// A short watch fan-out: every watcher gets every put once, in order.
#[test]
fn a_watch_fanout_delivers_every_put_to_every_watcher() {
    let server = RunningServer::start(Config::local_ephemeral()).unwrap();
    let cfg = capkv_loadgen::fanout::FanoutConfig {
        addr: server.addr().to_string(),
        watchers: 20,
        connections: 3,
        duration: Duration::from_millis(300),
        value_size: 16,
    };
    let r = capkv_loadgen::fanout::run(&cfg).unwrap();
    assert_eq!(r.anomalies, 0);
    assert!(r.puts_per_s > 0.0 && r.events_per_s > 0.0);
    assert!(capkv_loadgen::fanout::report(&cfg, &r).contains("events delivered/s"));
}

/// A short lease churn: cycles complete, and every key expires with its lease.
#[test]
fn a_lease_churn_leaves_no_key_behind() {
    let server = RunningServer::start(Config::local_ephemeral()).unwrap();
    let cfg = capkv_loadgen::churn::ChurnConfig {
        addr: server.addr().to_string(),
        connections: 2,
        in_flight: 2,
        ttl: Duration::from_millis(200),
        duration: Duration::from_millis(300),
    };
    let r = capkv_loadgen::churn::run(&cfg).unwrap();
    assert!(r.cycles_per_s > 0.0);
    assert_eq!(r.left, 0, "every key expired with its lease");
}

#[test]
fn idempotent_runs_key_every_measured_write_and_only_those() {
    // Writes seen with an idempotency key, and without.
    let keyed = Arc::new(AtomicU64::new(0));
    let unkeyed = Arc::new(AtomicU64::new(0));
    let (k, u) = (Arc::clone(&keyed), Arc::clone(&unkeyed));
    let store = Tapped::new(move |_: &WriteOp, idem: Option<&IdempotencyKey>| {
        let count = if idem.is_some() { &k } else { &u };
        count.fetch_add(1, Ordering::Relaxed);
    });
    let server =
        RunningServer::start_with_store(Config::local_ephemeral(), Arc::new(store)).unwrap();
    let base = config(server.addr().to_string());
    run::preload(&base).unwrap();
    let preloaded = unkeyed.load(Ordering::Relaxed);
    assert!(preloaded > 0, "the preload writes");
    assert_eq!(
        keyed.load(Ordering::Relaxed),
        0,
        "the preload writes unkeyed"
    );
    for batch in [1, 4] {
        let r = run::run(&RunConfig {
            mix_read_percent: 0,
            batch,
            idempotent: true,
            ..base.clone()
        })
        .unwrap();
        let all = r.all().unwrap();
        assert_eq!(all.error_count(), 0, "{:?}", all.errors);
    }
    assert!(keyed.load(Ordering::Relaxed) > 0, "keyed writes");
    assert_eq!(
        unkeyed.load(Ordering::Relaxed),
        preloaded,
        "every measured write carried a key"
    );
    // Only the capkv target makes keys.
    let refused = run::run(&RunConfig {
        target: TargetKind::Redis,
        idempotent: true,
        ..base
    });
    assert!(refused.is_err());
}
