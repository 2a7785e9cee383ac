//! capkv client library, and the `kv-client` CLI built on it.
//!
//! - [`Client`]: a `Send + Clone` async handle. capnp-rpc objects are `!Send`, so the
//!   connection lives on a thread of its own (a current-thread runtime with a `LocalSet`);
//!   the handle sends it jobs over a bounded channel and gets answers back on oneshots —
//!   the actor pattern. Clones share one connection.
//! - Pipelining: `connect` sends `open(token)` at once and keeps the *promised* `KvStore`;
//!   the first `get` goes out right behind it, so `open + get` costs one round trip. Writes
//!   pipeline the same way on a lazily created `WriteSession`.
//! - Deadlines: each call has a deadline (the handle's timeout); its remaining budget
//!   travels in `RequestContext`, and both ends stop waiting when it runs out.
//! - [`cli`] and [`shell`]: the `kv-client` command line and interactive shell;
//!   [`output`]: human and JSON rendering.
//!
//! Errors are [`ApiError`]s with the contract's stable codes; a broken connection is
//! `unavailable`, a request the server could not decode for size is `requestTooLarge`.

pub mod cli;
pub mod output;
pub mod shell;

use std::cell::RefCell;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use capkv::kv_capnp::{condition, gateway, kv_store, write_session};
use capkv::{send_with_union_cap, ApiError, CallMeta, ErrorCode};
use capnp_rpc::{rpc_twoparty_capnp, twoparty, RpcSystem};
use futures::future::{LocalBoxFuture, Shared};
use futures::{AsyncReadExt, FutureExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::compat::TokioAsyncReadCompatExt;

pub use capkv::{code_name, ApiError as Error, ErrorCode as Code};

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
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            limits: capkv::Limits::default(),
        }
    }
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

type Job = Box<dyn FnOnce(Rc<Conn>) -> LocalBoxFuture<'static, ()> + Send>;

/// A handle to one connection. Cheap to clone; `Send`, so it can be used from any task.
#[derive(Clone)]
pub struct Client {
    jobs: mpsc::Sender<Job>,
    timeout: Duration,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Connection-thread state.
struct Conn {
    gateway: gateway::Client,
    /// Promised by the pipelined `open`; usable before `open` returns.
    kv: kv_store::Client,
    /// How `open` ended; consulted when a call on `kv` fails, to report the real reason
    /// (e.g. `unauthenticated`) instead of "broken capability".
    opened: Shared<LocalBoxFuture<'static, Result<(), ApiError>>>,
    session: RefCell<Option<(write_session::Client, SharedOutcome)>>,
}

type SharedOutcome = Shared<LocalBoxFuture<'static, Result<(), ApiError>>>;

static REQUEST_SEQ: AtomicU64 = AtomicU64::new(1);

/// Awaits a response and decodes its result union: the success arm `$arm($v)` through
/// `$ok`, the error arm into an [`ApiError`]. Every call of the contract has this shape;
/// only the union module and the success arm differ.
macro_rules! decode_result {
    ($response:expr, $module:ident, $arm:ident($v:pat) => $ok:expr) => {{
        let resp = $response.await.map_err(capnp_err)?;
        use capkv::kv_capnp::$module::Which;
        match resp
            .get()
            .and_then(|r| r.get_result())
            .map_err(capnp_err)?
            .which()
        {
            Ok(Which::$arm($v)) => $ok,
            Ok(Which::Error(e)) => Err(read_error(e)),
            Err(e) => Err(capnp_err(e.into())),
        }
    }};
}

fn capnp_err(e: capnp::Error) -> ApiError {
    ApiError::from_capnp(&e)
}

impl Client {
    /// Connects to `addr` and sends `open(token)` without waiting for it.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Client, ApiError> {
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
        let _ = stream.set_nodelay(true);
        let stream = stream
            .into_std()
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let (jobs, rx) = mpsc::channel(JOB_QUEUE);
        let (ready_tx, ready_rx) = oneshot::channel();
        let timeout = options.timeout;
        std::thread::Builder::new()
            .name("capkv-client".into())
            .spawn(move || connection_thread(stream, options, rx, ready_tx))
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("cannot start thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| ApiError::new(ErrorCode::Internal, "connection thread ended"))??;
        Ok(Client { jobs, timeout })
    }

