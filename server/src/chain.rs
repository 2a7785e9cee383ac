//! The call chain: every cross-cutting step a call passes through, in one place and in a
//! fixed order. Handlers only decode their parameters, do their work and encode the result;
//! they never repeat a step below.
//!
//! Order, and why:
//! 1. **context**: decode `RequestContext` first, so that every later outcome (even a
//!    rejection) is logged with its request id and attempt.
//! 2. **drain**: a draining server refuses new work with `unavailable` (retryable: another
//!    instance or this one after restart will serve it). Health and version still answer,
//!    so that probes can see "not ready".
//! 3. **deadline**: a call whose budget is already spent is refused before it takes an
//!    admission slot; otherwise its budget is the caller's, capped at the configured maximum,
//!    or the configured default when it brought none.
//! 4. **rate** then **admission**: the per-token rate limit (a token bucket shared by the
//!    connections that opened with one token), then the per-connection and global in-flight
//!    limits. A call finding every global slot taken waits in a short bounded queue (at
//!    most `queue_timeout_ms`, within its deadline). Past any of them `overloaded` with
//!    `retryAfterMs`, cheaply, before any work. The slot is held by a guard until the
//!    call finishes, whatever way it finishes.
//! 5. **faults**: the armed fault plan (capkv-chaos) may fail, delay, stall the call or
//!    close its connection, here and nowhere else; after admission, so injected failures
//!    are counted like real ones; inside the deadline, so injected latency meets it like
//!    real latency. Probes and Admin calls are never faulted (a plan can always be cleared).
//! 6. **work** under the deadline: past it the work future is dropped — the work stops —
//!    and the call ends with `deadlineExceeded` (`capkv_deadline_exceeded_total`).
//! 7. **observe**: one log line and the request metrics, for every call, success or not.
//!
//! What a reload may change (limits, tokens, deadlines, rates) is one [`Tunables`] value
//! swapped whole; the chain reads it once per call, handlers when they validate.
//!
//! Around all of it runs the call's server span, the child of the caller's `traceparent`;
//! step 6 runs in a `store` span under it. With trace export off both are disabled
//! `TRACE` spans (one level check each), and the log line still carries a trace id: the
//! caller's.
//!
//! Two entries, one chain: [`Shared::serve`] runs an async work future; reads, whose work
//! never waits, go through [`Shared::serve_now`], which runs the same step functions to
//! the end at once and returns the outcome, with no async frame per call. When a step would
//! wait (every in-flight slot taken, so the call must queue; or a fault plan armed) it
//! stops before anything that cannot be repeated and hands the opened call to
//! [`Shared::serve_opened`], the async path, which goes on from there (a rate-limit token
//! already taken is not taken again).
//!
//! Authentication is not a step here because capkv authenticates by capability: only
//! `Gateway.open` checks a token, and every data call arrives on a `KvStore` or
//! `WriteSession` that an authenticated `open` produced.

use std::cell::Cell;
use std::future::Future;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use capkv::kv_capnp::request_context;
use capkv::{code_name, ApiError, CallMeta, ErrorCode};
use capkv_chaos::Chaos;
use capkv_store::{Pending, Store, StoreError};
use capkv_telemetry::TraceParent;
use sha2::Digest;
use std::collections::HashMap;
use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::field::Empty;
use tracing::Instrument;

use crate::config::Config;
use crate::method::{parse_fault_plan, Method};
use crate::metrics as m;
use crate::tunables::{ReloadState, TokenBucket, Tunables};

/// Advice sent with `overloaded`: long enough for a burst to pass, short enough not to idle.
const OVERLOADED_RETRY_AFTER_MS: u32 = 20;
/// Advice sent with `unavailable` while draining: a restart or failover takes about this.
const DRAINING_RETRY_AFTER_MS: u32 = 1_000;

/// Most token buckets kept; past it the map starts over (only accepted tokens get one,
/// so this is a guard, not a limit anyone meets).
const MAX_BUCKETS: usize = 64;

/// State shared by every worker and connection.
pub struct Shared {
    pub store: Arc<dyn Store>,
    tunables: ArcSwap<Tunables>,
    pub chaos: Chaos,
    pub sessions: crate::session::SessionTokens,
    /// Calls waiting for a global in-flight slot.
    queued: AtomicUsize,
    /// Calls holding a global in-flight slot: taken while below the `max_in_flight` in
    /// force, given back when the call ends. A counter rather than a semaphore so that
    /// taking and giving back a slot is one atomic operation each, without the lock a
    /// semaphore's release takes to look for waiters; a reload's new maximum applies to
    /// the next call that asks, with nothing to add or forget.
    in_flight: AtomicUsize,
    /// Woken (one waiter) when a slot is given back while calls wait, and (every waiter)
    /// when a reload raises the maximum.
    slot_freed: Notify,
    draining: AtomicBool,
    /// Woken when the last in-flight call finishes (the drain waits on it).
    idle: Notify,
    /// Woken (every waiter) when the drain starts: what work waiting outside the chain (a
    /// watcher's `next`) listens to, to answer at once.
    drain_started: Notify,
    /// Set, and waiters woken, when the drain timeout ends the calls still running.
    abandon: AtomicBool,
    abandon_notify: Notify,
    buckets: std::sync::Mutex<HashMap<[u8; 32], Arc<TokenBucket>>>,
    /// The config in force and how to read a new one (reload).
    pub(crate) reload: ReloadState,
    /// Bytes held by partially received large messages, server-wide (not reloadable).
    pub frame_budget: Arc<capkv_rpc::frames::FrameBudget>,
    /// Reply bytes built but not yet written, server-wide (bound not reloadable).
    pub reply_budget: Arc<capkv_rpc::backlog::ReplyBudget>,
    /// The RPC protocol implementation serving connections (not reloadable).
    pub rpc_engine: crate::config::RpcEngine,
    /// What runs each worker's connections (not reloadable).
    pub io_loop: crate::config::IoLoop,
    /// Capabilities held for all connections.
    capabilities_held: Arc<AtomicUsize>,
    /// Mutual TLS on new connections, when configured (not reloadable).
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// The per-call series' handles.
    call_metrics: crate::metrics::CallMetrics,
    /// Watchers alive and how far behind they are, for the metrics.
    pub watch_stats: WatchStats,
}

