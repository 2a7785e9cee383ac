//! Listener, workers and shutdown.
//!
//! One acceptor task (on the caller's runtime) accepts TCP connections and hands each to a
//! worker thread, round robin, over a bounded channel. Each worker is a current-thread tokio
//! runtime with a `LocalSet`, because capnp objects are `!Send`: a connection's RPC engine
//! (`capkv_rpc::engine`, or capnp-rpc's `RpcSystem`) and every capability on it live and
//! die on one thread. The store is shared by
//! all workers as `Arc<dyn Store>`.
//!
//! Shutdown (the `shutdown` future resolves, e.g. on SIGTERM): stop accepting, mark the
//! server draining (health says not ready, new calls get `unavailable`), wait up to
//! `drain_timeout_ms` for in-flight calls, then close every connection gracefully — queued
//! replies are flushed before the capnp `Abort` — and join the workers.

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use capkv::kv_capnp::gateway;
use capnp_rpc::{rpc_twoparty_capnp, twoparty, Disconnector, RpcSystem};
use futures::TryFutureExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use crate::chain::{Conn, Shared};
use crate::config::{Config, Engine, IoLoop, RpcEngine};
use crate::metrics as m;
use crate::rpc::GatewayImpl;
use capkv_rpc::frames::{BreachCell, GuardedReader, PeerReader};

/// How long closing connections may take at the end of a drain: the replies are already
/// computed, this only covers flushing them to slow readers.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause after a failed accept (e.g. out of file descriptors) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(50);

/// Refused connections lingering at once (see `linger`); past it they close at once.
const MAX_LINGERING_REFUSALS: usize = 64;
/// How long, and how many bytes, a refused connection is read and ignored before closing.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);
const REFUSAL_LINGER_BYTES: usize = 64 * 1024;

/// Refused connections lingering now, all listeners and workers together.
static LINGERING: AtomicUsize = AtomicUsize::new(0);

/// Closes a refused connection (too many connections, a TLS handshake refused) gently: its
/// write side first (the refusal already sent stays readable by the client), then reads and
/// drops what the client sent until it hangs up, for at most [`REFUSAL_LINGER`] and
/// [`REFUSAL_LINGER_BYTES`]. Past [`MAX_LINGERING_REFUSALS`] at once it closes at once.
/// Closed at once, a socket holding the client's first calls (unread) sends a reset, and
/// the client's kernel drops the refusal with it before the client reads it.
async fn linger<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(stream: S) {
    /// Counted out however the linger ends: dropped half-way too (its runtime shutting
    /// down), or each such drop would leave the count one higher for good, and after 64 of
    /// them every refusal would close at once.
    struct Counted;
    impl Drop for Counted {
        fn drop(&mut self) {
            LINGERING.fetch_sub(1, Ordering::AcqRel);
        }
    }
    let lingering = LINGERING.fetch_add(1, Ordering::AcqRel);
    let _counted = Counted;
    if lingering < MAX_LINGERING_REFUSALS {
        linger_now(stream).await;
    }
}

