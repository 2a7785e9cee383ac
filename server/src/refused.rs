//! Stand-in capabilities for calls that were refused.
//!
//! A call that returns a capability (`open`, `admin`, `session`, `resumeSession`) puts it
//! in a field outside its result union (`kvCap`, `adminCap`, `sessionCap`) so that every
//! Cap'n Proto implementation can pipeline on it. When the call is refused, that field
//! still needs a capability: a client has already sent calls to it. [`Refused`] is that
//! capability. Every method answers with the refusal's error in its own result union, so a
//! pipelined `open(bad).kvCap.get(k)` fails with `unauthenticated` and its message, a
//! stable code, instead of a bare "null capability" exception. Methods that return a
//! capability return another stand-in, so longer pipelined chains fail the same way.
//!
//! Stand-in calls pass the call chain like any other (deadline, admission, metrics, logs):
//! they are calls a client made, and count as such. A stand-in is a capability the server
//! holds for the peer, so it takes one of the connection's capability slots; when none is
//! left, the refused call gets the connection's shared at-capacity stand-in instead (one
//! per interface, answering `tooManyCapabilities` without the chain), so refusals cannot
//! grow the server's memory either.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{admin, kv_store, lease, watcher, write_session};
use capkv::ApiError;

use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;
use crate::reply::count_reply;

/// A capability of every capkv interface whose calls all fail with one error.
pub struct Refused {
    /// The call chain its calls pass; `None` for the at-capacity stand-in, which answers
    /// directly (it must not hold its connection: the connection caches it).
    chain: Option<(Arc<Shared>, Rc<Conn>)>,
    error: ApiError,
    _slot: Option<CapSlot>,
}

impl Refused {
    /// A stand-in, typed as the capability (`kv_store::Client`, ...) the refused call
    /// would have returned.
    pub fn client<C>(shared: &Arc<Shared>, conn: &Rc<Conn>, error: ApiError) -> C
    where
        C: capnp::capability::FromServer<Refused> + Clone + 'static,
    {
        // After its call: the limit in force now.
        let max = shared.tunables().max_capabilities_per_connection;
        match conn.cap_slot(shared, max) {
            Ok(slot) => capkv_rpc::local::new_client(Refused {
                chain: Some((Arc::clone(shared), Rc::clone(conn))),
                error,
                _slot: Some(slot),
            }),
            Err(full) => conn.capacity_stand_in(|| {
                capkv_rpc::local::new_client(Refused {
                    chain: None,
                    error: full,
                    _slot: None,
                })
            }),
        }
    }

    /// Runs a call through the chain with the refusal as its work's outcome; the chain may
    /// answer first with its own error (a spent deadline, admission).
    async fn answer(
        &self,
        method: Method,
        ctx: capnp::Result<capkv::kv_capnp::request_context::Reader<'_>>,
    ) -> ApiError {
        let Some((shared, conn)) = &self.chain else {
            return self.error.clone();
        };
        let r = shared
            .serve(conn, method, ctx, |_| async {
                Err::<(), _>(self.error.clone())
            })
            .await;
        r.err().unwrap_or_else(|| self.error.clone())
    }

    /// The connection whose backlog counts this stand-in's replies (the at-capacity
    /// stand-in's replies are a few bytes and go uncounted).
    fn conn(&self) -> Option<&Rc<Conn>> {
        self.chain.as_ref().map(|(_, c)| c)
    }
}

/// One stand-in method: the chain's answer in the result's error arm.
macro_rules! refuse {
    ($self:ident, $params:ident, $results:ident, $method:expr) => {{
        let p = $params.get()?;
        let e = $self.answer($method, p.get_ctx()).await;
        e.write($results.get().init_result().init_error());
        if let Some(conn) = $self.conn() {
            count_reply!(conn, $results);
        }
        Ok(())
    }};
}

/// A stand-in method that returns a capability (`set_cap` sets its `...Cap` field): the
/// error, and another stand-in to pipeline on.
macro_rules! refuse_with_cap {
    ($self:ident, $params:ident, $results:ident, $method:expr, $set_cap:ident) => {{
        let p = $params.get()?;
        let e = $self.answer($method, p.get_ctx()).await;
        let mut out = $results.get().init_result();
        e.write(out.reborrow().init_error());
        match &$self.chain {
            Some((shared, conn)) => {
                out.$set_cap(Refused::client(shared, conn, e));
                count_reply!(conn, $results);
            }
            // The at-capacity stand-in makes no more capabilities: the `...Cap` field
            // stays null, and calls pipelined on it fail with an exception.
            None => {}
        }
        Ok(())
    }};
}

