//! The monitoring files against the programs that consume them: a real Prometheus scrapes
//! a real kv-server under a short load, and every PromQL expression of the Grafana
//! dashboard and of the alert rules (without its threshold) returns data through
//! Prometheus's HTTP API. Needs `prometheus` on PATH (scripts/setup.sh installs it).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;

use std::time::{Duration, Instant};

use capkv_client::{Client, ClientOptions};

const ADMIN: &str = "monitoring-admin";
/// Bound on every wait here; generous for a loaded CI machine.
const PATIENCE: Duration = Duration::from_secs(90);

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A plain HTTP/1.0 GET on loopback; the body, or `None` if nothing answers yet.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    s.read_to_string(&mut response).ok()?;
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
}

/// Prometheus's answer to an instant query: the number of series in the result.
fn query(port: u16, expr: &str) -> Result<usize, String> {
    let body = http_get(
        port,
        &format!("/api/v1/query?query={}", percent_encode(expr)),
    )
    .ok_or("no answer")?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    if v["status"] != "success" {
        return Err(format!("query failed: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

/// The `expr:` of every alert rule, single-line or `|` block.
fn alert_exprs(yaml: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut lines = yaml.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest != "|" {
            out.push(rest.to_string());
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        let mut block = Vec::new();
        while let Some(next) = lines.peek() {
            let next_indent = next.len() - next.trim_start().len();
            if next.trim().is_empty() || next_indent <= indent {
                break;
            }
            block.push(next.trim().to_string());
            lines.next();
        }
        out.push(block.join(" "));
    }
    out
}

/// An alert expression without its final top-level comparison: the quantity it watches.
fn without_threshold(expr: &str) -> String {
    let bytes = expr.as_bytes();
    let mut depth = 0i32;
    let mut cut = None;
    for (i, c) in bytes.iter().enumerate() {
        match c {
            b'(' | b'{' | b'[' => depth += 1,
            b')' | b'}' | b']' => depth -= 1,
            _ if depth == 0 && (expr[i..].starts_with(" > ") || expr[i..].starts_with(" == ")) => {
                cut = Some(i)
            }
            _ => {}
        }
    }
    cut.map_or(expr, |i| &expr[..i]).trim().to_string()
}

fn dashboard_exprs(json: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(json).expect("dashboard is JSON");
    v["panels"]
        .as_array()
        .expect("panels")
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .map(|t| t["expr"].as_str().expect("expr").to_string())
        .collect()
}

#[test]
fn every_dashboard_and_alert_expression_returns_data_from_a_real_prometheus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard = std::fs::read_to_string(root.join("monitoring/grafana/dashboards/capkv.json"))
        .expect("dashboard");
    let alerts = std::fs::read_to_string(root.join("monitoring/alerts.yml")).expect("alerts");
    let mut exprs = dashboard_exprs(&dashboard);
    let alert_exprs = alert_exprs(&alerts);
    assert_eq!(alert_exprs.len(), 8, "{alert_exprs:?}");
    exprs.extend(alert_exprs.iter().map(|e| without_threshold(e)));

    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_string_lossy();
    let (server, addr, metrics_addr, _logs) = common::spawn_kv_server_with_metrics(
        &[
            "--engine",
            "rocksdb",
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
            "--log-level",
            "warn,capkv_server=info",
            "--data-dir",
            &data_dir,
        ],
        &[
            ("CAPKV_ADMIN__TOKEN", ADMIN),
            ("CAPKV_STORAGE__STATS_INTERVAL_MS", "200"),
            // Small per-connection limit, so that the load below also meets rejections.
            ("CAPKV_LIMITS__MAX_IN_FLIGHT_PER_CONNECTION", "2"),
        ],
    );

    // The probes beside /metrics.
    let status = |path: &str| -> String {
        let mut s = TcpStream::connect(&metrics_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
        let mut r = String::new();
        s.read_to_string(&mut r).unwrap();
        r.lines().next().unwrap_or_default().to_string()
    };
    assert!(status("/healthz").contains("200"), "{}", status("/healthz"));
    assert!(status("/readyz").contains("200"), "{}", status("/readyz"));
    assert!(status("/nope").contains("404"), "{}", status("/nope"));
    // Its content is checked through Prometheus below; right after start it may be empty.
    assert!(status("/metrics").contains("200"), "{}", status("/metrics"));

    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: capkv\n    static_configs:\n      - targets: [\"{metrics_addr}\"]\n"
        ),
    )
    .unwrap();
    let (prometheus, prom_port) = common::spawn_on_free_port(
        |port| {
            let mut c = Command::new("prometheus");
            c.arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("tsdb").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}"));
            c
        },
        "Server is ready to receive web requests",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let c = Client::connect(&addr, ClientOptions::default())
            .await
            .unwrap();
        c.set_faults(ADMIN, "get latency=1ms p=0.2").await.unwrap();
        let started = Instant::now();
        let mut round = 0u32;
        // Load until Prometheus has rates for it (bounded by PATIENCE).
        loop {
            round += 1;
            let burst: Vec<_> = (0..16u32)
                .map(|i| {
                    let c = c.clone();
                    tokio::spawn(async move {
                        let key = format!("k{}", i % 8);
                        let _ = c.put(key.as_bytes(), b"v").await;
                        let _ = c.get(key.as_bytes()).await;
                        let _ = c.get(b"missing").await;
                    })
                })
                .collect();
            for t in burst {
                t.await.unwrap();
            }
            if round % 20 == 0 {
                let ready = tokio::task::spawn_blocking(move || {
                    query(prom_port, "sum(rate(capkv_requests_total[1m])) > 0").unwrap_or(0) > 0
                        && query(prom_port, "capkv_store_wal_syncs").unwrap_or(0) > 0
                        && query(prom_port, "rate(capkv_store_wal_syncs[1m]) > 0").unwrap_or(0) > 0
                })
                .await
                .unwrap();
                if ready && started.elapsed() > Duration::from_secs(4) {
                    break;
                }
            }
            assert!(started.elapsed() < PATIENCE, "Prometheus never had rates");
        }
    });

    let mut empty = Vec::new();
    for expr in &exprs {
        match query(prom_port, expr) {
            Ok(0) => empty.push(expr.clone()),
            Ok(_) => {}
            Err(e) => panic!("`{expr}`: {e}"),
        }
    }
    assert!(empty.is_empty(), "expressions without data: {empty:#?}");
    eprintln!("{} expressions evaluated, all with data", exprs.len());
    drop(prometheus);
    drop(server);
}
