#!/usr/bin/env bash
# The server's two RPC engines back to back (rpc_engine = capkv, the default, and capnp-rpc,
# the reference), same kv-loadgen, same run: GET c=50 with 1 and 16 calls in flight per
# connection on the memory engine, alternating engines for ROUNDS rounds so that the machine's
# drift hits both alike. Prints a markdown table on stdout with the server's CPU per call.
# Usage: bench/engines.sh [BIN_DIR] [SECONDS] [ROUNDS]
# kv-server (1 worker) is pinned to core 1, kv-loadgen to core 0; every process started is
# stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-4}"
rounds="${3:-2}"
tmp=$(mktemp -d /var/tmp/capkv-engines.XXXXXX)
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop; rm -rf "$tmp"' EXIT

echo "| round | engine | in flight | GET/s | p99 | server CPU | server CPU per call |"
echo "|---|---|---|---|---|---|---|"
for round in $(seq "$rounds"); do
    for engine in capkv capnp-rpc; do
        for in_flight in 1 16; do
            CAPKV_RPC_ENGINE="$engine" taskset -c 1 "$bin/kv-server" --engine memory \
                --listen 127.0.0.1:0 --workers 1 --log-format json 2>"$tmp/kv.log" &
            pid=$!
            addr=$(wait_listening "$tmp/kv.log" "$pid") || exit 1
            out=$(taskset -c 0 "$bin/kv-loadgen" run --addr "$addr" --server-pid "$pid" \
                -c 50 --in-flight "$in_flight" --mix get --keys 10000 --preload \
                --warmup 1s --duration "${secs}s")
            stop
            ok=$(awk '$1 == "get" {print $3}' <<<"$out")
            p99=$(awk '$1 == "get" {print $7}' <<<"$out")
            cpu=$(sed -n 's/^server: cpu \([0-9.]*\)%.*/\1/p' <<<"$out")
            per_call=$(python3 -c "print(f'{${cpu:-0} * 10000 / max(${ok:-0}, 1):.1f} µs')")
            echo "| $round | $engine | $in_flight | $ok | $p99 | ${cpu}% | $per_call |"
        done
    done
done
