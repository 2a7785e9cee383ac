//! capkv telemetry, shared by kv-server, kv-client and kv-loadgen.
//!
//! - [`init`] installs the process's `tracing` subscriber: a log layer (JSON lines or
//!   human text, filtered by config or `RUST_LOG`) and, when trace export is configured, an
//!   OpenTelemetry layer that sends capkv's spans over OTLP/gRPC. It returns a
//!   [`Telemetry`] guard that flushes the spans when it is shut down or dropped.
//! - [`TraceConfig`]: endpoint, service name, sampling and export timeout, from config and
//!   the standard `OTEL_*` variables (which win).
//! - [`TraceParent`]: the W3C `traceparent` value that travels in every `RequestContext`:
//!   parsed on the server, produced from the client's attempt span.
//! - [`span_ids`]: the trace and span id a log line carries, whether or not export is on.
//! - With JSON logs, a panic is logged as one (target `capkv::panic`), not printed as text.
//!
//! Spans are created at `TRACE` level under targets starting with `capkv`. The log layer
//! keeps its own filter, so with export off those spans are disabled and cost one
//! level check per call; with export on only the OpenTelemetry layer sees them.
//! Telemetry must never hurt the service: the exporter runs on its own small runtime, its
//! queue is bounded (spans beyond it are dropped), and its own complaints are silenced
//! (`quiet when no collector answers`) unless `RUST_LOG` asks for them.

use std::fmt;
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{
    SpanContext, TraceContextExt, TraceFlags, TraceState, TracerProvider as _,
};
pub use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use serde::{Deserialize, Serialize};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

/// Target prefix of capkv's spans and events; the trace layer sees only these.
pub const TARGET_PREFIX: &str = "capkv";

/// Third-party targets whose chatter (an unreachable collector, HTTP/2 internals) stays
/// out of the logs unless `RUST_LOG` names them.
const QUIET_TARGETS: &str =
    "opentelemetry=off,opentelemetry_sdk=off,opentelemetry_otlp=off,tonic=off,h2=off,tower=off,hyper_util=off";

static TRACING_ENABLED: AtomicBool = AtomicBool::new(false);

/// Replaces the log layer's filter (installed by [`init`]).
type FilterSetter = Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync>;
static LOG_FILTER: OnceLock<FilterSetter> = OnceLock::new();
/// Whether `RUST_LOG` chose the filter at start (then it keeps winning).
static FILTER_FROM_ENV: AtomicBool = AtomicBool::new(false);

fn filter_with_quiet_targets(filter: &str) -> Result<EnvFilter, TelemetryError> {
    EnvFilter::try_new(format!("{filter},{QUIET_TARGETS}"))
        .map_err(|e| TelemetryError::Config(format!("log filter `{filter}`: {e}")))
}

/// Checks a log filter (`info`, `capkv::request=debug,info`) without applying it.
pub fn check_log_filter(filter: &str) -> Result<(), TelemetryError> {
    filter_with_quiet_targets(filter).map(|_| ())
}

/// Puts a new log filter in force; `Ok(false)` when `RUST_LOG` set the filter and so
/// keeps it, or when [`init`] has not installed the log layer.
pub fn set_log_filter(filter: &str) -> Result<bool, TelemetryError> {
    let new = filter_with_quiet_targets(filter)?;
    if FILTER_FROM_ENV.load(Ordering::Relaxed) {
        return Ok(false);
    }
    match LOG_FILTER.get() {
        Some(set) => set(new).map(|()| true).map_err(TelemetryError::Config),
        None => Ok(false),
    }
}

/// Whether spans are exported (so span contexts are real OpenTelemetry contexts).
pub fn tracing_enabled() -> bool {
    TRACING_ENABLED.load(Ordering::Relaxed)
}

