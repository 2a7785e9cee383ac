#!/usr/bin/env bash
# capkv against Redis the way the server-side engine's bars are stated (issue "capkv's own
# Cap'n Proto RPC engine, server side"): kv-server driven by kv-loadgen's raw client, Redis
# by redis-benchmark, GET and PUT at 50 connections with 1 and 16 calls in flight, in
# ROUNDS alternating rounds (`kv-loadgen versus`), so that this VM's drift of tens of percent
# within minutes cannot decide a ratio near 1.0 by itself. Prints markdown on stdout: the
# median ratio of calls/s, p99 (both timed from a request's write to its reply's read) and
# server CPU per call, with the rounds capkv was ahead in, then every round's figures.
# Usage: bench/versus.sh [BIN_DIR] [ROUNDS] [SECONDS] [KEYS] [VERSUS_ARGS...]
#   defaults: release build, 6 rounds of 4 s runs (1 s warm-up) on 100,000 keys (an even
#   count: each server goes first in half of them). VERSUS_ARGS go to `kv-loadgen versus`,
#   e.g. `-c 3000 --cases get1 --redis-client raw` (thousands of connections, Redis driven
#   by the same client work as capkv). SERVER_CPU_PCT=N in the environment holds each
#   server to N% of its core (`cap_cpu`, scripts/lib.sh): with thousands of connections the
#   generator's core, not the server's, limits calls/s; a server held to half a core is the
#   limit again, and calls/s compare the servers' capacity.
# kv-server (memory engine, 1 worker) and redis-server are pinned to core 1, kv-loadgen and
# the redis-benchmark it starts to core 0; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
rounds="${2:-6}"
secs="${3:-4}"
keys="${4:-100000}"
tmp=$(mktemp -d /var/tmp/capkv-versus.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; uncap_cpu_all; rm -rf "$tmp"' EXIT
extra=("${@:5}")
# Each connection is a descriptor at both ends.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"

start_kv_memory "$bin" "$tmp/kv.log" || exit 1
addr=$kv_addr
port=$(free_port)
start_redis "$port" "$tmp/redis.log" || exit 1

if [ -n "${SERVER_CPU_PCT:-}" ]; then
    cap_cpu "$kv_pid" "$SERVER_CPU_PCT" && cap_cpu "$redis_pid" "$SERVER_CPU_PCT" || exit 1
    echo "Each server held to ${SERVER_CPU_PCT}% of its core (a cgroup cpu limit, 10 ms period)."
    echo
fi

warmup=1s duration="${secs}s"
# SECONDS 0 is BENCH_QUICK's check of the script: a moment per case.
[ "$secs" = 0 ] && warmup=0s duration=300ms
taskset -c 0 "$bin/kv-loadgen" versus --addr "$addr" --server-pid "$kv_pid" \
    --redis-addr "127.0.0.1:$port" --redis-pid "$redis_pid" --repeat "$rounds" \
    --keys "$keys" --warmup "$warmup" --duration "$duration" "${extra[@]}"