/// Watchers alive, and the sum of their positions (the revision each has read through):
/// with the store's revision, how many revisions of changes they have yet to pull.
#[derive(Debug, Default)]
pub struct WatchStats {
    watchers: AtomicU64,
    positions: AtomicU64,
}

impl WatchStats {
    pub fn opened(&self, position: u64) {
        self.watchers.fetch_add(1, Ordering::Relaxed);
        self.positions.fetch_add(position, Ordering::Relaxed);
    }

    pub fn moved(&self, from: u64, to: u64) {
        self.positions
            .fetch_add(to.wrapping_sub(from), Ordering::Relaxed);
    }

    pub fn closed(&self, position: u64) {
        self.watchers.fetch_sub(1, Ordering::Relaxed);
        self.positions.fetch_sub(position, Ordering::Relaxed);
    }

    pub fn watchers(&self) -> u64 {
        self.watchers.load(Ordering::Relaxed)
    }

    /// Revisions the watchers have yet to read through, summed, at store revision `head`
    /// (a watcher of a future revision counts nothing).
    pub fn lag_revisions(&self, head: u64) -> u64 {
        (self.watchers() * head).saturating_sub(self.positions.load(Ordering::Relaxed))
    }
}

/// Why a server is not ready (see [`Shared::not_ready`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotReady {
    /// Shutting down: new work goes elsewhere.
    Draining,
    /// The store refuses writes (a full disk); reads are still served.
    WritesRefused(String),
}

impl NotReady {
    /// The short form `Gateway.health` puts in `status`.
    pub fn status(&self) -> &str {
        match self {
            NotReady::Draining => "draining",
            NotReady::WritesRefused(why) => why,
        }
    }
}

/// One client connection, owned by the worker thread serving it.
pub struct Conn {
    pub id: u64,
    pub peer: SocketAddr,
    in_flight: Cell<usize>,
    /// Notified to drop the connection at once (fault injection), without replies.
    kill: capkv_rpc::signal::Signal,
    /// When the last call ended (or the connection opened): the idle timeout's clock.
    last_active: Cell<Instant>,
    /// Calls waiting without an admission slot for something to happen (a watcher's
    /// `next` waiting for events): the connection is not idle while one waits.
    long_polls: Cell<usize>,
    /// The rate-limit bucket of the token this connection opened with.
    bucket: std::cell::RefCell<Option<Arc<TokenBucket>>>,
    /// Reply bytes built and not yet written; the frame layer stops reading past its bound.
    pub backlog: Rc<capkv_rpc::backlog::ReplyBacklog>,
    /// Capabilities the server holds for this peer (each a [`CapSlot`]).
    caps: Rc<Cell<usize>>,
    /// Stand-ins handed out when the connection is at its capability limit: one per
    /// interface, shared, so that refusals cost nothing more (see `crate::refused`).
    at_capacity: std::cell::RefCell<Vec<Box<dyn std::any::Any>>>,
}

/// A long poll running on a connection ([`Conn::long_poll`]).
pub struct LongPoll<'a>(&'a Conn);

impl Drop for LongPoll<'_> {
    fn drop(&mut self) {
        let conn = self.0;
        conn.long_polls.set(conn.long_polls.get().saturating_sub(1));
        conn.last_active.set(Instant::now());
    }
}

/// One capability the server holds for a connection's peer; dropped with the capability
/// (the peer released it, or the connection ended).
pub struct CapSlot {
    conn: Rc<Cell<usize>>,
    server: Arc<AtomicUsize>,
}

impl Drop for CapSlot {
    fn drop(&mut self) {
        self.conn.set(self.conn.get().saturating_sub(1));
        self.server.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    pub fn new(id: u64, peer: SocketAddr, shared: &Shared) -> Self {
        let t = shared.tunables();
        Self {
            id,
            peer,
            in_flight: Cell::new(0),
            kill: capkv_rpc::signal::Signal::default(),
            last_active: Cell::new(Instant::now()),
            long_polls: Cell::new(0),
            bucket: std::cell::RefCell::new(None),
            backlog: Rc::new(capkv_rpc::backlog::ReplyBacklog::new(
                Arc::clone(&shared.reply_budget),
                t.max_unsent_reply_bytes,
            )),
            caps: Rc::default(),
            at_capacity: std::cell::RefCell::default(),
        }
    }

    /// Room for one more capability for this peer (at most `max`), or
    /// `tooManyCapabilities`.
    pub fn cap_slot(&self, shared: &Shared, max: usize) -> Result<CapSlot, ApiError> {
        if self.caps.get() >= max {
            shared.reject("too_many_capabilities");
            return Err(ApiError::new(
                ErrorCode::TooManyCapabilities,
                format!(
                    "this connection holds {max} capabilities, the server's limit \
                     (limits.max_capabilities_per_connection); release some first"
                ),
            ));
        }
        self.caps.set(self.caps.get() + 1);
        shared.capabilities_held.fetch_add(1, Ordering::Relaxed);
        Ok(CapSlot {
            conn: Rc::clone(&self.caps),
            server: Arc::clone(&shared.capabilities_held),
        })
    }

    /// The shared stand-in of type `C` for a connection at its capability limit, made by
    /// `make` the first time.
    pub fn capacity_stand_in<C: Clone + 'static>(&self, make: impl FnOnce() -> C) -> C {
        let mut cache = self.at_capacity.borrow_mut();
        if let Some(c) = cache.iter().find_map(|b| b.downcast_ref::<C>()) {
            return c.clone();
        }
        let c = make();
        cache.push(Box::new(c.clone()));
        c
    }

