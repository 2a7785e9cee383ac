#!/usr/bin/env bash
# Durable writes while the worker is saturated: what `storage.committer_sched_batch` costs in
# commit latency. kv-server (1 worker, pinned to core 1, engine ENGINE: memory-log by
# default) takes GETs from 50 connections (kv-loadgen --target capkv-raw, one call in flight
# each: enough to keep its core busy) and, at the same time, durable puts from WRITERS
# connections (default 10); the option off then on, ROUNDS times (default 2), each case a
# fresh server on 100k preloaded keys. Prints a markdown table: puts/s and gets/s, each with
# its p50 and p99. Bounded (each case SECONDS + 3 s); every process started is stopped by
# its PID.
# Usage: bench/commit-latency.sh [BIN_DIR] [SECONDS] [ENGINE] [WRITERS] [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-10}"
engine="${3:-memory-log}"
writers="${4:-10}"
rounds="${5:-2}"
tmp=$(mktemp -d /var/tmp/capkv-commit-latency.XXXXXX)
pids=() # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT

# row CSV OP: "calls/s | p50 | p99" of OP from a kv-loadgen CSV (10 op, 12 ok_per_sec, 15 p50,
# 18 p99 in us).
row() {
    awk -F, -v op="$2" 'NR > 1 && $10 == op {printf "%.0f | %.2f ms | %.2f ms", $12, $15 / 1000, $18 / 1000}' "$1"
}

echo "| committer_sched_batch | round | puts/s ($writers writers) | put p50 | put p99 | gets/s (50 readers) | get p50 | get p99 |"
echo "|---|---|---|---|---|---|---|---|"
for round in $(seq "$rounds"); do
    for batch in false true; do
        rm -rf "$tmp/data"
        CAPKV_STORAGE__COMMITTER_SCHED_BATCH=$batch taskset -c 1 "$bin/kv-server" --engine "$engine" \
            --data-dir "$tmp/data" --listen 127.0.0.1:0 --workers 1 --log-format json 2>"$tmp/kv.log" &
        pids+=("$!")
        addr=$(wait_listening "$tmp/kv.log" "${pids[0]}") || exit 1
        taskset -c 0 "$bin/kv-loadgen" run --target capkv --addr "$addr" -c 1 --mix put --keys 100000 \
            --preload --warmup 0s --duration 100ms >/dev/null
        # The readers start first and end last, so that the writers' window is saturated whole.
        taskset -c 0 "$bin/kv-loadgen" run --target capkv-raw --addr "$addr" -c 50 --mix get \
            --keys 100000 --warmup 1s --duration "$((secs + 2))s" --csv "$tmp/get.csv" >/dev/null &
        readers=$!
        pids+=("$readers")
        taskset -c 0 "$bin/kv-loadgen" run --target capkv-raw --addr "$addr" -c "$writers" --mix put \
            --keys 100000 --warmup 2s --duration "${secs}s" --csv "$tmp/put.csv" >/dev/null
        wait "$readers"
        echo "| $batch | $round | $(row "$tmp/put.csv" put) | $(row "$tmp/get.csv" get) |"
        stop_all
    done
done