async fn linger_now<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut stream: S) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if stream.shutdown().await.is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    let mut read = 0;
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        while read < REFUSAL_LINGER_BYTES {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => read += n,
            }
        }
    })
    .await;
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    // Causes are not repeated in the messages: callers print the chain (`{:#}`).
    #[error("cannot listen on {addr}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the storage engine")]
    Storage(#[from] capkv_store_rocks::OpenError),
    #[error("cannot open the etcd engine")]
    Etcd(#[from] capkv_store_etcd::OpenError),
    #[error("cannot open the memory-log engine")]
    Log(#[from] capkv_store::logged::LogError),
    #[error("cannot start worker thread: {0}")]
    Worker(std::io::Error),
    /// A worker thread started but could not build its runtime (it logged why).
    #[error("{failed} of {workers} workers failed to start")]
    WorkersFailed { failed: usize, workers: usize },
    #[error(transparent)]
    Metrics(#[from] crate::metrics::ExporterError),
    #[error(transparent)]
    Tls(#[from] capkv_rpc::tls::TlsError),
}

/// A bound, not yet running server.
pub struct Server {
    config: Config,
    listener: TcpListener,
    shared: Arc<Shared>,
    /// The operator HTTP listener and the metrics it renders (`metrics_listen`).
    ops: Option<(TcpListener, metrics_exporter_prometheus::PrometheusHandle)>,
}

struct NewConn {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    /// Decrements the open-connection count when the connection ends, wherever that is.
    open_guard: ConnCount,
}

struct ConnCount(Arc<AtomicUsize>);

impl Drop for ConnCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        metrics::gauge!(m::CONNECTIONS).decrement(1.0);
    }
}

impl Server {
    /// Opens the store and binds the listener. Must be called inside a tokio runtime.
    pub async fn bind(config: Config) -> Result<Self, ServerError> {
        let store: Arc<dyn capkv_store::Store> = match config.engine {
            Engine::Memory => {
                let m = capkv_store::MemoryStore::with_history(
                    config.storage.memory_history_events,
                    config.storage.memory_history_bytes,
                );
                m.set_max_records(config.storage.memory_max_records);
                Arc::new(m)
            }
            // Opening replays the WAL: blocking, but only once, before anything is served.
            // On a disk too full to recover, reads are served read-only until there is room.
            Engine::Rocksdb => capkv_store_rocks::open_or_read_only(config.rocks_options())?,
            // Connects and reads the store's secret and history start: blocking, once.
            Engine::Etcd => Arc::new(capkv_store_etcd::EtcdStore::open(config.etcd_options())?),
            // Replays the log: blocking, once, before anything is served.
            Engine::MemoryLog => Arc::new(capkv_store::logged::LoggedStore::open(
                config.log_options(),
            )?),
        };
        Self::bind_with_store(config, store).await
    }

    /// Binds the listener over a store the caller made (`config.engine` is not used): for
    /// embedding, and for tests with an engine of their own.
    pub async fn bind_with_store(
        config: Config,
        store: Arc<dyn capkv_store::Store>,
    ) -> Result<Self, ServerError> {
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let ops = match config.metrics_listen {
            Some(addr) => {
                let http = TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?;
                Some((http, crate::metrics::install_recorder(addr)?))
            }
            None => None,
        };
        let mut shared = Shared::new(&config, store);
        if let Some(files) = config.tls.files() {
            shared.tls = Some(tokio_rustls::TlsAcceptor::from(
                capkv_rpc::tls::server_config(&files)?,
            ));
        }
        let shared = Arc::new(shared);
        Ok(Self {
            config,
            listener,
            shared,
            ops,
        })
    }

    /// The state every worker shares: reloads go through it (`Shared::reload`).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// The address of the operator HTTP listener, if there is one.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.ops.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has a local address; fall back to the configured one.
        self.listener.local_addr().unwrap_or(self.config.listen)
    }

    /// Serves until `shutdown` resolves, then drains and returns.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server {
            config,
            listener,
            shared,
            ops,
        } = self;
        let upkeep = ops.as_ref().map(|(_, h)| h.clone());
        // The operator address as bound, so `metrics_listen` may name port 0 (tests and
        // supervisors read it here instead of racing for a free port).
        let metrics_addr = ops
            .as_ref()
            .and_then(|(http, _)| http.local_addr().ok())
            .map(|a| a.to_string());
        let ops_task = ops.map(|(http, handle)| {
            tokio::spawn(crate::http::serve(http, handle, Arc::clone(&shared)))
        });
        let workers = config.worker_count();
        let per_worker_queue = (config.limits.accept_queue / workers).max(1);
        let mut senders = Vec::with_capacity(workers);
        let mut handles = Vec::with_capacity(workers);
        let (ready_tx, mut ready_rx) = mpsc::channel::<()>(workers);
        for i in 0..workers {
            let (tx, rx) = mpsc::channel::<NewConn>(per_worker_queue);
            let shared = Arc::clone(&shared);
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("capkv-worker-{i}"))
                .spawn(move || worker_main(i, rx, shared, ready))
                .map_err(ServerError::Worker)?;
            senders.push(tx);
            handles.push(handle);
        }
        drop(ready_tx);
        // Announce `listening` only once every worker can serve. A worker that failed to
        // start has logged why and dropped its sender: the server does not start, rather
        // than handing every Nth connection to a worker that drops it.
        let mut started = 0;
        while started < workers && ready_rx.recv().await.is_some() {
            started += 1;
        }
        if started < workers {
            // Their queues closed, the workers that did start end.
            drop(senders);
            for h in handles {
                let _ = tokio::task::spawn_blocking(move || h.join()).await;
            }
            return Err(ServerError::WorkersFailed {
                failed: workers - started,
                workers,
            });
        }
        let addr = listener.local_addr().unwrap_or(config.listen);
        tracing::info!(
            %addr,
            metrics_addr,
            workers,
            engine = config.engine.name(),
            rpc_engine = config.rpc_engine.name(),
            io_loop = config.io_loop.name(),
            "listening"
        );

        let stats = {
            let shared = Arc::clone(&shared);
            let every = Duration::from_millis(config.storage.stats_interval_ms);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                let mut frame_waits_seen = 0u64;
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    let store = Arc::clone(&shared.store);
                    // Property reads can take a lock inside RocksDB: keep them off the
                    // acceptor's thread.
                    match tokio::task::spawn_blocking(move || store.stats()).await {
                        Ok(st) => m::record_store_stats(&st),
                        Err(e) => tracing::warn!(error = %e, "reading storage statistics failed"),
                    }
                    metrics::gauge!(m::PARTIAL_FRAME_BYTES)
                        .set(shared.frame_budget.used_bytes() as f64);
                    let replies = &shared.reply_budget;
                    metrics::gauge!(m::UNSENT_REPLY_BYTES).set(replies.unsent_bytes() as f64);
                    metrics::gauge!(m::CONNECTIONS_PAUSED).set(replies.paused_connections() as f64);
                    metrics::counter!(m::CONNECTION_PAUSES_TOTAL).absolute(replies.pauses());
                    metrics::gauge!(m::CAPABILITIES_HELD).set(shared.capabilities_held() as f64);
                    let watch = &shared.watch_stats;
                    metrics::gauge!(m::WATCHERS).set(watch.watchers() as f64);
                    let head = shared.store.changes().revision();
                    metrics::gauge!(m::WATCH_LAG_REVISIONS).set(watch.lag_revisions(head) as f64);
                    metrics::gauge!(m::LEASES).set(shared.store.lease_clock().0 as f64);
                    let waits = shared.frame_budget.waits();
                    if waits > frame_waits_seen {
                        metrics::counter!(m::FRAME_BUDGET_WAITS_TOTAL).absolute(waits);
                        tracing::warn!(
                            waits = waits - frame_waits_seen,
                            held_bytes = shared.frame_budget.used_bytes(),
                            "frame budget full: large messages waited for room"
                        );
                        frame_waits_seen = waits;
                    }
                    // The recorder's periodic housekeeping (histogram buffers).
                    if let Some(h) = &upkeep {
                        h.run_upkeep();
                    }
                }
            })
        };

        let reaper = tokio::spawn(crate::lease::reap(Arc::clone(&shared.store)));

        let open = Arc::new(AtomicUsize::new(0));
        let refusal = capkv_rpc::frames::abort_frame(
            "too many connections; try again later",
            capnp_rpc::rpc_capnp::exception::Type::Overloaded,
        );
        let mut next = 0usize;
        tokio::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = listener.accept() => match r {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                        continue;
                    }
                },
            };
            let max_connections = shared.tunables().max_connections;
            if open.fetch_add(1, Ordering::AcqRel) >= max_connections {
                open.fetch_sub(1, Ordering::AcqRel);
                metrics::counter!(m::REJECTIONS_TOTAL, "reason" => "max_connections").increment(1);
                tracing::warn!(%peer, max = max_connections, "connection refused: too many connections");
                // Say why before closing: the client reports it instead of a bare hang-up.
                // One small frame into an empty socket buffer: never blocks.
                let _ = stream.try_write(&refusal);
                tokio::spawn(linger(stream));
                continue;
            }
            metrics::gauge!(m::CONNECTIONS).increment(1.0);
            let count = ConnCount(Arc::clone(&open));
            // Small request/response messages: never wait for Nagle.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(%peer, error = %e, "set_nodelay failed");
            }
            let stream = match stream.into_std() {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(%peer, error = %e, "cannot hand over connection");
                    continue;
                }
            };
            let job = NewConn {
                stream,
                peer,
                open_guard: count,
            };
            if let Err(e) = senders[next % workers].try_send(job) {
                metrics::counter!(m::REJECTIONS_TOTAL, "reason" => "accept_queue").increment(1);
                tracing::warn!(%peer, error = %e, "connection refused: worker queue full");
            }
            next = next.wrapping_add(1);
        }

        drop(listener);
        stats.abort();
        reaper.abort();
        shared.start_draining();
        // Reloadable: the value in force now, not the one at start.
        let drain_timeout_ms = shared.reload.current().shutdown.drain_timeout_ms;
        let drain_timeout = Duration::from_millis(drain_timeout_ms);
        tracing::info!(in_flight = shared.in_flight(), drain_timeout_ms, "draining");
        let left = shared.wait_idle(drain_timeout).await;
        if left > 0 {
            tracing::warn!(in_flight = left, "drain timeout: ending remaining calls");
            // Reads end with `unavailable` now; their replies get a moment to leave before
            // connections close. Writes still running end with their connection.
            shared.abandon_remaining();
            let still = shared.wait_idle(ABANDON_GRACE).await;
            if still > 0 {
                tracing::warn!(
                    in_flight = still,
                    "closing connections with writes still running"
                );
            }
        }
        // Closing the channels tells each worker to close its connections and stop.
        drop(senders);
        let joined = tokio::task::spawn_blocking(move || {
            for h in handles {
                if h.join().is_err() {
                    tracing::error!("a worker thread panicked");
                }
            }
        });
        if tokio::time::timeout(CLOSE_TIMEOUT * 2, joined)
            .await
            .is_err()
        {
            tracing::warn!("workers did not stop in time");
        }
        if let Some(t) = ops_task {
            t.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

fn worker_main(
    index: usize,
    mut rx: mpsc::Receiver<NewConn>,
    shared: Arc<Shared>,
    ready: mpsc::Sender<()>,
) {
    // The store hears when this worker has run through its ready connections (a write
    // engine may group what the pass submitted into one commit).
    let idle_store = Arc::clone(&shared.store);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(move || idle_store.worker_idle())
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(worker = index, error = %e, "cannot start worker runtime");
            return;
        }
    };
    shared.store.worker_started();
    // Connections (plain or TLS) are served from the worker's own readiness loop, unless
    // the config asks for a tokio task each. Made before the worker says it is ready (its
    // epoll is part of what a started server holds), in the runtime's context (tokio's
    // reactor watches that epoll).
    let ready_loop = match shared.io_loop {
        IoLoop::Capkv => {
            let _entered = rt.enter();
            match capkv_rpc::ready::ReadyLoop::new() {
                Ok(made) => Some(made),
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot start the readiness loop; serving connections as tasks");
                    None
                }
            }
        }
        IoLoop::Tokio => None,
    };
    // Outside any runtime on this thread: a blocking send is allowed here.
    let _ = ready.blocking_send(());
    drop(ready);
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async move {
        // The deadlines of this worker's waiting writes, on one timer.
        tokio::task::spawn_local(crate::deadlines::run());
        let live: Live = Rc::default();
        let warm = Rc::new(crate::rpc::Warm::new(Arc::clone(&shared.store)));
        let ready = ready_loop.map(|(ready, driver)| {
            tokio::task::spawn_local(async move {
                let e = driver.run().await;
                tracing::error!(worker = index, error = %e, "readiness loop failed: its connections are closed, new ones run as tasks");
            });
            ready
        });
        while let Some(job) = rx.recv().await {
            let start = ConnStart {
                id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
                peer: job.peer,
                open_guard: job.open_guard,
                worker: index,
                shared: Arc::clone(&shared),
                live: Rc::clone(&live),
                warm: Rc::clone(&warm),
                ahead: None,
            };
            // The handshake gets the frame timeout; a peer that cannot prove itself with a
            // certificate from the CA never reaches the RPC system.
            let tls = shared
                .tls
                .clone()
                .map(|acceptor| (acceptor, shared.tunables().frames.frame_timeout));
            // (A loop whose epoll failed is passed over: connections become tasks again.)
            if let Some(ready) = ready.as_ref().filter(|r| r.is_running()) {
                let mut start = start;
                let served = match tls {
                    None => ready.serve(job.stream, |socket| {
                        start.ahead = Some(socket.ahead_hint());
                        let (r, w) = socket.split();
                        connection(start, r, w)
                    }),
                    Some(tls) => ready.serve(job.stream, |socket| {
                        start.ahead = Some(socket.ahead_hint());
                        tls_connection(start, tls, socket)
                    }),
                };
                if let Err(e) = served {
                    tracing::warn!(peer = %job.peer, error = %e, "cannot register connection");
                }
                continue;
            }
            let stream = match tokio::net::TcpStream::from_std(job.stream) {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(peer = %job.peer, error = %e, "cannot register connection");
                    continue;
                }
            };
            match tls {
                None => {
                    let (r, w) = stream.into_split();
                    start_connection(start, r.compat(), w.compat_write());
                }
                Some(tls) => {
                    tokio::task::spawn_local(tls_connection(start, tls, stream));
                }
            }
        }
        let closing: Vec<_> = live
            .borrow_mut()
            .drain()
            .map(|(_, h)| h.hang_up())
            .collect();
        if !closing.is_empty() {
            let all = futures::future::join_all(closing);
            if tokio::time::timeout(CLOSE_TIMEOUT, all).await.is_err() {
                tracing::warn!(worker = index, "some connections did not close in time");
            }
        }
    });
}