    /// How long the connection has had no call in flight; zero while one is, or while a
    /// long poll waits.
    pub fn idle_for(&self) -> Duration {
        if self.in_flight.get() > 0 || self.long_polls.get() > 0 {
            Duration::ZERO
        } else {
            self.last_active.get().elapsed()
        }
    }

    /// Marks a long poll (a call that waits for events after its chain step, holding no
    /// admission slot) until the guard is dropped; the idle clock restarts when it ends.
    /// Without it, a watcher waiting longer than the idle timeout was closed as idle.
    pub fn long_poll(&self) -> LongPoll<'_> {
        self.long_polls.set(self.long_polls.get() + 1);
        LongPoll(self)
    }

    /// Charges this connection's calls to `bucket` (set when `open` accepts a token).
    pub fn set_bucket(&self, bucket: Arc<TokenBucket>) {
        *self.bucket.borrow_mut() = Some(bucket);
    }

    /// Asks the connection's task to drop the connection now.
    pub fn kill(&self) {
        self.kill.set();
    }

    /// Kills the connection and waits until its task has dropped it, so that what this call
    /// answers next goes nowhere. Bounded: the connection's task runs on this same thread
    /// as soon as the caller yields.
    pub async fn kill_and_forget(&self) -> ApiError {
        self.kill();
        tokio::time::sleep(Duration::from_millis(50)).await;
        ApiError::new(
            ErrorCode::Unavailable,
            "connection closed by an injected fault",
        )
    }

    /// Resolves once [`kill`](Conn::kill) was called.
    pub async fn killed(&self) {
        self.kill.wait().await;
    }
}

/// Resolves once `done` holds, asked again each time `notify` wakes its waiters. Interest
/// is registered before each ask, so a notification between the ask and the wait is not
/// missed.
async fn until(notify: &Notify, mut done: impl FnMut() -> bool) {
    loop {
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if done() {
            return;
        }
        notified.await;
    }
}

/// What a handler's work gets to know about its call.
pub struct Call {
    pub attempt: u32,
    pub deadline: Instant,
    /// The settings in force when the call started, loaded once by the chain: a handler
    /// reads these, never `Shared::tunables`, so one call never mixes two reloads.
    pub tunables: Arc<Tunables>,
}

impl Shared {
    pub fn new(config: &Config, store: Arc<dyn Store>) -> Self {
        let chaos = Chaos::new();
        if !config.faults.plan.trim().is_empty() {
            // Validated with the config; a plan that got here parses.
            match parse_fault_plan(&config.faults.plan) {
                Ok(plan) => {
                    tracing::warn!(plan = %plan, "fault plan armed from the configuration");
                    chaos.arm(plan);
                }
                Err(e) => tracing::error!(error = %e.message, "fault plan ignored"),
            }
        }
        let secret = store.instance_secret();
        Self {
            store,
            tunables: ArcSwap::from_pointee(Tunables::new(config, None)),
            chaos,
            sessions: crate::session::SessionTokens::new(secret),
            queued: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            slot_freed: Notify::new(),
            draining: AtomicBool::new(false),
            idle: Notify::new(),
            drain_started: Notify::new(),
            abandon: AtomicBool::new(false),
            abandon_notify: Notify::new(),
            buckets: std::sync::Mutex::new(HashMap::new()),
            reload: ReloadState::new(config.clone()),
            rpc_engine: config.rpc_engine,
            io_loop: config.io_loop,
            frame_budget: Arc::new(capkv_rpc::frames::FrameBudget::new(
                config.limits.frame_budget_bytes,
            )),
            reply_budget: Arc::new(capkv_rpc::backlog::ReplyBudget::new(
                config.limits.unsent_reply_budget_bytes,
            )),
            capabilities_held: Arc::default(),
            tls: None,
            call_metrics: crate::metrics::CallMetrics::new(Method::ALL.len()),
            watch_stats: WatchStats::default(),
        }
    }

    /// Capabilities the server holds for all its connections.
    pub fn capabilities_held(&self) -> usize {
        self.capabilities_held.load(Ordering::Relaxed)
    }

    /// The settings in force (a call reads them once, at its start).
    pub fn tunables(&self) -> Arc<Tunables> {
        self.tunables.load_full()
    }

    /// Puts reloaded settings in force. A lower `max_in_flight` holds back new calls until
    /// enough running ones end; a higher one wakes the calls queued for a slot.
    pub(crate) fn set_tunables(&self, new: Tunables) {
        let (old_max, new_max) = (self.tunables().max_in_flight, new.max_in_flight);
        self.tunables.store(Arc::new(new));
        if new_max < old_max && self.in_flight() > new_max {
            tracing::info!(
                in_flight = self.in_flight(),
                max_in_flight = new_max,
                "max_in_flight lowered below the calls in flight; new calls wait for them"
            );
        }
        if new_max > old_max {
            self.slot_freed.notify_waiters();
        }
    }

    /// The rate-limit bucket of an accepted token (one shared bucket when auth is off).
    pub fn bucket_for(&self, token: &str) -> Arc<TokenBucket> {
        let key: [u8; 32] = if self.tunables().auth.is_enabled() {
            sha2::Sha256::digest(token.as_bytes()).into()
        } else {
            [0; 32]
        };
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_BUCKETS && !map.contains_key(&key) {
            map.clear();
        }
        Arc::clone(
            map.entry(key)
                .or_insert_with(|| Arc::new(TokenBucket::new())),
        )
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Why the server cannot take all traffic now, or `None` when it can: what `/readyz`
    /// and `Gateway.health` both report.
    pub fn not_ready(&self) -> Option<NotReady> {
        if self.is_draining() {
            return Some(NotReady::Draining);
        }
        self.store.write_refusal().map(NotReady::WritesRefused)
    }

    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.drain_started.notify_waiters();
    }

