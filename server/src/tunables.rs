//! What a reload may change, and the state a reload works from.
//!
//! - [`Tunables`]: the reloadable settings (limits, tokens, deadlines, rates, timeouts),
//!   one value swapped whole; the chain loads it once per call and hands it to the work.
//! - [`TokenBucket`]: the per-token rate limit, reading its rate from the Tunables in force.
//! - [`ReloadState`]: the configuration in force and how to read a new one (`reload.rs`
//!   does the reload itself).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use capkv::Limits;
use tokio::time::Instant;

use crate::auth::Auth;
use crate::config::{Config, ConfigError};
use crate::method::Method;

/// Reads the configuration from where it came from (file, environment, flags).
pub type Loader = Box<dyn Fn() -> Result<Config, ConfigError> + Send + Sync>;

/// Who may have the Admin capability.
pub enum AdminAccess {
    /// No admin token configured and no dev flag: nobody.
    Disabled,
    /// Development: any token.
    Open,
    Token(Auth),
}

/// What a reload may change, swapped whole; each call reads it once.
pub struct Tunables {
    pub limits: Limits,
    pub auth: Auth,
    pub admin: AdminAccess,
    pub idempotency_ttl_ms: u64,
    /// (default, max) budget per method, indexed by `Method as usize`.
    pub(crate) budgets_ms: [(u32, u32); Method::ALL.len()],
    /// Open connections; past it new ones are refused (with an `Abort` saying why).
    pub max_connections: usize,
    pub(crate) max_in_flight: usize,
    pub(crate) max_in_flight_per_connection: usize,
    pub(crate) queue_depth: usize,
    pub(crate) queue_timeout: Duration,
    /// A connection without calls for this long is closed.
    pub idle_timeout: Option<Duration>,
    /// The frame layer's limits for new connections.
    pub frames: Arc<capkv_rpc::frames::FrameLimits>,
    /// Unsent reply bytes past which a connection is not read (see `capkv_rpc::backlog`).
    pub max_unsent_reply_bytes: usize,
    /// A paused connection whose socket takes nothing for this long is closed.
    pub slow_reader_timeout: Duration,
    /// Capabilities the server holds for one connection.
    pub max_capabilities_per_connection: usize,
    /// (calls per second, bucket size) per token; `None` = unlimited.
    pub(crate) rate: Option<(f64, f64)>,
}

impl Tunables {
    /// From `config`; tokens that differ from `previous`'s start their overlap window.
    pub fn new(config: &Config, previous: Option<&Tunables>) -> Self {
        let overlap = Duration::from_secs(config.auth.rotation_overlap_s);
        let token = config.auth.token.as_ref().map(|s| s.expose());
        let auth = match previous {
            Some(p) => p.auth.rotate(token, overlap),
            None => Auth::new(token),
        };
        let admin_token = config.admin.token.as_ref().map(|s| s.expose());
        let admin = match (
            admin_token,
            config.admin.dev_open,
            previous.map(|p| &p.admin),
        ) {
            (Some(t), _, Some(AdminAccess::Token(old))) => {
                AdminAccess::Token(old.rotate(Some(t), overlap))
            }
            (Some(t), _, _) => AdminAccess::Token(Auth::new(Some(t))),
            (None, true, _) => AdminAccess::Open,
            (None, false, _) => AdminAccess::Disabled,
        };
        let l = &config.limits;
        let rate = (l.rate_per_token > 0).then(|| {
            let per_s = f64::from(l.rate_per_token);
            let burst = if l.rate_burst == 0 {
                per_s
            } else {
                f64::from(l.rate_burst)
            };
            (per_s, burst)
        });
        Self {
            limits: config.protocol_limits(),
            auth,
            admin,
            idempotency_ttl_ms: config.idempotency.ttl_s.saturating_mul(1000),
            budgets_ms: Method::ALL.map(|m| config.budget_ms(m)),
            max_connections: l.max_connections,
            max_in_flight: l.max_in_flight,
            max_in_flight_per_connection: l.max_in_flight_per_connection,
            queue_depth: l.queue_depth,
            queue_timeout: Duration::from_millis(l.queue_timeout_ms),
            idle_timeout: (l.idle_timeout_ms > 0).then(|| Duration::from_millis(l.idle_timeout_ms)),
            frames: Arc::new(capkv_rpc::frames::FrameLimits::for_requests(
                config.protocol_limits().max_request_bytes(),
                config.protocol_limits().request_reader_options(),
                Duration::from_millis(l.frame_timeout_ms),
            )),
            rate,
            max_unsent_reply_bytes: l.max_unsent_reply_bytes,
            slow_reader_timeout: Duration::from_millis(l.slow_reader_timeout_ms),
            max_capabilities_per_connection: l.max_capabilities_per_connection,
        }
    }
}

/// A token bucket: one per auth token, shared by every connection that opened with it.
/// Rate and size come from the current [`Tunables`] at each take, so a reload applies at
/// once. A mutex rather than a lock-free crate (governor): it is taken once per call only
/// when rate limiting is on, and holds two numbers.
#[derive(Debug)]
pub struct TokenBucket {
    /// (tokens, when they were counted)
    state: std::sync::Mutex<(f64, Instant)>,
}

impl TokenBucket {
    pub(crate) fn new() -> Self {
        // Starts full: the first take caps it at the bucket size.
        Self {
            state: std::sync::Mutex::new((f64::INFINITY, Instant::now())),
        }
    }

    /// Takes one token, or says how long until one is there.
    pub(crate) fn take(&self, per_s: f64, size: f64) -> Result<(), Duration> {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let tokens = (st.0 + now.duration_since(st.1).as_secs_f64() * per_s).min(size);
        if tokens >= 1.0 {
            *st = (tokens - 1.0, now);
            Ok(())
        } else {
            *st = (tokens, now);
            Err(Duration::from_secs_f64((1.0 - tokens) / per_s))
        }
    }
}

/// The config in force and the way to read a new one.
pub struct ReloadState {
    pub(crate) current: Mutex<Config>,
    pub(crate) loader: OnceLock<Loader>,
}

impl ReloadState {
    pub fn new(config: Config) -> Self {
        Self {
            current: Mutex::new(config),
            loader: OnceLock::new(),
        }
    }

    /// The configuration in force (as of the last successful reload).
    pub fn current(&self) -> Config {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
