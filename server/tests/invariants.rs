//! Architecture invariants (ARCHITECTURE.md) checked against the running code:
//!
//! - "A handler reads the Tunables in force once": the chain loads them when the call
//!   starts and hands them to the work in `Call::tunables`; no handler reads
//!   `Shared::tunables` itself, so a reload between a write's validation and its
//!   execution cannot mix two configurations (the reads are nanoseconds apart with no
//!   await between them, too close for a timing test: the code is read instead).
//! - "Log an error where it is handled": a store failure is logged once, by
//!   `rpc::store_error`, not also by the engine and the chain.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use capkv::ErrorCode;
use capkv_store::{
    Entry, IdempotencyKey, MemoryStore, Pending, ScanPage, ScanRequest, Store, StoreError, WriteOp,
    WriteOutcome,
};
use common::*;

#[test]
fn handlers_read_the_tunables_the_chain_loaded() {
    for file in ["server/src/rpc.rs", "server/src/refused.rs"] {
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
        chain.contains("tunables: Arc::clone(&t),"),
        "the chain hands its Tunables to the call"
    );
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