    /// Resolves once the drain has started (at once if it has).
    pub async fn draining(&self) {
        until(&self.drain_started, || self.is_draining()).await
    }

    /// Ends every call still running that does not change data, with `unavailable`
    /// (the drain timeout has passed).
    pub fn abandon_remaining(&self) {
        self.abandon.store(true, Ordering::Release);
        self.abandon_notify.notify_waiters();
    }

    async fn abandoned(&self) {
        until(&self.abandon_notify, || {
            self.abandon.load(Ordering::Acquire)
        })
        .await
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Calls waiting in the admission queue for an in-flight slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Resolves when no call is in flight, or after `timeout`; returns how many calls were
    /// still in flight then. Only while draining (calls ending notify only then).
    pub async fn wait_idle(&self, timeout: Duration) -> usize {
        debug_assert!(
            self.is_draining(),
            "wait_idle outside a drain would never wake"
        );
        let idle = until(&self.idle, || self.in_flight.load(Ordering::SeqCst) == 0);
        match tokio::time::timeout(timeout, idle).await {
            Ok(()) => 0,
            Err(_) => self.in_flight(),
        }
    }

    /// Runs one call through the chain (see the module docs for the steps and their order).
    pub async fn serve<T, F, Fut>(
        &self,
        conn: &Conn,
        method: Method,
        ctx: capnp::Result<request_context::Reader<'_>>,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(Call) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let opened = self.open(conn, method, ctx);
        self.serve_opened(conn, method, opened, work).await
    }

    /// [`serve`](Self::serve) for work that never waits (reads): the same steps, run to
    /// the end at once when none of them has to wait, without an async frame per call.
    /// `Later` when one would (no free in-flight slot, so the call must queue; or a fault
    /// plan is armed, whose delays and stalls take time): the caller then finishes the
    /// call with [`serve_opened`](Self::serve_opened), which goes on from where this
    /// stopped (the rate-limit token already taken is not taken twice).
    pub fn serve_now<T>(
        &self,
        conn: &Conn,
        method: Method,
        ctx: capnp::Result<request_context::Reader<'_>>,
        work: impl FnOnce(Call) -> Result<T, ApiError>,
    ) -> Served<T> {
        let (opened, result) = match self.admit_now(conn, method, ctx, |before, meta, _slot| {
            let _in_store = store_span(method).entered();
            work(before.call(meta))
        }) {
            Admitted::Later(opened) => return Served::Later(opened),
            Admitted::Ran(opened, result) => (opened, result),
            Admitted::Refused(opened, e) => (opened, Err(e)),
        };
        self.observe(conn, method, &opened, &result);
        Served::Now(result)
    }

    /// Steps 1 to 4 at once, for [`serve_now`](Self::serve_now) and
    /// [`serve_write`](Self::serve_write): `run` gets the call's settings, context and
    /// admission slot, in its span. `Later` when a step would wait (no free in-flight
    /// slot, so the call must queue; or a fault plan is armed, whose delays and stalls
    /// take time): the caller then finishes the call with
    /// [`serve_opened`](Self::serve_opened), which goes on from where this stopped (the
    /// rate-limit token already taken is not taken twice).
    fn admit_now<'a, R>(
        &'a self,
        conn: &'a Conn,
        method: Method,
        ctx: capnp::Result<request_context::Reader<'_>>,
        run: impl FnOnce(Before, &CallMeta, Slot<'a>) -> R,
    ) -> Admitted<R> {
        let mut opened = self.open(conn, method, ctx);
        if method.faultable() && self.chaos.is_armed() {
            return Admitted::Later(opened);
        }
        let ran = match &opened.meta {
            Err(e) => Err(e.clone()),
            Ok(meta) => {
                let _in_span = opened.span.enter();
                match self.before_admission(conn, method, meta, opened.started) {
                    Err(e) => Err(e),
                    Ok(before) => match self.try_admit(conn, &before.t) {
                        Err(e) => Err(e),
                        Ok(Admission::Queue(_counted)) => {
                            opened.rate_charged = true;
                            drop(_in_span);
                            return Admitted::Later(opened);
                        }
                        Ok(Admission::Ready(slot)) => Ok(run(before, meta, slot)),
                    },
                }
            }
        };
        match ran {
            Ok(r) => Admitted::Ran(opened, r),
            Err(e) => Admitted::Refused(opened, e),
        }
    }

    /// Finishes a call [`open`](Self::open)ed here or left `Later` by
    /// [`serve_now`](Self::serve_now).
    pub async fn serve_opened<T, F, Fut>(
        &self,
        conn: &Conn,
        method: Method,
        opened: Opened,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(Call) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let result = match &opened.meta {
            Err(e) => Err(e.clone()),
            Ok(meta) => {
                self.admit_and_run(conn, method, meta, &opened, work)
                    .instrument(opened.span.clone())
                    .await
            }
        };
        // 7. observe
        self.observe(conn, method, &opened, &result);
        result
    }

    /// Step 1: the call's start, its context and its server span.
    fn open(
        &self,
        conn: &Conn,
        method: Method,
        ctx: capnp::Result<request_context::Reader<'_>>,
    ) -> Opened {
        // On the engine's direct path, the read that brought the call: one clock read for
        // the calls of a read, and their wait behind each other in it is theirs.
        let started = capkv_rpc::local::arrived().unwrap_or_else(Instant::now);
        conn.last_active.set(started);
        let meta = ctx
            .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, format!("bad ctx: {e}")))
            .and_then(CallMeta::read);
        let parent = meta
            .as_ref()
            .ok()
            .and_then(|m| TraceParent::parse(&m.traceparent));
        let span = tracing::trace_span!(
            target: "capkv::server", "call",
            otel.name = method.name(), otel.kind = "server", rpc.system = "capnp",
            rpc.method = method.name(), attempt = Empty, code = Empty, otel.status_code = Empty,
        );
        if let (Some(p), Ok(m)) = (&parent, &meta) {
            capkv_telemetry::set_remote_parent(&span, p, &m.tracestate);
        }
        Opened {
            started,
            meta,
            parent,
            span,
            rate_charged: false,
        }
    }

    /// Steps 2 to 4 up to admission: drain, deadline, rate. Never waits.
    fn before_admission(
        &self,
        conn: &Conn,
        method: Method,
        meta: &CallMeta,
        started: Instant,
    ) -> Result<Before, ApiError> {
        self.before_admission_charged(conn, method, meta, started, false)
    }

    /// [`before_admission`](Self::before_admission), skipping the rate limit when this
    /// call's token was already taken.
    fn before_admission_charged(
        &self,
        conn: &Conn,
        method: Method,
        meta: &CallMeta,
        started: Instant,
        rate_charged: bool,
    ) -> Result<Before, ApiError> {
        let t = self.tunables();
        conn.backlog.set_max_bytes(t.max_unsent_reply_bytes);
        // 2. drain
        if self.is_draining() && !method.served_while_draining() {
            self.reject("draining");
            return Err(
                ApiError::new(ErrorCode::Unavailable, "server is shutting down")
                    .with_retry_after_ms(DRAINING_RETRY_AFTER_MS),
            );
        }
        // 3. deadline
        let budget_ms = match meta.budget_ms {
            Some(0) => {
                self.reject("deadline_spent");
                return Err(ApiError::new(
                    ErrorCode::DeadlineExceeded,
                    "deadline already spent on arrival",
                ));
            }
            Some(ms) => ms.min(t.budgets_ms[method as usize].1),
            None => t.budgets_ms[method as usize].0,
        };
        let deadline = started + Duration::from_millis(u64::from(budget_ms));
        // 4. rate (admission follows)
        if let (false, Some((per_s, size)), Some(bucket)) =
            (rate_charged, t.rate, conn.bucket.borrow().as_ref())
        {
            if let Err(wait) = bucket.take(per_s, size) {
                self.reject("rate_limit");
                let ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
                return Err(ApiError::new(
                    ErrorCode::Overloaded,
                    format!("rate limit of {per_s} calls/s for this token exceeded"),
                )
                .with_retry_after_ms(ms));
            }
        }
        Ok(Before {
            t,
            deadline,
            budget_ms,
        })
    }

    async fn admit_and_run<T, F, Fut>(
        &self,
        conn: &Conn,
        method: Method,
        meta: &CallMeta,
        opened: &Opened,
        work: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(Call) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        let before =
            self.before_admission_charged(conn, method, meta, opened.started, opened.rate_charged)?;
        let (deadline, budget_ms) = (before.deadline, before.budget_ms);
        let _slot = self.admit(conn, &before.t, deadline).await?;
        // 5. faults
        let fault = if method.faultable() {
            self.chaos.decide(method.name())
        } else {
            None
        };
        if let Some(f) = &fault {
            metrics::counter!(m::FAULTS_INJECTED_TOTAL, "method" => method.name()).increment(1);
            tracing::debug!(method = method.name(), fault = ?f, "injecting fault");
        }
        let call = before.call(meta);
        let faulted_work = async {
            if let Some(f) = &fault {
                if f.close {
                    return Err(conn.kill_and_forget().await);
                }
                if f.stall {
                    std::future::pending::<()>().await;
                }
                if !f.delay.is_zero() {
                    tokio::time::sleep(f.delay).await;
                }
                if let Some(code) = &f.fail {
                    let code = capkv::code_from_name(code).unwrap_or(ErrorCode::Unavailable);
                    return Err(ApiError::new(code, "injected fault"));
                }
            }
            let r = work(call).instrument(store_span(method)).await;
            if fault.as_ref().is_some_and(|f| f.drop_reply) {
                return Err(conn.kill_and_forget().await);
            }
            r
        };
        // 6. work. Most calls complete on their first poll: they never need the deadline's
        // timer (whose setup costs a clock read and a handle per call); the rest get it.
        let bounded = async {
            let mut work = std::pin::pin!(faulted_work);
            match futures::poll!(work.as_mut()) {
                std::task::Poll::Ready(r) => Ok(r),
                std::task::Poll::Pending => tokio::time::timeout_at(deadline, work).await,
            }
        };
        let outcome = if method.changes_data() {
            // A write is never abandoned: its outcome would be unknown. One still running
            // when the drain gives up ends with its connection.
            bounded.await
        } else {
            tokio::select! {
                // The work first: a call that completes at once (most reads) never
                // registers with the drain's `Notify` (a lock and a list insert per call).
                biased;
                r = bounded => r,
                () = self.abandoned() => {
                    self.reject("drain_timeout");
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "server is shutting down: the drain timeout ended this call",
                    )
                    .with_retry_after_ms(DRAINING_RETRY_AFTER_MS));
                }
            }
        };
        match outcome {
            Ok(r) => r,
            // Dropping the work future here is what stops the work.
            Err(_) => Err(deadline_exceeded(method, budget_ms)),
        }
    }

    /// [`serve_now`](Self::serve_now) for a write whose outcome may come later (a store
    /// that commits in groups): the same steps, run at once; `work` submits the write.
    /// When the store answers at once, or a step refuses the call, it is answered now;
    /// when a step must wait it is `Later`, as from `serve_now`; else the call waits for
    /// its outcome in a [`WaitingWrite`], with its admission slot, under its deadline,
    /// without an async frame, a boxed future or a hook. `map` turns the store's outcome
    /// into the call's.
    pub fn serve_write<O>(
        self: &Arc<Self>,
        conn: &Rc<Conn>,
        method: Method,
        ctx: capnp::Result<request_context::Reader<'_>>,
        work: impl FnOnce(Call) -> Result<Pending<O>, ApiError>,
        map: fn(Result<O, StoreError>) -> Result<O, ApiError>,
    ) -> Begun<O> {
        // A call that waits here is never abandoned (`WaitingWrite`): writes only.
        debug_assert!(method.changes_data(), "{} is not a write", method.name());
        let admitted = self.admit_now(conn, method, ctx, |before, meta, slot| {
            let (deadline, budget_ms) = (before.deadline, before.budget_ms);
            let store = store_span(method);
            let submitted = store.in_scope(|| work(before.call(meta)));
            match submitted.map(Pending::now) {
                Err(e) => Err(e),
                // `map` logs what it handles: in the store span, as on the async path.
                Ok(Ok(outcome)) => Ok(Ok(store.in_scope(|| map(outcome)))),
                // The admission goes on with the call (`WaitingWrite` gives it back), and
                // so does the store span, which ends with the wait, as on the async path.
                Ok(Err(pending)) => Ok(Err((pending, slot.keep(), store, deadline, budget_ms))),
            }
        });
        let (opened, result) = match admitted {
            Admitted::Later(opened) => return Begun::Later(opened),
            Admitted::Refused(opened, e) | Admitted::Ran(opened, Err(e)) => (opened, Err(e)),
            Admitted::Ran(opened, Ok(Ok(result))) => (opened, result),
            Admitted::Ran(opened, Ok(Err((pending, held, store, deadline, budget_ms)))) => {
                return Begun::Waiting(WaitingWrite {
                    pending,
                    store,
                    map,
                    admitted: Some(held),
                    conn: Rc::clone(conn),
                    shared: Arc::clone(self),
                    opened,
                    method,
                    deadline,
                    budget_ms,
                    watch: None,
                    timer: None,
                    result: None,
                });
            }
        };
        self.observe(conn, method, &opened, &result);
        Begun::Now(result)
    }

    /// Step 4's admission, as far as it goes without waiting: the connection's limit, then
    /// a free global slot, or the verdict that the call must queue for one.
    fn try_admit<'a>(&'a self, conn: &'a Conn, t: &Tunables) -> Result<Admission<'a>, ApiError> {
        if conn.in_flight.get() >= t.max_in_flight_per_connection {
            return Err(self.overloaded("connection_in_flight"));
        }
        // Counted before any wait, so queued calls of one connection meet its limit too.
        conn.in_flight.set(conn.in_flight.get() + 1);
        let mut slot = Slot {
            shared: self,
            conn,
            held: false,
        };
        if self.take_slot(t.max_in_flight) {
            slot.held = true;
            Ok(Admission::Ready(slot))
        } else if t.queue_timeout.is_zero() || t.queue_depth == 0 {
            Err(self.overloaded("in_flight"))
        } else {
            Ok(Admission::Queue(slot))
        }
    }

    /// Takes a global slot if fewer than `max` are held.
    fn take_slot(&self, max: usize) -> bool {
        self.in_flight
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Waits until a global slot is taken, under the maximum in force at each try.
    async fn wait_slot(&self) {
        // A slot given back after a try wakes this call: `Slot::drop` notifies while
        // `queued` counts it, and it counts it already.
        until(&self.slot_freed, || {
            self.take_slot(self.tunables.load().max_in_flight)
        })
        .await
    }

    /// Step 4's admission: [`try_admit`](Self::try_admit), then, when every slot is taken,
    /// a short bounded wait in the queue.
    async fn admit<'a>(
        &'a self,
        conn: &'a Conn,
        t: &Tunables,
        deadline: Instant,
    ) -> Result<Slot<'a>, ApiError> {
        let mut slot = match self.try_admit(conn, t)? {
            Admission::Ready(slot) => return Ok(slot),
            Admission::Queue(slot) => slot,
        };
        if self.queued.fetch_add(1, Ordering::SeqCst) >= t.queue_depth {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(self.overloaded("queue_full"));
        }
        // Given back however the wait ends: a call dropped while it waits (its connection
        // gone) leaves the queue too, or the queue would fill with calls no longer there.
        let place = QueuePlace(&self.queued);
        let until = deadline.min(Instant::now() + t.queue_timeout);
        let waited = tokio::time::timeout_at(until, self.wait_slot()).await;
        drop(place);
        if waited.is_err() {
            return Err(self.overloaded("queue_timeout"));
        }
        slot.held = true;
        Ok(slot)
    }

    /// Sets the gauges that mirror counts the chain keeps anyway (calls in flight), for a
    /// scrape about to render them: once per scrape instead of a gauge update (a
    /// compare-and-swap loop on a shared float) at every call's start and end.
    pub(crate) fn publish_gauges(&self) {
        self.call_metrics.in_flight().set(self.in_flight() as f64);
    }

    /// `overloaded`, counted as a rejection for `reason`.
    fn overloaded(&self, reason: &'static str) -> ApiError {
        self.reject(reason);
        ApiError::new(
            ErrorCode::Overloaded,
            format!("too many calls in flight ({reason})"),
        )
        .with_retry_after_ms(OVERLOADED_RETRY_AFTER_MS)
    }

    fn release_global(&self) {
        let before = self.in_flight.fetch_sub(1, Ordering::SeqCst);
        // Only a queued call waits for a slot, so only then is one told (a `Notify` takes a
        // lock). SeqCst with `admit`'s count: either this load sees the queued call, or
        // that call's first try (after its count) sees this slot free.
        if self.queued.load(Ordering::SeqCst) > 0 {
            self.slot_freed.notify_one();
        }
        // Likewise only a drain waits for idle. SeqCst here and in `start_draining` /
        // `wait_idle`: either this load sees the drain, or the drain's first count sees
        // this call gone.
        if before == 1 && self.draining.load(Ordering::SeqCst) {
            self.idle.notify_waiters();
        }
    }

    pub(crate) fn reject(&self, reason: &'static str) {
        metrics::counter!(m::REJECTIONS_TOTAL, "reason" => reason).increment(1);
    }

    /// Step 7: the call's metrics, its span's fields and its log line.
    fn observe<T>(
        &self,
        conn: &Conn,
        method: Method,
        opened: &Opened,
        result: &Result<T, ApiError>,
    ) {
        let Opened {
            started,
            meta,
            parent,
            span,
            ..
        } = opened;
        let default_meta = CallMeta::default();
        let meta = meta.as_ref().unwrap_or(&default_meta);
        let parent = parent.as_ref();
        // One clock read ends the call: its latency and the connection's idle clock.
        let ended = Instant::now();
        conn.last_active.set(ended);
        let elapsed = ended - *started;
        let code = match result {
            Ok(_) => "ok",
            Err(e) => code_name(e.code),
        };
        if !span.is_disabled() {
            span.record("attempt", meta.attempt);
            span.record("code", code);
            if result.is_err() {
                span.record("otel.status_code", "ERROR");
            }
        }
        self.call_metrics.finished(
            (method as usize, method.name()),
            result.as_ref().err().map(|e| e.code),
            elapsed.as_secs_f64(),
        );
        let latency_ms = elapsed.as_secs_f64() * 1e3;
        // Keys, values and tokens are never logged; the error message is safe by contract.
        // The ids are worked out only for a line that will be written (the per-call line is
        // at debug level, usually off): they cost random draws when no span is exported.
        let ids = || capkv_telemetry::span_ids(span, parent);
        // An internal failure was logged, with its details, where it was handled (e.g.
        // `rpc::store_error`): here it is one more call, so it is not logged twice.
        match result {
            _ if tracing::enabled!(target: "capkv::request", tracing::Level::DEBUG) => {
                let (trace_id, span_id) = ids();
                tracing::debug!(
                    target: "capkv::request",
                    method = method.name(), code, latency_ms, attempt = meta.attempt,
                    %trace_id, %span_id, request_id = %meta.request_id,
                    peer = %conn.peer, conn = conn.id,
                    "request"
                )
            }
            _ => {}
        }
    }
}

