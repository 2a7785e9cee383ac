//! [`LocalClient`]: one connection, driven on the current thread's `LocalSet`.
//!
//! This is where the wire work happens: building requests, pipelining on promised
//! capabilities, decoding result unions, deadlines. It is `!Send` because capnp-rpc
//! objects are; [`Client`](crate::Client) wraps it in a connection thread for everyone
//! else. Programs that already run a `LocalSet` per thread (kv-loadgen) use it directly
//! and skip the thread hop.

use std::cell::{Cell, RefCell};
use std::future::Future;
use std::rc::Rc;

use capkv::kv_capnp::{admin, gateway, kv_store, lease, watcher, write_session};
use capkv::{ApiError, CallMeta, ErrorCode};
use capkv_rpc::client::{DirectCap, DirectReply};
use capnp_rpc::{rpc_twoparty_capnp, RpcSystem};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use tokio::time::Instant;

use crate::batch::GetBatcher;
use crate::wire::{
    call_words, capnp_err, deadline_exceeded, decode_result, decode_results, direct_result,
    get_one, origin_failure, read_entry, read_error, read_faults, read_text, too_many,
    wire_get_many, within, write_condition, CallSpec, SharedOutcome, GATEWAY_ID, GATEWAY_OPEN,
    KV_RESUME_SESSION, KV_SESSION, KV_STORE_ID, OPEN_KV_CAP, SESSION_CAP, SESSION_PUT,
    WRITE_SESSION_ID,
};
use crate::{
    BatchOutcome, ClientEngine, ClientOptions, Condition, DeleteOutcome, Entry, EventKind,
    FaultsInfo, Health, IncrementOutcome, KeyLease, LeaseGrant, LeaseStatus, PutOutcome,
    RevokeOutcome, ScanBounds, ScanOptions, ScanPage, VersionInfo, WatchEvent, WatchPage,
};

/// A capability on capkv's engine for direct calls: pipelined on the call that promised it
/// until that call returns, then the import it returned (`DirectCap::resolve`), which the
/// server reads on its fast path. Empty on capnp-rpc's `RpcSystem`.
type DirectSlot = Rc<RefCell<Option<Rc<DirectCap>>>>;

/// Puts into `slot` what its capability resolves to, once `reply` (of the call that
/// promised it) came.
fn resolve_into(slot: &DirectSlot, reply: &DirectReply) {
    let resolved = slot.borrow().as_ref().and_then(|d| d.resolve(reply));
    if let Some(r) = resolved {
        *slot.borrow_mut() = Some(Rc::new(r));
    }
}

/// The write session of a connection: the pipelined capability, how the call that made it
/// ended, and the token it resumed (if it was a `resumeSession`).
struct CachedSession {
    cap: write_session::Client,
    /// The same session on capkv's engine, for puts made directly.
    direct: DirectSlot,
    outcome: SharedOutcome,
    resumed: Option<Vec<u8>>,
}

/// One connection on the current `LocalSet`.
pub struct LocalClient {
    gateway: gateway::Client,
    /// Promised by the pipelined `open`; usable before `open` returns.
    kv: kv_store::Client,
    /// The same capability on capkv's engine, for gets made without capnp's hook objects
    /// (empty on capnp-rpc's `RpcSystem`, the reference engine).
    kv_direct: DirectSlot,
    /// How `open` ended; consulted when a call on `kv` fails, to report the real reason
    /// (e.g. `unauthenticated`) instead of "broken capability".
    opened: SharedOutcome,
    session: RefCell<Option<CachedSession>>,
    /// The session's token once the server has answered; what a reconnect resumes.
    session_token: Rc<RefCell<Option<Vec<u8>>>>,
    /// A token to resume instead of opening a new session (set after a reconnect).
    resume: RefCell<Option<Vec<u8>>>,
    /// False once the connection has ended; the owner then reconnects.
    alive: Rc<Cell<bool>>,
    /// Why the connection ended (set with `alive`).
    ended: Rc<RefCell<Option<ApiError>>>,
    /// Auto-batching of concurrent gets; `None` when off.
    batcher: Option<Rc<GetBatcher>>,
    /// The server-side watcher of each [`Watch`](crate::Watch) on this connection, by the
    /// watch's id. A new connection starts without: each watch makes its watcher again
    /// where it stopped.
    watchers: RefCell<std::collections::HashMap<u64, watcher::Client>>,
}

/// The shape of every Admin call: `Gateway.admin(token)` pipelined with the call, its
/// context, its parameters (`set`), the answer decoded from its result union, and a
/// refused `admin` explained as the reason (see `LocalClient::explain`).
macro_rules! admin_call {
    ($self:ident, $token:expr, $deadline:expr, $request:ident,
     |$req:ident| $set:expr,
     $result:ident, $arm:ident($v:pat) => $ok:expr) => {
        $self
            .run($deadline, |meta| async move {
                let (admin, outcome) = $self.admin_cap($token, &meta);
                let mut $req = admin.$request();
                meta.write($req.get().init_ctx());
                let () = $set;
                let r = async { decode_result!($req.send().promise, $result, $arm($v) => $ok) }
                    .await;
                $self.explain(r, &outcome).await
            })
            .await
    };
}

