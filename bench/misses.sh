#!/usr/bin/env bash
# Cache misses per GET, deterministic: kv-server and redis-server each run under valgrind's
# cachegrind (a simulated cache: L1 as this CPU's, the last level set to 2 MiB, the size of
# a core's L2 here), GET at CONNECTIONS connections, one call in flight each, driven by
# kv-loadgen's raw clients. Each server runs twice (SHORT and LONG seconds of gets after the
# same start and preload); the difference over the gets in between is what one get costs:
# instructions, L1 misses and 2 MiB misses (reads, writes). Why: with 1,000 connections a
# server's time per call grows with the cold cache lines each call touches, and on a shared
# VM timed A/B pairs cannot see a few percent; counted misses do not move from run to run.
# (The simulation ignores prefetch hints and the kernel: it counts lines touched, not time.)
# Usage: bench/misses.sh [BIN_DIR] [CONNECTIONS] [SHORT] [LONG]   (defaults: release, 1000, 3, 7)
# SERVERS="capkv" in the environment skips Redis. Needs valgrind (apt-get install -y valgrind). Prints a markdown table on stdout; every
# process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
conns="${2:-1000}" short="${3:-3}" long="${4:-7}"
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install -y valgrind)" >&2; exit 2; }
tmp=$(mktemp -d /var/tmp/capkv-misses.XXXXXX)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; rm -rf "$tmp"' EXIT
# Each connection is a descriptor at both ends.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
cachegrind=(valgrind --tool=cachegrind --cache-sim=yes --LL=2097152,16,64)

# one SERVER SECONDS: a fresh server under cachegrind, preloaded, then SECONDS of gets;
# prints "gets Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw" (cachegrind's totals, whole run).
one() {
    local server=$1 secs=$2 out="$tmp/cg.out" pid addr port target gets
    if [ "$server" = capkv ]; then
        "${cachegrind[@]}" --cachegrind-out-file="$out" "$bin/kv-server" --engine memory \
            --listen 127.0.0.1:0 --workers 1 --log-format json 2>"$tmp/server.log" &
        pid=$!; pids+=("$pid")
        addr=$(wait_listening "$tmp/server.log" "$pid" 600) || exit 1
        target=capkv-raw
        "$bin/kv-loadgen" run --target capkv --addr "$addr" -c 1 --mix put --keys 10000 \
            --preload --warmup 0s --duration 100ms >/dev/null
    else
        port=$(free_port)
        # Read by start_redis (scripts/lib.sh): the server runs under cachegrind.
        redis_wrap=("${cachegrind[@]}" --cachegrind-out-file="$out")
        start_redis "$port" "$tmp/server.log" || exit 1
        pid=$redis_pid
        addr="127.0.0.1:$port" target=redis-raw
        "$bin/kv-loadgen" run --target redis --addr "$addr" -c 1 --mix put --keys 10000 \
            --preload --warmup 0s --duration 100ms >/dev/null
    fi
    gets=$("$bin/kv-loadgen" run --target "$target" --addr "$addr" -c "$conns" --in-flight 1 \
        --mix get --keys 10000 --warmup 0s --duration "${secs}s" | awk '$1 == "get" {print $2}')
    # A clean stop, so that cachegrind writes its counts.
    kill -TERM "$pid"; wait "$pid" || true; pids=()
    echo "$gets $(sed -n 's/^summary: //p' "$out")"
}

echo "| server | gets counted | instructions per get | L1 misses per get (read + write) | 2 MiB misses per get (read + write) |"
echo "|---|---|---|---|---|"
for server in ${SERVERS:-capkv redis}; do
    a=$(one "$server" "$short")
    b=$(one "$server" "$long")
    python3 - "$server" "$a" "$b" <<'PY'
import sys
server, a, b = sys.argv[1], list(map(float, sys.argv[2].split())), list(map(float, sys.argv[3].split()))
names = "gets Ir I1mr ILmr Dr D1mr DLmr Dw D1mw DLmw".split()
d = {n: y - x for n, x, y in zip(names, a, b)}
g = d["gets"]
if g <= 0:
    sys.exit(f"{server}: no gets between the two runs")
per = {n: v / g for n, v in d.items()}
print(f"| {server} | {g:.0f} | {per['Ir']:.0f} | {per['D1mr'] + per['D1mw']:.1f} ({per['D1mr']:.1f} + {per['D1mw']:.1f}) "
      f"| {per['DLmr'] + per['DLmw']:.1f} ({per['DLmr']:.1f} + {per['DLmw']:.1f}) |")
PY
done
