//! Every metric the server records, named once here (Prometheus conventions: `capkv_`
//! prefix, `_total` counters, `_seconds` histograms), and the exporter that serves them.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusBuilder;

pub const REQUESTS_TOTAL: &str = "capkv_requests_total";
pub const REQUEST_DURATION_SECONDS: &str = "capkv_request_duration_seconds";
pub const IN_FLIGHT: &str = "capkv_in_flight_requests";
pub const CONNECTIONS: &str = "capkv_connections";
pub const REJECTIONS_TOTAL: &str = "capkv_rejections_total";

/// Latency buckets from 25 µs to 10 s: a memory get is tens of µs, a synced write is
/// milliseconds, a deadline-bound scan can take seconds.
const LATENCY_BUCKETS_SECONDS: [f64; 18] = [
    0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, thiserror::Error)]
#[error("cannot start the metrics listener on {addr}: {source}")]
pub struct ExporterError {
    addr: SocketAddr,
    source: metrics_exporter_prometheus::BuildError,
}

/// Serves `/metrics` on `addr` from a background thread of the exporter's own.
pub fn install_exporter(addr: SocketAddr) -> Result<(), ExporterError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(
            metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION_SECONDS.into()),
            &LATENCY_BUCKETS_SECONDS,
        )
        .and_then(|b| b.install())
        .map_err(|source| ExporterError { addr, source })?;
    metrics::describe_counter!(REQUESTS_TOTAL, "Calls finished, by method and code.");
    metrics::describe_histogram!(
        REQUEST_DURATION_SECONDS,
        metrics::Unit::Seconds,
        "Server-side call latency, by method."
    );
    metrics::describe_gauge!(IN_FLIGHT, "Calls being served now.");
    metrics::describe_gauge!(CONNECTIONS, "Open client connections.");
    metrics::describe_counter!(
        REJECTIONS_TOTAL,
        "Calls or connections refused before any work, by reason."
    );
    Ok(())
}
