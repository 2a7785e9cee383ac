//! `Gateway`: the bootstrap capability, one per connection, so that everything reached
//! through it shares the connection's admission state.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{admin, gateway, kv_store};
use capkv::{ApiError, ErrorCode, API_VERSION};

use super::{handle, AdminImpl, KvStoreImpl};
use crate::chain::{Conn, NotReady, Shared};
use crate::method::Method;
use crate::refused::Refused;
use crate::tunables::{AdminAccess, Tunables};

pub struct GatewayImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
}

impl GatewayImpl {
    pub fn new(shared: Arc<Shared>, conn: Rc<Conn>) -> Self {
        Self { shared, conn }
    }

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

impl gateway::Server for GatewayImpl {
    async fn health(
        self: Rc<Self>,
        params: gateway::HealthParams,
        mut results: gateway::HealthResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Health,
            |this, p, _call| Ok(this.shared.not_ready()),
            ok = |ok, not_ready| {
                ok.set_live(true);
                ok.set_ready(not_ready.is_none());
                ok.set_status(not_ready.as_ref().map_or("serving", NotReady::status));
            }
        )
    }

    async fn version(
        self: Rc<Self>,
        params: gateway::VersionParams,
        mut results: gateway::VersionResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Version,
            |this, p, _call| Ok(()),
            ok = |ok, ()| {
                ok.set_service(env!("CARGO_PKG_VERSION"));
                ok.set_api_version(API_VERSION);
            }
        )
    }

    async fn open(
        self: Rc<Self>,
        params: gateway::OpenParams,
        mut results: gateway::OpenResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Open,
            |this, p, call| {
                let token = p
                    .get_token()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .unwrap_or("");
                if !call.tunables.auth.check(token) {
                    return Err(ApiError::new(
                        ErrorCode::Unauthenticated,
                        "invalid or missing token",
                    ));
                }
                let max = call.tunables.max_capabilities_per_connection;
                let slot = this.conn.cap_slot(&this.shared, max)?;
                this.conn.set_bucket(this.shared.bucket_for(token));
                Ok(slot)
            },
            // The capability goes outside the union (`kvCap`, which every implementation
            // can pipeline on) and, for API v2 clients, in union member 0.
            with = |out, r| {
                match r {
                    Ok(slot) => {
                        let kv =
                            KvStoreImpl::new(Arc::clone(&self.shared), Rc::clone(&self.conn), slot);
                        // Its direct methods are reads at once: not on a store whose reads
                        // wait (etcd), where the hook path's handlers await them.
                        let kv: kv_store::Client = if self.shared.store.reads_complete_at_once() {
                            capkv_rpc::local::new_direct_client(kv)
                        } else {
                            capkv_rpc::local::new_client(kv)
                        };
                        out.set_kv(kv.clone());
                        out.set_kv_cap(kv);
                    }
                    Err(e) => {
                        e.write(out.reborrow().init_error());
                        out.set_kv_cap(Refused::client(&self.shared, &self.conn, e));
                    }
                }
            }
        )
    }

    async fn admin(
        self: Rc<Self>,
        params: gateway::AdminParams,
        mut results: gateway::AdminResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Admin,
            |this, p, call| {
                let token = p
                    .get_admin_token()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .unwrap_or("");
                this.check_admin(&call.tunables, token)?;
                let max = call.tunables.max_capabilities_per_connection;
                this.conn.cap_slot(&this.shared, max)
            },
            with = |out, r| {
                match r {
                    Ok(slot) => {
                        tracing::info!(peer = %self.conn.peer, conn = self.conn.id, "admin capability granted");
                        let admin: admin::Client = capkv_rpc::local::new_client(AdminImpl::new(
                            Arc::clone(&self.shared),
                            Rc::clone(&self.conn),
                            slot,
                        ));
                        out.set_admin(admin.clone());
                        out.set_admin_cap(admin);
                    }
                    Err(e) => {
                        e.write(out.reborrow().init_error());
                        out.set_admin_cap(Refused::client(&self.shared, &self.conn, e));
                    }
                }
            }
        )
    }
}