/// A TLS connection: its handshake within `tls`'s timeout, then its [`connection`] over
/// the TLS stream; a refused handshake's alert is left for the client to read.
async fn tls_connection<S>(
    start: ConnStart,
    (acceptor, timeout): (tokio_rustls::TlsAcceptor, Duration),
    stream: S,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let peer = start.peer;
    let (reason, refused) =
        match tokio::time::timeout(timeout, acceptor.accept(stream).into_fallible()).await {
            Ok(Ok(tls)) => {
                let (r, w) = tokio::io::split(tls);
                connection(start, r.compat(), w.compat_write()).await;
                return;
            }
            Ok(Err((e, stream))) => {
                tracing::warn!(%peer, error = %e, "TLS handshake refused");
                ("tls_handshake", Some(stream))
            }
            Err(_) => {
                tracing::warn!(%peer, "TLS handshake timed out");
                ("tls_timeout", None)
            }
        };
    metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "reason" => reason).increment(1);
    // A refusal's alert is sent: let the client read it.
    if let Some(stream) = refused {
        linger(stream).await;
    }
}

/// Connection ids, unique in the process (logs, metrics).
static NEXT_CONN_ID: AtomicU64 = AtomicU64::new(1);

/// Serves one connection over an in-process byte stream (one end of `tokio::io::duplex`)
/// on the current thread's `LocalSet`: everything a TCP connection passes (frame layer,
/// backlog, RPC system, chain, handlers) but the socket, for tests whose subject is not
/// the network. Its peer address is `0.0.0.0:0`; it ends when the other end is dropped.
pub fn serve_in_process(shared: Arc<Shared>, stream: tokio::io::DuplexStream) {
    let open = Arc::new(AtomicUsize::new(1));
    metrics::gauge!(m::CONNECTIONS).increment(1.0);
    let start = ConnStart {
        id: NEXT_CONN_ID.fetch_add(1, Ordering::Relaxed),
        peer: SocketAddr::from(([0, 0, 0, 0], 0)),
        open_guard: ConnCount(open),
        worker: 0,
        warm: Rc::new(crate::rpc::Warm::new(Arc::clone(&shared.store))),
        shared,
        live: Rc::default(),
        ahead: None,
    };
    let (r, w) = tokio::io::split(stream);
    start_connection(start, r.compat(), w.compat_write());
}

