//! capkv server.
//!
//! - [`config`]: layered configuration (flags > `CAPKV_*` env > TOML file > defaults).
//! - [`server`]: listener, worker threads (current-thread runtime + `LocalSet` each),
//!   drain on shutdown; [`server::RunningServer`] runs one on a thread for tests, and
//!   [`server::serve_in_process`] serves one connection over an in-process stream.
//! - [`chain`]: the ordered cross-cutting steps every call passes (context, drain,
//!   deadline, rate, admission, faults, work, observe), written once; the connection
//!   ([`chain::Conn`]) and the state all workers share ([`chain::Shared`]).
//! - [`method`]: the methods as the chain, logs and config name them; fault plans.
//! - [`deadlines`]: one timer per worker for the deadlines of writes waiting for their
//!   commit.
//! - [`tunables`]: the reloadable settings ([`tunables::Tunables`]), the per-token rate
//!   limit, and the configuration a reload starts from.
//! - [`rpc`]: the handlers, one module per capability (`Gateway`, `KvStore`,
//!   `WriteSession`, `Admin`, `Watcher`, `Lease`), each in one shape (`rpc::handle!`).
//! - [`lease`]: the reaper that revokes leases past their TTL.
//!   Every connection reads through `capkv_rpc::frames::GuardedReader` (the frame layer).
//! - [`refused`]: the stand-in capability a refused `open`/`admin`/`session` returns for
//!   pipelined calls, each answered with the refusal's error.
//! - [`reply`]: counting each built reply on its connection's backlog.
//! - [`validate`]: input limits, each breach a distinct error code.
//! - [`auth`]: constant-time bearer-token check.
//! - [`metrics`], [`logging`]: metric names and exporter; log setup.
//! - [`reload`]: SIGHUP / `Admin.reloadConfig`: re-read the config, apply what can change
//!   live (tokens with an overlap window, limits, timeouts, log level).
//! - [`signals`]: SIGTERM/SIGINT (drain) and SIGHUP (reload) handling for the binary.

pub mod auth;
pub mod chain;
pub mod config;
pub mod deadlines;
pub mod http;
pub mod lease;
pub mod logging;
pub mod method;
pub mod metrics;
pub mod refused;
pub mod reload;
pub mod reply;
pub mod rpc;
pub mod server;
pub mod session;
pub mod signals;
pub mod tunables;
pub mod validate;

pub use config::Config;
pub use server::{RunningServer, Server, ServerError};
