//! `WriteSession`: the writes; exists only behind `KvStore.session`/`resumeSession`. Its
//! token scopes the idempotency keys of the writes made through it.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{lease, lease_result, write_session};
use capkv::ApiError;
use capkv_store::{write, IdempotencyKey, Pending, StoreError, Write};

use capkv_rpc::local::Now;

use super::{direct, handle, reply_of, store_error, LeaseImpl};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::refused::Refused;
use crate::session::TOKEN_BYTES;
use crate::validate;

pub struct WriteSessionImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    token: [u8; TOKEN_BYTES],
    _slot: CapSlot,
}

impl WriteSessionImpl {
    pub(super) fn new(
        shared: Arc<Shared>,
        conn: Rc<Conn>,
        token: [u8; TOKEN_BYTES],
        slot: CapSlot,
    ) -> Self {
        Self {
            shared,
            conn,
            token,
            _slot: slot,
        }
    }

    /// A `grantLease` or `lease` result: the lease's capability (outside the union too),
    /// id and TTL, or the error and a stand-in.
    fn write_lease(
        self: &Rc<Self>,
        mut out: lease_result::Builder<'_>,
        r: Result<(u64, u64, CapSlot), ApiError>,
    ) {
        match r {
            Ok((id, ttl_ms, slot)) => {
                let l = LeaseImpl::new(Rc::clone(self), id, slot);
                // Its direct methods read the store at once: not on a store whose reads
                // wait (etcd), where the hook path's handlers await them.
                let l: lease::Client = if self.shared.store.reads_complete_at_once() {
                    capkv_rpc::local::new_direct_client(l)
                } else {
                    capkv_rpc::local::new_client(l)
                };
                out.set_lease(l.clone());
                out.set_lease_cap(l);
                out.set_id(id);
                out.set_ttl_ms(ttl_ms);
            }
            Err(e) => {
                e.write(out.reborrow().init_error());
                out.set_lease_cap(Refused::client(&self.shared, &self.conn, e));
            }
        }
    }

    pub(super) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub(super) fn conn(&self) -> &Rc<Conn> {
        &self.conn
    }

    /// Starts `w`, idempotently when the caller gave a key (its record kept for
    /// `idempotency_ttl_ms`).
    pub(super) fn apply<W: Write>(
        &self,
        w: W,
        key: Option<Vec<u8>>,
        idempotency_ttl_ms: u64,
    ) -> Pending<W::Outcome> {
        let idem = key.map(|key| IdempotencyKey {
            session: self.token.to_vec(),
            key,
            expires_at_unix_ms: write::now_unix_ms().saturating_add(idempotency_ttl_ms),
        });
        self.shared.store.apply(w, idem)
    }
}

/// A write's outcome as the contract says it (conflicting idempotency keys counted).
pub(super) fn written<T>(r: Result<T, StoreError>) -> Result<T, ApiError> {
    if matches!(r, Err(StoreError::IdempotencyKeyReused)) {
        metrics::counter!(crate::metrics::IDEMPOTENCY_CONFLICTS_TOTAL).increment(1);
    }
    r.map_err(store_error)
}

