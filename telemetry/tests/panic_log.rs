//! With JSON logs, a panic is a JSON log line (target `capkv::panic`), not the default
//! hook's plain text: a reader of the log stream never meets a line it cannot parse. (The
//! server's JSON-log test once failed on the blank line that begins the default hook's
//! output, from a panic inside capnp-rpc at shutdown.) The test runs its own binary again as
//! the process that logs and panics, and reads that process's stderr.

const CHILD: &str = "CAPKV_TELEMETRY_PANIC_CHILD";

#[test]
fn a_panic_is_a_json_log_line() {
    if std::env::var_os(CHILD).is_some() {
        let trace = capkv_telemetry::TraceConfig::default();
        let _telemetry = capkv_telemetry::init(&capkv_telemetry::Settings {
            log_filter: "info",
            log_style: capkv_telemetry::LogStyle::Json,
            trace: &trace,
            default_service_name: "panic-test",
        })
        .expect("telemetry");
        tracing::info!("before");
        let joined = std::thread::Builder::new()
            .name("doomed".into())
            .spawn(|| panic!("on purpose"))
            .expect("a thread")
            .join();
        assert!(joined.is_err(), "the thread panicked");
        tracing::info!("after");
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("the test binary"))
        .args(["a_panic_is_a_json_log_line", "--exact", "--nocapture"])
        .env(CHILD, "1")
        .env_remove("RUST_LOG")
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("the child runs");
    assert!(out.status.success(), "the child failed: {out:?}");
    let stderr = String::from_utf8(out.stderr).expect("UTF-8");
    let lines: Vec<serde_json::Value> = stderr
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    let panic = lines
        .iter()
        .find(|v| v["target"] == "capkv::panic")
        .unwrap_or_else(|| panic!("no panic line in {stderr}"));
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["panic"], "on purpose");
    assert_eq!(panic["thread"], "doomed");
    assert!(
        panic["location"]
            .as_str()
            .is_some_and(|l| l.contains("panic_log.rs")),
        "{panic}"
    );
    let messages: Vec<&str> = lines.iter().filter_map(|v| v["message"].as_str()).collect();
    assert_eq!(messages, ["before", "thread panicked", "after"]);
}
