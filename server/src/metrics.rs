//! Every metric the server records, named once here (Prometheus conventions: `capkv_`
//! prefix, `_total` counters, `_seconds` histograms), and the exporter that serves them.

use std::net::SocketAddr;
use std::sync::OnceLock;

use capkv::kv_capnp::ErrorCode;
use metrics::{Counter, Gauge, Histogram};
use metrics_exporter_prometheus::PrometheusBuilder;

pub const REQUESTS_TOTAL: &str = "capkv_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "capkv_request_duration_seconds";
pub const IN_FLIGHT: &str = "capkv_in_flight_requests";
pub const CONNECTIONS: &str = "capkv_connections";
pub const REJECTIONS_TOTAL: &str = "capkv_rejections_total";
pub const PARTIAL_FRAME_BYTES: &str = "capkv_partial_frame_bytes";
pub const FRAME_BUDGET_WAITS_TOTAL: &str = "capkv_frame_budget_waits_total";
pub const UNSENT_REPLY_BYTES: &str = "capkv_unsent_reply_bytes";
pub const CONNECTIONS_PAUSED: &str = "capkv_connections_paused";
pub const CONNECTION_PAUSES_TOTAL: &str = "capkv_connection_pauses_total";
pub const CAPABILITIES_HELD: &str = "capkv_capabilities_held";
pub const WATCHERS: &str = "capkv_watchers";
pub const WATCH_LAG_REVISIONS: &str = "capkv_watch_lag_revisions";
pub const WATCH_EVENTS_TOTAL: &str = "capkv_watch_events_total";
pub const LEASES: &str = "capkv_leases";
pub const LEASES_EXPIRED_TOTAL: &str = "capkv_leases_expired_total";
pub const CONFIG_RELOADS_TOTAL: &str = "capkv_config_reloads_total";
pub const CONNECTIONS_CLOSED_TOTAL: &str = "capkv_connections_closed_total";
pub const DEADLINE_EXCEEDED_TOTAL: &str = "capkv_deadline_exceeded_total";
pub const FAULTS_INJECTED_TOTAL: &str = "capkv_faults_injected_total";
pub const IDEMPOTENCY_CONFLICTS_TOTAL: &str = "capkv_idempotency_key_conflicts_total";
pub const STORE_IDEMPOTENT_REPLAYS: &str = "capkv_store_idempotent_replays";
pub const STORE_RECORDS_EVICTED: &str = "capkv_store_idempotency_records_evicted";
pub const STORE_LIVE_DATA_BYTES: &str = "capkv_store_live_data_bytes";
pub const STORE_PENDING_COMPACTION_BYTES: &str = "capkv_store_pending_compaction_bytes";
pub const STORE_MEMTABLE_BYTES: &str = "capkv_store_memtable_bytes";
pub const STORE_WAL_SYNCS: &str = "capkv_store_wal_syncs";
pub const STORE_COMMIT_GROUPS: &str = "capkv_store_commit_groups";
pub const STORE_COMMITS: &str = "capkv_store_commits";
pub const STORE_WRITE_STOPPED: &str = "capkv_store_write_stopped";
pub const STORE_DELAYED_WRITE_RATE: &str = "capkv_store_delayed_write_rate_bytes_per_second";
pub const STORE_WRITE_QUEUE: &str = "capkv_store_write_queue_length";
pub const STORE_FREE_BYTES: &str = "capkv_store_free_bytes";
pub const STORE_SPACE_LOW: &str = "capkv_store_space_low";
pub const STORE_READ_ONLY: &str = "capkv_store_read_only";
pub const STORE_SPACE_REFUSED_WRITES: &str = "capkv_store_space_refused_writes";
pub const STORE_RESERVE_BYTES: &str = "capkv_store_reserve_bytes";

/// Handles of the series every call touches, made on first use and kept. The macros
/// (`counter!(NAME, "method" => m)`) build a label vector, hash it and look it up in the
/// registry each time: four times per call, a measurable share of a 13 µs get. A handle
/// made before a recorder is installed stays a no-op: the server installs its recorder
/// before it serves.
pub struct CallMetrics {
    in_flight: OnceLock<Gauge>,
    /// `[method][code]`, where code 0 is "ok" and `c + 1` is error code `c`.
    requests: Box<[OnceLock<Counter>]>,
    /// `[method]`.
    durations: Box<[OnceLock<Histogram>]>,
}

