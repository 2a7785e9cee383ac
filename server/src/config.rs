//! Layered configuration: flags > `CAPKV_*` environment > TOML file > defaults.
//!
//! figment does the merging; this module owns the shape (every field has a default, unknown
//! keys in a file are an error so typos do not pass silently), the flag overrides, the
//! validation that turns a bad combination into one clear message, and the redaction used by
//! `--print-config`.
//!
//! Environment names: `CAPKV_<SECTION>__<KEY>` for nested keys, e.g.
//! `CAPKV_LIMITS__MAX_KEY_BYTES=512`, `CAPKV_AUTH__TOKEN=...`, and `CAPKV_<KEY>` at the top
//! level (`CAPKV_LISTEN`). Only names of this file's sections are read, so a client's
//! `CAPKV_ADDR` in the same environment does not break the server.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

/// A secret string: never printed by `Debug`, redacted by `--print-config`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    Memory,
    Rocksdb,
    /// An etcd cluster (`storage.etcd`): kv-servers as stateless gateways over it.
    Etcd,
    /// The memory engine made durable by a write-ahead log with group commit and snapshots
    /// (`capkv_store::logged`), in `data_dir`: data that fits in memory, at Redis's cost.
    #[serde(rename = "memory-log")]
    #[value(name = "memory-log")]
    MemoryLog,
}

impl Engine {
    pub fn name(self) -> &'static str {
        match self {
            Engine::Memory => "memory",
            Engine::Rocksdb => "rocksdb",
            Engine::Etcd => "etcd",
            Engine::MemoryLog => "memory-log",
        }
    }
}

/// Which implementation of the Cap'n Proto RPC protocol serves connections. Both speak the
/// same protocol and serve the same calls (the whole test suite runs on each); capkv's own
/// engine is the default, capnp-rpc's `RpcSystem` stays as the reference and the way back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum RpcEngine {
    /// capnp-rpc's `RpcSystem` (the reference).
    CapnpRpc,
    /// capkv's own engine (`capkv_rpc::engine`).
    #[default]
    Capkv,
}

impl RpcEngine {
    pub fn name(self) -> &'static str {
        match self {
            RpcEngine::CapnpRpc => "capnp-rpc",
            RpcEngine::Capkv => "capkv",
        }
    }
}

/// What runs a worker's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum IoLoop {
    /// capkv's own readiness loop (`capkv_rpc::ready`): connections in a slab, polled from
    /// an epoll of the worker's own.
    #[default]
    Capkv,
    /// A tokio task per connection (the reference, and the way back).
    Tokio,
}

impl IoLoop {
    pub fn name(self) -> &'static str {
        match self {
            IoLoop::Capkv => "capkv",
            IoLoop::Tokio => "tokio",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON lines, or human text when stderr is a terminal.
    Auto,
    Json,
    Text,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address of the Cap'n Proto listener.
    pub listen: SocketAddr,
    /// Address of the Prometheus `/metrics` listener; none = no listener.
    pub metrics_listen: Option<SocketAddr>,
    pub engine: Engine,
    /// Data directory of persistent engines.
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    /// Worker threads serving connections; 0 = one per core.
    pub workers: usize,
    pub auth: AuthConfig,
    pub admin: AdminConfig,
    pub faults: FaultsConfig,
    pub idempotency: IdempotencyConfig,
    pub limits: LimitsConfig,
    pub deadlines: DeadlinesConfig,
    pub shutdown: ShutdownConfig,
    pub log: LogConfig,
    /// Trace export (OTLP); off unless an endpoint is set here or in `OTEL_*`.
    pub telemetry: capkv_telemetry::TraceConfig,
    /// Mutual TLS on the RPC listener; off unless all three files are set.
    pub tls: TlsConfig,
    /// The RPC protocol implementation serving connections (restart to change).
    pub rpc_engine: RpcEngine,
    /// What runs each worker's connections (restart to change).
    pub io_loop: IoLoop,
}

/// PEM files for mutual TLS (see `scripts/dev-ca.sh`).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// The server's certificate chain.
    pub cert: Option<PathBuf>,
    /// The server's private key.
    pub key: Option<PathBuf>,
    /// The CA whose certificates clients must present.
    pub client_ca: Option<PathBuf>,
}