/// What a new connection needs from its worker.
struct ConnStart {
    id: u64,
    peer: SocketAddr,
    open_guard: ConnCount,
    worker: usize,
    shared: Arc<Shared>,
    live: Live,
    /// The worker's one prefetch hint, shared by its connections (each read's calls are
    /// shown and flushed within one poll, so they never interleave): nothing per connection.
    warm: Rc<crate::rpc::Warm>,
    /// On the worker's readiness loop: where the connection names its state, which the
    /// loop loads one event ahead (`capkv_rpc::ready::Ahead`). Elsewhere the connection
    /// asks for it itself at each poll.
    ahead: Option<capkv_rpc::ready::AheadHint>,
}

/// The connections a worker serves, by id, with how to end each at shutdown.
type Live = Rc<RefCell<HashMap<u64, Hangup>>>;

/// How to end a connection from its worker, per RPC engine.
enum Hangup {
    RpcSystem(Disconnector<rpc_twoparty_capnp::Side>),
    Engine(capkv_rpc::engine::Closer),
}

impl Hangup {
    /// Ends the connection; resolves once it has.
    async fn hang_up(self) {
        match self {
            Hangup::RpcSystem(d) => {
                let _ = d.await;
            }
            Hangup::Engine(c) => c.close().await,
        }
    }
}

