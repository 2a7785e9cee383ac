//! capkv client library, and the `kv-client` CLI built on it.
//!
//! - [`Client`]: a `Send + Clone` async handle. capnp-rpc objects are `!Send`, so the
//!   connection lives on a thread of its own (a current-thread runtime with a `LocalSet`);
//!   the handle sends it jobs over a bounded channel and gets answers back on oneshots —
//!   the actor pattern. Clones share one connection.
//! - [`LocalClient`] (module [`local`]): the same calls on the caller's own `LocalSet`,
//!   without the thread hop; this is where requests are built and results decoded.
//! - Pipelining: connecting sends `open(token)` at once and keeps the *promised*
//!   `KvStore`; the first `get` goes out right behind it, so `open + get` costs one round
//!   trip. Writes pipeline the same way on a lazily created `WriteSession`.
//! - Deadlines: each call has a deadline (the handle's timeout); its remaining budget
//!   travels in `RequestContext`, and both ends stop waiting when it runs out.
//! - Batches: `get_many` and `put_many` (atomic) carry many keys in one call.
//! - [`retry`]: the retry policy (which failures, backoff with jitter, `retryAfterMs`, a
//!   shared retry budget) applied by [`Client`] to every call, within the call's deadline.
//!   A lost connection is re-established on the next call.
//! - `app`, `cli` and `shell`: the `kv-client` program, its commands and its interactive
//!   shell; `output`:
//!   human and JSON rendering. Behind the default feature `cli`, so that a program that
//!   links only the library (kv-loadgen) pulls in no terminal dependencies.
//!
//! Errors are [`ApiError`]s with the contract's stable codes; a broken connection is
//! `unavailable`, a request the server could not decode for size is `requestTooLarge`.

#[cfg(feature = "cli")]
pub mod app;
pub mod batch;
#[cfg(feature = "cli")]
pub mod cli;
pub mod local;
#[cfg(feature = "cli")]
pub mod output;
pub mod retry;
#[cfg(feature = "cli")]
pub mod shell;
mod wire;

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv::{ApiError, ErrorCode};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

pub use capkv::{code_name, ApiError as Error, ErrorCode as Code};
pub use local::LocalClient;
pub use retry::{RetryBudget, RetryPolicy};
pub use wire::CallSpec;

use retry::{Attempt, Safety};

/// Calls queued towards the connection thread before `send` waits: backpressure.
const JOB_QUEUE: usize = 1024;

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Bearer token for `open`; empty when the server needs none.
    pub token: String,
    /// Deadline of each call.
    pub timeout: Duration,
    /// Deadline of the TCP connect.
    pub connect_timeout: Duration,
    /// Limits the server uses; sizes the reader for responses (a full scan page).
    pub limits: capkv::Limits,
    /// How failed calls are retried (within `timeout`, which covers all attempts).
    pub retry: RetryPolicy,
    /// Give every write a random idempotency key, reused by its retries (also across
    /// reconnects, which resume the session), so that retrying a write whose outcome is
    /// unknown cannot apply it twice. Off: writes with an unknown outcome are not retried.
    pub idempotent_writes: bool,
    /// Continue this write session (a token from an earlier connection's
    /// [`Client::session_token`]) instead of starting a new one.
    pub resume_session: Option<Vec<u8>>,
    /// Mutual TLS; `None` = plain TCP.
    pub tls: Option<ClientTls>,
    /// Auto-batching: gets issued on one connection in the same scheduler tick leave as one
    /// `getMany` of at most this many keys (capped at `limits.max_batch_items`). 0 or 1 =
    /// off (the default): every get is its own call. See [`batch`].
    pub auto_batch_keys: usize,
    /// The RPC runtime under the connection: capkv's own client engine (the default) or
    /// capnp-rpc's `RpcSystem`, the reference it is tested against (and the way back).
    /// The default follows `CAPKV_CLIENT_RPC_ENGINE` (`capkv` or `capnp-rpc`) when set.
    pub rpc_engine: ClientEngine,
}

/// The RPC runtime of a client connection (see [`ClientOptions::rpc_engine`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientEngine {
    /// `capkv_rpc::client`.
    #[default]
    Capkv,
    /// capnp-rpc's `RpcSystem`.
    CapnpRpc,
}

