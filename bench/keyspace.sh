#!/usr/bin/env bash
# What a keyspace costs: kv-server's memory engine (1 worker) against redis-server, both on
# core 1, the generator on core 0, with the same keys (kv-loadgen's `key:NNNNNNNNNNNN`) and
# 100-byte values. For each key count: the server's RSS per key ((RSS after the preload and
# a short GET run, so the allocator has settled) - RSS before) / keys, then GET and PUT
# c=50 with one call in flight each (kv-loadgen --target capkv-raw against --target redis:
# the same generator for both).
# Prints a markdown table on stdout.
# Usage: bench/keyspace.sh [BIN_DIR] [SECONDS] [COUNTS]   (COUNTS default "100000 1000000")
# Every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-4}"
counts="${3:-100000 1000000}"
tmp=$(mktemp -d /var/tmp/capkv-keyspace.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT

# measure NAME TARGET ADDR PID KEYS: preload, settle, RSS, then GET and PUT; prints a row.
measure() {
    local name=$1 target=$2 addr=$3 pid=$4 keys=$5 before after get put
    before=$(rss_kib "$pid")
    taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" -c 8 --in-flight 16 \
        --mix put --keys "$keys" --preload --warmup 0s --duration 100ms >/dev/null
    # Reads after the load let the allocator give back what growing the tables left free.
    taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" -c 50 --mix get \
        --keys "$keys" --warmup 0s --duration 1s >/dev/null
    after=$(rss_kib "$pid")
    get=$(taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" --server-pid "$pid" \
        -c 50 --mix get --keys "$keys" --warmup 1s --duration "${secs}s" | awk '$1 == "get" {print $3 " (p99 " $7 ")"}')
    put=$(taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" --server-pid "$pid" \
        -c 50 --mix put --keys "$keys" --warmup 1s --duration "${secs}s" | awk '$1 == "put" {print $3 " (p99 " $7 ")"}')
    local per_key=$(( (after - before) * 1024 / keys ))
    echo "| $keys | $name | $((before / 1024)) MiB | $((after / 1024)) MiB | $per_key B | $get | $put |"
}

echo "| keys | server | RSS before | RSS with the keys | RSS per key | GET/s c=50 | PUT/s c=50 |"
echo "|---|---|---|---|---|---|---|"
for n in $counts; do
    start_kv_memory "$bin" "$tmp/kv.log" || exit 1
    addr=$kv_addr
    # The raw target preloads through the client library (batches of 500).
    measure "capkv (memory engine)" capkv-raw "$addr" "$kv_pid" "$n"
    stop_all

    port=$(free_port)
    start_redis "$port" "$tmp/redis.log" || true
    measure "redis" redis "127.0.0.1:$port" "$redis_pid" "$n"
    stop_all
done
