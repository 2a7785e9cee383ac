#!/usr/bin/env bash
# Many connections, one call in flight each: kv-server (capkv's RPC engine, memory engine,
# 1 worker) against redis-server, both on core 1, the generator on core 0. For each count:
# GET throughput (kv-loadgen --target capkv-raw against kv-loadgen --target redis-raw, the
# same client work, and --target redis, the redis crate, then redis-benchmark, Redis's own
# client) and the server's RSS per connection:
# (largest RSS while the connections are open - RSS before they opened) / connections.
# With thousands of connections the generator's one core is busy (column "generator CPU"):
# then GET/s measures the generator as much as the server, and "server CPU per call"
# (user + system, from /proc) is what compares the servers.
# Prints a markdown table on stdout.
# Usage: bench/conns.sh [BIN_DIR] [SECONDS] [COUNTS]   (COUNTS default "1000 3000")
# Every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-4}"
counts="${3:-1000 3000}"
keys=10000
tmp=$(mktemp -d /var/tmp/capkv-conns.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT
# Each connection is a descriptor at both ends.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# Largest RSS of PID $1 until the file $2 exists, sampled every 50 ms, written to $3.
watch_rss() {
    local max=0 v
    while [ ! -e "$2" ] && [ -e "/proc/$1" ]; do
        v=$(rss_kib "$1" 2>/dev/null || echo 0)
        [ "${v:-0}" -gt "$max" ] && max=$v
        sleep 0.05
    done
    echo "$max" >"$3"
}
# Runs "$@" while watching PID $1's RSS; prints the command's stdout, leaves the max in $tmp/max.
with_rss() {
    local pid=$1; shift
    rm -f "$tmp/done" "$tmp/max"
    watch_rss "$pid" "$tmp/done" "$tmp/max" &
    local watcher=$!
    "$@" >"$tmp/out" 2>"$tmp/err" || { cat "$tmp/err" >&2; touch "$tmp/done"; wait "$watcher"; return 1; }
    touch "$tmp/done"
    wait "$watcher"
    cat "$tmp/out"
}
per_conn() { python3 -c "print(f'{max($2 - $1, 0) / $3:.1f}')"; }
# One table row: kv-loadgen's GET run over $1 connections against the server PID $4 at $5,
# with target $6; $2 and $3 are the row's server and client labels. Leaves the GET/s in `ok`.
loadgen_row() {
    local n=$1 server=$2 client=$3 pid=$4 addr=$5 target=$6 before max out p99 cpu
    before=$(rss_kib "$pid")
    out=$(with_rss "$pid" taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" \
        --server-pid "$pid" -c "$n" --in-flight 1 --mix get --keys "$keys" \
        --warmup 1s --duration "${secs}s")
    max=$(cat "$tmp/max")
    ok=$(awk '$1 == "get" {print $3}' <<<"$out"); p99=$(awk '$1 == "get" {print $7}' <<<"$out")
    cpu=$(sed -n 's/^server: cpu \([0-9.]*\)%.*/\1/p' <<<"$out")
    per_call=$(sed -n 's/^server: .*, \([0-9.]*\) us per call.*/\1/p' <<<"$out")
    gen=$(sed -n 's/^client (this generator): cpu \([0-9.]*\)%.*/\1/p' <<<"$out")
    echo "| $n | $server | $client | $ok | $p99 | ${cpu}% | ${per_call} us | ${gen}% | $((before / 1024)) MiB | $((max / 1024)) MiB | $(per_conn "$before" "$max" "$n") KiB |"
}

echo "| connections | server | client | GET/s | p99 | server CPU | server CPU per call | generator CPU | RSS before | RSS with connections | RSS per connection |"
echo "|---|---|---|---|---|---|---|---|---|---|---|"
for n in $counts; do
    # capkv
    start_kv_memory "$bin" "$tmp/kv.log" || exit 1
    addr=$kv_addr
    taskset -c 0 "$bin/kv-loadgen" run --addr "$addr" -c 1 --mix put --keys "$keys" --preload \
        --warmup 0s --duration 100ms >/dev/null
    loadgen_row "$n" capkv "kv-loadgen (raw)" "$kv_pid" "$addr" capkv-raw
    stop_all

    # Redis
    port=$(free_port)
    start_redis "$port" "$tmp/redis.log" || true
    taskset -c 0 "$bin/kv-loadgen" run --target redis --addr "127.0.0.1:$port" -c 1 --mix put \
        --keys "$keys" --preload --warmup 0s --duration 100ms >/dev/null
    loadgen_row "$n" redis kv-loadgen "$redis_pid" "127.0.0.1:$port" redis
    redis_ok=$ok
    # The same client work as capkv's row: the raw client's RESP twin.
    loadgen_row "$n" redis "kv-loadgen (raw)" "$redis_pid" "127.0.0.1:$port" redis-raw
    if command -v redis-benchmark >/dev/null 2>&1; then
        requests=$(( ${redis_ok%.*} * secs )); [ "$requests" -ge 10000 ] || requests=10000
        before=$(rss_kib "$redis_pid")
        out=$(with_rss "$redis_pid" taskset -c 0 redis-benchmark -p "$port" -c "$n" -n "$requests" \
            -r "$keys" -d 100 -t get --csv)
        max=$(cat "$tmp/max")
        # Redis 7 --csv: "test","rps","avg_latency_ms","min","p50","p95","p99","max"
        rps=$(awk -F'"' 'NR == 2 {print $4}' <<<"$out"); p99=$(awk -F'"' 'NR == 2 {print $14}' <<<"$out")
        echo "| $n | redis | redis-benchmark | $rps | ${p99} ms | | | | $((before / 1024)) MiB | $((max / 1024)) MiB | $(per_conn "$before" "$max" "$n") KiB |"
    fi
    stop_all
done