impl ClientEngine {
    /// From `CAPKV_CLIENT_RPC_ENGINE`; unset or unknown (logged) is the default.
    pub fn from_env() -> Self {
        match std::env::var("CAPKV_CLIENT_RPC_ENGINE").as_deref() {
            Ok("capnp-rpc") => ClientEngine::CapnpRpc,
            Ok("capkv") | Err(_) => ClientEngine::Capkv,
            Ok(other) => {
                tracing::warn!(
                    value = other,
                    "CAPKV_CLIENT_RPC_ENGINE is capkv or capnp-rpc; using capkv"
                );
                ClientEngine::Capkv
            }
        }
    }
}

/// Mutual TLS for a client: the config (CA, client certificate) and the name the server's
/// certificate must carry.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub config: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

impl ClientTls {
    /// From PEM files; `server_name` is what the server's certificate must name (a DNS
    /// name or an IP address).
    pub fn from_files(
        files: &capkv_rpc::tls::TlsFiles,
        server_name: &str,
    ) -> Result<ClientTls, capkv_rpc::tls::TlsError> {
        Ok(ClientTls {
            config: capkv_rpc::tls::client_config(files)?,
            server_name: server_name.to_string(),
        })
    }
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            limits: capkv::Limits::default(),
            retry: RetryPolicy::default(),
            idempotent_writes: true,
            resume_session: None,
            tls: None,
            auto_batch_keys: 0,
            rpc_engine: ClientEngine::from_env(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IncrementOutcome {
    /// The value after the increment.
    pub value: i64,
    pub version: u64,
    pub revision: u64,
}

/// The armed fault plan of a server, as `Admin` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FaultsInfo {
    /// Text form (see `Admin.setFaults` in the schema).
    pub plan: String,
    pub rules: u32,
}

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub version: u64,
    pub mod_revision: u64,
}

/// Precondition of a write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Condition {
    #[default]
    None,
    IfVersion(u64),
    IfAbsent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PutOutcome {
    pub version: u64,
    pub revision: u64,
    /// The lease the key lives by now (0: none).
    pub lease: u64,
}

/// The lease a put leaves its key attached to (see [`Client::put_with_lease`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyLease {
    /// None: a key attached to a lease is detached (as etcd's put).
    #[default]
    None,
    /// This lease, by id.
    Lease(u64),
    /// A lease of its own with this TTL, granted by the same write (Redis's `SET ... PX`).
    Ttl(Duration),
}

/// A granted lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseGrant {
    pub id: u64,
    pub ttl_ms: u64,
}

/// A lease as it is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LeaseStatus {
    pub id: u64,
    pub ttl_ms: u64,
    /// Until it expires, unless kept alive.
    pub remaining_ms: u64,
    /// Keys attached to it.
    pub keys: u64,
}

/// What a revoke did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RevokeOutcome {
    pub deleted: u64,
    pub revision: u64,
}

/// Outcome of an atomic `put_many`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchOutcome {
    /// Each key's new version, in item order.
    pub versions: Vec<u64>,
    /// The revision of the batch, shared by all its items.
    pub revision: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeleteOutcome {
    pub existed: bool,
    pub revision: u64,
}

/// Which keys a scan covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScanBounds {
    /// `start` inclusive (empty = first key), `end` exclusive (empty = no bound).
    Range {
        start: Vec<u8>,
        end: Vec<u8>,
    },
    Prefix(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOptions {
    pub bounds: ScanBounds,
    /// 0 = the server's default page size.
    pub limit: u32,
    /// `next_cursor` of the previous page; empty for the first.
    pub cursor: Vec<u8>,
    pub keys_only: bool,
}

impl Default for ScanOptions {
    fn default() -> Self {
        Self {
            bounds: ScanBounds::Prefix(Vec::new()),
            limit: 0,
            cursor: Vec::new(),
            keys_only: false,
        }
    }
}

/// What happened to a key (see [`Watch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Put,
    Delete,
}

/// One change a [`Watch`] delivers: a put's new entry, or a delete's key (with the
/// delete's revision as `mod_revision`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: EventKind,
    pub entry: Entry,
}

/// One page of a [`Watch`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchPage {
    /// In revision order.
    pub events: Vec<WatchEvent>,
    /// Every change in the range up to this revision has been delivered.
    pub revision: u64,
}

