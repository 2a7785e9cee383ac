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
//! - [`cli`] and [`shell`]: the `kv-client` command line and interactive shell;
//!   [`output`]: human and JSON rendering.
//!
//! Errors are [`ApiError`]s with the contract's stable codes; a broken connection is
//! `unavailable`, a request the server could not decode for size is `requestTooLarge`.

pub mod cli;
pub mod local;
pub mod output;
pub mod shell;

use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Duration;

use capkv::{ApiError, ErrorCode};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

pub use capkv::{code_name, ApiError as Error, ErrorCode as Code};
pub use local::LocalClient;

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

/// Resolves `addr` and opens a TCP connection with `TCP_NODELAY` (small messages must
/// never wait for Nagle), within the connect timeout.
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
    /// Connects to `addr` and sends `open(token)` without waiting for it.
    pub async fn connect(addr: &str, options: ClientOptions) -> Result<Client, ApiError> {
        let stream = tcp_connect(addr, &options)
            .await?
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

    /// Runs `f` on the connection thread with this handle's deadline.
    async fn call<T, F, Fut>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(Rc<LocalClient>, Instant) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, ApiError>> + 'static,
    {
        let deadline = Instant::now() + self.timeout;
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            async move {
                let _ = tx.send(f(conn, deadline).await);
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
            .map_err(|_| local::deadline_exceeded())?
            .map_err(|_| unavailable())?;
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(unavailable()),
            Err(_) => Err(local::deadline_exceeded()),
        }
    }

    pub async fn health(&self) -> Result<Health, ApiError> {
        self.call(|c, d| async move { c.health(d).await }).await
    }

    pub async fn version(&self) -> Result<VersionInfo, ApiError> {
        self.call(|c, d| async move { c.version(d).await }).await
    }

    /// The entry under `key`, or `None` if it does not exist.
    pub async fn get(&self, key: &[u8]) -> Result<Option<Entry>, ApiError> {
        let key = key.to_vec();
        self.call(move |c, d| async move { c.get(&key, d).await })
            .await
    }

    /// Several keys in one call (at most the server's `limits.max_batch_items`).
    pub async fn get_many(&self, keys: Vec<Vec<u8>>) -> Result<Vec<Option<Entry>>, ApiError> {
        self.call(move |c, d| async move { c.get_many(&keys, d).await })
            .await
    }

    pub async fn scan(&self, opts: ScanOptions) -> Result<ScanPage, ApiError> {
        self.call(move |c, d| async move { c.scan(&opts, d).await })
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
        self.call(move |c, d| async move { c.put(&key, &value, cond, d).await })
            .await
    }

    /// Several puts applied atomically: all or none, one revision.
    pub async fn put_many(
        &self,
        items: Vec<(Vec<u8>, Vec<u8>, Condition)>,
    ) -> Result<BatchOutcome, ApiError> {
        self.call(move |c, d| async move { c.put_many(&items, d).await })
            .await
    }

    pub async fn delete(&self, key: &[u8]) -> Result<DeleteOutcome, ApiError> {
        self.delete_if(key, Condition::None).await
    }

    pub async fn delete_if(&self, key: &[u8], cond: Condition) -> Result<DeleteOutcome, ApiError> {
        let key = key.to_vec();
        self.call(move |c, d| async move { c.delete(&key, cond, d).await })
            .await
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
        let conn = Rc::new(LocalClient::over(stream, &options));
        let _ = ready.send(Ok(()));
        // Ends when every handle is dropped; dropping the LocalClient and the LocalSet
        // then closes the connection.
        while let Some(job) = jobs.recv().await {
            tokio::task::spawn_local(job(Rc::clone(&conn)));
        }
    });
}
