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

use super::session::{at_once, handle_write, written};
use super::{handle, handle_now, store_error, Reply, WriteSessionImpl};
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

    /// What `handle_write!` applies through (the session's idempotency scope).
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
        results: lease::KeepAliveResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let reply: Reply = handle_now!(
            self,
            params,
            results,
            Method::LeaseKeepAlive,
            |this, _p, _call| {
                this.shared
                    .store
                    .lease_keep_alive(this.id)
                    .map_err(store_error)
            },
            ok = |ok, info| { lease_info!(ok, info) }
        );
        reply
    }

    fn time_to_live(
        self: Rc<Self>,
        params: lease::TimeToLiveParams,
        results: lease::TimeToLiveResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let reply: Reply = handle_now!(
            self,
            params,
            results,
            Method::LeaseTimeToLive,
            |this, _p, _call| this.shared.store.lease_info(this.id).map_err(store_error),
            ok = |ok, info| { lease_info!(ok, info) }
        );
        reply
    }

    fn revoke(
        self: Rc<Self>,
        params: lease::RevokeParams,
        mut results: lease::RevokeResults,
    ) -> impl std::future::Future<Output = Result<(), capnp::Error>> + 'static {
        let id = self.id;
        handle_write!(
            self,
            params,
            results,
            Method::LeaseRevoke,
            |p, _call| {
                let w = capkv_store::write::RevokeLease { id };
                (w, validate::idempotency_key(p.get_idempotency_key())?)
            },
            ok = |ok, o| {
                ok.set_deleted(o.deleted);
                ok.set_revision(o.revision);
            }
        )
    }
}