/// The changes to a range of keys, in revision order, across reconnects: the client keeps
/// the first revision not yet delivered, and when the connection is lost (or a call fails)
/// it watches again from there on the next call, so nothing is delivered twice or skipped.
/// A gap the server can no longer fill (its history is shorter) is `compacted`, whose
/// `oldest_revision` says where a new watch can start. Made by [`Client::watch`].
pub struct Watch {
    client: Client,
    id: u64,
    bounds: Arc<ScanBounds>,
    /// The first revision not yet delivered; 0 until the first page (from the next write).
    from: u64,
    /// Where a watch from the next write started (the server's revision then, plus one),
    /// once its answer came (0 before): a retry after a lost first page watches from there.
    /// Watching from "the next write" again had skipped the writes that page held.
    started: Arc<std::sync::atomic::AtomicU64>,
}

/// Where a watch's next page starts: `from` (0: the next write), and where a watch from
/// the next write records the revision it started at once the server says it.
pub(crate) struct WatchStart {
    pub(crate) from: u64,
    pub(crate) started: Arc<std::sync::atomic::AtomicU64>,
}

impl WatchStart {
    /// The revision to watch from: `from`, or, from the next write, where an earlier
    /// attempt learned that was (0 until one did).
    pub(crate) fn revision(&self) -> u64 {
        Self::revision_of(self.from, &self.started)
    }

    fn revision_of(from: u64, started: &std::sync::atomic::AtomicU64) -> u64 {
        match from {
            0 => started.load(Ordering::Acquire),
            from => from,
        }
    }
}

/// Events asked per [`Watch::next`] page.
const WATCH_PAGE_EVENTS: u32 = 100;
/// Time on top of a page's wait that its call may take (the round trip, a slow server).
const WATCH_CALL_SLACK: Duration = Duration::from_secs(5);

impl Watch {
    /// The next page: the changes after the last page, waiting up to `wait` (at most 60 s)
    /// for one; possibly empty when none came.
    pub async fn next(&mut self, wait: Duration) -> Result<WatchPage, ApiError> {
        let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX);
        let data = (
            self.id,
            Arc::clone(&self.bounds),
            self.from,
            wait_ms,
            Arc::clone(&self.started),
        );
        let page = self
            .client
            .with_timeout(wait.saturating_add(WATCH_CALL_SLACK))
            .call(
                "watch_next",
                // Safe to repeat: a failed call forgets its watcher, and the retry watches
                // again from the first revision not delivered.
                Safety::Idempotent,
                data,
                |c, d, spec| async move {
                    let (id, bounds, from, wait_ms, started) = &*d;
                    let start = WatchStart {
                        from: *from,
                        started: Arc::clone(started),
                    };
                    c.watch_next_from(*id, bounds, start, (WATCH_PAGE_EVENTS, *wait_ms), spec)
                        .await
                },
            )
            .await?;
        self.from = page.revision + 1;
        Ok(page)
    }

    /// The first revision not yet delivered (0 before the first page, unless a watch from
    /// the next write learned where it started: then that).
    pub fn next_revision(&self) -> u64 {
        WatchStart::revision_of(self.from, &self.started)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        // Releases the server's watcher; if the queue is full it goes with the connection.
        let id = self.id;
        let _ = self.client.jobs.try_send(Box::new(move |c| {
            c.forget_watcher(id);
            async {}.boxed_local()
        }));
    }
}