impl kv_store::Server for Refused {
    async fn watch(
        self: Rc<Self>,
        params: kv_store::WatchParams,
        mut results: kv_store::WatchResults,
    ) -> Result<(), capnp::Error> {
        refuse_with_cap!(self, params, results, Method::Watch, set_watcher_cap)
    }

    async fn get(
        self: Rc<Self>,
        params: kv_store::GetParams,
        mut results: kv_store::GetResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Get)
    }

    async fn scan(
        self: Rc<Self>,
        params: kv_store::ScanParams,
        mut results: kv_store::ScanResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Scan)
    }

    async fn get_many(
        self: Rc<Self>,
        params: kv_store::GetManyParams,
        mut results: kv_store::GetManyResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::GetMany)
    }

    async fn session(
        self: Rc<Self>,
        params: kv_store::SessionParams,
        mut results: kv_store::SessionResults,
    ) -> Result<(), capnp::Error> {
        refuse_with_cap!(self, params, results, Method::Session, set_session_cap)
    }

    async fn resume_session(
        self: Rc<Self>,
        params: kv_store::ResumeSessionParams,
        mut results: kv_store::ResumeSessionResults,
    ) -> Result<(), capnp::Error> {
        refuse_with_cap!(
            self,
            params,
            results,
            Method::ResumeSession,
            set_session_cap
        )
    }
}

impl watcher::Server for Refused {
    async fn next(
        self: Rc<Self>,
        params: watcher::NextParams,
        mut results: watcher::NextResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::WatchNext)
    }
}

impl write_session::Server for Refused {
    async fn put(
        self: Rc<Self>,
        params: write_session::PutParams,
        mut results: write_session::PutResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Put)
    }

    async fn delete(
        self: Rc<Self>,
        params: write_session::DeleteParams,
        mut results: write_session::DeleteResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Delete)
    }

    async fn put_many(
        self: Rc<Self>,
        params: write_session::PutManyParams,
        mut results: write_session::PutManyResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::PutMany)
    }

    async fn increment(
        self: Rc<Self>,
        params: write_session::IncrementParams,
        mut results: write_session::IncrementResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Increment)
    }

    async fn grant_lease(
        self: Rc<Self>,
        params: write_session::GrantLeaseParams,
        mut results: write_session::GrantLeaseResults,
    ) -> Result<(), capnp::Error> {
        refuse_with_cap!(self, params, results, Method::GrantLease, set_lease_cap)
    }

    async fn lease(
        self: Rc<Self>,
        params: write_session::LeaseParams,
        mut results: write_session::LeaseResults,
    ) -> Result<(), capnp::Error> {
        refuse_with_cap!(self, params, results, Method::Lease, set_lease_cap)
    }
}

impl lease::Server for Refused {
    async fn keep_alive(
        self: Rc<Self>,
        params: lease::KeepAliveParams,
        mut results: lease::KeepAliveResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::LeaseKeepAlive)
    }

    async fn time_to_live(
        self: Rc<Self>,
        params: lease::TimeToLiveParams,
        mut results: lease::TimeToLiveResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::LeaseTimeToLive)
    }

    async fn revoke(
        self: Rc<Self>,
        params: lease::RevokeParams,
        mut results: lease::RevokeResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::LeaseRevoke)
    }
}

impl admin::Server for Refused {
    async fn set_faults(
        self: Rc<Self>,
        params: admin::SetFaultsParams,
        mut results: admin::SetFaultsResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::SetFaults)
    }

    async fn show_faults(
        self: Rc<Self>,
        params: admin::ShowFaultsParams,
        mut results: admin::ShowFaultsResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::ShowFaults)
    }

    async fn clear_faults(
        self: Rc<Self>,
        params: admin::ClearFaultsParams,
        mut results: admin::ClearFaultsResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::ClearFaults)
    }

    async fn compact(
        self: Rc<Self>,
        params: admin::CompactParams,
        mut results: admin::CompactResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Compact)
    }

    async fn checkpoint(
        self: Rc<Self>,
        params: admin::CheckpointParams,
        mut results: admin::CheckpointResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::Checkpoint)
    }

    async fn reload_config(
        self: Rc<Self>,
        params: admin::ReloadConfigParams,
        mut results: admin::ReloadConfigResults,
    ) -> Result<(), capnp::Error> {
        refuse!(self, params, results, Method::ReloadConfig)
    }
}
