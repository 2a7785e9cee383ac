//! The RPC handlers: `Gateway`, `KvStore` and `WriteSession`.
//!
//! Each handler reads its parameters, hands its work to the call chain
//! ([`Shared::serve`](crate::chain::Shared::serve)), and writes the success or error arm of
//! its result union. A handler that returns a capability also puts it outside the union
//! (`kvCap`, `adminCap`, `sessionCap`), or a [`Refused`] stand-in when the call failed.
//! Nothing cross-cutting happens here. Handlers return `Err` to capnp-rpc only when the
//! reply itself cannot be built; every expected failure is an `Error` in the result.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{admin, entry, gateway, kv_store, write_session};
use capkv::{ApiError, ErrorCode, API_VERSION};
use capkv_store::{Entry, IdempotencyKey, Store, StoreError, WriteOp, WriteOutcome};

use crate::chain::{CapSlot, Conn, NotReady, Shared};
use crate::method::Method;
use crate::refused::Refused;
use crate::reply::count_reply;
use crate::tunables::{AdminAccess, Tunables};
use crate::validate;

/// Runs a blocking store operation (compaction, checkpoint) on tokio's blocking pool, so
/// the worker keeps serving its connections meanwhile.
async fn off_worker<T: Send + 'static>(
    store: &Arc<dyn Store>,
    what: &'static str,
    op: impl FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || op(store.as_ref()))
        .await
        .map_err(|e| {
            tracing::error!(error = %e, task = what, "storage task failed");
            ApiError::new(ErrorCode::Internal, format!("{what} task failed"))
        })?
        .map_err(store_error)
}

/// Advice to a client whose write was refused for space: freeing it takes an operator.
const STORAGE_FULL_RETRY_AFTER_MS: u32 = 5_000;

/// Converts an engine failure into a contract error. Details go to the log here, where the
/// error is handled, and only here (the engine passes them up; the chain's per-call line
/// is at debug); the client gets a message without internals.
fn store_error(e: StoreError) -> ApiError {
    match e {
        StoreError::ConditionFailed {
            index,
            current_version,
        } => ApiError::new(
            ErrorCode::ConditionFailed,
            match current_version {
                Some(v) => format!("condition failed at item {index}: current version is {v}"),
                None => format!("condition failed at item {index}: key does not exist"),
            },
        ),
        StoreError::IdempotencyKeyReused => ApiError::new(
            ErrorCode::IdempotencyKeyReused,
            "idempotency key already used in this session for a different write",
        ),
        StoreError::NotAnInteger => ApiError::new(
            ErrorCode::NotAnInteger,
            "value is not a decimal 64-bit integer, or the result would overflow",
        ),
        StoreError::Invalid(detail) => ApiError::new(ErrorCode::InvalidArgument, detail),
        StoreError::Busy(detail) => {
            tracing::warn!(error = %detail, "store busy");
            ApiError::new(ErrorCode::Overloaded, "storage write queue is full")
                .with_retry_after_ms(20)
        }
        StoreError::StorageFull(detail) => {
            tracing::warn!(error = %detail, "write refused: storage full");
            ApiError::new(
                ErrorCode::StorageFull,
                "the server's disk is full: writes are refused until space is freed",
            )
            .with_retry_after_ms(STORAGE_FULL_RETRY_AFTER_MS)
        }
        StoreError::Unavailable(detail) => {
            tracing::warn!(error = %detail, "store unavailable");
            ApiError::new(ErrorCode::Unavailable, "storage is unavailable").with_retry_after_ms(100)
        }
        StoreError::Internal(detail) => {
            tracing::error!(error = %detail, "store failure");
            ApiError::new(ErrorCode::Internal, "internal storage error")
        }
    }
}

fn write_entry(mut b: entry::Builder<'_>, e: &Entry) {
    b.set_key(&e.key);
    b.set_value(&e.value);
    b.set_version(e.version);
    b.set_mod_revision(e.mod_revision);
}

/// The bootstrap capability; one per connection, so that everything reached through it
/// shares the connection's admission state.
pub struct GatewayImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
}

impl GatewayImpl {
    pub fn new(shared: Arc<Shared>, conn: Rc<Conn>) -> Self {
        Self { shared, conn }
    }
}

