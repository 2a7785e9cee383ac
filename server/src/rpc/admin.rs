//! `Admin`: operator actions (fault plans, compaction, checkpoints, reload); exists only
//! behind a successful `Gateway.admin`. Every action is logged with its peer.

use std::rc::Rc;
use std::sync::Arc;

use capkv::kv_capnp::{admin, faults_result};
use capkv::{ApiError, ErrorCode};
use capkv_chaos::FaultPlan;

use super::{handle, off_worker};
use crate::chain::{CapSlot, Conn, Shared};
use crate::method::Method;

pub struct AdminImpl {
    shared: Arc<Shared>,
    conn: Rc<Conn>,
    _slot: CapSlot,
}

impl AdminImpl {
    pub(super) fn new(shared: Arc<Shared>, conn: Rc<Conn>, slot: CapSlot) -> Self {
        Self {
            shared,
            conn,
            _slot: slot,
        }
    }
}

/// The answer of the three fault-plan calls: the plan in force.
fn write_faults(mut out: faults_result::Builder<'_>, r: Result<FaultPlan, ApiError>) {
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
        handle!(
            self,
            params,
            results,
            Method::SetFaults,
            |this, p, _call| {
                let text = p
                    .get_plan()
                    .ok()
                    .and_then(|t| t.to_str().ok())
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::InvalidArgument, "plan is not UTF-8 text")
                    })?;
                let plan = crate::method::parse_fault_plan(text)?;
                tracing::warn!(plan = %plan, peer = %this.conn.peer, "fault plan armed by admin");
                this.shared.chaos.arm(plan);
                Ok(this.shared.chaos.show())
            },
            with = |out, r| write_faults(out, r)
        )
    }

    async fn show_faults(
        self: Rc<Self>,
        params: admin::ShowFaultsParams,
        mut results: admin::ShowFaultsResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::ShowFaults,
            |this, p, _call| Ok(this.shared.chaos.show()),
            with = |out, r| write_faults(out, r)
        )
    }

    async fn clear_faults(
        self: Rc<Self>,
        params: admin::ClearFaultsParams,
        mut results: admin::ClearFaultsResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::ClearFaults,
            |this, p, _call| {
                this.shared.chaos.clear();
                tracing::warn!(peer = %this.conn.peer, "fault plan cleared by admin");
                Ok(this.shared.chaos.show())
            },
            with = |out, r| write_faults(out, r)
        )
    }

    async fn compact(
        self: Rc<Self>,
        params: admin::CompactParams,
        mut results: admin::CompactResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Compact,
            |this, p, _call| {
                tracing::info!(peer = %this.conn.peer, "compaction requested by admin");
                // Compaction blocks for as long as it rewrites.
                off_worker(&this.shared.store, "compaction", |st| st.compact()).await
            },
            set_ok = |()| ()
        )
    }

    async fn checkpoint(
        self: Rc<Self>,
        params: admin::CheckpointParams,
        mut results: admin::CheckpointResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::Checkpoint,
            |this, p, _call| {
                let dir = p
                    .get_dir()
                    .ok()
                    .and_then(|d| d.to_str().ok())
                    .filter(|d| !d.is_empty())
                    .ok_or_else(|| {
                        ApiError::new(ErrorCode::InvalidArgument, "checkpoint needs a directory")
                    })?
                    .to_string();
                tracing::info!(peer = %this.conn.peer, dir = %dir, "checkpoint requested by admin");
                // Flushes and links files.
                off_worker(&this.shared.store, "checkpoint", move |st| {
                    st.checkpoint(std::path::Path::new(&dir))
                })
                .await
            },
            set_ok = |()| ()
        )
    }

    async fn reload_config(
        self: Rc<Self>,
        params: admin::ReloadConfigParams,
        mut results: admin::ReloadConfigResults,
    ) -> Result<(), capnp::Error> {
        handle!(
            self,
            params,
            results,
            Method::ReloadConfig,
            |this, p, _call| {
                tracing::info!(peer = %this.conn.peer, "configuration reload requested by admin");
                // Reading and parsing the file is blocking I/O: off the worker, whose other
                // connections keep being served (as the SIGHUP reload does).
                let shared = Arc::clone(&this.shared);
                match tokio::task::spawn_blocking(move || shared.reload()).await {
                    Ok(r) => {
                        r.map_err(|e| ApiError::new(ErrorCode::InvalidArgument, e.to_string()))
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "configuration reload task failed");
                        Err(ApiError::new(ErrorCode::Internal, "reload task failed"))
                    }
                }
            },
            set_ok = |changes| changes.as_str()
        )
    }
}