impl TlsConfig {
    /// The files, when TLS is on.
    pub fn files(&self) -> Option<capkv_rpc::tls::TlsFiles> {
        match (&self.cert, &self.key, &self.client_ca) {
            (Some(cert), Some(key), Some(ca)) => Some(capkv_rpc::tls::TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Bearer token `open` requires; none = any token is accepted (local development).
    pub token: Option<Secret>,
    /// After a reload changes `auth.token` or `admin.token`, the old token is still
    /// accepted this long, so clients can be moved over without failed calls.
    pub rotation_overlap_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            token: None,
            rotation_overlap_s: 60,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Operator token `Gateway.admin` requires. None: admin is refused...
    pub token: Option<Secret>,
    /// ...unless this is set (flag `--dev-admin`): then any admin token is accepted.
    /// For local development only.
    pub dev_open: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdempotencyConfig {
    /// How long a write's outcome is kept for replays of its idempotency key.
    pub ttl_s: u64,
}

impl Default for IdempotencyConfig {
    fn default() -> Self {
        Self { ttl_s: 24 * 3600 }
    }
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FaultsConfig {
    /// A fault plan armed at start (text form, see `Admin.setFaults`); empty = none.
    pub plan: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    pub max_key_bytes: usize,
    pub max_value_bytes: usize,
    pub max_scan_limit: u32,
    pub default_scan_limit: u32,
    pub max_scan_bytes: usize,
    /// Keys in one `getMany`, items in one `putMany`.
    pub max_batch_items: u32,
    /// Open connections; past it new connections are closed at once (and logged).
    pub max_connections: usize,
    /// Calls being served at once, over all connections; past it a call waits in the
    /// admission queue (`queue_depth`, `queue_timeout_ms`), then gets `overloaded`.
    pub max_in_flight: usize,
    /// Calls being served at once on one connection; past it `overloaded`.
    pub max_in_flight_per_connection: usize,
    /// Connections accepted but not yet picked up by a worker.
    pub accept_queue: usize,
    /// Calls waiting for an in-flight slot when all are taken; past it `overloaded` at once.
    pub queue_depth: usize,
    /// Longest wait for an in-flight slot; then `overloaded` (before any work).
    pub queue_timeout_ms: u64,
    /// A connection with no call for this long is closed; 0 = never.
    pub idle_timeout_ms: u64,
    /// Calls per second allowed per auth token (a token bucket shared by every connection
    /// that opened with that token); 0 = unlimited.
    pub rate_per_token: u32,
    /// Calls a token may make at once above its rate (the bucket's size); 0 = one second's
    /// worth.
    pub rate_burst: u32,
    /// Time a message that has started arriving has to arrive completely.
    pub frame_timeout_ms: u64,
    /// Bytes all partially received large messages (> 64 KiB) may hold together; past it
    /// their connections wait for room.
    pub frame_budget_bytes: usize,
    /// Reply bytes one connection may have produced but not yet written to its socket; past
    /// it the connection is not read (takes no new call) until its replies drain. A single
    /// larger reply still goes out.
    pub max_unsent_reply_bytes: usize,
    /// Unsent reply bytes over all connections; past it, connections with unsent replies
    /// are not read until the total drains. Restart only.
    pub unsent_reply_budget_bytes: usize,
    /// A connection paused by its unsent replies whose socket takes no byte for this long
    /// is closed (a client that does not read its replies).
    pub slow_reader_timeout_ms: u64,
    /// Capabilities the server holds for one connection (stores, sessions, admin, stand-ins
    /// of refused calls); past it a call that would return one more gets
    /// `tooManyCapabilities`.
    pub max_capabilities_per_connection: usize,
}

/// Knobs of the RocksDB engine (ignored by `memory`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageConfig {
    /// Sync the WAL before acknowledging a write. Off, acknowledged writes survive a crash
    /// of the process but not of the machine.
    pub sync: bool,
    /// Most writes gathered into one commit (one WAL sync); 1 turns group commit off.
    pub group_commit_max_writes: usize,
    /// How long the committer waits for more writes once it has one; 0 = only those
    /// already queued.
    pub group_commit_max_wait_us: u64,
    /// Writes waiting for the committer; past it writes get `overloaded`.
    pub write_queue_depth: usize,
    /// WAL bytes past which the oldest WAL file's memtables are flushed so it can retire.
    pub max_total_wal_bytes: u64,
    /// Retired WAL files kept to be written over by new ones (cheaper syncs); 0 = none.
    pub wal_recycle_files: usize,
    /// Run the committer thread (RocksDB, memory-log) as batch work (Linux
    /// `SCHED_BATCH`): woken, it does not preempt the worker on its core. Off by default:
    /// woken while every core is busy, it then waits for a time slice (24 ms a commit in
    /// `bench/commit-latency.sh`'s runs of 2026-12-06).
    pub committer_sched_batch: bool,
    /// Full compaction every this many seconds; 0 = off.
    pub compaction_interval_s: u64,
    pub block_cache_bytes: usize,
    /// How often engine statistics are copied into metrics.
    pub stats_interval_ms: u64,
    /// Below this many free bytes on the data directory's disk, writes are refused with
    /// `storageFull` (reads, deletes and compaction go on); 0 = no check.
    pub min_free_bytes: u64,
    /// A file of this size kept in the data directory and released when space runs low, so
    /// that compaction, deletes and a restart find room; 0 = none.
    pub reserve_bytes: u64,
    /// How often free space is measured (also after every write that failed for space).
    pub space_check_interval_ms: u64,
    /// Revisions whose events the RocksDB engine keeps for watchers (`KvStore.watch`).
    pub history_revisions: u64,
    /// Events the RocksDB engine's history keeps at most, however large the batches.
    pub history_events: u64,
    /// Size of each segment of the `memory-log` engine's log (made whole before use).
    pub log_segment_bytes: u64,
    /// Log bytes past which the `memory-log` engine writes a snapshot (or the last
    /// snapshot's size, if larger) and drops the segments before it.
    pub log_snapshot_min_bytes: u64,
    /// The longest a `memory-log` write waits for the end of its worker's pass (its run
    /// through every ready connection) before its group is committed anyway.
    pub log_group_wait_max_us: u64,
    /// Idempotency records the memory engines keep at most (the oldest go first).
    pub memory_max_records: usize,
    /// Events the memory engine keeps for watchers, at most (its oldest revisions go
    /// first, in runs of 64 or a sixteenth of this, whichever is less: see `Ring::trim`).
    pub memory_history_events: usize,
    /// Bytes of keys and values the memory engine's history keeps, at most.
    pub memory_history_bytes: usize,
    /// The etcd engine (`engine = "etcd"`).
    pub etcd: EtcdConfig,
}

/// Where the etcd engine's cluster is (`storage.etcd`). The history a gateway keeps for
/// watchers is `memory_history_events` / `memory_history_bytes`; `history_revisions` is
/// what `Admin.compact` leaves of etcd's own history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdConfig {
    /// Client URLs of the members, e.g. `["http://10.0.0.1:2379", ...]`.
    pub endpoints: Vec<String>,
    /// Prefix of every key capkv writes; stores sharing a cluster need different ones.
    pub prefix: String,
    /// etcd's own authentication, when the cluster has it on.
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// CA that signed the members' certificates (then endpoints are `https://`), and this
    /// gateway's client certificate and key when the members require one.
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Longest one request to etcd may take; past it the call is `unavailable`.
    pub request_timeout_ms: u64,
    /// The cluster's `--max-txn-ops` and `--max-request-bytes` (etcd does not report
    /// them): capkv's limits are checked against them at start.
    pub max_txn_ops: usize,
    pub max_request_bytes: usize,
    /// Idempotency records expiring within the same this-many seconds share one lease.
    pub record_lease_bucket_s: u64,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        let o = capkv_store_etcd::EtcdOptions::new(Vec::new());
        Self {
            endpoints: Vec::new(),
            prefix: String::from_utf8_lossy(&o.prefix).into_owned(),
            user: None,
            password: None,
            ca: None,
            cert: None,
            key: None,
            request_timeout_ms: o.request_timeout.as_millis() as u64,
            max_txn_ops: o.max_txn_ops,
            max_request_bytes: o.max_request_bytes,
            record_lease_bucket_s: o.record_lease_bucket_s,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadlinesConfig {
    /// Budget of a call that brings none.
    pub default_ms: u32,
    /// Cap on any budget a caller asks for.
    pub max_ms: u32,
    /// Per-method overrides, by method name (`get`, `scan`, `put`, `compact`, ...).
    pub methods: std::collections::BTreeMap<String, MethodDeadline>,
}

/// A method's own default and cap; an unset field falls back to `deadlines.*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MethodDeadline {
    pub default_ms: Option<u32>,
    pub max_ms: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShutdownConfig {
    /// How long in-flight calls get to finish after SIGTERM/SIGINT.
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A `tracing` filter (`info`, `capkv_server=debug,info`); `RUST_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            metrics_listen: None,
            engine: Engine::Rocksdb,
            data_dir: PathBuf::from("./data"),
            storage: StorageConfig::default(),
            workers: 0,
            auth: AuthConfig::default(),
            admin: AdminConfig::default(),
            faults: FaultsConfig::default(),
            idempotency: IdempotencyConfig::default(),
            limits: LimitsConfig::default(),
            deadlines: DeadlinesConfig::default(),
            shutdown: ShutdownConfig::default(),
            log: LogConfig::default(),
            telemetry: capkv_telemetry::TraceConfig::default(),
            tls: TlsConfig::default(),
            rpc_engine: RpcEngine::default(),
            io_loop: IoLoop::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        let l = capkv::Limits::default();
        Self {
            max_key_bytes: l.max_key_bytes,
            max_value_bytes: l.max_value_bytes,
            max_scan_limit: l.max_scan_limit,
            default_scan_limit: l.default_scan_limit,
            max_scan_bytes: l.max_scan_bytes,
            max_batch_items: l.max_batch_items,
            max_connections: 4096,
            max_in_flight: 8192,
            max_in_flight_per_connection: 256,
            accept_queue: 1024,
            // Short: a refusal is worth more to a caller quickly (it can go elsewhere or
            // back off) than a slot 20 ms later; bench/overload.sh measures it.
            queue_depth: 256,
            queue_timeout_ms: 2,
            idle_timeout_ms: 300_000,
            rate_per_token: 0,
            rate_burst: 0,
            frame_timeout_ms: 10_000,
            frame_budget_bytes: 64 * 1024 * 1024,
            // A few of the largest replies (a 1 MiB value, a 4 MiB scan page) per
            // connection, as Redis's client-output-buffer-limit allows a few MB.
            max_unsent_reply_bytes: 8 * 1024 * 1024,
            unsent_reply_budget_bytes: 256 * 1024 * 1024,
            slow_reader_timeout_ms: 30_000,
            // ~2.3 KiB each: 23 MiB per connection at most.
            max_capabilities_per_connection: 10_000,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        let r = capkv_store_rocks::RocksOptions::new("");
        let l = capkv_store::logged::LogOptions::new("");
        Self {
            sync: r.sync,
            group_commit_max_writes: r.group_commit_max_writes,
            group_commit_max_wait_us: r.group_commit_max_wait_us,
            write_queue_depth: r.write_queue_depth,
            max_total_wal_bytes: r.max_total_wal_bytes,
            wal_recycle_files: r.wal_recycle_files,
            committer_sched_batch: r.committer_sched_batch,
            compaction_interval_s: r.compaction_interval_s,
            block_cache_bytes: r.block_cache_bytes,
            stats_interval_ms: 5_000,
            min_free_bytes: r.space.min_free_bytes,
            reserve_bytes: r.space.reserve_bytes,
            space_check_interval_ms: r.space.check_interval.as_millis() as u64,
            history_revisions: r.history_revisions,
            history_events: r.history_events,
            log_segment_bytes: l.segment_bytes,
            log_snapshot_min_bytes: l.snapshot_min_log_bytes,
            log_group_wait_max_us: l.group_wait_max_us,
            memory_max_records: capkv_store::records::DEFAULT_MAX_RECORDS,
            memory_history_events: capkv_store::memory::DEFAULT_HISTORY_EVENTS,
            memory_history_bytes: capkv_store::memory::DEFAULT_HISTORY_BYTES,
            etcd: EtcdConfig::default(),
        }
    }
}

impl Default for DeadlinesConfig {
    fn default() -> Self {
        // Compaction rewrites the store: it gets more time than a data call.
        let compact = MethodDeadline {
            default_ms: Some(600_000),
            max_ms: Some(3_600_000),
        };
        Self {
            default_ms: 5_000,
            max_ms: 60_000,
            // A checkpoint flushes memtables and links files: usually quick, but give it
            // compaction's room rather than a data call's.
            methods: [
                ("compact".to_string(), compact),
                ("checkpoint".to_string(), compact),
                // A watcher's `next` may wait up to a minute for a change (`waitMs`).
                (
                    "watch_next".to_string(),
                    MethodDeadline {
                        default_ms: Some(65_000),
                        max_ms: Some(65_000),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        }
    }
}

impl Default for ShutdownConfig {
    fn default() -> Self {
        Self {
            drain_timeout_ms: 10_000,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

/// Values given as command-line flags; each one set overrides every other layer.
#[derive(Debug, Clone, Default)]
pub struct FlagOverrides {
    pub listen: Option<SocketAddr>,
    pub metrics_listen: Option<SocketAddr>,
    pub engine: Option<Engine>,
    pub data_dir: Option<PathBuf>,
    pub workers: Option<usize>,
    pub log_level: Option<String>,
    pub log_format: Option<LogFormat>,
    pub dev_admin: Option<bool>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub tls_client_ca: Option<PathBuf>,
    pub etcd_endpoints: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {0}")]
    Load(Box<figment::Error>),
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// Top-level keys that may come from the environment (see the module docs).
const ENV_KEYS: [&str; 18] = [
    "idempotency",
    "listen",
    "metrics_listen",
    "engine",
    "data_dir",
    "storage",
    "workers",
    "auth",
    "admin",
    "faults",
    "limits",
    "deadlines",
    "shutdown",
    "log",
    "telemetry",
    "tls",
    "rpc_engine",
    "io_loop",
];

impl Config {
    /// Loads defaults, then `file` (if given; it must exist), then the environment, then
    /// `flags`, and validates the result.
    pub fn load(file: Option<&Path>, flags: &FlagOverrides) -> Result<Self, ConfigError> {
        let mut fig = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            fig = fig.merge(Toml::file_exact(path));
        }
        fig = fig.merge(Env::prefixed("CAPKV_").split("__").filter(|k| {
            let top = k.as_str().split('.').next().unwrap_or("");
            ENV_KEYS.iter().any(|known| known.eq_ignore_ascii_case(top))
        }));
        macro_rules! flag {
            ($key:literal, $v:expr) => {
                if let Some(v) = &$v {
                    fig = fig.merge(Serialized::default($key, v));
                }
            };
        }
        flag!("listen", flags.listen);
        flag!("metrics_listen", flags.metrics_listen);
        flag!("engine", flags.engine);
        flag!("data_dir", flags.data_dir);
        flag!("workers", flags.workers);
        flag!("log.level", flags.log_level);
        flag!("log.format", flags.log_format);
        flag!("admin.dev_open", flags.dev_admin);
        flag!("tls.cert", flags.tls_cert);
        flag!("tls.key", flags.tls_key);
        flag!("tls.client_ca", flags.tls_client_ca);
        flag!("storage.etcd.endpoints", flags.etcd_endpoints);
        let config: Config = fig.extract().map_err(|e| ConfigError::Load(Box::new(e)))?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what serde cannot: ranges and relations between fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let fail = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if l.max_key_bytes == 0 || l.max_value_bytes == 0 || l.max_scan_bytes == 0 {
            return fail("limits.max_key_bytes, max_value_bytes and max_scan_bytes must be > 0");
        }
        if l.max_value_bytes > 64 * 1024 * 1024 {
            return fail("limits.max_value_bytes must be at most 64 MiB");
        }
        // Upper bounds, so that sums of limits (one request's bytes, a reply's) cannot wrap
        // and a typo cannot make one message as large as memory: a key is a name (etcd's
        // whole request is at most 1.5 MiB), a scan page is read into memory at once.
        if l.max_key_bytes > 1024 * 1024 {
            return fail("limits.max_key_bytes must be at most 1 MiB");
        }
        if l.max_scan_bytes > 256 * 1024 * 1024 {
            return fail("limits.max_scan_bytes must be at most 256 MiB");
        }
        if l.max_scan_limit > 1_000_000 {
            return fail("limits.max_scan_limit must be at most 1000000");
        }
        if l.max_batch_items == 0 || l.max_batch_items > 100_000 {
            return fail("limits.max_batch_items must be in 1..=100000");
        }
        if l.default_scan_limit == 0 || l.default_scan_limit > l.max_scan_limit {
            return fail("limits.default_scan_limit must be in 1..=limits.max_scan_limit");
        }
        if l.max_connections == 0
            || l.max_in_flight == 0
            || l.max_in_flight_per_connection == 0
            || l.accept_queue == 0
        {
            return fail("limits.max_connections, max_in_flight, max_in_flight_per_connection and accept_queue must be > 0");
        }
        if l.frame_timeout_ms == 0 || l.frame_budget_bytes < l.max_key_bytes + l.max_value_bytes {
            return fail("limits.frame_timeout_ms must be > 0 and limits.frame_budget_bytes must hold one largest request");
        }
        if l.max_unsent_reply_bytes == 0
            || l.unsent_reply_budget_bytes < l.max_unsent_reply_bytes
            || l.slow_reader_timeout_ms == 0
            || l.max_capabilities_per_connection == 0
        {
            return fail("limits.max_unsent_reply_bytes, slow_reader_timeout_ms and max_capabilities_per_connection must be > 0, and limits.unsent_reply_budget_bytes >= limits.max_unsent_reply_bytes");
        }
        if l.queue_timeout_ms > 10_000 {
            return fail("limits.queue_timeout_ms must be at most 10000");
        }
        if self.auth.rotation_overlap_s > 7 * 24 * 3600 {
            return fail("auth.rotation_overlap_s must be at most 604800 (7 days)");
        }
        if self.deadlines.default_ms == 0 || self.deadlines.default_ms > self.deadlines.max_ms {
            return fail("deadlines.default_ms must be in 1..=deadlines.max_ms");
        }
        let st = &self.storage;
        if st.group_commit_max_writes == 0 || st.group_commit_max_writes > 1_000_000 {
            return fail(
                "storage.group_commit_max_writes must be in 1..=1000000 (1 = group commit off)",
            );
        }
        if st.group_commit_max_wait_us > 1_000_000 {
            return fail("storage.group_commit_max_wait_us must be at most 1000000");
        }
        if st.write_queue_depth == 0 || st.write_queue_depth > 1_000_000 {
            return fail("storage.write_queue_depth must be in 1..=1000000");
        }
        let seg = capkv_store::logged::MIN_SEGMENT_BYTES..=u32::MAX as u64;
        if !seg.contains(&st.log_segment_bytes) {
            return fail(&format!(
                "storage.log_segment_bytes must be in {}..={}",
                seg.start(),
                seg.end()
            ));
        }
        if st.memory_max_records == 0 {
            return fail("storage.memory_max_records must be at least 1");
        }
        if st.log_group_wait_max_us > 100_000 {
            return fail("storage.log_group_wait_max_us must be at most 100000");
        }
        if st.log_snapshot_min_bytes < st.log_segment_bytes {
            return fail(
                "storage.log_snapshot_min_bytes must be at least storage.log_segment_bytes",
            );
        }
        if st.max_total_wal_bytes < capkv_store_rocks::MIN_TOTAL_WAL_BYTES {
            return fail(&format!(
                "storage.max_total_wal_bytes must be at least {}",
                capkv_store_rocks::MIN_TOTAL_WAL_BYTES
            ));
        }
        if st.wal_recycle_files > capkv_store_rocks::MAX_WAL_RECYCLE_FILES {
            return fail(&format!(
                "storage.wal_recycle_files must be at most {}",
                capkv_store_rocks::MAX_WAL_RECYCLE_FILES
            ));
        }
        if st.space_check_interval_ms == 0 || st.space_check_interval_ms > 60_000 {
            return fail("storage.space_check_interval_ms must be in 1..=60000");
        }
        if st.history_revisions == 0 || st.history_revisions > 1_000_000_000 {
            return fail("storage.history_revisions must be in 1..=1000000000");
        }
        if st.history_events == 0 || st.history_events > 1_000_000_000 {
            return fail("storage.history_events must be in 1..=1000000000");
        }
        if st.memory_history_events == 0 || st.memory_history_events > 100_000_000 {
            return fail("storage.memory_history_events must be in 1..=100000000");
        }
        if st.memory_history_bytes == 0 || st.memory_history_bytes > 1 << 40 {
            return fail("storage.memory_history_bytes must be in 1..=1099511627776");
        }
        if self.engine == Engine::Etcd {
            self.validate_etcd()?;
        }
        if self.idempotency.ttl_s == 0 || self.idempotency.ttl_s > 30 * 24 * 3600 {
            return fail("idempotency.ttl_s must be in 1..=2592000 (30 days)");
        }
        if st.stats_interval_ms == 0 {
            return fail("storage.stats_interval_ms must be > 0");
        }
        let t = &self.tls;
        let set = [t.cert.is_some(), t.key.is_some(), t.client_ca.is_some()];
        if set.iter().any(|s| *s) && !set.iter().all(|s| *s) {
            return fail(
                "tls.cert, tls.key and tls.client_ca go together (all three for mutual TLS)",
            );
        }
        if let Err(e) = self.telemetry.validate() {
            return Err(ConfigError::Invalid(e.to_string()));
        }
        if self.workers > 1024 {
            return fail("workers must be at most 1024 (0 = one per core)");
        }
        if let Some(t) = &self.auth.token {
            if t.expose().is_empty() {
                return fail("auth.token must not be empty (leave it unset to disable auth)");
            }
        }
        if let Some(t) = &self.admin.token {
            if t.expose().is_empty() {
                return fail("admin.token must not be empty (leave it unset to disable admin)");
            }
        }
        if let (Some(data), Some(admin)) = (&self.auth.token, &self.admin.token) {
            if data.expose() == admin.expose() {
                return fail(
                    "admin.token must differ from auth.token (every data client would hold Admin)",
                );
            }
        }
        for (name, m) in &self.deadlines.methods {
            let Some(method) = crate::method::Method::from_name(name) else {
                return Err(ConfigError::Invalid(format!(
                    "deadlines.methods: unknown method `{name}` (one of {})",
                    crate::method::Method::names().join(", ")
                )));
            };
            let (default_ms, max_ms) = self.budget_ms(method);
            if default_ms == 0 || default_ms > max_ms || m.max_ms == Some(0) {
                return Err(ConfigError::Invalid(format!(
                    "deadlines.methods.{name}: default_ms must be in 1..=max_ms"
                )));
            }
        }
        if !self.faults.plan.trim().is_empty() {
            crate::method::parse_fault_plan(&self.faults.plan)
                .map_err(|e| ConfigError::Invalid(format!("faults.plan: {}", e.message)))?;
        }
        Ok(())
    }

    /// Defaults, but on an ephemeral loopback port with two workers and the memory engine:
    /// what tests and embedded servers want.
    pub fn local_ephemeral() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            workers: 2,
            engine: Engine::Memory,
            ..Self::default()
        }
    }

    /// The RocksDB options this config sets.
    pub fn rocks_options(&self) -> capkv_store_rocks::RocksOptions {
        let st = &self.storage;
        capkv_store_rocks::RocksOptions {
            path: self.data_dir.clone(),
            sync: st.sync,
            group_commit_max_writes: st.group_commit_max_writes,
            group_commit_max_wait_us: st.group_commit_max_wait_us,
            write_queue_depth: st.write_queue_depth,
            compaction_interval_s: st.compaction_interval_s,
            block_cache_bytes: st.block_cache_bytes,
            space: capkv_store_rocks::SpaceOptions {
                min_free_bytes: st.min_free_bytes,
                reserve_bytes: st.reserve_bytes,
                check_interval: std::time::Duration::from_millis(st.space_check_interval_ms),
            },
            history_revisions: st.history_revisions,
            history_events: st.history_events,
            max_total_wal_bytes: st.max_total_wal_bytes,
            wal_recycle_files: st.wal_recycle_files,
            committer_sched_batch: st.committer_sched_batch,
        }
    }

    fn validate_etcd(&self) -> Result<(), ConfigError> {
        let e = &self.storage.etcd;
        let fail = |m: String| Err(ConfigError::Invalid(m));
        if e.endpoints.is_empty() {
            return fail(
                "engine = \"etcd\" needs storage.etcd.endpoints (e.g. --etcd-endpoints \
                 http://127.0.0.1:2379)"
                    .into(),
            );
        }
        if e.prefix.is_empty() {
            return fail("storage.etcd.prefix must not be empty".into());
        }
        if e.request_timeout_ms == 0 || e.request_timeout_ms > 600_000 {
            return fail("storage.etcd.request_timeout_ms must be in 1..=600000".into());
        }
        if e.user.is_some() != e.password.is_some() {
            return fail("storage.etcd.user and storage.etcd.password go together".into());
        }
        if e.cert.is_some() != e.key.is_some() || (e.cert.is_some() && e.ca.is_none()) {
            return fail("storage.etcd.cert and key go together, and need storage.etcd.ca".into());
        }
        let l = &self.limits;
        self.etcd_options()
            .check_limits(
                l.max_batch_items as usize,
                l.max_key_bytes,
                l.max_value_bytes,
            )
            .or_else(fail)
    }

    /// The memory-log engine's options (`storage.log_*`, the memory engines' bounds).
    pub fn log_options(&self) -> capkv_store::logged::LogOptions {
        let st = &self.storage;
        let mut o = capkv_store::logged::LogOptions::new(self.data_dir.clone());
        o.segment_bytes = st.log_segment_bytes;
        o.snapshot_min_log_bytes = st.log_snapshot_min_bytes;
        o.group_commit_max_writes = st.group_commit_max_writes;
        o.group_wait_max_us = st.log_group_wait_max_us;
        o.write_queue_depth = st.write_queue_depth;
        o.history_events = st.memory_history_events;
        o.history_bytes = st.memory_history_bytes;
        o.max_records = st.memory_max_records;
        o.committer_sched_batch = st.committer_sched_batch;
        o
    }

    /// The etcd engine's options from `storage.etcd` (and the history sizes).
    pub fn etcd_options(&self) -> capkv_store_etcd::EtcdOptions {
        let st = &self.storage;
        let e = &st.etcd;
        let mut o = capkv_store_etcd::EtcdOptions::new(e.endpoints.clone());
        o.prefix = e.prefix.clone().into_bytes();
        o.user = e
            .user
            .clone()
            .zip(e.password.as_ref().map(|p| p.expose().to_string()));
        o.tls = e.ca.clone().map(|ca| capkv_store_etcd::EtcdTls {
            ca,
            cert: e.cert.clone(),
            key: e.key.clone(),
        });
        o.request_timeout = std::time::Duration::from_millis(e.request_timeout_ms);
        o.history_events = st.memory_history_events;
        o.history_bytes = st.memory_history_bytes;
        o.compact_keep_revisions = st.history_revisions;
        o.record_lease_bucket_s = e.record_lease_bucket_s;
        o.max_txn_ops = e.max_txn_ops;
        o.max_request_bytes = e.max_request_bytes;
        o
    }

    /// A method's (default, max) budget in milliseconds.
    pub fn budget_ms(&self, method: crate::method::Method) -> (u32, u32) {
        let d = &self.deadlines;
        let m = d.methods.get(method.name()).copied().unwrap_or_default();
        (
            m.default_ms.unwrap_or(d.default_ms),
            m.max_ms.unwrap_or(d.max_ms),
        )
    }

    /// The protocol-level limits this config sets.
    pub fn protocol_limits(&self) -> capkv::Limits {
        let l = &self.limits;
        capkv::Limits {
            max_key_bytes: l.max_key_bytes,
            max_value_bytes: l.max_value_bytes,
            max_scan_limit: l.max_scan_limit,
            default_scan_limit: l.default_scan_limit,
            max_scan_bytes: l.max_scan_bytes,
            max_batch_items: l.max_batch_items,
        }
    }

    /// Number of worker threads to start.
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The effective config as TOML, secrets replaced by `<redacted>`.
    pub fn to_redacted_toml(&self) -> String {
        let mut shown = self.clone();
        if shown.auth.token.is_some() {
            shown.auth.token = Some(Secret::new("<redacted>"));
        }
        if shown.admin.token.is_some() {
            shown.admin.token = Some(Secret::new("<redacted>"));
        }
        if shown.storage.etcd.password.is_some() {
            shown.storage.etcd.password = Some(Secret::new("<redacted>"));
        }
        // Serializing a plain struct of strings and numbers cannot fail; fall back to Debug
        // (which redacts too) rather than panic if it ever does.
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# {e}\n{shown:#?}"))
    }
}

#[cfg(test)]
// figment::Jail's closure type is fixed by figment; its large error type is not ours to box.
#[allow(clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn precedence_is_flags_env_file_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "capkv.toml",
                r#"
                listen = "127.0.0.1:1111"
                workers = 3
                [limits]
                max_key_bytes = 100
                max_value_bytes = 200
                [log]
                level = "debug"
                "#,
            )?;
            jail.set_env("CAPKV_WORKERS", "5");
            jail.set_env("CAPKV_LIMITS__MAX_KEY_BYTES", "50");
            jail.set_env("CAPKV_ADDR", "ignored-client-variable");
            let flags = FlagOverrides {
                workers: Some(7),
                log_level: Some("warn".into()),
                ..Default::default()
            };
            let c = Config::load(Some(Path::new("capkv.toml")), &flags).unwrap();
            assert_eq!(c.listen.port(), 1111, "file over default");
            assert_eq!(c.limits.max_value_bytes, 200, "file over default");
            assert_eq!(c.limits.max_key_bytes, 50, "env over file");
            assert_eq!(c.workers, 7, "flag over env");
            assert_eq!(c.log.level, "warn", "nested flag over file");
            assert_eq!(c.limits.max_scan_limit, 10_000, "default kept");
            Ok(())
        });
    }

    #[test]
    fn unknown_file_key_and_bad_values_are_refused() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("typo.toml", "[limits]\nmax_key_byte = 1\n")?;
            let e = Config::load(Some(Path::new("typo.toml")), &FlagOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("max_key_byte"), "{e}");
            jail.create_file("bad.toml", "[deadlines]\ndefault_ms = 10\nmax_ms = 5\n")?;
            let e = Config::load(Some(Path::new("bad.toml")), &FlagOverrides::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains("deadlines.default_ms"), "{e}");
            for (toml, named) in [
                (
                    "[storage]\nmax_total_wal_bytes = 1000\n",
                    "storage.max_total_wal_bytes",
                ),
                (
                    "[storage]\nwal_recycle_files = 17\n",
                    "storage.wal_recycle_files",
                ),
                (
                    "[storage]\nlog_segment_bytes = 1000\n",
                    "storage.log_segment_bytes",
                ),
                (
                    "[storage]\nlog_segment_bytes = 1048576\nlog_snapshot_min_bytes = 65536\n",
                    "storage.log_snapshot_min_bytes",
                ),
                (
                    "[storage]\nlog_group_wait_max_us = 100001\n",
                    "storage.log_group_wait_max_us",
                ),
                (
                    "[storage]\nmemory_max_records = 0\n",
                    "storage.memory_max_records",
                ),
                (
                    "[limits]\nmax_key_bytes = 1048577\n",
                    "limits.max_key_bytes must be at most",
                ),
                (
                    "[limits]\nmax_scan_bytes = 268435457\n",
                    "limits.max_scan_bytes must be at most",
                ),
                (
                    "[limits]\nmax_scan_limit = 1000001\n",
                    "limits.max_scan_limit must be at most",
                ),
                (
                    "[auth]\ntoken = \"same-secret\"\n[admin]\ntoken = \"same-secret\"\n",
                    "admin.token must differ",
                ),
            ] {
                jail.create_file("wal.toml", toml)?;
                let e = Config::load(Some(Path::new("wal.toml")), &FlagOverrides::default())
                    .unwrap_err()
                    .to_string();
                assert!(e.contains(named), "{e}");
            }
            let missing = Config::load(Some(Path::new("nope.toml")), &FlagOverrides::default());
            assert!(missing.is_err());
            Ok(())
        });
    }

    #[test]
    fn per_method_deadlines_fall_back_and_are_checked() {
        let mut c = Config::default();
        assert_eq!(c.budget_ms(crate::method::Method::Get), (5_000, 60_000));
        assert_eq!(
            c.budget_ms(crate::method::Method::Compact),
            (600_000, 3_600_000)
        );
        c.deadlines.methods.insert(
            "scan".into(),
            MethodDeadline {
                default_ms: Some(100),
                max_ms: None,
            },
        );
        assert_eq!(c.budget_ms(crate::method::Method::Scan), (100, 60_000));
        assert!(c.validate().is_ok());
        c.deadlines
            .methods
            .insert("gett".into(), MethodDeadline::default());
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("unknown method `gett`"), "{e}");
        let mut c = Config::default();
        c.faults.plan = "get explode".into();
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("faults.plan"));
    }

    #[test]
    fn print_config_redacts_the_token() {
        let mut c = Config::default();
        c.auth.token = Some(Secret::new("hunter2-very-secret"));
        c.admin.token = Some(Secret::new("admin-very-secret"));
        let shown = c.to_redacted_toml();
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("admin-very-secret"));
        assert!(shown.contains("<redacted>"));
        assert!(!format!("{c:?}").contains("hunter2"));
        let back: Config = toml::from_str(&shown).unwrap();
        assert_eq!(back.limits, c.limits, "printed config is loadable");
    }
}