/// Ids of [`Watch`]es, unique in the process.
static WATCH_IDS: AtomicU64 = AtomicU64::new(1);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanPage {
    pub entries: Vec<Entry>,
    /// Pass back as `cursor` for the next page; `None` when the range is exhausted.
    pub next_cursor: Option<Vec<u8>>,
    pub revision: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    pub live: bool,
    pub ready: bool,
    pub status: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VersionInfo {
    pub service: String,
    pub api_version: u32,
}

type Job = Box<dyn FnOnce(Rc<LocalClient>) -> LocalBoxFuture<'static, ()> + Send>;

/// Why calls are being dropped unsent (the connection is down and could not be made again),
/// so that the caller is told more than "not connected".
type NotSentReason = Arc<std::sync::Mutex<Option<ApiError>>>;

/// Marks a span with how its call or attempt ended.
fn record_outcome(span: &tracing::Span, code: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("code", code);
    if code != "ok" {
        span.record("otel.status_code", "ERROR");
    }
}

/// A handle to one connection. Cheap to clone; `Send`, so it can be used from any task.
#[derive(Clone)]
pub struct Client {
    jobs: mpsc::Sender<Job>,
    /// Why the connection thread last dropped a call unsent (shared with it).
    not_sent: NotSentReason,
    timeout: Duration,
    retry: RetryPolicy,
    budget: RetryBudget,
    counters: Arc<Counters>,
    idempotent_writes: bool,
    /// A caller-chosen key for the writes of this handle (see `with_idempotency_key`).
    fixed_key: Option<[u8; 16]>,
    /// Several gateways were named: a call answered `unavailable` moves the connection to
    /// the next (a gateway that cannot reach its store, or one draining, hands its clients
    /// to another), and the call's retry goes there.
    failover: bool,
}

#[derive(Debug, Default)]
struct Counters {
    calls: AtomicU64,
    attempts: AtomicU64,
}

/// What a client (all its clones) has done so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClientStats {
    /// Logical calls made.
    pub calls: u64,
    /// Attempts sent or tried; `attempts - calls` is the number of retries.
    pub attempts: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The addresses of `addr`: one, or several separated by commas (gateways of one service,
/// e.g. kv-servers over one etcd cluster: any of them serves any call and session).
pub(crate) fn addresses(addr: &str) -> Vec<&str> {
    let list: Vec<&str> = addr
        .split(',')
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    if list.is_empty() {
        vec![addr]
    } else {
        list
    }
}

/// Connects to the first of `addr`'s addresses ([`addresses`]) that answers, trying them
/// in turn from the one at `start` (wrapping), each within the connect timeout; returns
/// the stream and which address it reached. When none answers, the error is the last
/// one's, naming every address tried.
pub(crate) async fn tcp_connect_from(
    addr: &str,
    start: usize,
    options: &ClientOptions,
) -> Result<(tokio::net::TcpStream, usize), ApiError> {
    let list = addresses(addr);
    let mut last = None;
    for i in 0..list.len() {
        let at = (start + i) % list.len();
        match tcp_connect(list[at], options).await {
            Ok(stream) => return Ok((stream, at)),
            Err(e) => {
                tracing::debug!(addr = list[at], error = %e, "cannot connect");
                last = Some(e);
            }
        }
    }
    let e = last.unwrap_or_else(|| ApiError::new(ErrorCode::InvalidArgument, "no address"));
    if list.len() == 1 {
        return Err(e);
    }
    Err(ApiError::new(
        e.code,
        format!(
            "cannot connect to any of {}: {}",
            list.join(", "),
            e.message
        ),
    ))
}

/// Resolves `addr` (one address) and opens a TCP connection with `TCP_NODELAY` (small
/// messages must never wait for Nagle), within the connect timeout.
pub(crate) async fn tcp_connect(
    addr: &str,
    options: &ClientOptions,
) -> Result<tokio::net::TcpStream, ApiError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(addr)
        .await
        .map_err(|e| {
            ApiError::new(
                ErrorCode::InvalidArgument,
                format!("bad address {addr}: {e}"),
            )
        })?
        .collect();
    let stream = tokio::time::timeout(
        options.connect_timeout,
        tokio::net::TcpStream::connect(&addrs[..]),
    )
    .await
    .map_err(|_| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("connect to {addr} timed out"),
        )
    })?
    .map_err(|e| {
        ApiError::new(
            ErrorCode::Unavailable,
            format!("cannot connect to {addr}: {e}"),
        )
    })?;
    if let Err(e) = stream.set_nodelay(true) {
        tracing::debug!(error = %e, "set_nodelay failed");
    }
    Ok(stream)
}

