#!/usr/bin/env bash
# Sets up and runs every check: formatting, clippy (warnings are errors), all tests,
# promtool on monitoring/, and the smoke script against the built binaries. This is what
# CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
start=$(date +%s)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
# The server and client tests again on capnp-rpc's RpcSystem, the reference the default
# engine (capkv_rpc::engine) is held to, and the way back (rpc_engine = "capnp-rpc").
echo "== benchmarks, each run once (criterion's test mode: they work, not how fast)"
cargo test --locked -p capkv-store --bench memory
echo "== cargo test on capnp-rpc's RpcSystem (server and client tests)"
CAPKV_RPC_ENGINE=capnp-rpc cargo test --locked -p capkv-server -p capkv-client
# The server tests again with each connection a tokio task (io_loop = "tokio"), the
# reference the worker's own readiness loop (capkv_rpc::ready) is held to, and the way back.
echo "== cargo test with tokio tasks for connections (server tests)"
CAPKV_IO_LOOP=tokio cargo test --locked -p capkv-server
echo "== monitoring (promtool)"
promtool check config monitoring/prometheus.yml
promtool check rules monitoring/alerts.yml
promtool test rules monitoring/alerts_test.yml
echo "== packaging (compose, references, hadolint)"
bash scripts/check-packaging.sh
echo "== smoke"
bash scripts/smoke.sh "$CARGO_TARGET_DIR/debug"

# The README's commands that build the workspace cannot run inside cargo test (cargo
# holds its build lock): they run here, in the debug profile already built above.
source scripts/lib.sh
work=$(mktemp -d)
run_pid=""
trap 'if [ -n "$run_pid" ]; then kill "$run_pid" 2>/dev/null || true; wait "$run_pid" 2>/dev/null || true; fi; rm -rf "$work"' EXIT
echo "== scripts/run.sh (debug profile), smoke against it"
CAPKV_PROFILE=debug bash scripts/run.sh --engine memory --listen 127.0.0.1:0 --log-format json \
    2>"$work/run.log" &
run_pid=$!
addr=$(wait_listening "$work/run.log" "$run_pid" 3000)  # its build check comes first
CAPKV_ADDR="$addr" bash scripts/smoke.sh "$CARGO_TARGET_DIR/debug"
kill -TERM "$run_pid"
wait "$run_pid"
run_pid=""
echo "== bench/run.sh (BENCH_QUICK=1, debug profile: checks the script, not the speed)"
CAPKV_PROFILE=debug BENCH_QUICK=1 bash bench/run.sh "$work/results.md"
# Each section the results file must hold: the comparison, the floor's and
# redis-benchmark's rows, the durable table.
for want in "GET c=50" "| GET c=50 | capnp-rpc floor |" "| 1 | capnp-rpc | 16 |" \
    "| GET c=50 | capkv raw |" "| GET c=50 x16 in rounds | capkv raw |" "| GET c=50 | capkv, capnp-rpc client |" "| GET c=50 | capkv-engine floor, raw |" "| 50 | capkv | kv-loadgen (raw) |" \
    "| GET c=50 batch 16 | redis-benchmark -P 16 |" "appendfsync always" \
    "| capkv (memory engine) |" "| capkv (RocksDB engine) |" "| db_bench "; do
    grep -qF "$want" "$work/results.md" || { cat "$work/results.md"; echo "missing: $want" >&2; exit 1; }
done
# The plots it links, written beside it.
for plot in spectrum-get-c-50 spectrum-put-c-50 open-loop durable; do
    grep -q "<svg" "$work/plots/$plot.svg" || { echo "missing plot: $plot.svg" >&2; exit 1; }
done
echo "== bench/etcd.sh (debug profile, 1 s runs: checks the script, not the speed)"
bash bench/etcd.sh "$CARGO_TARGET_DIR/debug" 1 1 >"$work/etcd.md"
for want in "| GET c=1 | etcd (direct) |" "| PUT c=50 | capkv on etcd |" "| capkv on RocksDB (one node) |"; do
    grep -qF "$want" "$work/etcd.md" || { cat "$work/etcd.md"; echo "missing: $want" >&2; exit 1; }
done

echo "== all checks passed in $(( $(date +%s) - start )) s"
