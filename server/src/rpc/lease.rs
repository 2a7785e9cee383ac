//! `Lease`: one lease's keep-alive, time to live and revoke; exists only behind a
//! `WriteSession` (`grantLease`, `lease`), whose token scopes a revoke's idempotency key.
//!
//! Keep-alives and reads of the time to live are not writes: lease deadlines live in the
//! store's memory (see `capkv_store::lease`), so they answer at once like reads. A revoke is
//! a write (its keys are deleted at one revision), answered like the session's writes. Expiry
//! is the server's reaper (`crate::server`), not a call.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::lease;

use capkv_rpc::local::Now;

use super::session::{write_now, written};
use super::{direct, handle, now, reply_of, store_error, waiting, WriteSessionImpl};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::validate;

pub struct LeaseImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    /// The session it was reached through: its writes (a revoke) are that session's.
    session: Rc<WriteSessionImpl>,
    id: u64,
    _slot: CapSlot,
}

impl LeaseImpl {
    pub(super) fn new(session: Rc<WriteSessionImpl>, id: u64, slot: CapSlot) -> Self {
        Self {
            shared: Arc::clone(session.shared()),
            conn: Rc::clone(session.conn()),
            session,
            id,
            _slot: slot,
        }
    }

    /// What `write_now!` applies through (the session's idempotency scope).
    fn apply<W: capkv_store::Write>(
        &self,
        w: W,
        key: Option<Vec<u8>>,
        idempotency_ttl_ms: u64,
    ) -> capkv_store::Pending<W::Outcome> {
        self.session.apply(w, key, idempotency_ttl_ms)
    }
}

/// The `ok` group of a `LeaseInfoResult`.
macro_rules! lease_info {
    ($ok:ident, $info:ident) => {{
        $ok.set_id($info.id);
        $ok.set_ttl_ms($info.ttl_ms);
        $ok.set_remaining_ms($info.remaining_ms);
        $ok.set_keys($info.keys);
    }};
}

impl lease::Server for LeaseImpl {
    fn keep_alive(
        self: Rc<Self>,
        params: lease::KeepAliveParams,
        mut results: lease::KeepAliveResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        if !self.shared.store.reads_complete_at_once() {
            return waiting(self.keep_alive_waiting(params, results));
        }
        let now = self.keep_alive_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn time_to_live(
        self: Rc<Self>,
        params: lease::TimeToLiveParams,
        mut results: lease::TimeToLiveResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        if !self.shared.store.reads_complete_at_once() {
            return waiting(self.time_to_live_waiting(params, results));
        }
        let now = self.time_to_live_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }

    fn revoke(
        self: Rc<Self>,
        params: lease::RevokeParams,
        mut results: lease::RevokeResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let now = self.revoke_now(params.get(), || Ok(results.get()));
        reply_of(now, params, results)
    }
}

direct!(LeaseImpl, lease::Client, { 0 => keep_alive_now, 1 => time_to_live_now, 2 => revoke_now });

/// The cores of the methods served at once ([`now!`]), for both paths.
impl LeaseImpl {
    fn revoke_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<lease::revoke_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<lease::revoke_results::Builder<'r>>,
    ) -> Now {
        let id = self.id;
        write_now!(
            self,
            params,
            results,
            lease::revoke_params::Owned,
            lease::revoke_results::Owned,
            Method::LeaseRevoke,
            |this, p, call| {
                let w = capkv_store::write::RevokeLease { id };
                let idem = validate::idempotency_key(p.get_idempotency_key())?;
                Ok(this.apply(w, idem, call.tunables.idempotency_ttl_ms))
            },
            ok = |ok, o| {
                ok.set_deleted(o.deleted);
                ok.set_revision(o.revision);
            }
        )
    }

    fn keep_alive_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<lease::keep_alive_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<lease::keep_alive_results::Builder<'r>>,
    ) -> Now {
        now!(
            self,
            params,
            results,
            lease::keep_alive_params::Owned,
            lease::keep_alive_results::Owned,
            Method::LeaseKeepAlive,
            |this, _p, _call| {
                this.shared
                    .store
                    .lease_keep_alive(this.id)
                    .map_err(store_error)
            },
            ok = |ok, info| { lease_info!(ok, info) }
        )
    }

    fn time_to_live_now<'r>(
        self: &Rc<Self>,
        params: capnp::Result<lease::time_to_live_params::Reader<'_>>,
        results: impl FnOnce() -> capnp::Result<lease::time_to_live_results::Builder<'r>>,
    ) -> Now {
        now!(
            self,
            params,
            results,
            lease::time_to_live_params::Owned,
            lease::time_to_live_results::Owned,
            Method::LeaseTimeToLive,
            |this, _p, _call| this.shared.store.lease_info(this.id).map_err(store_error),
            ok = |ok, info| { lease_info!(ok, info) }
        )
    }
}

/// The keep-alive and time to live on a store whose reads wait (etcd keeps the deadlines):
/// awaited inside the chain ([`waiting`](super::waiting)).
impl LeaseImpl {
    async fn keep_alive_waiting(
        self: Rc<Self>,
        params: lease::KeepAliveParams,
        mut results: lease::KeepAliveResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::LeaseKeepAlive,
            |this, _p, _call| {
                let info = this.shared.store.lease_keep_alive_async(this.id).await;
                info.map_err(store_error)
            },
            ok = |ok, info| { lease_info!(ok, info) }
        )
    }

    async fn time_to_live_waiting(
        self: Rc<Self>,
        params: lease::TimeToLiveParams,
        mut results: lease::TimeToLiveResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::LeaseTimeToLive,
            |this, _p, _call| {
                let info = this.shared.store.lease_info_async(this.id).await;
                info.map_err(store_error)
            },
            ok = |ok, info| { lease_info!(ok, info) }
        )
    }
}
