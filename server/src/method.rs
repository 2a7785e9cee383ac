//! The RPC methods as the chain, the logs, the metrics and the configuration name them,
//! and the fault plans that may name them.

use std::str::FromStr;

use capkv::{ApiError, ErrorCode};
use capkv_chaos::FaultPlan;

/// The RPC methods, as the chain and the logs name them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Health,
    Version,
    Open,
    Get,
    Scan,
    Session,
    Put,
    Delete,
    GetMany,
    PutMany,
    Increment,
    ResumeSession,
    Admin,
    SetFaults,
    ShowFaults,
    ClearFaults,
    Compact,
    ReloadConfig,
    Checkpoint,
    Watch,
    WatchNext,
    GrantLease,
    Lease,
    LeaseKeepAlive,
    LeaseTimeToLive,
    LeaseRevoke,
}

impl Method {
    pub const ALL: [Method; 26] = [
        Method::Health,
        Method::Version,
        Method::Open,
        Method::Get,
        Method::Scan,
        Method::Session,
        Method::Put,
        Method::Delete,
        Method::GetMany,
        Method::PutMany,
        Method::Increment,
        Method::ResumeSession,
        Method::Admin,
        Method::SetFaults,
        Method::ShowFaults,
        Method::ClearFaults,
        Method::Compact,
        Method::ReloadConfig,
        Method::Checkpoint,
        Method::Watch,
        Method::WatchNext,
        Method::GrantLease,
        Method::Lease,
        Method::LeaseKeepAlive,
        Method::LeaseTimeToLive,
        Method::LeaseRevoke,
    ];

    pub fn from_name(name: &str) -> Option<Method> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }

    pub fn names() -> Vec<&'static str> {
        Self::ALL.iter().map(|m| m.name()).collect()
    }

    /// Data methods, the ones a fault plan may touch.
    pub fn faultable(self) -> bool {
        matches!(
            self,
            Method::Open
                | Method::Get
                | Method::Scan
                | Method::Session
                | Method::Put
                | Method::Delete
                | Method::GetMany
                | Method::PutMany
                | Method::Increment
                | Method::ResumeSession
                | Method::Watch
                | Method::WatchNext
                | Method::GrantLease
                | Method::Lease
                | Method::LeaseKeepAlive
                | Method::LeaseTimeToLive
                | Method::LeaseRevoke
        )
    }

    pub fn name(self) -> &'static str {
        match self {
            Method::Health => "health",
            Method::Version => "version",
            Method::Open => "open",
            Method::Get => "get",
            Method::Scan => "scan",
            Method::Session => "session",
            Method::Put => "put",
            Method::Delete => "delete",
            Method::GetMany => "get_many",
            Method::PutMany => "put_many",
            Method::Increment => "increment",
            Method::ResumeSession => "resume_session",
            Method::Admin => "admin",
            Method::SetFaults => "set_faults",
            Method::ShowFaults => "show_faults",
            Method::ClearFaults => "clear_faults",
            Method::Compact => "compact",
            Method::ReloadConfig => "reload_config",
            Method::Checkpoint => "checkpoint",
            Method::Watch => "watch",
            Method::WatchNext => "watch_next",
            Method::GrantLease => "grant_lease",
            Method::Lease => "lease",
            Method::LeaseKeepAlive => "lease_keep_alive",
            Method::LeaseTimeToLive => "lease_time_to_live",
            Method::LeaseRevoke => "lease_revoke",
        }
    }

    /// Methods that change stored data: never abandoned half-way by the drain.
    pub fn changes_data(self) -> bool {
        matches!(
            self,
            Method::Put
                | Method::Delete
                | Method::PutMany
                | Method::Increment
                | Method::GrantLease
                | Method::LeaseRevoke
        )
    }

    /// Probes must keep answering while the server drains.
    pub(crate) fn served_while_draining(self) -> bool {
        matches!(self, Method::Health | Method::Version)
    }
}

/// Checks a fault plan's text and its method and code names.
pub fn parse_fault_plan(text: &str) -> Result<FaultPlan, ApiError> {
    let invalid = |m: String| ApiError::new(ErrorCode::InvalidArgument, m);
    let plan = FaultPlan::from_str(text).map_err(|e| invalid(e.to_string()))?;
    for rule in &plan.rules {
        if rule.method != "*" && !Method::from_name(&rule.method).is_some_and(Method::faultable) {
            return Err(invalid(format!(
                "fault rule `{rule}`: `{}` is not a data method (one of {}, or *)",
                rule.method,
                Method::ALL
                    .iter()
                    .filter(|m| m.faultable())
                    .map(|m| m.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        if let capkv_chaos::FaultAction::Fail { code } = &rule.action {
            if capkv::code_from_name(code).is_none() {
                return Err(invalid(format!(
                    "fault rule `{rule}`: unknown error code `{code}`"
                )));
            }
        }
    }
    Ok(plan)
}
