//! A foreign Cap'n Proto implementation against capkv: pycapnp (the C++ library inside a
//! Python wheel) runs `tests/pycapnp/pipelining.py` with nothing but `schema/kv.capnp`,
//! pipelining every capability through its generated Pipeline API, against a real server,
//! directly and through a delaying proxy that counts round trips. See the script for what
//! it checks.
//!
//! pycapnp comes from `scripts/setup.sh`, which installs it (pinned) into a venv outside
//! the clone; `CAPKV_PYCAPNP_PYTHON` names that venv's python. Without it this test fails
//! and says how to get it: the foreign client is the point of the test, not an extra.

mod common;

use std::time::Duration;

use common::*;

/// Half a round trip: each direction through the proxy is delayed this long.
const DELAY: Duration = Duration::from_millis(100);

fn python() -> String {
    let python = std::env::var("CAPKV_PYCAPNP_PYTHON")
        .unwrap_or_else(|_| "/var/tmp/capkv-tools/pycapnp-venv/bin/python".to_string());
    assert!(
        std::path::Path::new(&python).exists(),
        "{python} not found: run `source scripts/setup.sh` (it installs pycapnp into a venv \
         and sets CAPKV_PYCAPNP_PYTHON)"
    );
    python
}

#[test]
fn pycapnp_pipelines_every_capability_in_one_round_trip() {
    let python = python();
    let mut config = test_config();
    config.auth.token = Some(capkv_server::config::Secret::new("py-token"));
    config.admin.token = Some(capkv_server::config::Secret::new("py-admin"));
    let server = start(config);
    let addr = server.addr();
    local(async move {
        let proxy = delaying_proxy(addr, DELAY).await;
        let script = repo().join("server/tests/pycapnp/pipelining.py");
        let schema = repo().join("schema/kv.capnp");
        let run = tokio::process::Command::new(&python)
            .arg(&script)
            .arg(&schema)
            .arg(addr.to_string())
            .arg(proxy.to_string())
            .arg((DELAY * 2).as_millis().to_string())
            .args(["py-token", "py-admin"])
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the pycapnp script ends within 2 minutes")
            .expect("python runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        eprintln!("{stdout}{stderr}");
        assert!(out.status.success(), "pycapnp checks failed: {stderr}");
        assert!(stdout.contains("ok: the connection still serves after the refusals"));
    });
}