impl Client {
    /// Connects to `addr` and sends `open(token)` without waiting for it. `addr` may name
    /// several gateways of one service, comma-separated (`a:7070,b:7070`): the first that
    /// answers is used, and when its connection is lost, or a call is answered
    /// `unavailable`, the next ones are tried in turn, the write session resumed there.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Client, ApiError> {
        let (stream, at) = tcp_connect_from(addr, 0, &options).await?;
        let stream = stream
            .into_std()
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let timeout = options.timeout;
        let retry = options.retry.clone();
        let budget = RetryBudget::new(&retry);
        let idempotent_writes = options.idempotent_writes;
        let failover = addresses(addr).len() > 1;
        let addr = addr.to_string();
        let not_sent = NotSentReason::default();
        let thread_not_sent = Arc::clone(&not_sent);
        std::thread::Builder::new()
            .name("capkv-client".into())
            .spawn(move || {
                connection_thread(addr, at, stream, options, rx, ready_tx, thread_not_sent)
            })
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot start thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "connection thread ended"))??;
        Ok(Client {
            jobs,
            not_sent,
            timeout,
            retry,
            budget,
            counters: Arc::default(),
            idempotent_writes,
            fixed_key: None,
            failover,
        })
    }

    /// A handle on the same connection whose calls use another deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A handle whose writes all carry `key` as their idempotency key: to replay a write
    /// (same key, same parameters) and get its recorded outcome instead of a second effect.
    pub fn with_idempotency_key(&self, key: [u8; 16]) -> Client {
        Client {
            fixed_key: Some(key),
            ..self.clone()
        }
    }

    /// The handle for one logical write and the idempotency key it will carry: this
    /// handle's fixed key, a fresh random one, or none when idempotent writes are off.
    pub fn for_one_write(&self) -> (Client, Option<[u8; 16]>) {
        let key = self.write_key();
        let handle = match key {
            Some(k) => self.with_idempotency_key(k),
            None => self.clone(),
        };
        (handle, key)
    }

    /// The idempotency key of the next logical write: the fixed one, a fresh random one,
    /// or none when idempotent writes are off.
    fn write_key(&self) -> Option<[u8; 16]> {
        match self.fixed_key {
            Some(k) => Some(k),
            None if self.idempotent_writes => Some(rand::random()),
            None => None,
        }
    }

    /// The write session's token, once a write has opened the session: pass it as
    /// `ClientOptions::resume_session` to continue the session from another connection.
    pub async fn session_token(&self) -> Result<Option<Vec<u8>>, ApiError> {
        self.call(
            "session_token",
            Safety::Idempotent,
            (),
            |c, _, _| async move { Ok(c.session_token()) },
        )
        .await
    }

    /// Calls and attempts made through this client and its clones.
    pub fn stats(&self) -> ClientStats {
        ClientStats {
            calls: self.counters.calls.load(Ordering::Relaxed),
            attempts: self.counters.attempts.load(Ordering::Relaxed),
        }
    }

    /// Runs one logical call: `f` on the connection thread, retried as the policy says,
    /// all attempts within this handle's timeout. `data` is shared by the attempts.
    async fn call<D, T, Fut>(
        &self,
        method: &'static str,
        safety: Safety,
        data: D,
        f: fn(Rc<LocalClient>, Arc<D>, CallSpec) -> Fut,
    ) -> Result<T, ApiError>
    where
        D: Send + Sync + 'static,
        T: Send + 'static,
        Fut: Future<Output = Result<T, ApiError>> + 'static,
    {
        let deadline = far_from_now(self.timeout);
        let data = Arc::new(data);
        // A write gets one key for all its attempts; with it, repeating is safe.
        let (idempotency_key, safety) = match safety {
            Safety::NotIdempotent => match self.write_key() {
                Some(k) => (Some(k), Safety::Idempotent),
                None => (None, Safety::NotIdempotent),
            },
            Safety::Idempotent => (None, Safety::Idempotent),
        };
        self.counters.calls.fetch_add(1, Ordering::Relaxed);
        // One span per logical call and one per attempt under it; the attempt's context
        // travels to the server, whose span becomes its child. Disabled (one level check
        // each) unless traces are exported.
        let call_span = tracing::trace_span!(
            target: "capkv::client", "call",
            otel.name = method, rpc.method = method, code = Empty,
            otel.status_code = Empty,
        );
        let result = retry::run(method, &self.retry, &self.budget, deadline, safety, |attempt| {
            self.counters.attempts.fetch_add(1, Ordering::Relaxed);
            let attempt_span = tracing::trace_span!(
                target: "capkv::client", parent: &call_span, "attempt",
                otel.name = method, otel.kind = "client", rpc.system = "capnp",
                rpc.method = method, attempt, code = Empty, otel.status_code = Empty,
            );
            let data = Arc::clone(&data);
            let spec = CallSpec {
                deadline,
                attempt,
                idempotency_key,
                traceparent: capkv_telemetry::TraceParent::of_span(&attempt_span),
            };
            let sent = self.attempt(spec, move |c| f(c, data, spec));
            let instrument_span = attempt_span.clone();
            async move {
                let outcome = sent.await;
                // Client metrics: attempts by method and outcome (a code name, `ok`, or
                // `not_sent`); retries are counted where they are decided (retry::run).
                let label = match &outcome {
                    Attempt::Done(Ok(_)) => "ok",
                    Attempt::Done(Err(e)) => capkv::code_name(e.code),
                    Attempt::NotSent(_) => "not_sent",
                };
                metrics::counter!("capkv_client_attempts_total", "method" => method, "outcome" => label)
                    .increment(1);
                record_outcome(&attempt_span, label);
                outcome
            }
            .instrument(instrument_span)
        })
        .instrument(call_span.clone())
        .await;
        if !call_span.is_disabled() {
            record_outcome(
                &call_span,
                match &result {
                    Ok(_) => "ok",
                    Err(e) => capkv::code_name(e.code),
                },
            );
        }
        result
    }

    /// One attempt on the connection thread.
    async fn attempt<T, G, Fut>(&self, spec: CallSpec, g: G) -> Attempt<T>
    where
        T: Send + 'static,
        G: FnOnce(Rc<LocalClient>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ApiError>> + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let failover = self.failover;
        let job: Job = Box::new(move |conn| {
            async move {
                let r = g(Rc::clone(&conn)).await;
                if failover && matches!(&r, Err(e) if e.code == ErrorCode::Unavailable) {
                    conn.retire();
                }
                let _ = tx.send(r);
            }
            .boxed_local()
        });
        let stopped = || {
            ApiError::new(
                ErrorCode::Unavailable,
                "client connection thread has stopped",
            )
        };
        match tokio::time::timeout_at(spec.deadline, self.jobs.send(job)).await {
            Err(_) => return Attempt::Done(Err(wire::deadline_exceeded())),
            Ok(Err(_)) => return Attempt::Done(Err(stopped())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(spec.deadline, rx).await {
            Ok(Ok(r)) => Attempt::Done(r),
            // The connection thread dropped the job unrun: no connection to send it on.
            Ok(Err(_)) => {
                let why = self.not_sent.lock().ok().and_then(|w| w.clone());
                Attempt::NotSent(why.unwrap_or_else(|| {
                    ApiError::new(ErrorCode::Unavailable, "not connected to the server")
                }))
            }
            Err(_) => Attempt::Done(Err(wire::deadline_exceeded())),
        }
    }

    pub async fn health(&self) -> Result<Health, ApiError> {
        self.call("health", Safety::Idempotent, (), |c, _, d| async move {
            c.health(d).await
        })
        .await
    }

    pub async fn version(&self) -> Result<VersionInfo, ApiError> {
        self.call("version", Safety::Idempotent, (), |c, _, d| async move {
            c.version(d).await
        })
        .await
    }

    /// The entry under `key`, or `None` if it does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, ApiError> {
        self.call(
            "get",
            Safety::Idempotent,
            key.to_vec(),
            |c, key, d| async move { c.get(&key, d).await },
        )
        .await
    }

    /// Several keys in one call (at most the server's `limits.max_batch_items`).
    pub async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Entry>>, ApiError> {
        self.call(
            "get_many",
            Safety::Idempotent,
            keys,
            |c, keys, d| async move { c.get_many(&keys, d).await },
        )
        .await
    }

    pub async fn scan(&self, opts: ScanOptions) -> Result<ScanPage, ApiError> {
        self.call("scan", Safety::Idempotent, opts, |c, opts, d| async move {
            c.scan(&opts, d).await
        })
        .await
    }

    pub async fn put(&self, key: &[u8], value: &[u8]) -> Result<PutOutcome, ApiError> {
        self.put_if(key, value, Condition::None).await
    }

    pub async fn put_if(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
    ) -> Result<PutOutcome, ApiError> {
        self.put_with_lease(key, value, cond, KeyLease::None).await
    }

    /// A put whose key lives by `lease` (see [`KeyLease`]).
    pub async fn put_with_lease(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        lease: KeyLease,
    ) -> Result<PutOutcome, ApiError> {
        let data = (key.to_vec(), value.to_vec(), cond, lease);
        self.call(
            "put",
            Safety::NotIdempotent,
            data,
            |c, data, d| async move {
                let (key, value, cond, lease) = &*data;
                c.put_with_lease(key, value, *cond, *lease, d).await
            },
        )
        .await
    }

    /// A lease of `ttl`: keys put with it go when it expires (not kept alive for its TTL)
    /// or is revoked.
    pub async fn grant_lease(&self, ttl: Duration) -> Result<LeaseGrant, ApiError> {
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.call(
            "grant_lease",
            Safety::NotIdempotent,
            ttl_ms,
            |c, ttl_ms, d| async move { c.grant_lease(*ttl_ms, d).await },
        )
        .await
    }

    /// Renews lease `id` to its full TTL.
    pub async fn keep_alive(&self, id: u64) -> Result<LeaseStatus, ApiError> {
        self.call(
            "lease_keep_alive",
            Safety::Idempotent,
            id,
            |c, id, d| async move { c.lease_status(*id, true, d).await },
        )
        .await
    }

    /// Lease `id` as it is now (not renewed).
    pub async fn lease_time_to_live(&self, id: u64) -> Result<LeaseStatus, ApiError> {
        self.call(
            "lease_time_to_live",
            Safety::Idempotent,
            id,
            |c, id, d| async move { c.lease_status(*id, false, d).await },
        )
        .await
    }

    /// Ends lease `id` now: its keys are deleted at one revision.
    pub async fn revoke_lease(&self, id: u64) -> Result<RevokeOutcome, ApiError> {
        self.call(
            "lease_revoke",
            Safety::NotIdempotent,
            id,
            |c, id, d| async move { c.revoke_lease(*id, d).await },
        )
        .await
    }

    /// Several puts applied atomically: all or none, one revision.
    pub async fn put_many(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>, Condition)>,
    ) -> Result<BatchOutcome, ApiError> {
        self.call(
            "put_many",
            Safety::NotIdempotent,
            items,
            |c, items, d| async move { c.put_many(&items, d).await },
        )
        .await
    }

    /// Adds `delta` to the integer under `key` (absent = 0), like Redis INCRBY.
    pub async fn increment(&self, key: &[u8], delta: i64) -> Result<IncrementOutcome, ApiError> {
        self.call(
            "increment",
            Safety::NotIdempotent,
            (key.to_vec(), delta),
            |c, data, d| async move { c.increment(&data.0, data.1, d).await },
        )
        .await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<DeleteOutcome, ApiError> {
        self.delete_if(key, Condition::None).await
    }

    /// A watch of the keys in `bounds` from revision `from` (0: from the next write); its
    /// [`Watch::next`] pages deliver the changes.
    pub fn watch(&self, bounds: ScanBounds, from: u64) -> Watch {
        Watch {
            client: self.clone(),
            id: WATCH_IDS.fetch_add(1, Ordering::Relaxed),
            bounds: Arc::new(bounds),
            from,
            started: Arc::default(),
        }
    }

    pub async fn delete_if(&self, key: &[u8], cond: Condition) -> Result<DeleteOutcome, ApiError> {
        self.call(
            "delete",
            Safety::NotIdempotent,
            (key.to_vec(), cond),
            |c, data, d| async move { c.delete(&data.0, data.1, d).await },
        )
        .await
    }
}