/// What starting a connection's RPC runtime needs, for either stream (TCP or TLS).
struct Started {
    engine: ClientEngine,
    reader_options: capnp::message::ReaderOptions,
    /// Cleared when the connection ends.
    alive: Rc<Cell<bool>>,
    /// Why it ended, when with an error.
    ended: Rc<RefCell<Option<ApiError>>>,
}

impl Started {
    /// Starts the runtime over `stream` on the current `LocalSet`; returns the bootstrap,
    /// and on capkv's engine the same capability for direct calls.
    fn run<S>(self, stream: S) -> (gateway::Client, Option<DirectCap>)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
    {
        let Started {
            engine,
            reader_options,
            alive,
            ended,
        } = self;
        let (gateway, direct, connection): (gateway::Client, _, LocalBoxFuture<'static, _>) =
            match engine {
                ClientEngine::Capkv => {
                    let limits = capkv_rpc::client::ClientLimits {
                        reader_options,
                        ..Default::default()
                    };
                    let (bootstrap, driver) = capkv_rpc::client::connect_direct(stream, limits);
                    (
                        capnp::capability::FromClientHook::new(bootstrap.hook()),
                        Some(bootstrap),
                        driver.boxed_local(),
                    )
                }
                ClientEngine::CapnpRpc => {
                    let side = rpc_twoparty_capnp::Side::Client;
                    let network =
                        capkv_rpc::transport::vat_network_over(stream, side, reader_options);
                    let mut rpc = RpcSystem::new(Box::new(network), None);
                    (
                        rpc.bootstrap(rpc_twoparty_capnp::Side::Server),
                        None,
                        rpc.boxed_local(),
                    )
                }
            };
        tokio::task::spawn_local(async move {
            // Calls on a dead connection fail with `disconnected`, reported as
            // `unavailable`; the reason is only worth a debug line, and is kept for calls
            // that find no connection.
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended");
                *ended.borrow_mut() = Some(ApiError::from_capnp(&e));
            }
            alive.set(false);
        });
        (gateway, direct)
    }
}

impl LocalClient {
    /// Connects to `addr` and sends `open(token)` without waiting for it. Must be called
    /// inside a `LocalSet`: the connection's `RpcSystem` is spawned on it.
    /// `addr` may name several gateways, comma-separated: the first that answers is used.
    pub async fn connect(addr: &str, options: &ClientOptions) -> Result<LocalClient, ApiError> {
        Ok(Self::connect_from(addr, 0, options).await?.0)
    }

    /// [`connect`](Self::connect), trying `addr`'s addresses from the one at `start`
    /// (wrapping); also says which one it reached.
    pub async fn connect_from(
        addr: &str,
        start: usize,
        options: &ClientOptions,
    ) -> Result<(LocalClient, usize), ApiError> {
        let (stream, at) = crate::tcp_connect_from(addr, start, options).await?;
        Ok((Self::over(stream, options).await?, at))
    }

