//! Architecture invariants (ARCHITECTURE.md) checked against the running code:
//!
//! - "A handler reads the Tunables in force once": the chain loads them when the call
//!   starts and hands them to the work in `Call::tunables`; no handler reads
//!   `Shared::tunables` itself, so a reload between a write's start and its execution
//!   cannot mix two configurations. Shown by a reload made while a put waits in an
//!   injected latency (on a paused clock, so the order is certain), and by reading the
//!   handlers' code.
//! - "Log an error where it is handled": a store failure is logged once, by
//!   `rpc::store_error`, not also by the engine and the chain.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use capkv::{CallMeta, ErrorCode};
use capkv_store::conformance::Tapped;
use capkv_store::{
    Entry, IdempotencyKey, MemoryStore, Pending, ScanPage, ScanRequest, Store, StoreError, WriteOp,
    WriteOutcome,
};
use common::*;

#[test]
fn handlers_read_the_tunables_the_chain_loaded() {
    let rpc_dir = repo().join("server/src/rpc");
    let mut files: Vec<String> = std::fs::read_dir(&rpc_dir)
        .expect("server/src/rpc")
        .map(|e| {
            format!(
                "server/src/rpc/{}",
                e.unwrap().file_name().to_string_lossy()
            )
        })
        .collect();
    assert!(files.len() >= 5, "the handler modules: {files:?}");
    files.push("server/src/refused.rs".into());
    for file in &files {
        let code = read_repo_file(file);
        let reads: Vec<&str> = code
            .lines()
            .filter(|l| l.contains(".tunables()") && !l.trim_start().starts_with("//"))
            .collect();
        let allowed = if file.ends_with("refused.rs") { 1 } else { 0 };
        assert!(
            reads.len() <= allowed,
            "{file} reads Shared::tunables itself; use Call::tunables: {reads:?}"
        );
    }
    let chain = read_repo_file("server/src/chain.rs");
    assert!(
        chain.contains("tunables: self.t,"),
        "the chain hands its Tunables to the call"
    );
}

#[test]
fn a_reload_during_a_write_does_not_change_the_settings_it_runs_with() {
    const HOUR_S: u64 = 3600;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, async {
        let mut config = test_config();
        config.idempotency.ttl_s = HOUR_S;
        let expiries: Arc<Mutex<Vec<u64>>> = Arc::default();
        let seen = Arc::clone(&expiries);
        let store = Arc::new(Tapped::new(
            move |_: &WriteOp, idem: Option<&IdempotencyKey>| {
                if let Some(k) = idem {
                    seen.lock().unwrap().push(k.expires_at_unix_ms);
                }
            },
        ));
        let (gw, shared) = in_process_gateway_over(&config, store.clone());
        let plan = capkv_server::method::parse_fault_plan("put latency=30s").unwrap();
        shared.chaos.arm(plan);
        let ctx = CallMeta {
            budget_ms: Some(120_000),
            ..CallMeta::default()
        };
        let mut open = gw.open_request();
        ctx.write(open.get().init_ctx());
        let kv = open.send().pipeline.get_result().get_kv_cap();
        let mut session = kv.session_request();
        ctx.write(session.get().init_ctx());
        let session = session.send();
        let ws = session.pipeline.get_result().get_session_cap();
        assert_eq!(
            code_of!(session.promise.await.unwrap(), session_result),
            None
        );
        let put = |value: &[u8], idem: &[u8]| {
            let mut put = ws.put_request();
            ctx.write(put.get().init_ctx());
            put.get().set_key(b"k");
            put.get().set_value(value);
            put.get().set_idempotency_key(idem);
            put.send().promise
        };
        let value = [b'v'; 100];
        let first = put(&value, b"first");
        // The put has entered the chain (which loaded the settings in force) and waits in
        // its injected latency: the clock is paused, and moves only when every task waits,
        // which this loop never does.
        for _ in 0..10_000 {
            if shared.in_flight() == 1 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(shared.in_flight(), 1, "the put is in the chain");
        assert!(expiries.lock().unwrap().is_empty(), "not executed yet");
        // A reload that would refuse this value and shorten its idempotency record.
        let mut smaller = config.clone();
        smaller.limits.max_value_bytes = 16;
        smaller.idempotency.ttl_s = 1;
        shared.apply_config(smaller).expect("reload");
        assert_eq!(code_of!(first.await.unwrap(), put_result), None);
        let expiry = expiries.lock().unwrap()[0];
        let now = capkv_store::write::now_unix_ms();
        assert!(
            expiry > now + HOUR_S * 1000 / 2,
            "the record got the reloaded TTL: expires in {} ms",
            expiry.saturating_sub(now)
        );
        // A put that starts after the reload runs with the new settings.
        shared.chaos.clear();
        assert_eq!(
            code_of!(put(&value, b"second").await.unwrap(), put_result),
            Some(ErrorCode::ValueTooLarge)
        );
    });
}

/// The detail only the server-side log may show.
const DETAIL: &str = "disk controller on fire (boom-detail)";

/// The memory engine, except that every `get` fails.
struct FailingGets(MemoryStore);

impl Store for FailingGets {
    fn get(&self, _key: &[u8]) -> Result<Option<Entry>, StoreError> {
        Err(StoreError::Internal(DETAIL.into()))
    }
    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        self.0.write(op, idem)
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.0.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.0.get_many(keys)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.0.revision()
    }
    capkv_store::forward_history_and_leases!(0);
    fn engine_name(&self) -> &'static str {
        "failing-gets"
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.0.instance_secret()
    }
}

static LINES_WITH_DETAIL: AtomicUsize = AtomicUsize::new(0);

/// Counts log events (any level, any target) that carry the injected detail.
struct CountDetail;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountDetail {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        struct Find(bool);
        impl tracing::field::Visit for Find {
            fn record_debug(&mut self, _: &tracing::field::Field, v: &dyn std::fmt::Debug) {
                self.0 |= format!("{v:?}").contains("boom-detail");
            }
        }
        let mut f = Find(false);
        event.record(&mut f);
        if f.0 {
            LINES_WITH_DETAIL.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[test]
fn a_store_failure_is_logged_exactly_once() {
    use tracing_subscriber::layer::SubscriberExt;
    // Everything enabled, so that a second line at any level would be seen.
    let subscriber = tracing_subscriber::registry()
        .with(tracing_subscriber::filter::LevelFilter::TRACE)
        .with(CountDetail);
    tracing::subscriber::set_global_default(subscriber).expect("the only subscriber here");
    let server = capkv_server::RunningServer::start_with_store(
        test_config(),
        Arc::new(FailingGets(MemoryStore::new())),
    )
    .expect("server starts");
    let addr = server.addr();
    local(async move {
        let c = client(addr).await;
        let e = c.get(b"k").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(
            !e.message.contains("boom-detail"),
            "the detail reached the client: {e:?}"
        );
    });
    drop(server);
    assert_eq!(LINES_WITH_DETAIL.load(Ordering::Relaxed), 1);
}