/// The core of a write ([`now!`]'s shape): `|this, p, call| submit` reads the params `p`
/// and submits the write (`this.apply(write, idempotency key, ttl)`, or a shortcut of the
/// store's), giving its `Pending` outcome. The chain runs at once up to the write's
/// submission ([`Shared::serve_write`](crate::chain::Shared::serve_write)); a write the
/// store answers at once (the memory engine's, every time) is answered at once, as reads
/// are; one that waits for a group commit (RocksDB, memory-log, etcd) waits for its
/// outcome in the engine ([`Now::Wait`], one box); when a step of the chain must wait, the
/// rest of the call is a future, as in [`now!`]. The reply forms are `handle!`'s.
macro_rules! write_now {
    ($self:ident, $params:ident, $results:ident, $P:ty, $R:ty, $method:expr,
     |$this:ident, $p:ident, $call:ident| $submit:expr, $($reply:tt)+) => {{
        match $params {
            Err(e) => Now::Done(Err(e)),
            Ok($p) => {
                let $this = $self;
                let begun = $self.shared.serve_write(
                    &$self.conn,
                    $method,
                    $p.get_ctx(),
                    |called| {
                        let $call = &called;
                        $submit
                    },
                    written,
                );
                match begun {
                    crate::chain::Begun::Now(r) => {
                        crate::rpc::now!(@reply $self, $results, r, $($reply)+)
                    }
                    crate::chain::Begun::Later(opened) => crate::rpc::now!(@later
                        $self, $P, $R, $method, opened,
                        |$this, $p, called| {
                            let pending = {
                                let $call = &called;
                                $submit
                            }?;
                            written(pending.await)
                        },
                        $($reply)+),
                    crate::chain::Begun::Waiting(waiting) => Now::Wait(crate::rpc::waiting_reply(
                        waiting,
                        |results: capnp::any_pointer::Builder<'_>, r, conn: &crate::chain::Conn| {
                            let mut built: <$R as capnp::traits::Owned>::Builder<'_> =
                                results.get_as()?;
                            {
                                #[allow(unused_mut)]
                                let mut out = built.reborrow().init_result();
                                crate::rpc::handle!(@reply out, r, $($reply)+);
                            }
                            crate::reply::count_reply!(@built conn, built);
                            Ok(())
                        },
                    )),
                }
            }
        }
    }};
}
pub(crate) use write_now;