/// A call the chain has opened (step 1): when it started, its context, its server span.
pub struct Opened {
    started: Instant,
    meta: Result<CallMeta, ApiError>,
    parent: Option<TraceParent>,
    span: tracing::Span,
    /// The rate limit already took this call's token (a `Later` from `serve_now`).
    rate_charged: bool,
}

/// What [`Shared::serve_now`] did: the call's outcome, or nothing yet.
pub enum Served<T> {
    Now(Result<T, ApiError>),
    /// A step must wait: finish with [`Shared::serve_opened`].
    Later(Opened),
}

/// What steps 2 to 4 settled before admission.
struct Before {
    t: Arc<Tunables>,
    deadline: Instant,
    budget_ms: u32,
}

impl Before {
    /// The call's view, taking the settings over (no second reference to count).
    fn call(self, meta: &CallMeta) -> Call {
        Call {
            attempt: meta.attempt,
            deadline: self.deadline,
            tunables: self.t,
        }
    }
}

/// [`Shared::try_admit`]'s verdict.
enum Admission<'a> {
    /// A global slot is held.
    Ready(Slot<'a>),
    /// Counted on the connection, but every global slot is taken: the call must queue.
    Queue(Slot<'a>),
}

/// Step 6's span: the store work, under the call's span.
fn store_span(method: Method) -> tracing::Span {
    tracing::trace_span!(
        target: "capkv::store", "store", otel.name = format!("store.{}", method.name()),
    )
}

/// An admission slot; dropping it (on every path out of a call) gives it back. Unless
/// `held` it holds only the connection's count (a refused or queued call).
struct Slot<'a> {
    shared: &'a Shared,
    conn: &'a Conn,
    /// A global slot is held (counted in `Shared::in_flight`).
    held: bool,
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        give_back(self.shared, self.conn, self.held);
    }
}