impl Client {
    /// Arms a fault plan on the server (needs the admin token); an empty plan clears it.
    pub async fn set_faults(&self, admin_token: &str, plan: &str) -> Result<FaultsInfo, ApiError> {
        let data = (admin_token.to_string(), plan.to_string());
        self.call(
            "set_faults",
            Safety::Idempotent,
            data,
            |c, data, d| async move { c.set_faults(&data.0, &data.1, d).await },
        )
        .await
    }

    pub async fn show_faults(&self, admin_token: &str) -> Result<FaultsInfo, ApiError> {
        self.call(
            "show_faults",
            Safety::Idempotent,
            admin_token.to_string(),
            |c, t, d| async move { c.show_faults(&t, d).await },
        )
        .await
    }

    pub async fn clear_faults(&self, admin_token: &str) -> Result<FaultsInfo, ApiError> {
        self.call(
            "clear_faults",
            Safety::Idempotent,
            admin_token.to_string(),
            |c, t, d| async move { c.clear_faults(&t, d).await },
        )
        .await
    }

    /// Makes the server write a checkpoint (a backup) of its store into `dir`, a path on
    /// the server's machine that must not exist yet.
    pub async fn checkpoint(&self, admin_token: &str, dir: &str) -> Result<(), ApiError> {
        // Not repeated once it may have run: a second checkpoint into the same directory
        // is refused (it exists), which would hide that the first one was written.
        self.call(
            "checkpoint",
            Safety::NotIdempotent,
            (admin_token.to_string(), dir.to_string()),
            |c, t, d| async move { c.checkpoint(&t.0, &t.1, d).await },
        )
        .await
    }

