#!/usr/bin/env bash
# Watch fan-out: one writer putting to a prefix as fast as one call at a time allows, and 1,
# 100 and 1,000 watchers of that prefix (kv-loadgen watch-fanout): puts/s, events delivered
# per second (summed over watchers) and put-to-delivery latency. Then lease churn
# (kv-loadgen lease-churn): leases of 1 s granted, each with one key, left to expire.
# bench/run.sh's pinning: kv-server (memory engine, 1 worker) on core 1, kv-loadgen on core 0.
#
# Usage: bash bench/watch.sh [SECONDS]   (default 10 per case)
# Bounded: three runs of SECONDS; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
secs=${1:-10}
bin="${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release"
for b in kv-server kv-loadgen; do
    [ -x "$bin/$b" ] || { echo "build first: cargo build --release -p capkv-server -p capkv-loadgen" >&2; exit 2; }
done
tmp=$(mktemp -d)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT
taskset -c 1 "$bin/kv-server" --engine memory --listen 127.0.0.1:0 --workers 1 \
    --log-format json 2>"$tmp/server.log" &
pids=("$!")
addr=$(wait_listening "$tmp/server.log" "${pids[0]}")
for watchers in 1 100 1000; do
    taskset -c 0 "$bin/kv-loadgen" watch-fanout --addr "$addr" --watchers "$watchers" \
        --connections 10 --duration "${secs}s"
done
taskset -c 0 "$bin/kv-loadgen" lease-churn --addr "$addr" --connections 10 --in-flight 4 \
    --ttl 1s --duration "${secs}s"