/// Starts one connection over its (plain or TLS) halves as a task of its own (see
/// [`connection`]).
fn start_connection<R, W>(start: ConnStart, reader: R, writer: W)
where
    R: PeerReader + 'static,
    W: futures::io::AsyncWrite + Unpin + 'static,
{
    tokio::task::spawn_local(connection(start, reader, writer));
}

/// One connection's life: its RPC system over its halves, reading through the frame layer,
/// until it ends (peer gone, fault, idle, breach), then its cleanup.
fn connection<R, W>(start: ConnStart, reader: R, writer: W) -> impl Future<Output = ()>
where
    R: PeerReader + 'static,
    W: futures::io::AsyncWrite + Unpin + 'static,
{
    let ConnStart {
        id,
        peer,
        open_guard,
        worker,
        shared,
        live,
        warm,
        ahead,
    } = start;
    // Nothing reaches the RPC system before the frame layer has checked it.
    let tunables = shared.tunables();
    let breach: BreachCell = Rc::default();
    let conn = Rc::new(Conn::new(id, peer, &shared));
    // A peer that does not read its replies stops being read (see `capkv_rpc::backlog`);
    // the calls of each read have their store entries prefetched as they are checked.
    let reader = GuardedReader::new(
        reader,
        Arc::clone(&tunables.frames),
        Arc::clone(&shared.frame_budget),
        Rc::clone(&breach),
    )
    .with_backlog(Rc::clone(&conn.backlog))
    .with_warm(warm);
    let gateway: gateway::Client =
        capkv_rpc::local::new_client(GatewayImpl::new(Arc::clone(&shared), Rc::clone(&conn)));
    let reader_options = tunables.limits.request_reader_options();
    // Both engines speak the same protocol over the same checked stream; capnp-rpc's
    // `RpcSystem` is the reference capkv's own is tested against, and the way back. Each
    // gives its future, boxed (inline, the task would be sized for the larger, capnp-rpc's,
    // whichever runs: +4 KiB of RSS a connection, measured) and mapped by a combinator (an
    // `async move { f.await }` block holds `f` twice: its capture and its awaitee, 1.2 KiB
    // more a connection for capkv's engine), and its writer's flush task
    // where there is one (capkv's engine writes from its own loop, a pass's replies in one
    // write, so ending its future ends its writes).
    type Rpc = dyn Future<Output = Result<(), String>>;
    let (rpc, stop_writer): (Pin<Box<Rpc>>, Option<tokio::task::AbortHandle>) =
        match shared.rpc_engine {
            RpcEngine::CapnpRpc => {
                // capnp-rpc flushes after every message: the coalescing writer turns that into
                // one write per scheduler tick, with a flush task of its own.
                let writer = capkv_rpc::transport::CoalescingWriter::with_backlog(
                    writer,
                    Some(Rc::clone(&conn.backlog)),
                );
                let stop_writer = writer.abort_handle();
                let network = twoparty::VatNetwork::new(
                    reader,
                    writer,
                    rpc_twoparty_capnp::Side::Server,
                    reader_options,
                );
                let rpc = RpcSystem::new(Box::new(network), Some(gateway.client));
                live.borrow_mut()
                    .insert(id, Hangup::RpcSystem(rpc.get_disconnector()));
                (Box::pin(rpc.map_err(|e| e.to_string())), Some(stop_writer))
            }
            RpcEngine::Capkv => {
                let closer = capkv_rpc::engine::Closer::default();
                live.borrow_mut().insert(id, Hangup::Engine(closer.clone()));
                let limits = capkv_rpc::engine::EngineLimits {
                    reader_options,
                    // The engine writes its last bytes itself, for as long as the other
                    // engine's writer may.
                    finish_timeout: WRITER_DRAIN_GRACE,
                    ..Default::default()
                };
                let serve = capkv_rpc::engine::serve_with(
                    reader,
                    writer,
                    gateway.client.hook,
                    limits,
                    closer,
                    Some(Rc::clone(&conn.backlog)),
                );
                (Box::pin(serve.map_err(|e| e.to_string())), None)
            }
        };
    async move {
        tracing::debug!(conn = id, %peer, worker, "connection opened");
        // What else ends a connection, polled only when it woke (not at every call).
        let side = capkv_rpc::signal::WhenWoken::new(async {
            tokio::select! {
                () = conn.killed() => SideEnd::Killed,
                () = idle_expired(&shared, &conn) => SideEnd::Idle,
                () = conn.backlog.stalled(|| shared.tunables().slow_reader_timeout) => SideEnd::SlowReader,
            }
        });
        let mut slow_reader = false;
        // This connection's cold state, asked for at once (see `capkv_rpc::hint`) before
        // the engine reaches it one miss at a time: on the readiness loop, by the loop
        // while it serves the event before this connection's; on a task of its own, at
        // the start of each poll.
        // The engine's own state (capkv's boxed future, under a kilobyte) is asked for
        // whole: its fields are read one after the other, each line a miss otherwise.
        // Bounded: the reference engine's larger future is not worth a turn's prefetches.
        let (flag, conn_at) = (side.flag_ptr(), Rc::as_ptr(&conn).cast::<u8>());
        let (rpc_at, rpc_len) = (
            (&*rpc as *const Rpc).cast::<u8>(),
            std::mem::size_of_val(&*rpc).min(ENGINE_STATE_PREFETCH_BYTES),
        );
        let mut rpc = rpc;
        let cold = [
            (flag, 1),
            (conn_at, std::mem::size_of::<Conn>()),
            (rpc_at, rpc_len),
        ];
        if let Some(ahead) = &ahead {
            ahead.set(cold);
        }
        let on_its_own = ahead.is_none();
        let rpc = std::future::poll_fn(move |cx| {
            if on_its_own {
                for (at, bytes) in cold {
                    capkv_rpc::hint::prefetch_bytes(at, bytes);
                }
            }
            rpc.as_mut().poll(cx)
        });
        tokio::select! {
            biased;
            r = rpc => if let Err(e) = r {
                // Peers hanging up is normal; a protocol error is worth a line.
                tracing::debug!(conn = id, %peer, error = %e, "connection ended with error");
            },
            end = side => match end {
                // Dropping the RPC engine closes the socket and drops its calls unanswered.
                SideEnd::Killed => tracing::info!(conn = id, %peer, "connection closed by an injected fault"),
                SideEnd::Idle => {
                    metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "reason" => "idle").increment(1);
                    tracing::info!(conn = id, %peer, "connection closed: idle timeout");
                }
                // Dropping the RPC engine also drops the replies queued for a peer that does
                // not read them: their memory comes back.
                SideEnd::SlowReader => {
                    slow_reader = true;
                    metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "reason" => "slow_reader").increment(1);
                    tracing::warn!(
                        conn = id, %peer,
                        unsent_reply_bytes = conn.backlog.unsent_bytes(),
                        timeout_ms = shared.tunables().slow_reader_timeout.as_millis() as u64,
                        "connection closed: slow reader (replies not read within the timeout)"
                    );
                }
            },
        }
        if let Some(b) = breach.get() {
            metrics::counter!(m::CONNECTIONS_CLOSED_TOTAL, "reason" => b.label()).increment(1);
            tracing::warn!(conn = id, %peer, reason = b.label(), "connection closed: hostile or broken message");
        }
        // The writer may still be draining what the RPC system left it. A slow reader's is
        // dropped at once (it would never drain); any other gets a bounded grace period,
        // so that no socket outlives its connection slot for long.
        conn.backlog.close();
        if let Some(stop_writer) = stop_writer {
            if slow_reader {
                stop_writer.abort();
            } else if !stop_writer.is_finished() {
                tokio::task::spawn_local(async move {
                    tokio::time::sleep(WRITER_DRAIN_GRACE).await;
                    stop_writer.abort();
                });
            }
        }
        live.borrow_mut().remove(&id);
        drop(open_guard);
        tracing::debug!(conn = id, %peer, "connection closed");
    }
}