    /// Makes the server reload its configuration (as SIGHUP does); returns what changed.
    pub async fn reload_config(&self, admin_token: &str) -> Result<String, ApiError> {
        self.call(
            "reload_config",
            Safety::Idempotent,
            admin_token.to_string(),
            |c, t, d| async move { c.reload_config(&t, d).await },
        )
        .await
    }

    /// Compacts the server's storage (give the handle a generous timeout).
    pub async fn compact(&self, admin_token: &str) -> Result<(), ApiError> {
        self.call(
            "compact",
            Safety::Idempotent,
            admin_token.to_string(),
            |c, t, d| async move { c.compact(&t, d).await },
        )
        .await
    }
}

/// `now + d`, or a century from now when that is past what an `Instant` holds (a timeout
/// of billions of years, which the CLI's duration syntax accepts, panicked).
pub(crate) fn far_from_now(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

/// Least time between a failed reconnect and the next attempt: calls made while the server
/// is down fail fast (as not sent) instead of each waiting for a connect.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(50);

fn connection_thread(
    addr: String,
    mut at: usize,
    stream: std::net::TcpStream,
    options: ClientOptions,
    mut jobs: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<(), ApiError>>,
    not_sent: NotSentReason,
) {
    // Read by a job refused while a reconnect's failure is recent (its reason, again).
    let last_not_sent = Arc::clone(&not_sent);
    let drop_unsent = |job: Job, why: Option<ApiError>| {
        if let (Some(why), Ok(mut slot)) = (why, not_sent.lock()) {
            *slot = Some(why);
        }
        drop(job); // not sent: the caller may retry it, whatever it is
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(ApiError::new(ErrorCode::Internal, e.to_string())));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        let stream = match tokio::net::TcpStream::from_std(stream) {
            Ok(s) => s,
            Err(e) => {
                let _ = ready.send(Err(ApiError::new(ErrorCode::Unavailable, e.to_string())));
                return;
            }
        };
        let mut conn = match LocalClient::over(stream, &options).await {
            Ok(c) => Rc::new(c),
            Err(e) => {
                let _ = ready.send(Err(e));
                return;
            }
        };
        if let Some(token) = options.resume_session.clone() {
            conn.resume_with(token);
        }
        let _ = ready.send(Ok(()));
        let mut last_failed_reconnect: Option<Instant> = None;
        // Ends when every handle is dropped; dropping the LocalClient and the LocalSet
        // then closes the connection.
        while let Some(job) = jobs.recv().await {
            if !conn.is_alive() {
                // The peer at this address is not a capkv server: connecting again would
                // only learn that again.
                if let Some(e) = conn.end_reason().filter(wire::is_not_capnp) {
                    drop_unsent(job, Some(e));
                    continue;
                }
                if let Some(failed) = last_failed_reconnect {
                    let left = RECONNECT_INTERVAL.saturating_sub(failed.elapsed());
                    if !left.is_zero() {
                        // A reconnect failed moments ago: not tried again yet, and the
                        // caller's retry is told to wait out the interval. Without the
                        // wait, a call's retries (backoffs of 5-20 ms) all came within it,
                        // none was sent, and a server back a moment later never saw them.
                        let mut why = last_not_sent
                            .lock()
                            .ok()
                            .and_then(|w| w.clone())
                            .unwrap_or_else(|| {
                                ApiError::new(ErrorCode::Unavailable, "not connected to the server")
                            });
                        why.retry_after_ms = u32::try_from(left.as_millis())
                            .unwrap_or(u32::MAX)
                            .saturating_add(1);
                        drop_unsent(job, Some(why));
                        continue;
                    }
                }
                // With several addresses, the next one first: the one that failed is
                // likely still down, and any gateway serves the same data and session.
                match LocalClient::connect_from(&addr, at + 1, &options).await {
                    Ok((c, reached)) => {
                        // Continue the same write session, so that the idempotency keys
                        // of writes retried across the reconnect keep their meaning.
                        if let Some(token) = conn.token_to_resume() {
                            c.resume_with(token);
                        }
                        at = reached;
                        let to = addresses(&addr)[reached];
                        tracing::info!(addr = to, "reconnected");
                        last_failed_reconnect = None;
                        conn = Rc::new(c);
                    }
                    Err(e) => {
                        tracing::debug!(%addr, error = %e, "reconnect failed");
                        last_failed_reconnect = Some(Instant::now());
                        let why = ApiError::new(
                            e.code,
                            format!(
                                "not connected to the server: reconnecting failed: {}",
                                e.message
                            ),
                        );
                        drop_unsent(job, Some(why));
                        continue;
                    }
                }
            }
            tokio::task::spawn_local(job(Rc::clone(&conn)));
        }
    });
}