impl Slot<'_> {
    /// Ends the borrow, not the admission: whether a global slot is held, for an owner
    /// that gives it back itself ([`WaitingWrite`], a call that outlives the borrow).
    fn keep(self) -> bool {
        let held = self.held;
        std::mem::forget(self);
        held
    }
}

/// A call's place in the admission queue (counted in `Shared::queued`), given back when
/// dropped: when its wait ends, and when the call is dropped while it waits.
struct QueuePlace<'a>(&'a AtomicUsize);

impl Drop for QueuePlace<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Ends an admission: the connection's count, and the global slot if one was held.
fn give_back(shared: &Shared, conn: &Conn, held: bool) {
    // The idle clock is set when the call ends (`observe`); a call dropped with its
    // connection needs none.
    conn.in_flight.set(conn.in_flight.get() - 1);
    if held {
        shared.release_global();
    }
}

/// Step 6's end when past the deadline: counted, logged, and the call's error.
fn deadline_exceeded(method: Method, budget_ms: u32) -> ApiError {
    metrics::counter!(m::DEADLINE_EXCEEDED_TOTAL, "method" => method.name()).increment(1);
    tracing::debug!(
        method = method.name(),
        budget_ms,
        "deadline exceeded; work stopped"
    );
    ApiError::new(
        ErrorCode::DeadlineExceeded,
        format!("deadline of {budget_ms} ms exceeded"),
    )
}

