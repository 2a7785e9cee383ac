//! Writes to a store that answers later (a group commit: RocksDB, memory-log) wait for
//! their outcome in the RPC engine (`Now::Wait`, or a future on capnp-rpc's hook path):
//! the call is answered with the outcome when it comes, holds its admission slot until
//! then, and past its deadline ends with `deadlineExceeded` while the write goes on.
//! Driven through a store whose commits the test releases by hand.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use capkv::ErrorCode;
use capkv_store::{
    Completer, Entry, IdempotencyKey, MemoryStore, Pending, ScanPage, ScanRequest, Store,
    StoreError, WriteOp, WriteOutcome,
};
use tokio::time::Instant;

/// A write held back: where its outcome goes, and the outcome.
type Held = (Completer<WriteOutcome>, Result<WriteOutcome, StoreError>);

/// The memory engine, whose writes are applied at once but answered only when the test
/// releases them (as a committer answers a group after its sync).
#[derive(Default)]
struct HeldCommits {
    inner: MemoryStore,
    held: Mutex<Vec<Held>>,
}

impl HeldCommits {
    fn held(&self) -> usize {
        self.held.lock().unwrap().len()
    }

    fn release(&self) {
        for (done, outcome) in self.held.lock().unwrap().drain(..) {
            done.complete(outcome);
        }
    }
}

impl Store for HeldCommits {
    fn get(&self, key: &[u8]) -> Result<Option<Entry>, StoreError> {
        self.inner.get(key)
    }
    fn write(&self, op: WriteOp, idem: Option<IdempotencyKey>) -> Pending<WriteOutcome> {
        let outcome = self.inner.write(op, idem).wait();
        let (done, pending) = Pending::channel();
        self.held.lock().unwrap().push((done, outcome));
        pending
    }
    fn scan(&self, req: &ScanRequest) -> Result<ScanPage, StoreError> {
        self.inner.scan(req)
    }
    fn get_many(&self, keys: &[&[u8]]) -> Result<(Vec<Option<Entry>>, u64), StoreError> {
        self.inner.get_many(keys)
    }
    fn revision(&self) -> Result<u64, StoreError> {
        self.inner.revision()
    }
    capkv_store::forward_history_and_leases!(inner);
    fn engine_name(&self) -> &'static str {
        "held-commits"
    }
    fn instance_secret(&self) -> [u8; 32] {
        self.inner.instance_secret()
    }
}

/// A server over a [`HeldCommits`] store, a put's budget capped at `put_max_ms` if given.
fn held_server(put_max_ms: Option<u32>) -> (Arc<HeldCommits>, capkv_server::RunningServer) {
    held_server_with(put_max_ms, common::test_config())
}

/// [`held_server`] with `config`.
fn held_server_with(
    put_max_ms: Option<u32>,
    mut config: capkv_server::Config,
) -> (Arc<HeldCommits>, capkv_server::RunningServer) {
    let store = Arc::new(HeldCommits::default());
    config.deadlines.methods.insert(
        "put".into(),
        capkv_server::config::MethodDeadline {
            default_ms: None,
            max_ms: put_max_ms,
        },
    );
    let server = capkv_server::RunningServer::start_with_store(config, store.clone())
        .expect("server starts");
    (store, server)
}

/// The server's cap on a put's budget: far below the client's own timeout (10 s), so a
/// put held past it is ended by the server.
const PUT_BUDGET_MS: u32 = 100;

/// Polls `done` every millisecond until it holds, for at most 10 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let started = Instant::now();
    while !done() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Puts `value` under `key` from a task of its own, and returns once the store holds its
/// commit.
async fn held_put(
    c: &capkv_client::Client,
    store: &HeldCommits,
    key: &'static [u8],
    value: &'static [u8],
) -> tokio::task::JoinHandle<Result<capkv_client::PutOutcome, capkv::ApiError>> {
    let held = store.held();
    let put = tokio::task::spawn_local({
        let c = c.clone();
        async move { c.put(key, value).await }
    });
    until("the put's commit", || store.held() == held + 1).await;
    put
}

#[test]
fn a_write_waiting_for_its_commit_is_answered_with_its_outcome() {
    let (store, server) = held_server(None);
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        let put = held_put(&c, &store, b"k", b"v1").await;
        // Waiting: admitted, not answered; the connection serves other calls meanwhile.
        assert_eq!(shared.in_flight(), 1);
        assert_eq!(c.get(b"k").await.unwrap().unwrap().value, b"v1");
        assert!(!put.is_finished());
        store.release();
        let written = put.await.unwrap().expect("the put's outcome");
        assert_eq!(written.version, 1);
        until("the slot back", || shared.in_flight() == 0).await;
        // A batch and a delete wait and answer the same way.
        let batch = tokio::task::spawn_local({
            let c = c.clone();
            async move {
                c.put_many(vec![(b"a".to_vec(), b"1".to_vec(), Default::default())])
                    .await
            }
        });
        let delete = tokio::task::spawn_local({
            let c = c.clone();
            async move { c.delete(b"k").await }
        });
        until("both commits", || store.held() == 2).await;
        store.release();
        batch.await.unwrap().expect("the batch's outcome");
        assert!(delete.await.unwrap().expect("the delete's outcome").existed);
        assert_eq!(c.get(b"k").await.unwrap(), None);
    });
}

