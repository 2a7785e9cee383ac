//! Traces from client to server, checked by a real OTLP/gRPC receiver (an in-process
//! `TraceService` built from opentelemetry-proto's service definitions): kv-client and
//! kv-server, both real processes, export to it. One call yields a client span and a
//! server span in one trace, the server span the child of the client's attempt span and
//! the store span the child of the server's; a retried call shows each attempt; the
//! server's request log line carries the same trace id. And with nothing listening at the
//! endpoint, kv-client still works and says nothing about it.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

/// Bound on every wait here; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(60);

fn client_bin() -> PathBuf {
    // Built by `cargo test --workspace` beside kv-server.
    let p = common::kv_client_bin();
    assert!(
        p.exists(),
        "{} missing: run cargo test --workspace",
        p.display()
    );
    p
}

/// One received span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    kind: i32,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

fn value_text(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

struct Receiver {
    spans: mpsc::SyncSender<Got>,
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .map(value_text)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                let got = Got {
                    service: service.clone(),
                    name: span.name,
                    kind: span.kind,
                    trace_id: span.trace_id,
                    span_id: span.span_id,
                    parent_span_id: span.parent_span_id,
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value_text(kv)))
                        .collect(),
                };
                // Bounded: a test makes a few dozen spans; extra ones are dropped.
                let _ = self.spans.try_send(got);
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

/// Starts the receiver on its own runtime; returns its address and the span stream.
fn start_receiver() -> (tokio::runtime::Runtime, String, mpsc::Receiver<Got>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tx, rx) = mpsc::sync_channel(10_000);
    let incoming = rt
        .block_on(async {
            tonic::transport::server::TcpIncoming::bind("127.0.0.1:0".parse().unwrap())
        })
        .expect("bind receiver");
    let addr = incoming.local_addr().expect("receiver address");
    rt.spawn(
        tonic::transport::Server::builder()
            .serve_with_incoming(TraceServiceServer::new(Receiver { spans: tx }), incoming),
    );
    (rt, format!("http://{addr}"), rx)
}

fn kv_client(addr: &str, endpoint: &str, args: &[&str]) -> std::process::Output {
    Command::new(client_bin())
        .args(["--addr", addr, "--otlp-endpoint", endpoint])
        .args(args)
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .env_remove("RUST_LOG")
        .output()
        .expect("run kv-client")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[test]
fn a_call_is_one_trace_from_client_attempts_to_server_and_store() {
    one_trace_per_call(&["--engine", "memory"]);
}

/// The same on a store whose writes wait for a group commit: the put waits in the RPC
/// engine (`Now::Wait`), its server and store spans as on the memory engine's.
#[test]
fn a_write_waiting_for_its_commit_is_one_trace_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("log");
    one_trace_per_call(&[
        "--engine",
        "memory-log",
        "--data-dir",
        data.to_str().unwrap(),
    ]);
}

fn one_trace_per_call(engine: &[&str]) {
    let (_rt, endpoint, spans) = start_receiver();
    let mut args = vec!["--listen", "127.0.0.1:0", "--workers", "1"];
    args.extend_from_slice(engine);
    let (server, addr, log_rx) = common::spawn_kv_server(
        &args,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
            // The first get fails once, so its call is retried.
            ("CAPKV_FAULTS__PLAN", "get fail=unavailable times=1"),
            ("CAPKV_LOG__LEVEL", "capkv::request=debug,info"),
        ],
    );

    let put = kv_client(&addr, &endpoint, &["put", "traced", "v1"]);
    assert!(put.status.success(), "put: {put:?}");
    let get = kv_client(&addr, &endpoint, &["--attempts", "3", "get", "traced"]);
    assert!(get.status.success(), "get: {get:?}");
    assert_eq!(String::from_utf8_lossy(&get.stdout).trim(), "v1");

    // Spans arrive in batches, in any order: check what has arrived until it all holds
    // (bounded by PATIENCE), then report the last reason it did not.
    let mut got: Vec<Got> = Vec::new();
    let give_up = Instant::now() + PATIENCE;
    let traces = loop {
        match check(&got) {
            Ok(t) => break t,
            Err(why) => {
                let left = give_up.saturating_duration_since(Instant::now());
                match spans.recv_timeout(left) {
                    Ok(s) => got.push(s),
                    Err(_) => panic!("{why}; spans: {got:#?}"),
                }
            }
        }
    };
    for trace in traces {
        // The server's request log line names the caller's trace. It was written before
        // the reply left, so it is already in the pipe.
        let logged = std::iter::from_fn(|| log_rx.recv_timeout(PATIENCE).ok())
            .take(100)
            .filter(|l| l.contains("capkv::request"))
            .find(|l| l.contains(&trace));
        assert!(logged.is_some(), "no request log line with trace {trace}");
    }
    drop(server);
}