impl gateway::Server for GatewayImpl {
    async fn health(
        self: Rc<Self>,
        params: gateway::HealthParams,
        mut results: gateway::HealthResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let r = self
            .shared
            .serve(&self.conn, Method::Health, p.get_ctx(), |_| async {
                Ok(self.shared.not_ready())
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(not_ready) => {
                let mut ok = out.init_ok();
                ok.set_live(true);
                ok.set_ready(not_ready.is_none());
                ok.set_status(not_ready.as_ref().map_or("serving", NotReady::status));
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn version(
        self: Rc<Self>,
        params: gateway::VersionParams,
        mut results: gateway::VersionResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let r = self
            .shared
            .serve(&self.conn, Method::Version, p.get_ctx(), |_| async {
                Ok(())
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(()) => {
                let mut ok = out.init_ok();
                ok.set_service(env!("CARGO_PKG_VERSION"));
                ok.set_api_version(API_VERSION);
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn open(
        self: Rc<Self>,
        params: gateway::OpenParams,
        mut results: gateway::OpenResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let this = &self;
        let r = self
            .shared
            .serve(&self.conn, Method::Open, p.get_ctx(), |call| async move {
                let token = p
                    .get_token()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .unwrap_or("");
                if call.tunables.auth.check(token) {
                    let slot = this
                        .conn
                        .cap_slot(&this.shared, call.tunables.max_capabilities_per_connection)?;
                    this.conn.set_bucket(this.shared.bucket_for(token));
                    Ok(slot)
                } else {
                    Err(ApiError::new(
                        ErrorCode::Unauthenticated,
                        "invalid or missing token",
                    ))
                }
            })
            .await;
        let mut out = results.get().init_result();
        // The capability goes outside the union (`kvCap`, which every implementation can
        // pipeline on) and, for API v2 clients, in union member 0.
        match r {
            Ok(slot) => {
                let kv: kv_store::Client = capnp_rpc::new_client(KvStoreImpl {
                    shared: Arc::clone(&self.shared),
                    conn: Rc::clone(&self.conn),
                    _slot: slot,
                });
                out.set_kv(kv.clone());
                out.set_kv_cap(kv);
            }
            Err(e) => {
                e.write(out.reborrow().init_error());
                out.set_kv_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn admin(
        self: Rc<Self>,
        params: gateway::AdminParams,
        mut results: gateway::AdminResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let this = &self;
        let r = self
            .shared
            .serve(&self.conn, Method::Admin, p.get_ctx(), |call| async move {
                let token = p
                    .get_admin_token()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .unwrap_or("");
                this.check_admin(&call.tunables, token)?;
                this.conn
                    .cap_slot(&this.shared, call.tunables.max_capabilities_per_connection)
            })
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok(slot) => {
                tracing::info!(peer = %self.conn.peer, conn = self.conn.id, "admin capability granted");
                let admin: admin::Client = capnp_rpc::new_client(AdminImpl {
                    shared: Arc::clone(&self.shared),
                    conn: Rc::clone(&self.conn),
                    _slot: slot,
                });
                out.set_admin(admin.clone());
                out.set_admin_cap(admin);
            }
            Err(e) => {
                e.write(out.reborrow().init_error());
                out.set_admin_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
        count_reply!(self.conn, results);
        Ok(())
    }
}

impl GatewayImpl {
    fn check_admin(&self, tunables: &Tunables, token: &str) -> Result<(), ApiError> {
        match &tunables.admin {
            AdminAccess::Disabled => Err(ApiError::new(
                ErrorCode::PermissionDenied,
                "admin is disabled on this server (set admin.token)",
            )),
            AdminAccess::Open => Ok(()),
            AdminAccess::Token(auth) if auth.check(token) => Ok(()),
            AdminAccess::Token(_) => Err(ApiError::new(
                ErrorCode::Unauthenticated,
                "invalid or missing admin token",
            )),
        }
    }
}

/// Operator actions; exists only behind a successful `Gateway.admin`.
pub struct AdminImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    _slot: CapSlot,
}

fn write_faults(
    mut out: capkv::kv_capnp::faults_result::Builder<'_>,
    r: Result<capkv_chaos::FaultPlan, ApiError>,
) {
    match r {
        Ok(plan) => {
            let mut ok = out.reborrow().init_ok();
            ok.set_rules(plan.rules.len() as u32);
            ok.set_plan(plan.to_string());
        }
        Err(e) => e.write(out.init_error()),
    }
}

impl admin::Server for AdminImpl {
    async fn set_faults(
        self: Rc<Self>,
        params: admin::SetFaultsParams,
        mut results: admin::SetFaultsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::SetFaults, p.get_ctx(), |_| async {
                let text = p
                    .get_plan()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::InvalidArgument, "plan is not UTF-8 text")
                    })?;
                let plan = crate::method::parse_fault_plan(text)?;
                tracing::warn!(plan = %plan, peer = %self.conn.peer, "fault plan armed by admin");
                s.chaos.arm(plan);
                Ok(s.chaos.show())
            })
            .await;
        write_faults(results.get().init_result(), r);
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn show_faults(
        self: Rc<Self>,
        params: admin::ShowFaultsParams,
        mut results: admin::ShowFaultsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::ShowFaults, p.get_ctx(), |_| async {
                Ok(s.chaos.show())
            })
            .await;
        write_faults(results.get().init_result(), r);
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn clear_faults(
        self: Rc<Self>,
        params: admin::ClearFaultsParams,
        mut results: admin::ClearFaultsResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::ClearFaults, p.get_ctx(), |_| async {
                s.chaos.clear();
                tracing::warn!(peer = %self.conn.peer, "fault plan cleared by admin");
                Ok(s.chaos.show())
            })
            .await;
        write_faults(results.get().init_result(), r);
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn compact(
        self: Rc<Self>,
        params: admin::CompactParams,
        mut results: admin::CompactResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::Compact, p.get_ctx(), |_| async {
                tracing::info!(peer = %self.conn.peer, "compaction requested by admin");
                // Compaction blocks for as long as it rewrites.
                off_worker(&s.store, "compaction", |st| st.compact()).await
            })
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok(()) => out.set_ok(()),
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn checkpoint(
        self: Rc<Self>,
        params: admin::CheckpointParams,
        mut results: admin::CheckpointResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::Checkpoint, p.get_ctx(), |_| async {
                let dir = p
                    .get_dir()
                    .ok()
                    .and_then(|d| d.to_str().ok())
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::InvalidArgument, "checkpoint needs a directory")
                    })?
                    .to_string();
                tracing::info!(peer = %self.conn.peer, dir = %dir, "checkpoint requested by admin");
                // Flushes and links files.
                off_worker(&s.store, "checkpoint", move |st| {
                    st.checkpoint(std::path::Path::new(&dir))
                })
                .await
            })
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok(()) => out.set_ok(()),
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn reload_config(
        self: Rc<Self>,
        params: admin::ReloadConfigParams,
        mut results: admin::ReloadConfigResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::ReloadConfig, p.get_ctx(), |_| async {
                tracing::info!(peer = %self.conn.peer, "configuration reload requested by admin");
                s.reload()
                    .map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))
            })
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok(changes) => out.set_ok(changes.as_str()),
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }
}

impl KvStoreImpl {
    fn write_session(
        &self,
        mut out: capkv::kv_capnp::session_result::Builder<'_>,
        r: Result<([u8; crate::session::TOKEN_BYTES], CapSlot), ApiError>,
    ) {
        match r {
            Ok((token, slot)) => {
                let session: write_session::Client = capnp_rpc::new_client(WriteSessionImpl {
                    shared: Arc::clone(&self.shared),
                    conn: Rc::clone(&self.conn),
                    token,
                    _slot: slot,
                });
                out.set_session(session.clone());
                out.set_session_cap(session);
                out.set_token(&token);
            }
            Err(e) => {
                e.write(out.reborrow().init_error());
                out.set_session_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
    }
}

/// Read access; exists only behind a successful `open`.
pub struct KvStoreImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    _slot: CapSlot,
}

impl kv_store::Server for KvStoreImpl {
    async fn get(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::Get, p.get_ctx(), |call| async move {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                s.store
                    .get(key)
                    .map_err(store_error)?
                    .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "key not found"))
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(e) => write_entry(out.init_ok(), &e),
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn scan(
        self: Rc<Self>,
        params: kv_store::ScanParams,
        mut results: kv_store::ScanResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(&self.conn, Method::Scan, p.get_ctx(), |call| async move {
                let req = validate::scan(&call.tunables.limits, p.get_range())?;
                s.store.scan(&req).map_err(store_error)
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(page) => {
                let mut ok = out.init_ok();
                ok.set_revision(page.revision);
                if page.more {
                    if let Some(last) = page.entries.last() {
                        ok.set_next_cursor(&validate::next_cursor(&last.key));
                    }
                }
                let len = u32::try_from(page.entries.len())
                    .map_err(|_| capnp::Error::failed("scan page too long".into()))?;
                let mut list = ok.init_entries(len);
                for (i, e) in page.entries.iter().enumerate() {
                    write_entry(list.reborrow().get(i as u32), e);
                }
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn session(
        self: Rc<Self>,
        params: kv_store::SessionParams,
        mut results: kv_store::SessionResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let this = &self;
        let r = self
            .shared
            .serve(
                &self.conn,
                Method::Session,
                p.get_ctx(),
                |call| async move {
                    let max = call.tunables.max_capabilities_per_connection;
                    this.conn.cap_slot(&this.shared, max)
                },
            )
            .await;
        let token = self.shared.sessions.issue();
        self.write_session(results.get().init_result(), r.map(|slot| (token, slot)));
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn resume_session(
        self: Rc<Self>,
        params: kv_store::ResumeSessionParams,
        mut results: kv_store::ResumeSessionResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let this = &self;
        let r = self
            .shared
            .serve(
                &self.conn,
                Method::ResumeSession,
                p.get_ctx(),
                |call| async move {
                    let token = p.get_token().map_err(|e| {
                        ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!("cannot read token: {e}"),
                        )
                    })?;
                    let mut owned = [0u8; crate::session::TOKEN_BYTES];
                    if !this.shared.sessions.verify(token) {
                        return Err(ApiError::new(
                            ErrorCode::PermissionDenied,
                            "unknown session token",
                        ));
                    }
                    owned.copy_from_slice(token);
                    let max = call.tunables.max_capabilities_per_connection;
                    Ok((owned, this.conn.cap_slot(&this.shared, max)?))
                },
            )
            .await;
        self.write_session(results.get().init_result(), r);
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn get_many(
        self: Rc<Self>,
        params: kv_store::GetManyParams,
        mut results: kv_store::GetManyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let r = s
            .serve(
                &self.conn,
                Method::GetMany,
                p.get_ctx(),
                |call| async move {
                    let list = p.get_keys().map_err(|e| {
                        ApiError::new(ErrorCode::InvalidArgument, format!("cannot read keys: {e}"))
                    })?;
                    let tunables = &call.tunables;
                    let limits = &tunables.limits;
                    validate::batch_len(limits, list.len())?;
                    let keys = list
                        .iter()
                        .enumerate()
                        .map(|(i, k)| validate::key(limits, k).map_err(validate::at_item(i)))
                        .collect::<Result<Vec<_>, _>>()?;
                    let (items, revision) = s.store.get_many(&keys).map_err(store_error)?;
                    let payload: usize = items
                        .iter()
                        .flatten()
                        .map(|e| e.key.len() + e.value.len())
                        .sum();
                    if payload > limits.max_response_payload_bytes() {
                        return Err(ApiError::new(
                            ErrorCode::ResponseTooLarge,
                            format!(
                            "the answer holds {payload} bytes of keys and values; the limit is {}",
                            limits.max_response_payload_bytes()
                        ),
                        ));
                    }
                    Ok((items, revision))
                },
            )
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok((items, revision)) => {
                let mut ok = out.reborrow().init_ok();
                ok.set_revision(revision);
                let mut list = ok.init_items(items.len() as u32);
                for (i, item) in items.iter().enumerate() {
                    let mut b = list.reborrow().get(i as u32);
                    match item {
                        Some(e) => write_entry(b.init_found(), e),
                        None => b.set_not_found(()),
                    }
                }
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }
}

/// The write capability.
pub struct WriteSessionImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    /// Scopes the session's idempotency keys.
    token: [u8; crate::session::TOKEN_BYTES],
    _slot: CapSlot,
}

impl WriteSessionImpl {
    /// Applies `op`, idempotently when the caller gave a key.
    async fn write(
        &self,
        op: WriteOp,
        key: Option<Vec<u8>>,
        idempotency_ttl_ms: u64,
    ) -> Result<WriteOutcome, ApiError> {
        let s = &self.shared;
        let idem = key.map(|key| IdempotencyKey {
            session: self.token.to_vec(),
            key,
            expires_at_unix_ms: capkv_store::write::now_unix_ms()
                .saturating_add(idempotency_ttl_ms),
        });
        let r = s.store.write(op, idem).await;
        if matches!(r, Err(StoreError::IdempotencyKeyReused)) {
            metrics::counter!(crate::metrics::IDEMPOTENCY_CONFLICTS_TOTAL).increment(1);
        }
        r.map_err(store_error)
    }
}

fn unexpected(o: &WriteOutcome) -> ApiError {
    tracing::error!(outcome = ?o, "store answered with the outcome of another write");
    ApiError::new(ErrorCode::Internal, "internal storage error")
}

impl write_session::Server for WriteSessionImpl {
    async fn increment(
        self: Rc<Self>,
        params: write_session::IncrementParams,
        mut results: write_session::IncrementResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let this = &self;
        let r = s
            .serve(
                &self.conn,
                Method::Increment,
                p.get_ctx(),
                |call| async move {
                    let key = validate::key(&call.tunables.limits, p.get_key())?;
                    let idem = validate::idempotency_key(p.get_idempotency_key())?;
                    let op = WriteOp::Increment {
                        key: key.to_vec(),
                        delta: p.get_delta(),
                    };
                    match this
                        .write(op, idem, call.tunables.idempotency_ttl_ms)
                        .await?
                    {
                        WriteOutcome::Increment(o) => Ok(o),
                        other => Err(unexpected(&other)),
                    }
                },
            )
            .await;
        let out = results.get().init_result();
        match r {
            Ok(o) => {
                let mut ok = out.init_ok();
                ok.set_value(o.value);
                ok.set_version(o.version);
                ok.set_revision(o.revision);
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn put(
        self: Rc<Self>,
        params: write_session::PutParams,
        mut results: write_session::PutResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let this = &self;
        let r = s
            .serve(&self.conn, Method::Put, p.get_ctx(), |call| async move {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let value = validate::value(&call.tunables.limits, p.get_value())?;
                let cond = validate::condition(p.get_condition())?;
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                let op = WriteOp::Put {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    cond,
                };
                match this
                    .write(op, idem, call.tunables.idempotency_ttl_ms)
                    .await?
                {
                    WriteOutcome::Put(o) => Ok(o),
                    other => Err(unexpected(&other)),
                }
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(o) => {
                let mut ok = out.init_ok();
                ok.set_version(o.version);
                ok.set_revision(o.revision);
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn delete(
        self: Rc<Self>,
        params: write_session::DeleteParams,
        mut results: write_session::DeleteResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let this = &self;
        let r = s
            .serve(&self.conn, Method::Delete, p.get_ctx(), |call| async move {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let cond = validate::condition(p.get_condition())?;
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                let op = WriteOp::Delete {
                    key: key.to_vec(),
                    cond,
                };
                match this
                    .write(op, idem, call.tunables.idempotency_ttl_ms)
                    .await?
                {
                    WriteOutcome::Delete(o) => Ok(o),
                    other => Err(unexpected(&other)),
                }
            })
            .await;
        let out = results.get().init_result();
        match r {
            Ok(o) => {
                let mut ok = out.init_ok();
                ok.set_existed(o.existed);
                ok.set_revision(o.revision);
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }

    async fn put_many(
        self: Rc<Self>,
        params: write_session::PutManyParams,
        mut results: write_session::PutManyResults,
    ) -> Result<(), capnp::Error> {
        let p = params.get()?;
        let s = &self.shared;
        let this = &self;
        let r = s
            .serve(
                &self.conn,
                Method::PutMany,
                p.get_ctx(),
                |call| async move {
                    let list = p.get_items().map_err(|e| {
                        ApiError::new(
                            ErrorCode::InvalidArgument,
                            format!("cannot read items: {e}"),
                        )
                    })?;
                    let tunables = &call.tunables;
                    let limits = &tunables.limits;
                    validate::batch_len(limits, list.len())?;
                    let items = list
                        .iter()
                        .enumerate()
                        .map(|(i, item)| {
                            validate::put_item(limits, item).map_err(validate::at_item(i))
                        })
                        .collect::<Result<Vec<_>, ApiError>>()?;
                    let keys: Vec<&[u8]> = items.iter().map(|i| i.key).collect();
                    validate::distinct_keys(&keys)?;
                    let idem = validate::idempotency_key(p.get_idempotency_key())?;
                    let op = WriteOp::PutMany {
                        items: items
                            .iter()
                            .map(|i| (i.key.to_vec(), i.value.to_vec(), i.cond))
                            .collect(),
                    };
                    match this
                        .write(op, idem, call.tunables.idempotency_ttl_ms)
                        .await?
                    {
                        WriteOutcome::PutMany(o) => Ok(o),
                        other => Err(unexpected(&other)),
                    }
                },
            )
            .await;
        let mut out = results.get().init_result();
        match r {
            Ok(o) => {
                let mut ok = out.reborrow().init_ok();
                ok.set_revision(o.revision);
                let mut versions = ok.init_versions(o.versions.len() as u32);
                for (i, v) in o.versions.iter().enumerate() {
                    versions.set(i as u32, *v);
                }
            }
            Err(e) => e.write(out.init_error()),
        }
        count_reply!(self.conn, results);
        Ok(())
    }
}
