//! What the server logs: one JSON line per request with the fields operators filter on,
//! and never a token or a stored value, at any level (trace included).

mod common;

use capkv_client::{Client, ClientOptions};

const TOKEN: &str = "sentinel-token-5f0c9e";
const ADMIN_TOKEN: &str = "sentinel-admin-1b7d42";
const VALUE: &str = "sentinel-value-a83e11";

#[test]
fn request_lines_are_json_with_their_fields_and_secrets_never_appear() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().expect("a UTF-8 temp dir");
    let (mut child, addr, rx) = common::spawn_kv_server(
        &[
            "--listen",
            "127.0.0.1:0",
            "--log-level",
            "trace",
            "--engine",
            "rocksdb",
            "--workers",
            "1",
            "--data-dir",
            data,
        ],
        &[
            ("CAPKV_AUTH__TOKEN", TOKEN),
            ("CAPKV_ADMIN__TOKEN", ADMIN_TOKEN),
            ("RUST_LOG", "trace"),
        ],
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let options = ClientOptions {
            token: TOKEN.into(),
            ..ClientOptions::default()
        };
        let c = Client::connect(&addr, options).await.unwrap();
        c.put(b"log-key", VALUE.as_bytes()).await.unwrap();
        assert_eq!(
            c.get(b"log-key").await.unwrap().unwrap().value,
            VALUE.as_bytes()
        );
        c.increment(b"n", 1).await.unwrap();
        c.show_faults(ADMIN_TOKEN).await.unwrap();
        c.show_faults("wrong-admin-token").await.unwrap_err();
        let bad = Client::connect(&addr, ClientOptions::default())
            .await
            .unwrap();
        bad.get(b"log-key").await.unwrap_err();
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    // The reader thread ends with stderr; bounded by the process having exited. The
    // receiver holds every line, from the first.
    let lines: Vec<String> = rx.iter().collect();

    let mut requests = 0;
    for line in &lines {
        assert!(!line.contains(TOKEN), "token logged: {line}");
        assert!(!line.contains(ADMIN_TOKEN), "admin token logged: {line}");
        assert!(!line.contains(VALUE), "value logged: {line}");
        let v: serde_json::Value = serde_json::from_str(line).expect("every line is JSON");
        if v["target"] == "capkv::request" {
            requests += 1;
            for field in [
                "trace_id",
                "span_id",
                "method",
                "code",
                "latency_ms",
                "attempt",
                "request_id",
                "peer",
                "conn",
            ] {
                assert!(!v[field].is_null(), "request line without {field}: {line}");
            }
            let hex_of_len = |field: &str, len: usize| {
                v[field].as_str().is_some_and(|s| {
                    s.len() == len
                        && s.bytes().all(|b| b.is_ascii_hexdigit())
                        && s != "0".repeat(len)
                })
            };
            assert!(hex_of_len("trace_id", 32), "trace_id: {line}");
            assert!(hex_of_len("span_id", 16), "span_id: {line}");
        }
    }
    assert!(requests >= 6, "request lines at trace level: {requests}");
    eprintln!(
        "{} log lines, {requests} request lines, no secrets",
        lines.len()
    );
}