    /// Starts the RPC system over an open stream (inside a `LocalSet`), after the TLS
    /// handshake when the options ask for TLS.
    pub async fn over(
        stream: tokio::net::TcpStream,
        options: &ClientOptions,
    ) -> Result<LocalClient, ApiError> {
        let reader_options = capkv::response_reader_options(&options.limits);
        let alive = Rc::new(Cell::new(true));
        let ended = Rc::new(RefCell::new(None));
        let started = Started {
            engine: options.rpc_engine,
            reader_options,
            alive: Rc::clone(&alive),
            ended: Rc::clone(&ended),
        };
        let (gateway, bootstrap) =
            match &options.tls {
                None => started.run(stream),
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(tls.server_name.clone())
                        .map_err(|e| {
                            ApiError::new(
                                ErrorCode::InvalidArgument,
                                format!("TLS server name {}: {e}", tls.server_name),
                            )
                        })?;
                    let connector =
                        tokio_rustls::TlsConnector::from(std::sync::Arc::clone(&tls.config));
                    let stream = tokio::time::timeout(
                        options.connect_timeout,
                        connector.connect(name, stream),
                    )
                    .await
                    .map_err(|_| ApiError::new(ErrorCode::Unavailable, "TLS handshake timed out"))?
                    .map_err(|e| {
                        ApiError::new(ErrorCode::Unavailable, format!("TLS handshake failed: {e}"))
                    })?;
                    started.run(stream)
                }
            };
        let (kv, kv_direct, opened) = match bootstrap {
            // capkv's engine: `open` made directly, so that `kv` is a capability gets can
            // be called on directly too (pipelined on the same question).
            Some(bootstrap) => {
                let token = options.token.as_str();
                let open = bootstrap.call(GATEWAY_ID, GATEWAY_OPEN, call_words(token.len()), |p| {
                    let mut p = p.init_as::<gateway::open_params::Builder>();
                    CallMeta::default().write(p.reborrow().init_ctx());
                    p.set_token(token);
                    Ok(())
                });
                let kv_direct = open.pipelined(&OPEN_KV_CAP);
                let kv: kv_store::Client = capnp::capability::FromClientHook::new(kv_direct.hook());
                let slot: DirectSlot = Rc::new(RefCell::new(Some(Rc::new(kv_direct))));
                let resolving = Rc::clone(&slot);
                let opened = async move {
                    let reply = open.await.map_err(capnp_err)?;
                    let r = decode_results!(
                        reply
                            .results()
                            .and_then(|c| c.get_as::<gateway::open_results::Reader>()),
                        open_result,
                        Kv(_) => Ok(())
                    );
                    resolve_into(&resolving, &reply);
                    r
                }
                .boxed_local()
                .shared();
                // Resolve as soon as `open` returns, not when a call first fails.
                tokio::task::spawn_local(opened.clone().map(|_| ()));
                (kv, slot, opened)
            }
            None => {
                let mut req = gateway.open_request();
                CallMeta::default().write(req.get().init_ctx());
                req.get().set_token(options.token.as_str());
                let sent = req.send();
                let kv = sent.pipeline.get_result().get_kv_cap();
                let resp = sent.promise;
                let opened = async move { decode_result!(resp, open_result, Kv(_) => Ok(())) }
                    .boxed_local()
                    .shared();
                (kv, DirectSlot::default(), opened)
            }
        };
        Ok(LocalClient {
            gateway,
            kv,
            kv_direct,
            opened,
            session: RefCell::new(None),
            session_token: Rc::default(),
            resume: RefCell::new(None),
            alive,
            ended,
            batcher: GetBatcher::new(options),
            watchers: RefCell::default(),
        })
    }

    /// The write session's token, once the server has issued it.
    pub fn session_token(&self) -> Option<Vec<u8>> {
        self.session_token.borrow().clone()
    }

    /// Makes this connection's writes continue the session `token` names (idempotency keys
    /// of that session keep their meaning), instead of starting a new one.
    pub fn resume_with(&self, token: Vec<u8>) {
        *self.resume.borrow_mut() = Some(token);
    }

    /// What auto-batching has done on this connection; `None` when it is off.
    pub fn batch_stats(&self) -> Option<crate::batch::BatchStats> {
        self.batcher.as_ref().map(|b| b.stats())
    }

    /// Whether the connection is still up (a new call on a dead one fails at once).
    pub fn is_alive(&self) -> bool {
        self.alive.get()
    }

    /// Stops taking calls on this connection (calls already on it finish): the client's
    /// connection thread connects again, to the next of several gateways, at the next call.
    pub fn retire(&self) {
        self.alive.set(false);
    }

    /// Why the connection ended, when it ended with an error.
    pub fn end_reason(&self) -> Option<ApiError> {
        self.ended.borrow().clone()
    }

    /// Runs one call: builds its `RequestContext` from the deadline and gives up at the
    /// deadline, dropping (and so cancelling) the request.
    async fn run<T, F, Fut>(&self, spec: impl Into<CallSpec>, f: F) -> Result<T, ApiError>
    where
        F: FnOnce(CallMeta) -> Fut,
        Fut: Future<Output = Result<T, ApiError>>,
    {
        within(spec, f).await
    }

    pub async fn health(&self, deadline: impl Into<CallSpec>) -> Result<Health, ApiError> {
        self.run(deadline, |meta| async move {
            let mut req = self.gateway.health_request();
            meta.write(req.get().init_ctx());
            decode_result!(req.send().promise, health_result, Ok(ok) => Ok(Health {
                live: ok.get_live(),
                ready: ok.get_ready(),
                status: read_text(ok.get_status()),
            }))
        })
        .await
    }

    pub async fn version(&self, deadline: impl Into<CallSpec>) -> Result<VersionInfo, ApiError> {
        self.run(deadline, |meta| async move {
            let mut req = self.gateway.version_request();
            meta.write(req.get().init_ctx());
            decode_result!(req.send().promise, version_result, Ok(ok) => Ok(VersionInfo {
                service: read_text(ok.get_service()),
                api_version: ok.get_api_version(),
            }))
        })
        .await
    }

    /// The entry under `key`, or `None` if it does not exist.
    ///
    /// With auto-batching on ([`ClientOptions::auto_batch_keys`]), a first attempt without
    /// a trace context joins the gets issued on this connection in the same scheduler tick
    /// and leaves with them as one `getMany` (see [`crate::batch`]).
    pub async fn get(
        &self,
        key: &[u8],
        deadline: impl Into<CallSpec>,
    ) -> Result<Option<Entry>, ApiError> {
        let spec = deadline.into();
        if let Some(batcher) = &self.batcher {
            // Retries and traced calls go alone: their attempt number and span must be
            // their own on the wire.
            if spec.attempt <= 1 && spec.traceparent.is_none() {
                if spec.deadline <= Instant::now() {
                    return Err(deadline_exceeded());
                }
                let direct = self.kv_direct.borrow().clone();
                let reply = batcher.enqueue(
                    key.to_vec(),
                    spec.deadline,
                    &self.kv,
                    direct.as_ref(),
                    &self.opened,
                );
                // No timer here: the batch keeps this get's deadline (see crate::batch).
                return match reply.await {
                    Ok(r) => r,
                    Err(futures::channel::oneshot::Canceled) => Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "the batched get was abandoned (connection shutting down)",
                    )),
                };
            }
        }
        let direct = self.kv_direct.borrow().clone();
        self.run(spec, |meta| {
            get_one(&self.kv, direct.as_deref(), &self.opened, key, meta)
        })
        .await
    }

    /// Several keys in one call; `None` for each missing key, in `keys` order.
    pub async fn get_many(
        &self,
        keys: &[Vec<u8>],
        deadline: impl Into<CallSpec>,
    ) -> Result<Vec<Option<Entry>>, ApiError> {
        self.run(deadline, |meta| async move {
            let direct = self.kv_direct.borrow().clone();
            let r = wire_get_many(&self.kv, direct.as_deref(), keys, &meta).await;
            self.explain(r, &self.opened).await
        })
        .await
    }

    pub async fn scan(
        &self,
        opts: &ScanOptions,
        deadline: impl Into<CallSpec>,
    ) -> Result<ScanPage, ApiError> {
        self.run(deadline, |meta| async move {
            let mut req = self.kv.scan_request();
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
            self.explain(r, &self.opened).await
        })
        .await
    }

    /// The next page of watch `id` over `bounds`: on this connection's watcher of it, or
    /// on a new one from revision `from` (0: from the next write) pipelined with the call,
    /// one round trip. Any failure forgets the watcher (the server may have moved it past
    /// a page this side never got): the next call makes a new one from `from`.
    pub async fn watch_next(
        &self,
        id: u64,
        bounds: &ScanBounds,
        from: u64,
        page: (u32, u32),
        deadline: impl Into<CallSpec>,
    ) -> Result<WatchPage, ApiError> {
        let start = crate::WatchStart {
            from,
            started: std::sync::Arc::default(),
        };
        self.watch_next_from(id, bounds, start, page, deadline)
            .await
    }

    /// [`watch_next`](Self::watch_next) from `start` (see [`crate::WatchStart`]).
    pub(crate) async fn watch_next_from(
        &self,
        id: u64,
        bounds: &ScanBounds,
        start: crate::WatchStart,
        (max_events, wait_ms): (u32, u32),
        deadline: impl Into<CallSpec>,
    ) -> Result<WatchPage, ApiError> {
        let r = self
            .run(deadline, |meta| async move {
                let w = self.watcher(id, bounds, start, &meta);
                let mut req = w.next_request();
                meta.write(req.get().init_ctx());
                req.get().set_max_events(max_events);
                req.get().set_wait_ms(wait_ms);
                let resp = req.send().promise.await.map_err(capnp_err)?;
                let result = resp.get().and_then(|r| r.get_result()).map_err(capnp_err)?;
                use capkv::kv_capnp::watch_events::Which;
                match result.which() {
                    Ok(Which::Ok(ok)) => {
                        let list = ok.get_events().map_err(capnp_err)?;
                        let events = list
                            .iter()
                            .map(|e| {
                                Ok(WatchEvent {
                                    kind: match e.get_kind() {
                                        Ok(capkv::kv_capnp::EventKind::Put) => EventKind::Put,
                                        Ok(capkv::kv_capnp::EventKind::Delete) => EventKind::Delete,
                                        Err(capnp::NotInSchema(n)) => {
                                            return Err(ApiError::new(
                                                ErrorCode::Internal,
                                                format!("unknown event kind {n}"),
                                            ))
                                        }
                                    },
                                    entry: read_entry(e.get_entry().map_err(capnp_err)?)?,
                                })
                            })
                            .collect::<Result<_, _>>()?;
                        Ok(WatchPage {
                            events,
                            revision: ok.get_revision(),
                        })
                    }
                    Ok(Which::Error(e)) => Err(ApiError {
                        oldest_revision: result.get_oldest_revision(),
                        ..read_error(e)
                    }),
                    Err(e) => Err(capnp_err(e.into())),
                }
            })
            .await;
        if r.is_err() {
            self.forget_watcher(id);
        }
        r
    }

    /// This connection's watcher of watch `id`, made (pipelined) when there is none.
    fn watcher(
        &self,
        id: u64,
        bounds: &ScanBounds,
        start: crate::WatchStart,
        meta: &CallMeta,
    ) -> watcher::Client {
        if let Some(w) = self.watchers.borrow().get(&id) {
            return w.clone();
        }
        let mut req = self.kv.watch_request();
        meta.write(req.get().init_ctx());
        match bounds {
            ScanBounds::Range { start, end } => {
                let mut g = req.get().init_range().init_range();
                g.set_start(start);
                g.set_end(end);
            }
            ScanBounds::Prefix(p) => req.get().init_range().set_prefix(p),
        }
        let from = start.revision();
        req.get().set_start_revision(from);
        // A failed watch fails the pipelined `next` on its stand-in with the same error.
        let sent = req.send();
        let w = sent.pipeline.get_result().get_watcher_cap();
        if from == 0 {
            // From the next write: the answer says where that is (the server's revision
            // then), kept for a retry should the first page be lost.
            let started = start.started;
            tokio::task::spawn_local(async move {
                use capkv::kv_capnp::watch_result::Which;
                let Ok(resp) = sent.promise.await else {
                    return;
                };
                // A refused watch (overloaded, compacted...) says no revision.
                let head = resp
                    .get()
                    .and_then(|r| r.get_result())
                    .ok()
                    .filter(|r| matches!(r.which(), Ok(Which::Watcher(_))))
                    .map(|r| r.get_revision());
                if let Some(head) = head {
                    let _ = started.compare_exchange(
                        0,
                        head.saturating_add(1),
                        std::sync::atomic::Ordering::AcqRel,
                        std::sync::atomic::Ordering::Acquire,
                    );
                }
            });
        }
        self.watchers.borrow_mut().insert(id, w.clone());
        w
    }

    /// Drops this connection's watcher of watch `id` (the server's is released).
    pub fn forget_watcher(&self, id: u64) {
        self.watchers.borrow_mut().remove(&id);
    }

    pub async fn put(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        deadline: impl Into<CallSpec>,
    ) -> Result<PutOutcome, ApiError> {
        self.put_with_lease(key, value, cond, KeyLease::None, deadline)
            .await
    }

    /// A put whose key lives by `lease`.
    pub async fn put_with_lease(
        &self,
        key: &[u8],
        value: &[u8],
        cond: Condition,
        lease: KeyLease,
        deadline: impl Into<CallSpec>,
    ) -> Result<PutOutcome, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let fill = |mut p: write_session::put_params::Builder<'_>| {
                meta.write(p.reborrow().init_ctx());
                if let Some(k) = &spec.idempotency_key {
                    p.set_idempotency_key(k);
                }
                p.set_key(key);
                p.set_value(value);
                write_condition(p.reborrow().init_condition(), cond);
                match lease {
                    KeyLease::None => {}
                    KeyLease::Lease(id) => p.set_lease(id),
                    KeyLease::Ttl(ttl) => {
                        p.set_ttl_ms(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
                    }
                }
            };
            let outcome_of = |ok: capkv::kv_capnp::put_result::ok::Reader<'_>| PutOutcome {
                version: ok.get_version(),
                revision: ok.get_revision(),
                lease: ok.get_lease(),
            };
            let r = match self.direct_session(&outcome) {
                // capkv's engine: the put without capnp's hook objects.
                Some(direct) => {
                    async {
                        let words = call_words(key.len() + value.len());
                        direct_result!(direct, WRITE_SESSION_ID, SESSION_PUT, words,
                            write_session::put_params::Builder => fill,
                            write_session::put_results::Reader, put_result,
                            Ok(ok) => Ok(outcome_of(ok)))
                    }
                    .await
                }
                None => {
                    let mut req = session.put_request();
                    fill(req.get());
                    async {
                        decode_result!(req.send().promise, put_result, Ok(ok) => Ok(outcome_of(ok)))
                    }
                    .await
                }
            };
            self.explain(r, &outcome).await
        })
        .await
    }

    /// A lease of `ttl_ms`, through the write session (keyed like a write).
    pub async fn grant_lease(
        &self,
        ttl_ms: u64,
        deadline: impl Into<CallSpec>,
    ) -> Result<LeaseGrant, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let mut req = session.grant_lease_request();
            meta.write(req.get().init_ctx());
            if let Some(k) = &spec.idempotency_key {
                req.get().set_idempotency_key(k);
            }
            req.get().set_ttl_ms(ttl_ms);
            let r = async {
                let resp = req.send().promise.await.map_err(capnp_err)?;
                let result = resp.get().and_then(|r| r.get_result()).map_err(capnp_err)?;
                use capkv::kv_capnp::lease_result::Which;
                match result.which() {
                    Ok(Which::Lease(_)) => Ok(LeaseGrant {
                        id: result.get_id(),
                        ttl_ms: result.get_ttl_ms(),
                    }),
                    Ok(Which::Error(e)) => Err(read_error(e)),
                    Err(e) => Err(capnp_err(e.into())),
                }
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    /// The capability of lease `id`, pipelined on the write session (no round trip).
    fn lease_cap(&self, id: u64, meta: &CallMeta) -> (lease::Client, SharedOutcome) {
        let (session, outcome) = self.session(meta);
        let mut req = session.lease_request();
        meta.write(req.get().init_ctx());
        req.get().set_id(id);
        (req.send().pipeline.get_result().get_lease_cap(), outcome)
    }

    /// Lease `id` now, renewed first when `renew` (a keep-alive): one round trip.
    pub async fn lease_status(
        &self,
        id: u64,
        renew: bool,
        deadline: impl Into<CallSpec>,
    ) -> Result<LeaseStatus, ApiError> {
        self.run(deadline, |meta| async move {
            let (lease, outcome) = self.lease_cap(id, &meta);
            macro_rules! status {
                ($req:ident) => {{
                    meta.write($req.get().init_ctx());
                    decode_result!($req.send().promise, lease_info_result, Ok(ok) => Ok(LeaseStatus {
                        id: ok.get_id(),
                        ttl_ms: ok.get_ttl_ms(),
                        remaining_ms: ok.get_remaining_ms(),
                        keys: ok.get_keys(),
                    }))
                }};
            }
            let r = async {
                if renew {
                    let mut req = lease.keep_alive_request();
                    status!(req)
                } else {
                    let mut req = lease.time_to_live_request();
                    status!(req)
                }
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    /// Revokes lease `id` (keyed like a write): one round trip.
    pub async fn revoke_lease(
        &self,
        id: u64,
        deadline: impl Into<CallSpec>,
    ) -> Result<RevokeOutcome, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let mut req = session.lease_request();
            meta.write(req.get().init_ctx());
            req.get().set_id(id);
            let lease = req.send().pipeline.get_result().get_lease_cap();
            let mut req = lease.revoke_request();
            meta.write(req.get().init_ctx());
            if let Some(k) = &spec.idempotency_key {
                req.get().set_idempotency_key(k);
            }
            let r = async {
                decode_result!(req.send().promise, revoke_result, Ok(ok) => Ok(RevokeOutcome {
                    deleted: ok.get_deleted(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    /// Several puts applied atomically (all or none), as one write.
    pub async fn put_many(
        &self,
        items: &[(Vec<u8>, Vec<u8>, Condition)],
        deadline: impl Into<CallSpec>,
    ) -> Result<BatchOutcome, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let mut req = session.put_many_request();
            meta.write(req.get().init_ctx());
            if let Some(k) = &spec.idempotency_key {
                req.get().set_idempotency_key(k);
            }
            let n = u32::try_from(items.len()).map_err(|_| too_many(items.len()))?;
            let mut list = req.get().init_items(n);
            for (i, (k, v, c)) in items.iter().enumerate() {
                let mut b = list.reborrow().get(i as u32);
                b.set_key(k);
                b.set_value(v);
                write_condition(b.init_condition(), *c);
            }
            let r = async {
                decode_result!(req.send().promise, put_many_result, Ok(ok) => Ok(BatchOutcome {
                    versions: ok.get_versions().map_err(capnp_err)?.iter().collect(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    pub async fn delete(
        &self,
        key: &[u8],
        cond: Condition,
        deadline: impl Into<CallSpec>,
    ) -> Result<DeleteOutcome, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let mut req = session.delete_request();
            meta.write(req.get().init_ctx());
            if let Some(k) = &spec.idempotency_key {
                req.get().set_idempotency_key(k);
            }
            req.get().set_key(key);
            write_condition(req.get().init_condition(), cond);
            let r = async {
                decode_result!(req.send().promise, delete_result, Ok(ok) => Ok(DeleteOutcome {
                    existed: ok.get_existed(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    /// Adds `delta` to the integer under `key` (absent = 0), like Redis INCRBY.
    pub async fn increment(
        &self,
        key: &[u8],
        delta: i64,
        deadline: impl Into<CallSpec>,
    ) -> Result<IncrementOutcome, ApiError> {
        let spec = deadline.into();
        self.run(spec, |mut meta| async move {
            let (session, outcome) = self.write_session(&mut meta, &spec).await?;
            let mut req = session.increment_request();
            meta.write(req.get().init_ctx());
            req.get().set_key(key);
            req.get().set_delta(delta);
            if let Some(k) = &spec.idempotency_key {
                req.get().set_idempotency_key(k);
            }
            let r = async {
                decode_result!(req.send().promise, increment_result, Ok(ok) => Ok(IncrementOutcome {
                    value: ok.get_value(),
                    version: ok.get_version(),
                    revision: ok.get_revision(),
                }))
            }
            .await;
            self.explain(r, &outcome).await
        })
        .await
    }

    /// `Gateway.admin(token)`, pipelined: the Admin call that follows goes out with it.
    fn admin_cap(&self, token: &str, meta: &CallMeta) -> (admin::Client, SharedOutcome) {
        let mut req = self.gateway.admin_request();
        meta.write(req.get().init_ctx());
        req.get().set_admin_token(token);
        let sent = req.send();
        let cap = sent.pipeline.get_result().get_admin_cap();
        let resp = sent.promise;
        let outcome: SharedOutcome =
            async move { decode_result!(resp, admin_result, Admin(_) => Ok(())) }
                .boxed_local()
                .shared();
        (cap, outcome)
    }

    /// Arms a fault plan (text form, see `Admin.setFaults`); an empty plan clears.
    pub async fn set_faults(
        &self,
        admin_token: &str,
        plan: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<FaultsInfo, ApiError> {
        admin_call!(self, admin_token, deadline, set_faults_request,
            |req| req.get().set_plan(plan),
            faults_result, Ok(ok) => Ok(read_faults(ok)))
    }

    pub async fn show_faults(
        &self,
        admin_token: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<FaultsInfo, ApiError> {
        admin_call!(self, admin_token, deadline, show_faults_request,
            |req| (),
            faults_result, Ok(ok) => Ok(read_faults(ok)))
    }

    pub async fn clear_faults(
        &self,
        admin_token: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<FaultsInfo, ApiError> {
        admin_call!(self, admin_token, deadline, clear_faults_request,
            |req| (),
            faults_result, Ok(ok) => Ok(read_faults(ok)))
    }

    /// Compacts the server's storage now.
    pub async fn compact(
        &self,
        admin_token: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<(), ApiError> {
        admin_call!(self, admin_token, deadline, compact_request,
            |req| (),
            admin_ack, Ok(()) => Ok(()))
    }

    /// Makes the server write a checkpoint of its store into `dir` (on its machine).
    pub async fn checkpoint(
        &self,
        admin_token: &str,
        dir: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<(), ApiError> {
        admin_call!(self, admin_token, deadline, checkpoint_request,
            |req| req.get().set_dir(dir),
            admin_ack, Ok(()) => Ok(()))
    }

    /// Makes the server read its configuration again; returns what changed.
    pub async fn reload_config(
        &self,
        admin_token: &str,
        deadline: impl Into<CallSpec>,
    ) -> Result<String, ApiError> {
        admin_call!(self, admin_token, deadline, reload_config_request,
            |req| (),
            reload_result, Ok(t) => Ok(read_text(t)))
    }

    /// The session for a write. A keyed write waits until the session's token is known
    /// (one extra round trip, on a connection's first write only): its retries may then
    /// resume this very session after a reconnect, where its key keeps its meaning.
    /// After that wait the write's budget (`meta`) is what is left of its deadline, not
    /// what was left before it (the server would have worked on past the time the caller
    /// gave up).
    async fn write_session(
        &self,
        meta: &mut CallMeta,
        spec: &CallSpec,
    ) -> Result<(write_session::Client, SharedOutcome), ApiError> {
        let (session, outcome) = self.session(meta);
        if spec.idempotency_key.is_some() && self.session_token.borrow().is_none() {
            if let Err(e) = outcome.clone().await {
                self.forget_session(&outcome, &e);
                return Err(e);
            }
            meta.budget_ms = Some(crate::wire::budget_ms(spec)?);
        }
        Ok((session, outcome))
    }

    /// The write session, created on first use by a call pipelined on the promised
    /// `KvStore`, so even the first write of a connection costs one round trip.
    fn session(&self, meta: &CallMeta) -> (write_session::Client, SharedOutcome) {
        if let Some(c) = &*self.session.borrow() {
            return (c.cap.clone(), c.outcome.clone());
        }
        // `session` and `resumeSession` answer with the same SessionResult struct.
        fn token_of(
            result: capnp::Result<capkv::kv_capnp::session_result::Reader<'_>>,
        ) -> Result<Vec<u8>, ApiError> {
            let result = result.map_err(capnp_err)?;
            use capkv::kv_capnp::session_result::Which;
            match result.which() {
                Ok(Which::Session(_)) => Ok(result.get_token().map_err(capnp_err)?.to_vec()),
                Ok(Which::Error(e)) => Err(read_error(e)),
                Err(e) => Err(capnp_err(e.into())),
            }
        }
        macro_rules! session_token {
            ($resp:expr) => {
                async move {
                    let resp = $resp.await.map_err(capnp_err)?;
                    token_of(resp.get().and_then(|r| r.get_result()))
                }
                .boxed_local()
            };
        }
        let resumed = self.resume.borrow_mut().take();
        type Token = LocalBoxFuture<'static, Result<Vec<u8>, ApiError>>;
        let (token, session, direct): (Token, write_session::Client, _) =
            match (self.kv_direct.borrow().clone(), &resumed) {
                // capkv's engine: made directly, so that puts can be too.
                (Some(kv), resumed) => {
                    let words = call_words(resumed.as_ref().map_or(0, Vec::len));
                    let method = if resumed.is_some() {
                        KV_RESUME_SESSION
                    } else {
                        KV_SESSION
                    };
                    let call = kv.call(KV_STORE_ID, method, words, |p| {
                        match resumed {
                            Some(token) => {
                                let mut p = p.init_as::<kv_store::resume_session_params::Builder>();
                                meta.write(p.reborrow().init_ctx());
                                p.set_token(token);
                            }
                            None => {
                                let p = p.init_as::<kv_store::session_params::Builder>();
                                meta.write(p.init_ctx());
                            }
                        }
                        Ok(())
                    });
                    let direct = call.pipelined(&SESSION_CAP);
                    let session = capnp::capability::FromClientHook::new(direct.hook());
                    let slot: DirectSlot = Rc::new(RefCell::new(Some(Rc::new(direct))));
                    let resolving = Rc::clone(&slot);
                    let resuming = resumed.is_some();
                    let token = async move {
                        let reply = call.await.map_err(capnp_err)?;
                        let results = reply.results();
                        let token = if resuming {
                            token_of(results.and_then(|c| {
                                c.get_as::<kv_store::resume_session_results::Reader>()?
                                    .get_result()
                            }))
                        } else {
                            token_of(results.and_then(|c| {
                                c.get_as::<kv_store::session_results::Reader>()?
                                    .get_result()
                            }))
                        };
                        resolve_into(&resolving, &reply);
                        token
                    }
                    .boxed_local();
                    (token, session, slot)
                }
                (None, Some(token)) => {
                    let mut req = self.kv.resume_session_request();
                    meta.write(req.get().init_ctx());
                    req.get().set_token(token);
                    let sent = req.send();
                    let session = sent.pipeline.get_result().get_session_cap();
                    (session_token!(sent.promise), session, DirectSlot::default())
                }
                (None, None) => {
                    let mut req = self.kv.session_request();
                    meta.write(req.get().init_ctx());
                    let sent = req.send();
                    let session = sent.pipeline.get_result().get_session_cap();
                    (session_token!(sent.promise), session, DirectSlot::default())
                }
            };
        let opened = self.opened.clone();
        let token_cell = Rc::clone(&self.session_token);
        let outcome: SharedOutcome = async move {
            opened.await?;
            *token_cell.borrow_mut() = Some(token.await?);
            Ok(())
        }
        .boxed_local()
        .shared();
        // Learn the token as soon as it arrives, not only when a write fails.
        tokio::task::spawn_local(outcome.clone().map(|_| ()));
        *self.session.borrow_mut() = Some(CachedSession {
            cap: session.clone(),
            direct,
            outcome: outcome.clone(),
            resumed,
        });
        (session, outcome)
    }

    /// The direct handle of the session `outcome` belongs to, while it is the cached one
    /// (a session forgotten meanwhile is reached through its hook only).
    fn direct_session(&self, outcome: &SharedOutcome) -> Option<Rc<DirectCap>> {
        let cached = self.session.borrow();
        let c = cached.as_ref().filter(|c| c.outcome.ptr_eq(outcome))?;
        let direct = c.direct.borrow().clone();
        direct
    }

    /// A call on a pipelined capability whose origin (the call that promised it) failed is
    /// answered by the server's stand-in with the origin's error; report the origin's error
    /// itself, and do not reuse a session that never existed.
    async fn explain<T>(
        &self,
        r: Result<T, ApiError>,
        origin: &SharedOutcome,
    ) -> Result<T, ApiError> {
        let Err(e) = r else { return r };
        match origin_failure(origin).await {
            Some(origin_err) => {
                self.forget_session(origin, &origin_err);
                Err(origin_err)
            }
            None => Err(e),
        }
    }

    /// Drops the cached session if `failed` is the outcome of the call that made it (not
    /// an `open`, an `admin` or an older session's), so that the next write asks again. A
    /// `resumeSession` refused for a passing reason (overloaded, unavailable) is asked
    /// again with the same token: starting a fresh session instead would end the meaning
    /// of the idempotency keys of writes being retried.
    fn forget_session(&self, failed: &SharedOutcome, why: &ApiError) {
        let mut cached = self.session.borrow_mut();
        if !cached.as_ref().is_some_and(|c| c.outcome.ptr_eq(failed)) {
            return;
        }
        let Some(cached) = cached.take() else { return };
        if let Some(token) = cached.resumed {
            if capkv::is_retryable(why.code) && self.session_token.borrow().is_none() {
                *self.resume.borrow_mut() = Some(token);
            }
        }
    }

    /// The session a new connection should resume to continue this one's: the token the
    /// server issued, else one this connection was still resuming (its `resumeSession` had
    /// not answered, or was refused for a passing reason).
    pub fn token_to_resume(&self) -> Option<Vec<u8>> {
        if let Some(t) = self.session_token.borrow().clone() {
            return Some(t);
        }
        if let Some(t) = self
            .session
            .borrow()
            .as_ref()
            .and_then(|c| c.resumed.clone())
        {
            return Some(t);
        }
        self.resume.borrow().clone()
    }
}