/// Why a connection ended other than by its RPC loop ending.
enum SideEnd {
    /// An injected fault killed it.
    Killed,
    /// No call for the idle timeout.
    Idle,
    /// Its peer did not read its replies within the slow-reader timeout.
    SlowReader,
}

/// Resolves when `conn` has had no call in flight for the idle timeout in force (checked
/// again after each wait, so calls and reloads in between count).
async fn idle_expired(shared: &Shared, conn: &Conn) {
    /// How often a connection re-reads the settings while idle timeouts are off.
    const RECHECK: Duration = Duration::from_secs(1);
    loop {
        let wait = match shared.tunables().idle_timeout {
            None => RECHECK,
            Some(limit) => match limit.checked_sub(conn.idle_for()) {
                None => return,
                Some(left) if left.is_zero() => return,
                Some(left) => left,
            },
        };
        tokio::time::sleep(wait).await;
    }
}

/// Bytes of a connection's engine state prefetched at the start of each turn (capkv's
/// engine's whole future: `capkv_rpc::engine`'s test bounds it at a kilobyte).
const ENGINE_STATE_PREFETCH_BYTES: usize = 1024;

/// How long a closed connection's writer may keep draining its last bytes to the peer.
const WRITER_DRAIN_GRACE: Duration = Duration::from_secs(5);