/// Checks the spans of the put (one attempt) and the get (two: the first met the injected
/// fault); returns the two trace ids (hex) or why the spans do not (yet) show it.
fn check(got: &[Got]) -> Result<Vec<String>, String> {
    let mut traces = Vec::new();
    for (method, attempts) in [("put", 1), ("get", 2)] {
        let call = got
            .iter()
            .find(|s| {
                s.service == "kv-client" && s.kind == SpanKind::Internal as i32 && s.name == method
            })
            .ok_or(format!("no client call span for {method}"))?;
        if call.attributes.get("code").map(String::as_str) != Some("ok") {
            return Err(format!("{method} call span without code ok"));
        }
        let mut tries: Vec<&Got> = got
            .iter()
            .filter(|s| s.kind == SpanKind::Client as i32 && s.parent_span_id == call.span_id)
            .collect();
        tries.sort_by_key(|s| s.attributes.get("attempt").cloned());
        if tries.len() != attempts {
            return Err(format!(
                "{} attempt spans for {method}, want {attempts}",
                tries.len()
            ));
        }
        for (n, attempt) in tries.iter().enumerate() {
            let code = attempt.attributes.get("code").cloned().unwrap_or_default();
            if attempt.trace_id != call.trace_id {
                return Err(format!("{method} attempt {n} in another trace"));
            }
            if attempt.attributes.get("attempt") != Some(&(n + 1).to_string()) {
                return Err(format!("{method} attempt {n} numbered wrong"));
            }
            let want = if method == "get" && n == 0 {
                "unavailable"
            } else {
                "ok"
            };
            if code != want {
                return Err(format!("{method} attempt {n} ended {code}, want {want}"));
            }
            // A put's attempt also carries the session opening (a `session` server span).
            let server_span = got
                .iter()
                .find(|s| {
                    s.kind == SpanKind::Server as i32
                        && s.parent_span_id == attempt.span_id
                        && s.name == method
                })
                .ok_or(format!("no server span under attempt {n} of {method}"))?;
            if server_span.service != "kv-server" || server_span.trace_id != call.trace_id {
                return Err(format!(
                    "server span of {method} in another service or trace"
                ));
            }
            if server_span.attributes.get("code") != Some(&code) {
                return Err(format!(
                    "server span of {method} attempt {n} disagrees on code"
                ));
            }
            let store = got.iter().find(|s| s.parent_span_id == server_span.span_id);
            match (code.as_str(), store) {
                ("ok", Some(st))
                    if st.name == format!("store.{method}") && st.trace_id == call.trace_id => {}
                ("ok", _) => {
                    return Err(format!("no store span under the server span of {method}"))
                }
                (_, Some(_)) => return Err(format!("the faulted {method} reached the store")),
                (_, None) => {}
            }
        }
        traces.push(hex(&call.trace_id));
    }
    Ok(traces)
}

#[test]
fn an_absent_collector_costs_nothing_visible() {
    // A port nobody listens on: connecting is refused at once.
    let endpoint = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let config = common::test_config();
    let server = common::start(config);
    let out = kv_client(&server.addr().to_string(), &endpoint, &["put", "k", "v"]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        out.stderr.is_empty(),
        "kv-client complained: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
