#!/usr/bin/env bash
# A/B of two kv-server builds, the way a server change is judged here: alternating pairs
# (A, B, A, B, ...) seconds apart, with bench/run.sh's pinning (kv-server memory engine, 1
# worker, on core 1; kv-loadgen --target capkv-raw on core 0), printing each run's rate and
# the server's CPU per call (user + sys from /proc, divided by calls/s) and the part of it
# in user space (the kernel's share is mostly loopback TCP, which any server pays). One run
# alone means little on a shared VM: read the pairs, and trust a change that wins most of them.
#
# Usage: bench/ab.sh BIN_A BIN_B [MIX] [IN_FLIGHT] [PAIRS] [SECONDS]
#   defaults: get 16 3 5 (100,000 keys, 50 connections, 2 s warm-up per run);
#   CONNECTIONS and KEYS in the environment change those (CONNECTIONS=3000 KEYS=10000 is
#   bench/conns.sh's case); SERVER_CPU_PCT=N holds the server to N% of its core (see
#   `cap_cpu` in scripts/lib.sh: with thousands of connections the generator's core is
#   the limit otherwise). Ends with the median over pairs of B's CPU per call over A's, and
#   of its user-space part (the server's own code) over A's.
# e.g. keep the old binary before rebuilding:
#   cp $CARGO_TARGET_DIR/release/kv-server /var/tmp/kv-server-before
#   cargo build --release -p capkv-server
#   bash bench/ab.sh /var/tmp/kv-server-before $CARGO_TARGET_DIR/release/kv-server get 16
# Bounded: PAIRS x 2 runs of SECONDS each (plus preload and warm-up); every process
# started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
[ $# -ge 2 ] || { sed -n '9,15p' "$0" >&2; exit 2; }
bin_a=$1 bin_b=$2 mix=${3:-get} in_flight=${4:-16} pairs=${5:-3} secs=${6:-5}
conns=${CONNECTIONS:-50} keys=${KEYS:-100000}
# Each connection is a descriptor at both ends.
ulimit -n 20000 2>/dev/null || ulimit -n "$(ulimit -Hn)"
loadgen="${LOADGEN:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release/kv-loadgen}"
for b in "$bin_a" "$bin_b" "$loadgen"; do
    [ -x "$b" ] || { echo "not an executable: $b" >&2; exit 2; }
done
tmp=$(mktemp -d)
pids=()  # what stop_all (scripts/lib.sh) stops
trap 'stop_all; uncap_cpu_all; rm -rf "$tmp"' EXIT

# one BIN: one run against a fresh server; sets `rate` (calls/s), `cpu` (server %) and
# `user` (the server's user-space microseconds per call).
one() {
    local log="$tmp/server.log" pid addr out
    taskset -c 1 "$1" --engine memory --listen 127.0.0.1:0 --workers 1 --log-format json \
        2>"$log" &
    pid=$!
    pids=("$pid")
    addr=$(wait_listening "$log" "$pid")
    if [ -n "${SERVER_CPU_PCT:-}" ]; then cap_cpu "$pid" "$SERVER_CPU_PCT" || exit 1; fi
    out=$(taskset -c 0 "$loadgen" run --target capkv-raw --addr "$addr" -c "$conns" \
        --in-flight "$in_flight" --mix "$mix" --keys "$keys" --preload --warmup 2s \
        --duration "${secs}s" --server-pid "$pid")
    stop_all
    uncap_cpu_all
    rate=$(awk '$1 == "all" {print $3}' <<<"$out")
    cpu=$(awk '$1 == "server:" {print $3 + 0}' <<<"$out")
    user=$(sed -n 's/^server: .*(\([0-9.]*\) in user space).*/\1/p' <<<"$out")
}

echo "mix $mix, $in_flight in flight, $conns connections, $keys keys, ${secs}s per run${SERVER_CPU_PCT:+, server held to $SERVER_CPU_PCT% of a core}"
ratios=() user_ratios=()
for _ in $(seq "$pairs"); do
    per_call=() user_per_call=()
    for b in "$bin_a" "$bin_b"; do
        one "$b"
        awk -v n="$b" -v r="${rate:-0}" -v c="${cpu:-0}" -v u="${user:--}" 'BEGIN {
            printf "%-40s %8d/s  cpu %3d%%  %s us/call (%s user)\n", n, r, c,
                (r > 0 ? sprintf("%.3f", c / 100 / r * 1e6) : "-"), u }'
        per_call+=("$(awk -v r="${rate:-0}" -v c="${cpu:-0}" 'BEGIN { print (r > 0 ? c / r : 0) }')")
        user_per_call+=("${user:-0}")
    done
    ratios+=("$(awk -v a="${per_call[0]}" -v b="${per_call[1]}" 'BEGIN { print (a > 0 ? b / a : 0) }')")
    user_ratios+=("$(awk -v a="${user_per_call[0]}" -v b="${user_per_call[1]}" 'BEGIN { print (a > 0 ? b / a : 0) }')")
done
# median_line LABEL RATIO...: the median of the ratios and how many are below 1.
median_line() {
    local label=$1; shift
    printf '%s\n' "$@" | sort -g | awk -v label="$label" '{ v[NR] = $1; if ($1 < 1) lower++ } END {
        m = (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)
        printf "B/A %s: median %.3f over %d pairs, B lower in %d\n", label, m, NR, lower }'
}
median_line "server CPU per call" "${ratios[@]}"
median_line "its user-space part" "${user_ratios[@]}"
