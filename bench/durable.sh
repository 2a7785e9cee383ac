#!/usr/bin/env bash
# Durable puts, one back-to-back run with the same load generator: capkv on RocksDB with the
# WAL synced before each acknowledgement, group commit on (default) and off
# (storage.group_commit_max_writes=1), capkv's memory-log engine (its log synced before each
# acknowledgement, group commit on), against redis-server with `appendfsync always`.
# 1 and 50 writers (connections, one call in flight each), 100-byte values, 100k keys; and
# capkv's 50 writers again with an idempotency key per put (`Client`'s default).
# Prints a markdown table on stdout; with DURABLE_CSV=FILE also writes the rows as
# `target,writers,puts_per_sec,p99_ms` (what `kv-loadgen plot-durable` reads).
# Usage: bench/durable.sh [BIN_DIR] [SECONDS] [WARMUP_SECONDS]
# kv-server and redis-server are pinned to core 1, kv-loadgen to core 0; data lives in a
# temp dir on the same disk for all of them; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-10}"
warmup="${3:-1}"
tmp=$(mktemp -d /var/tmp/capkv-durable.XXXXXX)
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop; rm -rf "$tmp"' EXIT

start_capkv() { # $1 = group_commit_max_writes, $2 = engine (default rocksdb)
    rm -rf "$tmp/data"
    CAPKV_STORAGE__GROUP_COMMIT_MAX_WRITES="$1" taskset -c 1 "$bin/kv-server" --engine "${2:-rocksdb}" \
        --data-dir "$tmp/data" --listen 127.0.0.1:0 --workers 1 --log-format json 2>"$tmp/kv.log" &
    pid=$!
    addr=$(wait_listening "$tmp/kv.log" "$pid") || exit 1
}

start_durable_redis() {
    rm -rf "$tmp/redis"; mkdir -p "$tmp/redis"
    port=$(free_port)
    pids=()
    start_redis "$port" "$tmp/redis.log" --dir "$tmp/redis" --appendonly yes \
        --appendfsync always || true
    pid=$redis_pid
    addr="127.0.0.1:$port"
}

csv="${DURABLE_CSV:-}"
[ -z "$csv" ] || echo "target,writers,puts_per_sec,p99_ms" >"$csv"

run() { # $1 = case name, $2 = target, $3 = connections, $4 = series label (default: target),
        # $5... more kv-loadgen flags
    taskset -c 0 "$bin/kv-loadgen" run "${@:5}" --target "$2" --addr "$addr" --server-pid "$pid" \
        --mix put -c "$3" --keys 100000 --value-size 100 --warmup "${warmup}s" --duration "${secs}s" \
        --csv "$tmp/run.csv" >/dev/null
    if [ -n "$csv" ]; then
        awk -F, -v target="${4:-$2}" -v writers="$3" 'NR > 1 && $10 == "put" {
            printf "%s,%s,%.1f,%.3f\n", target, writers, $12, $18 / 1000 }' "$tmp/run.csv" >>"$csv"
    fi
    # CSV: 12 ok_per_sec, 14 mean, 15 p50, 18 p99, 21 errors, 22 server CPU %.
    awk -F, -v name="$1" -v target="$2" 'NR > 1 && $10 == "put" {
        printf "| %s | %s | %.0f | %.2f ms | %.2f ms | %.2f ms | %s | %s%% |\n",
            name, target, $12, $15 / 1000, $18 / 1000, $14 / 1000, $21, $22 }' "$tmp/run.csv"
}

echo "| case | target | puts/s | p50 | p99 | mean | errors | server CPU |"
echo "|---|---|---|---|---|---|---|---|"
start_capkv 1024
run "sync, group commit on, 1 writer" capkv 1
run "sync, group commit on, 50 writers" capkv 50
# As capkv's `Client` writes by default: each put with an idempotency key, its record
# committed in the same batch.
run "sync, group commit on, keyed, 50 writers" capkv 50 "capkv (keyed)" --idempotent
stop
start_capkv 1
run "sync, group commit off, 1 writer" capkv 1 "capkv (group commit off)"
run "sync, group commit off, 50 writers" capkv 50 "capkv (group commit off)"
stop
# The memory engine with its write-ahead log (`--engine memory-log`): Redis's design, with
# group commit.
start_capkv 1024 memory-log
run "memory-log, 1 writer" capkv 1 "capkv memory-log"
run "memory-log, 50 writers" capkv 50 "capkv memory-log"
run "memory-log, keyed, 50 writers" capkv 50 "capkv memory-log (keyed)" --idempotent
stop
start_durable_redis
run "appendfsync always, 1 writer" redis 1
run "appendfsync always, 50 writers" redis 50
stop