impl CallMetrics {
    /// For `methods` methods, identified by their index below `methods`.
    pub fn new(methods: usize) -> Self {
        let codes = capkv::ALL_CODES.len() + 1;
        Self {
            in_flight: OnceLock::new(),
            requests: (0..methods * codes).map(|_| OnceLock::new()).collect(),
            durations: (0..methods).map(|_| OnceLock::new()).collect(),
        }
    }

    pub fn in_flight(&self) -> &Gauge {
        self.in_flight.get_or_init(|| metrics::gauge!(IN_FLIGHT))
    }

    /// Counts one finished call of `method` (index and label) and records its latency.
    pub fn finished(
        &self,
        (index, method): (usize, &'static str),
        error: Option<ErrorCode>,
        elapsed_s: f64,
    ) {
        debug_assert!(index < self.durations.len());
        let code_index = error.map_or(0, |c| c as usize + 1);
        let slot = index * (capkv::ALL_CODES.len() + 1) + code_index;
        if let Some(counter) = self.requests.get(slot) {
            counter
                .get_or_init(|| {
                    let code = error.map_or("ok", capkv::code_name);
                    metrics::counter!(REQUESTS_TOTAL, "method" => method, "code" => code)
                })
                .increment(1);
        }
        if let Some(histogram) = self.durations.get(index) {
            histogram
                .get_or_init(|| metrics::histogram!(REQUEST_DURATION_SECONDS, "method" => method))
                .record(elapsed_s);
        }
    }
}

/// Copies the engine's statistics into gauges. The engine keeps the counts; exporting them
/// as gauges (not counters) avoids double counting across samples.
pub fn record_store_stats(st: &capkv_store::StoreStats) {
    let pairs = [
        (STORE_LIVE_DATA_BYTES, st.live_data_bytes),
        (STORE_PENDING_COMPACTION_BYTES, st.pending_compaction_bytes),
        (STORE_MEMTABLE_BYTES, st.memtable_bytes),
        (STORE_WAL_SYNCS, st.wal_syncs),
        (STORE_COMMIT_GROUPS, st.commit_groups),
        (STORE_COMMITS, st.commits),
        (STORE_WRITE_STOPPED, st.write_stopped),
        (STORE_DELAYED_WRITE_RATE, st.delayed_write_rate),
        (STORE_WRITE_QUEUE, st.write_queue_len),
        (STORE_IDEMPOTENT_REPLAYS, st.idempotent_replays),
        (STORE_RECORDS_EVICTED, st.records_evicted),
    ];
    for (name, value) in pairs {
        metrics::gauge!(name).set(value as f64);
    }
    if let Some(sp) = &st.space {
        let pairs = [
            (STORE_FREE_BYTES, sp.free_bytes),
            (STORE_SPACE_LOW, u64::from(sp.low)),
            (STORE_READ_ONLY, u64::from(sp.read_only)),
            (STORE_SPACE_REFUSED_WRITES, sp.refused_writes),
            (STORE_RESERVE_BYTES, sp.reserve_bytes),
        ];
        for (name, value) in pairs {
            metrics::gauge!(name).set(value as f64);
        }
    }
}

/// Latency buckets from 25 µs to 10 s: a memory get is tens of µs, a synced write is
/// milliseconds, a deadline-bound scan can take seconds.
const LATENCY_BUCKETS_SECONDS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics listener on {addr}")]
pub struct ExporterError {
    addr: SocketAddr,
    source: metrics_exporter_prometheus::BuildError,
}

/// Installs the Prometheus recorder; `crate::http` serves what it renders on `addr`.
pub fn install_recorder(
    addr: SocketAddr,
) -> Result<metrics_exporter_prometheus::PrometheusHandle, ExporterError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION_SECONDS.into()),
            &LATENCY_BUCKETS_SECONDS,
        )
        .and_then(|b| b.install_recorder())
        .map_err(|source| ExporterError { addr, source })?;
    metrics::describe_counter!(REQUESTS_TOTAL, "Calls finished, by method and code.");
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Server-side call latency, by method."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Calls being served now.");
    metrics::describe_gauge!(CONNECTIONS, "Open client connections.");
    metrics::describe_gauge!(
        STORE_LIVE_DATA_BYTES,
        metrics::Unit::Bytes,
        "Estimated live data on disk."
    );
    metrics::describe_gauge!(
        STORE_PENDING_COMPACTION_BYTES,
        metrics::Unit::Bytes,
        "Bytes compaction still has to rewrite."
    );
    metrics::describe_gauge!(
        STORE_MEMTABLE_BYTES,
        metrics::Unit::Bytes,
        "Bytes in memtables."
    );
    metrics::describe_gauge!(STORE_WAL_SYNCS, "WAL syncs since the engine opened.");
    metrics::describe_gauge!(
        STORE_COMMIT_GROUPS,
        "Group commits since the engine opened."
    );
    metrics::describe_gauge!(STORE_COMMITS, "Writes committed since the engine opened.");
    metrics::describe_gauge!(
        STORE_WRITE_STOPPED,
        "1 while the engine stops writes for compaction."
    );
    metrics::describe_gauge!(
        STORE_DELAYED_WRITE_RATE,
        "Rate writes are slowed to; 0 when not slowed."
    );
    metrics::describe_gauge!(STORE_WRITE_QUEUE, "Writes waiting for the committer.");
    metrics::describe_gauge!(
        STORE_FREE_BYTES,
        "Free bytes on the data directory's filesystem at the last check."
    );
    metrics::describe_gauge!(
        STORE_SPACE_LOW,
        "1 while writes are refused for space (below storage.min_free_bytes, or read-only)."
    );
    metrics::describe_gauge!(
        STORE_READ_ONLY,
        "1 while storage runs read-only after a start on a full disk."
    );
    metrics::describe_gauge!(
        STORE_SPACE_REFUSED_WRITES,
        "Writes refused for space since the store opened."
    );
    metrics::describe_gauge!(
        STORE_RESERVE_BYTES,
        "Size of the reserve file (storage.reserve_bytes; 0 once released)."
    );
    metrics::describe_counter!(
        DEADLINE_EXCEEDED_TOTAL,
        "Calls whose work was stopped at their deadline, by method."
    );
    metrics::describe_counter!(
        IDEMPOTENCY_CONFLICTS_TOTAL,
        "Writes refused because their idempotency key was used for another write."
    );
    metrics::describe_gauge!(
        STORE_IDEMPOTENT_REPLAYS,
        "Writes answered from an idempotency record (not written again) since open."
    );
    metrics::describe_gauge!(
        STORE_RECORDS_EVICTED,
        "Idempotency records a memory engine dropped for room before they expired, since open."
    );
    metrics::describe_counter!(
        FAULTS_INJECTED_TOTAL,
        "Calls a fault plan acted on, by method."
    );
    metrics::describe_counter!(
        REJECTIONS_TOTAL,
        "Calls or connections refused before any work, by reason."
    );
    metrics::describe_counter!(
        CONFIG_RELOADS_TOTAL,
        "Configuration reloads (SIGHUP or Admin.reloadConfig), by result (ok, refused)."
    );
    metrics::describe_counter!(
        CONNECTIONS_CLOSED_TOTAL,
        "Connections the server closed itself, by reason (idle, or a frame-layer breach: frame_too_large, too_many_segments, frame_timeout, undecodable, unsupported_message, cap_table_too_long, bootstrap_flood)."
    );
    metrics::describe_counter!(
        FRAME_BUDGET_WAITS_TOTAL,
        "Times a large message waited because limits.frame_budget_bytes was full."
    );
    metrics::describe_gauge!(
        PARTIAL_FRAME_BYTES,
        "Bytes held by partially received large messages, server-wide (limits.frame_budget_bytes)."
    );
    metrics::describe_gauge!(
        UNSENT_REPLY_BYTES,
        "Reply bytes built but not yet written to their sockets, server-wide (limits.unsent_reply_budget_bytes)."
    );
    metrics::describe_gauge!(
        CONNECTIONS_PAUSED,
        "Connections not read right now because their replies are not being read (limits.max_unsent_reply_bytes)."
    );
    metrics::describe_counter!(
        CONNECTION_PAUSES_TOTAL,
        "Times a connection stopped being read because of its unsent replies."
    );
    metrics::describe_gauge!(
        CAPABILITIES_HELD,
        "Capabilities (stores, sessions, admin, stand-ins) the server holds for its peers."
    );
    metrics::describe_gauge!(WATCHERS, "Watchers alive (KvStore.watch).");
    metrics::describe_gauge!(
        WATCH_LAG_REVISIONS,
        "Revisions of changes the watchers have yet to pull, summed over watchers."
    );
    metrics::describe_gauge!(LEASES, "Leases alive.");
    metrics::describe_counter!(
        LEASES_EXPIRED_TOTAL,
        "Leases revoked by the reaper because they were not kept alive for their TTL."
    );
    metrics::describe_counter!(
        WATCH_EVENTS_TOTAL,
        "Events delivered to watchers (Watcher.next)."
    );
    Ok(handle)
}