/// Trace export settings (`[telemetry]` in kv-server's config; flags in kv-client).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraceConfig {
    /// OTLP/gRPC collector address, e.g. `http://127.0.0.1:4317`; empty = no export.
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` or `OTEL_EXPORTER_OTLP_ENDPOINT` override it.
    pub otlp_endpoint: String,
    /// `service.name` of the spans; `OTEL_SERVICE_NAME` overrides it. Empty = the binary's.
    pub service_name: String,
    /// Fraction of new traces sampled (0..=1); a caller's decision is followed.
    /// `OTEL_TRACES_SAMPLER` (and `_ARG`) override it.
    pub sample_ratio: f64,
    /// Longest wait for one export, and for the final flush at shutdown.
    pub export_timeout_ms: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        TraceConfig {
            otlp_endpoint: String::new(),
            service_name: String::new(),
            sample_ratio: 1.0,
            export_timeout_ms: 3_000,
        }
    }
}

impl TraceConfig {
    /// The endpoint to export to, if any, after the standard variables.
    pub fn effective_endpoint(&self) -> Option<String> {
        if env_is("OTEL_SDK_DISABLED", "true") {
            return None;
        }
        [
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "OTEL_EXPORTER_OTLP_ENDPOINT",
        ]
        .iter()
        .filter_map(|v| std::env::var(v).ok())
        .chain(std::iter::once(self.otlp_endpoint.clone()))
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
    }

    pub fn validate(&self) -> Result<(), TelemetryError> {
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(TelemetryError::Config(format!(
                "telemetry.sample_ratio must be within 0..=1, not {}",
                self.sample_ratio
            )));
        }
        if self.export_timeout_ms == 0 {
            return Err(TelemetryError::Config(
                "telemetry.export_timeout_ms must be positive".into(),
            ));
        }
        Ok(())
    }
}

fn env_is(var: &str, value: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v.trim().eq_ignore_ascii_case(value))
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogStyle {
    Json,
    Text,
    /// JSON lines, or text when stderr is a terminal.
    Auto,
}

/// What [`init`] needs.
#[derive(Debug, Clone)]
pub struct Settings<'a> {
    /// Log filter (`info`, `capkv::request=debug,info`); `RUST_LOG` wins when set.
    pub log_filter: &'a str,
    pub log_style: LogStyle,
    pub trace: &'a TraceConfig,
    /// `service.name` when neither the config nor `OTEL_SERVICE_NAME` gives one.
    pub default_service_name: &'a str,
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("{0}")]
    Config(String),
    #[error("cannot start the trace exporter: {0}")]
    Exporter(String),
}

/// The installed telemetry; [`Telemetry::shutdown`] (or drop) flushes pending spans.
#[must_use = "dropping it flushes and stops trace export"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    timeout: Duration,
    // The exporter's gRPC channel lives on this runtime; it must outlive the provider.
    runtime: Option<tokio::runtime::Runtime>,
}

impl Telemetry {
    /// Whether spans are being exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Flushes pending spans (waiting at most the export timeout) and stops export.
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(provider) = self.provider.take() {
            TRACING_ENABLED.store(false, Ordering::Relaxed);
            // An unreachable collector is not worth a line at exit: export is best effort.
            let _ = provider.shutdown_with_timeout(self.timeout);
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(self.timeout);
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Installs the global subscriber (logs, and trace export when configured). A second call
/// in one process (tests) keeps the first subscriber and exports nothing more.
pub fn init(settings: &Settings<'_>) -> Result<Telemetry, TelemetryError> {
    settings.trace.validate()?;
    let (filter, from_env) = match EnvFilter::try_from_default_env() {
        Ok(f) => (f, true),
        Err(_) => (
            filter_with_quiet_targets(settings.log_filter)
                .unwrap_or_else(|_| EnvFilter::new(format!("info,{QUIET_TARGETS}"))),
            false,
        ),
    };
    // Reloadable, so SIGHUP can change the level of a running server.
    let (filter, filter_handle) = tracing_subscriber::reload::Layer::new(filter);
    let json = match settings.log_style {
        LogStyle::Json => true,
        LogStyle::Text => false,
        LogStyle::Auto => !std::io::stderr().is_terminal(),
    };
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // A failed log write would be reported with eprintln!, which panics when stderr
        // itself is gone (a closed log pipe): that took a worker and its connections down.
        // Losing log lines is better than losing the server.
        .log_internal_errors(false);
    let fmt = if json {
        fmt.json().flatten_event(true).boxed()
    } else {
        fmt.boxed()
    };

    let mut telemetry = Telemetry {
        provider: None,
        timeout: Duration::from_millis(settings.trace.export_timeout_ms),
        runtime: None,
    };
    let otel = match settings.trace.effective_endpoint() {
        None => None,
        Some(endpoint) => {
            let (provider, runtime) = exporter(settings, &endpoint)?;
            let tracer = provider.tracer("capkv");
            telemetry.provider = Some(provider);
            telemetry.runtime = Some(runtime);
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
                        meta.target().starts_with(TARGET_PREFIX)
                    })),
            )
        }
    };
    let exporting = otel.is_some();
    let installed = tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()
        .is_ok();
    if installed && json {
        log_panics();
    }
    if installed {
        FILTER_FROM_ENV.store(from_env, Ordering::Relaxed);
        let _ = LOG_FILTER.set(Box::new(move |f| {
            filter_handle.reload(f).map_err(|e| e.to_string())
        }));
    }
    if installed && exporting {
        TRACING_ENABLED.store(true, Ordering::Relaxed);
    } else {
        // Not installed (a second init): nothing would feed this provider.
        telemetry.stop();
    }
    Ok(telemetry)
}

/// Makes a panic a log line (target `capkv::panic`, level ERROR) instead of the default
/// hook's plain text on stderr: where logs are JSON lines, a reader of the stream would
/// meet lines it cannot parse (the default hook's output even starts with an empty one).
/// The panic itself goes on as before: a task's is contained by its runtime, as the server
/// relies on; the backtrace is included when `RUST_BACKTRACE` asks for one.
fn log_panics() {
    std::panic::set_hook(Box::new(|info| {
        let payload = info.payload();
        let message = payload
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(a panic payload that is not text)");
        let location = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_default();
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("<unnamed>");
        let backtrace = std::backtrace::Backtrace::capture();
        if backtrace.status() == std::backtrace::BacktraceStatus::Captured {
            tracing::error!(target: "capkv::panic", panic = message, location, thread, %backtrace, "thread panicked");
        } else {
            tracing::error!(target: "capkv::panic", panic = message, location, thread, "thread panicked");
        }
    }));
}

fn exporter(
    settings: &Settings<'_>,
    endpoint: &str,
) -> Result<(SdkTracerProvider, tokio::runtime::Runtime), TelemetryError> {
    let trace = settings.trace;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("otel-export")
        .enable_all()
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    // tonic's lazy channel spawns its worker on the runtime entered here.
    let _entered = runtime.enter();
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_millis(trace.export_timeout_ms))
        .build()
        .map_err(|e| TelemetryError::Exporter(e.to_string()))?;
    let service_name = match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.trim().is_empty() => name,
        _ if !trace.service_name.is_empty() => trace.service_name.clone(),
        _ => settings.default_service_name.to_string(),
    };
    let mut builder = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service_name).build());
    // Without OTEL_TRACES_SAMPLER the SDK's default would ignore the configured ratio.
    if std::env::var_os("OTEL_TRACES_SAMPLER").is_none() {
        builder = builder.with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            trace.sample_ratio,
        ))));
    }
    Ok((builder.build(), runtime))
}

/// A W3C trace context `traceparent` value (version 00).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses `00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`; `None` for anything
    /// else, including all-zero ids (the spec says to ignore such a header).
    pub fn parse(value: &str) -> Option<TraceParent> {
        let value = value.trim();
        if value.is_empty() {
            // The common case, no trace context: decided without splitting.
            return None;
        }
        let mut parts = value.split('-');
        let (version, trace, span, flags) =
            (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
        let lower_hex = |s: &str, len: usize| {
            s.len() == len
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        };
        // Future versions may append fields; version 00 has exactly four.
        if !lower_hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some())
        {
            return None;
        }
        if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
            return None;
        }
        let trace_id = TraceId::from_hex(trace).ok()?;
        let span_id = SpanId::from_hex(span).ok()?;
        let flags = u8::from_str_radix(flags, 16).ok()?;
        if trace_id == TraceId::INVALID || span_id == SpanId::INVALID {
            return None;
        }
        Some(TraceParent {
            trace_id,
            span_id,
            sampled: flags & 1 == 1,
        })
    }

    /// The context of `span` to send to the server, when spans are being exported.
    pub fn of_span(span: &tracing::Span) -> Option<TraceParent> {
        if !tracing_enabled() {
            return None;
        }
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| TraceParent {
            trace_id: sc.trace_id(),
            span_id: sc.span_id(),
            sampled: sc.is_sampled(),
        })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            self.trace_id,
            self.span_id,
            u8::from(self.sampled)
        )
    }
}

/// Makes the remote caller's span the parent of `span` (the server's span of a call).
pub fn set_remote_parent(span: &tracing::Span, parent: &TraceParent, tracestate: &str) {
    if !tracing_enabled() {
        return;
    }
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    let state = tracestate.parse::<TraceState>().unwrap_or_default();
    let sc = SpanContext::new(parent.trace_id, parent.span_id, flags, true, state);
    // Fails only if the span was already started, which a fresh span is not.
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
}

/// The trace and span id for the log lines of `span`: the exported span's own ids, or,
/// with export off, the caller's trace id (a new one without a caller) and a fresh span
/// id, so the lines of one call still share an id with the caller's.
pub fn span_ids(span: &tracing::Span, parent: Option<&TraceParent>) -> (TraceId, SpanId) {
    if tracing_enabled() {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        if sc.is_valid() {
            return (sc.trace_id(), sc.span_id());
        }
    }
    let trace_id = parent.map_or_else(|| TraceId::from(rand::random::<u128>()), |p| p.trace_id);
    (trace_id, SpanId::from(rand::random::<u64>()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_and_prints_the_w3c_example() {
        let tp = TraceParent::parse(EXAMPLE).expect("valid");
        assert!(tp.sampled);
        assert_eq!(tp.to_string(), EXAMPLE);
        let unsampled = EXAMPLE.replace("-01", "-00");
        assert!(!TraceParent::parse(&unsampled).expect("valid").sampled);
    }

    #[test]
    fn rejects_malformed_values() {
        for bad in [
            "",
            "00",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bz-01",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn later_versions_may_carry_more_fields() {
        let v1 = EXAMPLE.replacen("00-", "01-", 1) + "-future";
        assert!(TraceParent::parse(&v1).is_some());
    }

    #[test]
    fn without_export_log_ids_follow_the_caller() {
        let tp = TraceParent::parse(EXAMPLE).expect("valid");
        let (trace, span) = span_ids(&tracing::Span::none(), Some(&tp));
        assert_eq!(trace, tp.trace_id);
        assert_ne!(span, tp.span_id);
        let (fresh, _) = span_ids(&tracing::Span::none(), None);
        assert_ne!(fresh, TraceId::INVALID);
    }

    #[test]
    fn config_checks_its_ranges() {
        let mut c = TraceConfig::default();
        assert!(c.validate().is_ok());
        c.sample_ratio = 1.5;
        assert!(c.validate().is_err());
        c.sample_ratio = 0.5;
        c.export_timeout_ms = 0;
        assert!(c.validate().is_err());
    }
}
