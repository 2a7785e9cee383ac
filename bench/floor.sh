#!/usr/bin/env bash
# How far each server is from the floor of a loopback call, server-bound: rounds of a bare C
# epoll echo (../shared/peers/pingpong.c: 100-byte request and reply, no work), kv-server
# (memory engine, 1 worker, driven by kv-loadgen's raw client, GET) and redis-server (driven
# by the raw client's RESP twin, GET), at CONNECTIONS connections with one call in flight
# each, every server held to CPU_PCT% of core 1 (`cap_cpu`, scripts/lib.sh) so that the
# server is the limit; the generators run on core 0. Prints per round each server's calls/s
# and its CPU per call (user + sys from /proc), with the user-space part for the two
# servers: what a server's own code costs beyond the kernel's loopback work, which the echo
# is nearly all of. Why: at one call in flight the kernel's work per call is the same for
# capkv and Redis (one recv, one send, two TCP segments), so the echo bounds how far ahead
# of Redis any server can be. Needs gcc (apt-get install -y gcc) and redis-server.
# Usage: bench/floor.sh [BIN_DIR] [CONNECTIONS] [CPU_PCT] [SECONDS] [ROUNDS]
#   defaults: release build, 1000, 70, 5, 4.
# Bounded: ROUNDS x 3 runs of SECONDS (plus 1 s warm-up for the two servers); every process
# started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
conns="${2:-1000}" pct="${3:-70}" secs="${4:-5}" rounds="${5:-4}"
keys=10000
peers="$(cd .. && pwd)/shared/peers"
[ -f "$peers/pingpong.c" ] || { echo "no $peers/pingpong.c" >&2; exit 2; }
command -v gcc >/dev/null || { echo "gcc is not installed (apt-get install -y gcc)" >&2; exit 2; }
tmp=$(mktemp -d /var/tmp/capkv-floor.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; uncap_cpu_all; rm -rf "$tmp"' EXIT
# Each connection is a descriptor at both ends.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
# CPU time (user + sys) of PID $1 so far, in clock ticks.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)

gcc -O2 -o "$tmp/pingpong" "$peers/pingpong.c"
echo_port=$(free_port)
taskset -c 1 "$tmp/pingpong" s "$echo_port" 100 &
echo_pid=$!; pids+=("$echo_pid")
start_kv_memory "$bin" "$tmp/kv.log" || exit 1
redis_port=$(free_port)
start_redis "$redis_port" "$tmp/redis.log" || exit 1
for p in "$echo_pid" "$kv_pid" "$redis_pid"; do cap_cpu "$p" "$pct" || exit 1; done
"$bin/kv-loadgen" run --target capkv --addr "$kv_addr" -c 1 --mix put --keys "$keys" \
    --preload --warmup 0s --duration 100ms >/dev/null
"$bin/kv-loadgen" run --target redis --addr "127.0.0.1:$redis_port" -c 1 --mix put \
    --keys "$keys" --preload --warmup 0s --duration 100ms >/dev/null

# One server's run: "calls/s us-per-call (user us)".
server_run() {
    local target=$1 addr=$2 pid=$3 out
    out=$(taskset -c 0 "$bin/kv-loadgen" run --target "$target" --addr "$addr" \
        --server-pid "$pid" -c "$conns" --in-flight 1 --mix get --keys "$keys" \
        --warmup 1s --duration "${secs}s")
    echo "$(awk '$1 == "get" {print $3}' <<<"$out") $(sed -n \
        's/^server: .*, \([0-9.]*\) us per call (\([0-9.]*\) in user space).*/\1 us (\2 user)/p' <<<"$out")"
}

echo "Each server held to ${pct}% of core 1; ${conns} connections, one call in flight each."
echo
echo "| round | bare C echo: calls/s, CPU per call | capkv | Redis |"
echo "|---|---|---|---|"
for r in $(seq "$rounds"); do
    t0=$(ticks "$echo_pid")
    ops=$(taskset -c 0 "$tmp/pingpong" c "$echo_port" 100 "$conns" "$secs" | awk '{print $1}')
    t1=$(ticks "$echo_pid")
    floor=$(python3 -c "print(f'{$ops:.0f} {($t1 - $t0) / $hz / ($ops * $secs) * 1e6:.2f} us')")
    kv=$(server_run capkv-raw "$kv_addr" "$kv_pid")
    redis=$(server_run redis-raw "127.0.0.1:$redis_port" "$redis_pid")
    echo "| $r | $floor | $kv | $redis |"
done
