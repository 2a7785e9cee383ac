#!/usr/bin/env bash
# capkv as a gateway over etcd against etcd driven directly by the same generator
# (kv-loadgen --target etcd: the get and put calls the engine makes), and the single-node
# RocksDB engine beside them: GET and PUT at 1 and 50 connections, 100-byte values,
# 10k keys. The gateway's overhead is the ratio of each pair, run back to back. Rows
# "keyed": puts with an idempotency key each, as capkv's `Client` makes them by default.
# Usage: bench/etcd.sh [BIN_DIR] [SECONDS] [PAIRS]; prints a markdown table.
# A 3-member etcd cluster (Debian's etcd-server) and kv-server share core 1, kv-loadgen
# runs on core 0; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-10}"
pairs="${3:-2}"
tmp=$(mktemp -d /var/tmp/capkv-etcd.XXXXXX)
pids=()
trap 'stop_all; rm -rf "$tmp"' EXIT

taskset_all() { for p in "${pids[@]}"; do taskset -pc 1 "$p" >/dev/null; done; }

start_etcd_cluster "$tmp/etcd"
taskset_all
# Limits that fit etcd's transactions (--max-txn-ops 128, less the batch's record).
CAPKV_LIMITS__MAX_BATCH_ITEMS=127 taskset -c 1 "$bin/kv-server" --engine etcd \
    --etcd-endpoints "$ETCD_ENDPOINTS" --listen 127.0.0.1:0 --workers 1 --log-format json \
    2>"$tmp/gw.log" &
pids+=($!)
gw=$(wait_listening "$tmp/gw.log" "$!") || exit 1

run() { # $1 = case, $2 = label, $3 = target, $4 = addr, $5 = mix, $6 = connections, $7... flags
    taskset -c 0 "$bin/kv-loadgen" run "${@:7}" --target "$3" --addr "$4" \
        --mix "$5" -c "$6" --keys 10000 --value-size 100 --warmup 2s --duration "${secs}s" \
        --csv "$tmp/run.csv" >/dev/null
    # CSV: 10 op, 12 ok_per_sec, 15 p50 (us), 18 p99, 21 errors.
    awk -F, -v name="$1" -v target="$2" -v op="$5" 'NR > 1 && $10 == op {
        printf "| %s | %s | %.0f | %.3f ms | %.3f ms | %s |\n",
            name, target, $12, $15 / 1000, $18 / 1000, $21 }' "$tmp/run.csv"
}

# Both stores hold the keys before the reads.
taskset -c 0 "$bin/kv-loadgen" run --target etcd --addr "$ETCD_ENDPOINTS" --preload \
    --preload-batch 100 --mix get -c 1 --keys 10000 --warmup 0s --duration 1s >/dev/null
taskset -c 0 "$bin/kv-loadgen" run --target capkv --addr "$gw" --preload \
    --preload-batch 100 --mix get -c 1 --keys 10000 --warmup 0s --duration 1s >/dev/null

echo "| case | target | calls/s | p50 | p99 | errors |"
echo "|---|---|---|---|---|---|"
for c in 1 50; do
    for mix in get put; do
        name="${mix^^} c=$c"
        for _ in $(seq "$pairs"); do
            run "$name" "etcd (direct)" etcd "$ETCD_ENDPOINTS" "$mix" "$c"
            run "$name" "capkv on etcd" capkv "$gw" "$mix" "$c"
        done
    done
    # Writes as capkv's `Client` makes them by default: each with an idempotency key, whose
    # record goes into the write's transaction (etcd has no such thing to compare with).
    run "PUT c=$c keyed" "capkv on etcd" capkv "$gw" put "$c" --idempotent
done
stop_all

# The single-node engine on the same core, for scale (WAL synced per commit group).
CAPKV_STORAGE__COMPACTION_INTERVAL_S=0 taskset -c 1 "$bin/kv-server" --engine rocksdb \
    --data-dir "$tmp/rocks" --listen 127.0.0.1:0 --workers 1 --log-format json 2>"$tmp/rocks.log" &
pids+=($!)
rocks=$(wait_listening "$tmp/rocks.log" "$!") || exit 1
taskset -c 0 "$bin/kv-loadgen" run --target capkv --addr "$rocks" --preload \
    --mix get -c 1 --keys 10000 --warmup 0s --duration 1s >/dev/null
for c in 1 50; do
    for mix in get put; do
            run "${mix^^} c=$c" "capkv on RocksDB (one node)" capkv "$rocks" "$mix" "$c"
    done
    run "PUT c=$c keyed" "capkv on RocksDB (one node)" capkv "$rocks" put "$c" --idempotent
done
