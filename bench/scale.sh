#!/usr/bin/env bash
# Storage at scale: kv-server's RocksDB engine (1 worker, sync on, the defaults: 256 MiB
# block cache, bloom filter, LZ4) against RocksDB's own db_bench with the same options
# (values incompressible in both: kv-loadgen's are random bytes), on the same disk, for each key count (default 100,000 and 10,000,000 keys of
# 16 bytes with 100-byte values: ~1.2 GiB at 10M, more than the block cache).
#
# Per key count, capkv: load every key once (kv-loadgen --preload: putMany of 500, 4 in
# flight), wait (bounded) for compaction to settle, then GET uniform, GET zipfian (s=0.99)
# and durable PUT uniform, c=50 one call in flight each, and GET uniform with 16 in flight
# (kv-loadgen --target capkv-raw); bytes on disk after the load, RSS after the reads, and
# bytes the server wrote to disk per byte loaded (WAL, flushes and compaction:
# /proc/PID/io). db_bench: fillseq (the same sequential load, WAL on, not
# synced), readrandom with 50 threads (every key present, as in capkv's run), overwrite
# sync=1 with 50 threads (random keys over the existing ones, as capkv's PUT), and the same
# written-bytes figure from its statistics.
#
# Placement: kv-server and db_bench on core 1, kv-loadgen on core 0 (db_bench has no
# network and no second process: it gets the one core the server gets).
# Prints a markdown table on stdout. Bounded: each measured case runs SECONDS; the loads
# take about a minute per 10M keys each. Every process started is stopped by its PID.
# Usage: bench/scale.sh [BIN_DIR] [SECONDS] [COUNTS]   (COUNTS default "100000 10000000")
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-10}"
counts="${3:-100000 10000000}"
source scripts/setup.sh # db_bench (rocksdb-tools), curl
# Data goes to disk (/var/tmp), never to a tmpfs /tmp.
tmp=$(mktemp -d /var/tmp/capkv-scale.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT

CACHE_BYTES=$((256 << 20)) # kv-server's default block cache (storage.block_cache_bytes)
mib() { echo $(( $1 / 1048576 )); }
# on_disk DIR: "total MiB (SST files + WAL [+ kv-server's free-space reserve])".
on_disk() {
    local total sst wal reserve
    total=$(du -sb "$1" | cut -f1)
    # printf %.0f: awk prints sums past 2^31 in exponent form (and %d clamps them), which
    # $(( )) cannot read.
    sst=$(find "$1" -name '*.sst' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}')
    wal=$(find "$1" -name '*.log' -printf '%s\n' | awk '{s+=$1} END {printf "%.0f\n", s}')
    reserve=""
    [ -f "$1/capkv.reserve" ] && reserve=" + $(mib "$(stat -c %s "$1/capkv.reserve")") reserve"
    echo "$(mib "$total") MiB ($(mib "$sst") SST + $(mib "$wal") WAL$reserve)"
}
written_bytes() { awk '/^write_bytes:/ {print $2}' "/proc/$1/io"; }
# metric ADDR NAME: one sample of kv-server's /metrics (0 when absent).
metric() {
    curl -fsS "http://$1/metrics" 2>/dev/null | awk -v n="$2" '$1 == n {print int($2); f=1} END {if (!f) print 0}'
}
# run_case ADDR PID N MIX DIST [IN_FLIGHT]: "rate (p99 X)" of a c=50 closed-loop run.
run_case() {
    taskset -c 0 "$bin/kv-loadgen" run --target capkv-raw --addr "$1" --server-pid "$2" \
        -c 50 --in-flight "${6:-1}" --mix "$4" --dist "$5" --keys "$3" --warmup 2s --duration "${secs}s" \
        | awk -v m="$4" '$1 == m {printf "%.1fk (p99 %s)", $3 / 1000, $7}'
}

capkv() {
    local n=$1 dir="$tmp/capkv-$1" log="$tmp/kv-$1.log" addr ops pid t0 t1 w0 w1 pending
    CAPKV_STORAGE__STATS_INTERVAL_MS=500 taskset -c 1 "$bin/kv-server" --engine rocksdb --data-dir "$dir" --listen 127.0.0.1:0 \
        --metrics-listen 127.0.0.1:0 --workers 1 --log-format json 2>"$log" &
    pid=$!; pids+=("$pid")
    addr=$(wait_listening "$log" "$pid" 300) || exit 1
    ops=$(sed -n 's/.*"metrics_addr":"\([0-9.:]*\)".*/\1/p' "$log" | head -n1)
    w0=$(written_bytes "$pid"); t0=$(date +%s.%N)
    taskset -c 0 "$bin/kv-loadgen" run --target capkv --addr "$addr" -c 1 --mix put \
        --keys "$n" --preload --warmup 0s --duration 100ms >/dev/null
    t1=$(date +%s.%N)
    # Compaction catching up after the load is part of its cost: wait for it (at most 5 min).
    sleep 1 # one statistics read after the load
    for _ in $(seq 300); do
        pending=$(metric "$ops" capkv_store_pending_compaction_bytes)
        [ "$pending" = 0 ] && break
        sleep 1
    done
    w1=$(written_bytes "$pid")
    local load_s per_s wamp get get16 zget put rss disk
    disk=$(on_disk "$dir")
    load_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", b - a}')
    per_s=$(awk -v a="$t0" -v b="$t1" -v n="$n" 'BEGIN {printf "%.0fk", n / (b - a) / 1000}')
    wamp=$(awk -v w=$((w1 - w0)) -v n="$n" 'BEGIN {printf "%.1f", w / (n * 116)}')
    get=$(run_case "$addr" "$pid" "$n" get uniform)
    get16=$(run_case "$addr" "$pid" "$n" get uniform 16)
    zget=$(run_case "$addr" "$pid" "$n" get zipf)
    rss=$(( $(rss_kib "$pid") / 1024 ))
    put=$(run_case "$addr" "$pid" "$n" put uniform)
    echo "| $n | capkv (RocksDB engine) | ${load_s} s (${per_s}/s), ${wamp}x | $disk | $get | $get16 | $zget | $put | $rss MiB |"
    stop_all
}

# db_bench prints "name : X micros/op Y ops/sec ..." and, with --histogram, "Percentiles:
# P50: a P75: b P99: c ..." in microseconds.
db_rate() { awk -v b="$1" '$1 == b && $2 == ":" {for (i=1;i<=NF;i++) if ($i=="ops/sec") r=$(i-1)}
    /^Percentiles:/ && !p {p=$7} END {printf "%.1fk (p99 %.2fms)", r/1000, p/1000}'; }
db_written() { awk '/rocksdb.(wal|flush.write|compact.write).bytes COUNT/ {s+=$4} END {print s+0}'; }

dbbench() {
    local n=$1 dir="$tmp/db-$1" common out load_s per_s wamp get put rss_peak disk
    common="--db=$dir --num=$n --key_size=16 --value_size=100 --compression_type=lz4 \
        --compression_ratio=1 \
        --cache_size=$CACHE_BYTES --bloom_bits=10 --max_background_jobs=2 --seed=1 --histogram=1"
    # shellcheck disable=SC2086 # $common is a list of flags
    out=$(taskset -c 1 db_bench --benchmarks=fillseq,waitforcompaction $common --sync=0 \
        --statistics=1 2>&1)
    # The load's own rate (as capkv's, without the wait for compaction).
    per_s=$(echo "$out" | awk '$1 == "fillseq" {for (i=1;i<=NF;i++) if ($i=="ops/sec") print $(i-1)}')
    load_s=$(awk -v r="$per_s" -v n="$n" 'BEGIN {printf "%.0f", n / r}')
    per_s=$(awk -v r="$per_s" 'BEGIN {printf "%.0fk", r / 1000}')
    wamp=$(awk -v w="$(echo "$out" | db_written)" -v n="$n" 'BEGIN {printf "%.1f", w / (n * 116)}')
    disk=$(on_disk "$dir")
    # shellcheck disable=SC2086
    get=$(taskset -c 1 db_bench --benchmarks=readrandom --use_existing_db=1 $common \
        --threads=50 --duration="$secs" 2>&1 | db_rate readrandom)
    # shellcheck disable=SC2086
    put=$(taskset -c 1 /usr/bin/time -f 'rss %M' db_bench --benchmarks=overwrite \
        --use_existing_db=1 $common --threads=50 --sync=1 --duration="$secs" 2>&1 \
        | tee "$tmp/db-put.out" | db_rate overwrite)
    rss_peak=$(( $(awk '/^rss / {print $2}' "$tmp/db-put.out") / 1024 ))
    echo "| $n | db_bench $(db_bench --version 2>/dev/null | awk '{print $3}') | ${load_s} s (${per_s}/s), ${wamp}x | $disk | $get (50 threads) | – | – | $put | $rss_peak MiB (peak, overwrite) |"
    rm -rf "$dir"
}

echo "| keys | engine | load: time (rate), disk bytes written per byte loaded | on disk after the load | GET/s uniform c=50 | GET/s uniform c=50 x16 | GET/s zipf c=50 | durable PUT/s c=50 | RSS |"
echo "|---|---|---|---|---|---|---|---|---|"
for n in $counts; do
    capkv "$n"
    rm -rf "$tmp/capkv-$n"
    dbbench "$n"
done