    /// A handle on the same connection whose calls use another deadline.
    pub fn with_timeout(&self, timeout: Duration) -> Client {
        Client {
            jobs: self.jobs.clone(),
            timeout,
        }
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Runs `f` on the connection thread under this handle's deadline.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<Conn>, CallMeta) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ApiError>> + 'static,
    {
        let deadline = Instant::now() + self.timeout;
        let request_id = format!("c{}", REQUEST_SEQ.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            async move {
                // The budget is what is left when the request leaves, not the full timeout:
                // time spent queued for the connection thread is already gone.
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    let _ = tx.send(Err(deadline_exceeded()));
                    return;
                }
                let meta = CallMeta {
                    budget_ms: Some(u32::try_from(left.as_millis()).unwrap_or(u32::MAX)),
                    request_id,
                    attempt: 1,
                    ..CallMeta::default()
                };
                // The connection thread also gives up at the deadline, so that the capnp
                // request is dropped (and cancelled on the server) rather than leaked.
                let r = match tokio::time::timeout_at(deadline, f(conn, meta)).await {
                    Ok(r) => r,
                    Err(_) => Err(deadline_exceeded()),
                };
                let _ = tx.send(r);
            }
            .boxed_local()
        });
        let unavailable = || {
            ApiError::new(
                ErrorCode::Unavailable,
                "client connection thread has stopped",
            )
        };
        tokio::time::timeout_at(deadline, self.jobs.send(job))
            .await
            .map_err(|_| deadline_exceeded())?
            .map_err(|_| unavailable())?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(deadline_exceeded()),
        }
    }

    pub async fn health(&self) -> Result<Health, ApiError> {
        self.call(|conn, meta| async move {
            let mut req = conn.gateway.health_request();
            meta.write(req.get().init_ctx());
            decode_result!(req.send().promise, health_result, Ok(ok) => Ok(Health {
                live: ok.get_live(),
                ready: ok.get_ready(),
                status: read_text(ok.get_status()),
            }))
        })
        .await
    }

    pub async fn version(&self) -> Result<VersionInfo, ApiError> {
        self.call(|conn, meta| async move {
            let mut req = conn.gateway.version_request();
            meta.write(req.get().init_ctx());
            decode_result!(req.send().promise, version_result, Ok(ok) => Ok(VersionInfo {
                service: read_text(ok.get_service()),
                api_version: ok.get_api_version(),
            }))
        })
        .await
    }

    /// The entry under `key`, or `None` if it does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, ApiError> {
        let key = key.to_vec();
        self.call(move |conn, meta| async move {
            let mut req = conn.kv.get_request();
            meta.write(req.get().init_ctx());
            req.get().set_key(&key);
            let r = async {
                match decode_result!(req.send().promise, get_result, Ok(e) => Ok(Some(read_entry(e.map_err(capnp_err)?)?))) {
                    Err(e) if e.code == ErrorCode::NotFound => Ok(None),
                    other => other,
                }
            }
            .await;
            conn.explain(r, &conn.opened).await
        })
        .await
    }

    pub async fn scan(&self, opts: ScanOptions) -> Result<ScanPage, ApiError> {
        self.call(move |conn, meta| async move {
            let mut req = conn.kv.scan_request();
            meta.write(req.get().init_ctx());
            {
                let mut r = req.get().init_range();
                r.set_limit(opts.limit);
                r.set_cursor(&opts.cursor);
                r.set_keys_only(opts.keys_only);
                match &opts.bounds {
                    ScanBounds::Range { start, end } => {
                        let mut g = r.init_range();
                        g.set_start(start);
                        g.set_end(end);
                    }
                    ScanBounds::Prefix(p) => r.set_prefix(p),
                }
            }
            let r = async {
                decode_result!(req.send().promise, scan_result, Ok(ok) => {
                    let list = ok.get_entries().map_err(capnp_err)?;
                    let entries = list.iter().map(read_entry).collect::<Result<_, _>>()?;
                    let cursor = ok.get_next_cursor().map_err(capnp_err)?;
                    Ok(ScanPage {
                        entries,
                        next_cursor: (!cursor.is_empty()).then(|| cursor.to_vec()),
                        revision: ok.get_revision(),
                    })
                })
            }
            .await;
            conn.explain(r, &conn.opened).await
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
        let (key, value) = (key.to_vec(), value.to_vec());
        self.call(move |conn, meta| async move {
            let (session, outcome) = conn.session(&meta);
            let mut req = session.put_request();
            meta.write(req.get().init_ctx());
            req.get().set_key(&key);
            req.get().set_value(&value);
            write_condition(req.get().init_condition(), cond);
            let r = async {
                decode_result!(req.send().promise, put_result, Ok(ok) => Ok(PutOutcome {
                    version: ok.get_version(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            conn.explain(r, &outcome).await
        })
        .await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<DeleteOutcome, ApiError> {
        self.delete_if(key, Condition::None).await
    }

    pub async fn delete_if(&self, key: &[u8], cond: Condition) -> Result<DeleteOutcome, ApiError> {
        let key = key.to_vec();
        self.call(move |conn, meta| async move {
            let (session, outcome) = conn.session(&meta);
            let mut req = session.delete_request();
            meta.write(req.get().init_ctx());
            req.get().set_key(&key);
            write_condition(req.get().init_condition(), cond);
            let r = async {
                decode_result!(req.send().promise, delete_result, Ok(ok) => Ok(DeleteOutcome {
                    existed: ok.get_existed(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            conn.explain(r, &outcome).await
        })
        .await
    }
}

impl Conn {
    /// The write session, created on first use by a call pipelined on the promised
    /// `KvStore`, so even the first write of a connection costs one round trip.
    fn session(&self, meta: &CallMeta) -> (write_session::Client, SharedOutcome) {
        if let Some((s, o)) = &*self.session.borrow() {
            return (s.clone(), o.clone());
        }
        let mut req = self.kv.session_request();
        meta.write(req.get().init_ctx());
        let (resp, session) = send_with_union_cap::<_, _, write_session::Client>(req);
        let opened = self.opened.clone();
        let outcome: SharedOutcome = async move {
            opened.await?;
            decode_result!(resp, session_result, Session(_) => Ok(()))
        }
        .boxed_local()
        .shared();
        *self.session.borrow_mut() = Some((session.clone(), outcome.clone()));
        (session, outcome)
    }

    /// A call on a pipelined capability fails with a bare exception when the call that
    /// promised the capability failed; report that call's error instead.
    async fn explain<T>(
        &self,
        r: Result<T, ApiError>,
        origin: &SharedOutcome,
    ) -> Result<T, ApiError> {
        match r {
            Err(e) if matches!(e.code, ErrorCode::Internal | ErrorCode::Unavailable) => {
                match origin.clone().await {
                    Err(origin_err) => {
                        if origin_err.code != ErrorCode::Unavailable {
                            // Do not reuse a session that never existed.
                            self.session.borrow_mut().take();
                        }
                        Err(origin_err)
                    }
                    Ok(()) => Err(e),
                }
            }
            other => other,
        }
    }
}

fn deadline_exceeded() -> ApiError {
    ApiError::new(ErrorCode::DeadlineExceeded, "client deadline exceeded")
}

fn read_text(t: capnp::Result<capnp::text::Reader<'_>>) -> String {
    t.ok()
        .and_then(|t| t.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn read_error(e: capnp::Result<capkv::kv_capnp::error::Reader<'_>>) -> ApiError {
    match e {
        Ok(e) => ApiError::read(e),
        Err(e) => capnp_err(e),
    }
}

fn read_entry(e: capkv::kv_capnp::entry::Reader<'_>) -> Result<Entry, ApiError> {
    Ok(Entry {
        key: e.get_key().map_err(capnp_err)?.to_vec(),
        value: e.get_value().map_err(capnp_err)?.to_vec(),
        version: e.get_version(),
        mod_revision: e.get_mod_revision(),
    })
}

fn write_condition(mut b: condition::Builder<'_>, c: Condition) {
    match c {
        Condition::None => b.set_none(()),
        Condition::IfVersion(v) => b.set_if_version(v),
        Condition::IfAbsent => b.set_if_absent(()),
    }
}

fn connection_thread(
    stream: std::net::TcpStream,
    options: ClientOptions,
    mut jobs: mpsc::Receiver<Job>,
    ready: oneshot::Sender<Result<(), ApiError>>,
) {
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
        let (reader, writer) = stream.compat().split();
        let network = twoparty::VatNetwork::new(
            futures::io::BufReader::new(reader),
            futures::io::BufWriter::new(writer),
            rpc_twoparty_capnp::Side::Client,
            capkv::response_reader_options(&options.limits),
        );
        let mut rpc = RpcSystem::new(Box::new(network), None);
        let gateway: gateway::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
        let mut rpc: Pin<Box<RpcSystem<_>>> = Box::pin(rpc);

        let mut req = gateway.open_request();
        CallMeta::default().write(req.get().init_ctx());
        req.get().set_token(options.token.as_str());
        let (resp, kv) = send_with_union_cap::<_, _, kv_store::Client>(req);
        let opened = async move { decode_result!(resp, open_result, Kv(_) => Ok(())) }
            .boxed_local()
            .shared();
        let conn = Rc::new(Conn {
            gateway,
            kv,
            opened,
            session: RefCell::new(None),
        });
        let _ = ready.send(Ok(()));
        let mut rpc_done = false;
        loop {
            tokio::select! {
                job = jobs.recv() => match job {
                    Some(job) => {
                        tokio::task::spawn_local(job(Rc::clone(&conn)));
                    }
                    None => break, // every handle dropped
                },
                r = &mut rpc, if !rpc_done => {
                    rpc_done = true;
                    // Calls on a dead connection now fail with `disconnected`, which the
                    // handle reports as `unavailable`; keep serving jobs so they do.
                    if let Err(e) = r {
                        tracing::debug!(error = %e, "connection ended");
                    }
                }
            }
        }
    });
}

/// Helper for callers that only need a scan's bounds from a prefix.
pub fn prefix(p: impl Into<Vec<u8>>) -> ScanBounds {
    ScanBounds::Prefix(p.into())
}