/// How [`Shared::admit_now`] left a call: to go on later, run (with what `run` gave), or
/// refused by a step.
enum Admitted<R> {
    Later(Opened),
    Ran(Opened, R),
    Refused(Opened, ApiError),
}

/// What [`Shared::serve_write`] did with a write.
pub enum Begun<O> {
    /// Answered: the store answered at once, or a step refused the call.
    Now(Result<O, ApiError>),
    /// A step must wait: finish with [`Shared::serve_opened`].
    Later(Opened),
    /// Submitted: the outcome comes from the store.
    Waiting(WaitingWrite<O>),
}

/// A write submitted by [`Shared::serve_write`], waiting for its outcome: steps 6 and 7
/// of the chain as a poll, not an async frame. A write is never abandoned (its outcome
/// would be unknown); past its deadline the call ends with `deadlineExceeded` while the
/// write goes on, as on the async path. Dropped with its connection: the write stands.
pub struct WaitingWrite<O> {
    pending: Pending<O>,
    /// Step 6's span: open until the outcome is taken, so that it covers the wait.
    store: tracing::Span,
    map: fn(Result<O, StoreError>) -> Result<O, ApiError>,
    /// The admission (whether a global slot is held), given back when the outcome is
    /// known or the call is dropped.
    admitted: Option<bool>,
    conn: Rc<Conn>,
    shared: Arc<Shared>,
    opened: Opened,
    method: Method,
    deadline: Instant,
    budget_ms: u32,
    /// Made at the first wait (a write answered by then needs none): the worker's
    /// sweeper watching the deadline ([`crate::deadlines`]), or else a timer of its own.
    watch: Option<crate::deadlines::Watch>,
    timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    result: Option<Result<O, ApiError>>,
}