/// After the drain timeout, how long abandoned calls get to send their replies.
const ABANDON_GRACE: Duration = Duration::from_millis(200);

/// A server running on a thread of its own, for tests and embedding.
pub struct RunningServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<(), ServerError>>>,
}

impl RunningServer {
    /// Binds and starts serving `config` on a new thread; returns once it listens.
    pub fn start(config: Config) -> Result<Self, anyhow::Error> {
        Self::start_with(config, None)
    }

    /// Like [`RunningServer::start`], over `store` instead of the configured engine.
    pub fn start_with_store(
        config: Config,
        store: Arc<dyn capkv_store::Store>,
    ) -> Result<Self, anyhow::Error> {
        Self::start_with(config, Some(store))
    }

    fn start_with(
        config: Config,
        store: Option<Arc<dyn capkv_store::Store>>,
    ) -> Result<Self, anyhow::Error> {
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("capkv-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(ServerError::Worker)?;
                rt.block_on(async move {
                    let bound = match store {
                        Some(store) => Server::bind_with_store(config, store).await,
                        None => Server::bind(config).await,
                    };
                    let server = match bound {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            return Err(e);
                        }
                    };
                    let _ = ready_tx.send(Ok((server.local_addr(), server.shared())));
                    server
                        .run(async {
                            let _ = stop_rx.await;
                        })
                        .await
                })
            })?;
        let (addr, shared) = ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("server thread exited before listening"))?
            .map_err(anyhow::Error::msg)?;
        Ok(Self {
            addr,
            shared,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The running server's shared state (e.g. `apply_config` to reload in a test).
    pub fn shared(&self) -> Arc<Shared> {
        Arc::clone(&self.shared)
    }

    /// Drains and stops the server, waiting for it.
    pub fn stop(mut self) -> Result<(), anyhow::Error> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> Result<(), anyhow::Error> {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| anyhow::anyhow!("server thread panicked"))?
                .map_err(Into::into),
            None => Ok(()),
        }
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        if let Err(e) = self.stop_inner() {
            tracing::warn!(error = %e, "server stopped with an error");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linger dropped half-way (its runtime shutting down) is counted out: the count of
    /// lingering refusals does not creep up.
    #[test]
    fn a_linger_dropped_half_way_is_counted_out() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("address");
            let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let (stream, _) = listener.accept().await.expect("accept");
            let before = LINGERING.load(Ordering::Acquire);
            {
                let mut lingering = std::pin::pin!(linger(stream));
                // It waits for the client, who sends nothing.
                assert!(futures::poll!(lingering.as_mut()).is_pending());
                assert_eq!(LINGERING.load(Ordering::Acquire), before + 1);
            }
            assert_eq!(LINGERING.load(Ordering::Acquire), before);
            drop(client);
        });
    }
}