#[test]
fn a_write_waiting_past_its_deadline_ends_with_deadline_exceeded_and_goes_on() {
    let (store, server) = held_server(Some(PUT_BUDGET_MS));
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        // The client waits up to 10 s: the answer is the server's.
        let started = Instant::now();
        let e = c.put(b"slow", b"v").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::DeadlineExceeded, "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(9),
            "answered by the client's own timeout"
        );
        // The server's own deadline ends the call and gives its slot back, while the
        // commit is still held.
        until("the slot back", || shared.in_flight() == 0).await;
        assert_eq!(store.held(), 1);
        // The outcome arriving after the call ended goes nowhere, harmlessly; the
        // connection goes on.
        store.release();
        assert_eq!(c.get(b"slow").await.unwrap().unwrap().value, b"v");
        // (A delete: its budget is not capped, however long the release takes here.)
        let next = tokio::task::spawn_local({
            let c = c.clone();
            async move { c.delete(b"slow").await }
        });
        until("the delete's commit", || store.held() == 1).await;
        store.release();
        assert!(next.await.unwrap().expect("the delete's outcome").existed);
    });
}

/// A drain waits for a write waiting for its commit: the write is answered with its
/// outcome, then the server stops.
#[test]
fn a_drain_waits_for_a_write_waiting_for_its_commit() {
    let (store, server) = held_server(None);
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        let put = held_put(&c, &store, b"k", b"v").await;
        let stopping = std::thread::spawn(move || server.stop());
        until("the drain", || shared.is_draining()).await;
        store.release();
        assert_eq!(put.await.unwrap().expect("the put's outcome").version, 1);
        stopping
            .join()
            .expect("the stopping thread")
            .expect("a clean stop");
        assert_eq!(shared.in_flight(), 0);
    });
}

/// A connection that goes while its write waits gives the write's admission back; the
/// write goes on, and its outcome arriving later goes nowhere.
#[test]
fn a_connection_gone_while_its_write_waits_leaves_nothing_held() {
    let (store, server) = held_server(None);
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        let put = held_put(&c, &store, b"k", b"v").await;
        assert_eq!(shared.in_flight(), 1);
        put.abort();
        drop(c);
        until("the slot back", || shared.in_flight() == 0).await;
        store.release();
        let c = common::plain_client(addr).await;
        assert_eq!(c.get(b"k").await.unwrap().unwrap().value, b"v");
    });
}

/// A call waiting in the admission queue whose connection goes gives its place back:
/// the queue does not fill up with calls no longer there (and then refuse every call that
/// would wait as `queue_full`).
#[test]
fn a_connection_gone_while_its_call_is_queued_gives_its_place_back() {
    let mut config = common::test_config();
    config.limits.max_in_flight = 1;
    config.limits.queue_timeout_ms = 10_000;
    let (store, server) = held_server_with(None, config);
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        let first = held_put(&c, &store, b"a", b"1").await;
        let other = common::plain_client(addr).await;
        let queued = tokio::task::spawn_local({
            let other = other.clone();
            async move { other.put(b"b", b"2").await }
        });
        until("the second put queued", || shared.queued() == 1).await;
        queued.abort();
        drop(other);
        until("its place back", || shared.queued() == 0).await;
        store.release();
        assert_eq!(first.await.unwrap().expect("the first put").version, 1);
        until("the slot back", || shared.in_flight() == 0).await;
    });
}

/// Admission and fault plans hold for writes that wait (they take the chain's async path):
/// a put queued for admission behind a held write gets the slot when that write's outcome
/// comes, then waits for its own commit; an injected failure answers a put before it
/// reaches the store; injected latency delays it, then it waits as any other.
#[test]
fn admission_and_faults_hold_for_writes_that_wait() {
    const ADMIN: &str = "admin-secret";
    let mut config = common::test_config();
    config.limits.max_in_flight = 1;
    config.limits.queue_timeout_ms = 10_000;
    config.admin.token = Some(capkv_server::config::Secret::new(ADMIN));
    let (store, server) = held_server_with(None, config);
    let shared = server.shared();
    let addr = server.addr();
    common::local(async move {
        let c = common::plain_client(addr).await;
        let first = held_put(&c, &store, b"a", b"1").await;
        let second = tokio::task::spawn_local({
            let c = c.clone();
            async move { c.put(b"b", b"2").await }
        });
        until("the second put queued", || shared.queued() == 1).await;
        assert_eq!(store.held(), 1, "a queued put has not reached the store");
        store.release();
        assert_eq!(first.await.unwrap().expect("the first put").version, 1);
        until("the second put's commit", || store.held() == 1).await;
        assert_eq!((shared.queued(), shared.in_flight()), (0, 1));
        store.release();
        second.await.unwrap().expect("the second put");
        until("the slot back", || shared.in_flight() == 0).await;

        c.set_faults(ADMIN, "put fail=unavailable").await.unwrap();
        let e = c.put(b"c", b"3").await.unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable, "{e}");
        assert_eq!(store.held(), 0, "refused before the store");
        c.set_faults(ADMIN, "put latency=20ms").await.unwrap();
        let delayed = held_put(&c, &store, b"c", b"3").await;
        store.release();
        assert_eq!(delayed.await.unwrap().expect("the delayed put").version, 1);
        until("the slot back", || shared.in_flight() == 0).await;
    });
}