impl<O> WaitingWrite<O> {
    /// Ready once the outcome (or the deadline) is in: then [`take`](Self::take) it.
    pub fn poll_outcome(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<()> {
        use std::task::Poll;
        if self.result.is_some() {
            return Poll::Ready(());
        }
        if let Poll::Ready(outcome) = std::pin::Pin::new(&mut self.pending).poll(cx) {
            // `map` logs a store failure where it is handled: in the call's spans.
            self.result = Some(self.store.in_scope(|| (self.map)(outcome)));
            // Leaves the sweeper's queue now, not when the call is dropped.
            self.watch = None;
            self.give_back();
            return Poll::Ready(());
        }
        let deadline = self.deadline;
        match &self.watch {
            Some(watch) => watch.set_waker(cx.waker()),
            None if self.timer.is_none() => {
                self.watch = crate::deadlines::watch(deadline, cx.waker());
                if self.watch.is_none() {
                    self.timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
                }
            }
            None => {}
        }
        let passed = match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx).is_ready(),
            // Watched: the sweeper wakes this call once the deadline has passed.
            None => Instant::now() >= deadline,
        };
        if passed {
            let exceeded = self
                .opened
                .span
                .in_scope(|| deadline_exceeded(self.method, self.budget_ms));
            self.result = Some(Err(exceeded));
            self.give_back();
            return Poll::Ready(());
        }
        Poll::Pending
    }

    /// The call's outcome, observed (step 7). Once, after `poll_outcome` was ready.
    pub fn take(&mut self) -> Result<O, ApiError> {
        self.give_back();
        let result = self.result.take().unwrap_or_else(|| {
            Err(ApiError::new(
                ErrorCode::Internal,
                "a write's outcome was taken twice",
            ))
        });
        // The store span ends before the call's, as the async path's does.
        self.store = tracing::Span::none();
        self.shared
            .observe(&self.conn, self.method, &self.opened, &result);
        result
    }

    /// The connection the call came on.
    pub fn conn(&self) -> &Conn {
        &self.conn
    }

    fn give_back(&mut self) {
        if let Some(held) = self.admitted.take() {
            give_back(&self.shared, &self.conn, held);
        }
    }
}

impl<O> Drop for WaitingWrite<O> {
    fn drop(&mut self) {
        self.give_back();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_in_flight: usize) -> Config {
        let mut config = Config::local_ephemeral();
        config.limits.max_in_flight = max_in_flight;
        config.limits.max_in_flight_per_connection = 8;
        // Longer than any test: a queued call here is admitted or the test is wrong.
        config.limits.queue_timeout_ms = 600_000;
        config
    }

    /// A missed wake-up would leave a queued call waiting out its queue timeout.
    async fn within<T>(f: impl Future<Output = T>) -> T {
        tokio::time::timeout(Duration::from_secs(60), f)
            .await
            .expect("woken")
    }

    /// The global in-flight slots: one given back goes to a queued call, a reload that
    /// raises the maximum admits queued calls at once, one that lowers it holds new calls
    /// back until enough running ones end.
    #[tokio::test]
    async fn queued_calls_get_slots_given_back_or_added_by_a_reload() {
        let shared = Shared::new(&config(1), Arc::new(capkv_store::MemoryStore::new()));
        let conn = Conn::new(1, "127.0.0.1:1".parse().expect("an address"), &shared);
        let t = shared.tunables();
        let deadline = Instant::now() + Duration::from_secs(600);
        let reload = |max| Tunables::new(&config(max), Some(&shared.tunables()));

        let first = shared
            .admit(&conn, &t, deadline)
            .await
            .expect("a free slot");
        let second = shared.admit(&conn, &t, deadline);
        tokio::pin!(second);
        assert!(
            futures::poll!(second.as_mut()).is_pending(),
            "no slot: it queues"
        );
        drop(first);
        let second = within(second).await.expect("the slot the first gave back");
        assert_eq!(shared.in_flight(), 1);

        let third = shared.admit(&conn, &t, deadline);
        tokio::pin!(third);
        assert!(futures::poll!(third.as_mut()).is_pending());
        shared.set_tunables(reload(2));
        let third = within(third).await.expect("the slot the reload added");
        assert_eq!(shared.in_flight(), 2);

        shared.set_tunables(reload(1));
        let t = shared.tunables();
        drop(second);
        let fourth = shared.admit(&conn, &t, deadline);
        tokio::pin!(fourth);
        assert!(
            futures::poll!(fourth.as_mut()).is_pending(),
            "one running call is the lowered maximum"
        );
        drop(third);
        let fourth = within(fourth)
            .await
            .expect("a slot under the lowered maximum");
        assert_eq!(shared.in_flight(), 1);
        drop(fourth);
        assert_eq!((shared.in_flight(), conn.in_flight.get()), (0, 0));
        assert_eq!(shared.queued.load(Ordering::SeqCst), 0);
    }
}