impl write_session::Server for WriteSessionImpl {
    async fn grant_lease(
        self: Rc<Self>,
        params: write_session::GrantLeaseParams,
        mut results: write_session::GrantLeaseResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::GrantLease,
            |this, p, call| {
                let ttl_ms = validate::lease_ttl_ms(p.get_ttl_ms())?;
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                let max = call.tunables.max_capabilities_per_connection;
                let slot = this.conn.cap_slot(&this.shared, max)?;
                let granted = written(
                    this.apply(
                        write::GrantLease { ttl_ms },
                        idem,
                        call.tunables.idempotency_ttl_ms,
                    )
                    .await,
                )?;
                Ok((granted.id, granted.ttl_ms, slot))
            },
            with = |out, r| self.write_lease(out, r)
        )
    }

    async fn lease(
        self: Rc<Self>,
        params: write_session::LeaseParams,
        mut results: write_session::LeaseResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Lease,
            |this, p, call| {
                let info = this
                    .shared
                    .store
                    .lease_info_async(p.get_id())
                    .await
                    .map_err(store_error)?;
                let max = call.tunables.max_capabilities_per_connection;
                Ok((info.id, info.ttl_ms, this.conn.cap_slot(&this.shared, max)?))
            },
            with = |out, r| self.write_lease(out, r)
        )
    }

    fn increment(
        self: Rc<Self>,
        params: write_session::IncrementParams,
        mut results: write_session::IncrementResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let now = self.increment_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn put(
        self: Rc<Self>,
        params: write_session::PutParams,
        mut results: write_session::PutResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let now = self.put_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn delete(
        self: Rc<Self>,
        params: write_session::DeleteParams,
        mut results: write_session::DeleteResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let now = self.delete_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn put_many(
        self: Rc<Self>,
        params: write_session::PutManyParams,
        mut results: write_session::PutManyResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let now = self.put_many_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }
}

direct!(WriteSessionImpl, write_session::Client, {
    0 => put_now,
    1 => delete_now,
    2 => put_many_now,
    3 => increment_now,
});

/// The cores of the methods served at once ([`now!`]), for both paths.
impl WriteSessionImpl {
    fn increment_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<write_session::increment_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<write_session::increment_results::Builder<'r>>,
    ) -> Now {
        write_now!(
            self,
            params,
            results,
            write_session::increment_params::Owned,
            write_session::increment_results::Owned,
            Method::Increment,
            |this, p, call| {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let w = write::Increment {
                    key: key.to_vec(),
                    delta: p.get_delta(),
                };
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                Ok(this.apply(w, idem, call.tunables.idempotency_ttl_ms))
            },
            ok = |ok, o| {
                ok.set_value(o.value);
                ok.set_version(o.version);
                ok.set_revision(o.revision);
            }
        )
    }

    fn put_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<write_session::put_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<write_session::put_results::Builder<'r>>,
    ) -> Now {
        write_now!(
            self,
            params,
            results,
            write_session::put_params::Owned,
            write_session::put_results::Owned,
            Method::Put,
            |this, p, call| {
                let limits = &call.tunables.limits;
                let key = validate::key(limits, p.get_key())?;
                let value = validate::value(limits, p.get_value())?;
                let cond = validate::condition(p.get_condition())?;
                let attach = validate::attach(p.get_lease(), p.get_ttl_ms())?;
                match validate::idempotency_key(p.get_idempotency_key())? {
                    // Nothing to record and no lease: the store may take key and value
                    // where they lie in the message (the memory engine copies them once,
                    // into the entry; no write to build and drop).
                    None if attach == write::Attach::None => {
                        Ok(this.shared.store.put(key, value, cond))
                    }
                    idem => {
                        let w = write::Put {
                            key: key.to_vec(),
                            value: value.to_vec(),
                            cond,
                            attach,
                        };
                        Ok(this.apply(w, idem, call.tunables.idempotency_ttl_ms))
                    }
                }
            },
            ok = |ok, o| {
                ok.set_version(o.version);
                ok.set_revision(o.revision);
                ok.set_lease(o.lease);
            }
        )
    }

    fn delete_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<write_session::delete_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<write_session::delete_results::Builder<'r>>,
    ) -> Now {
        write_now!(
            self,
            params,
            results,
            write_session::delete_params::Owned,
            write_session::delete_results::Owned,
            Method::Delete,
            |this, p, call| {
                let key = validate::key(&call.tunables.limits, p.get_key())?;
                let cond = validate::condition(p.get_condition())?;
                match validate::idempotency_key(p.get_idempotency_key())? {
                    // As a put's: nothing to record, the key read where it lies.
                    None => Ok(this.shared.store.delete(key, cond)),
                    idem => {
                        let w = write::Delete {
                            key: key.to_vec(),
                            cond,
                        };
                        Ok(this.apply(w, idem, call.tunables.idempotency_ttl_ms))
                    }
                }
            },
            ok = |ok, o| {
                ok.set_existed(o.existed);
                ok.set_revision(o.revision);
            }
        )
    }

    fn put_many_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<write_session::put_many_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<write_session::put_many_results::Builder<'r>>,
    ) -> Now {
        write_now!(
            self,
            params,
            results,
            write_session::put_many_params::Owned,
            write_session::put_many_results::Owned,
            Method::PutMany,
            |this, p, call| {
                let list = p.get_items().map_err(|e| {
                    ApiError::new(
                        capkv::ErrorCode::InvalidArgument,
                        format!("cannot read items: {e}"),
                    )
                })?;
                let limits = &call.tunables.limits;
                validate::batch_len(limits, list.len())?;
                let items = list
                    .iter()
                    .enumerate()
                    .map(|(i, item)| validate::put_item(limits, item).map_err(validate::at_item(i)))
                    .collect::<Result<Vec<_>, ApiError>>()?;
                let keys: Vec<&[u8]> = items.iter().map(|i| i.key).collect();
                validate::distinct_keys(&keys)?;
                let w = write::PutMany {
                    items: items
                        .iter()
                        .map(|i| (i.key.to_vec(), i.value.to_vec(), i.cond))
                        .collect(),
                };
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                Ok(this.apply(w, idem, call.tunables.idempotency_ttl_ms))
            },
            ok = |ok, o| {
                ok.set_revision(o.revision);
                let mut versions = ok.init_versions(o.versions.len() as u32);
                for (i, v) in o.versions.iter().enumerate() {
                    versions.set(i as u32, *v);
                }
            }
        )
    }
}
