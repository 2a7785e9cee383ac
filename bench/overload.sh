#!/usr/bin/env bash
# Overload: measure kv-server's capacity C, then offer 5x C open loop for 20 s and report
# whether it holds: up, RSS bounded, admitted p99 vs the unloaded p99, how fast refusals
# arrive, successful throughput vs C. Prints a markdown table on stdout.
#
# This machine has 2 cores: a load generator on one core cannot offer 5x what a server on
# the other serves when both spend about the same CPU per call. So the server's capacity is
# set by its admission limits instead of its CPU: every data call holds its in-flight slot
# for an injected 2 ms (a slow backend, `* latency=2ms`; tokio's timer makes it ~3 ms),
# with max_in_flight=8, so C ~= 8 / 3 ms ~= 2.5k calls/s, and 5x C stays within what one
# core of kv-loadgen can send and read while the server refuses the excess. What is
# measured is then exactly the admission path: the queue, its timeout, the refusals.
#
# Usage: bench/overload.sh [BIN_DIR] [OVERLOAD_SECONDS]. kv-server is pinned to core 1,
# kv-loadgen to core 0; every process started is stopped by its PID.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/release}"
secs="${2:-20}"
tmp=$(mktemp -d /var/tmp/capkv-overload.XXXXXX)
pid=""
stop() { if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; pid=""; fi; }
trap 'stop; rm -rf "$tmp"' EXIT

CAPKV_FAULTS__PLAN='* latency=2ms' CAPKV_LIMITS__MAX_IN_FLIGHT=8 \
    taskset -c 1 "$bin/kv-server" --engine memory --listen 127.0.0.1:0 --workers 1 \
    --log-format json 2>"$tmp/kv.log" &
pid=$!
addr=$(wait_listening "$tmp/kv.log" "$pid") || exit 1

load() { # $1 = json out, rest = kv-loadgen run flags
    local out="$1"; shift
    # kv-loadgen drives connections directly, without retries: each refusal is counted.
    taskset -c 0 "$bin/kv-loadgen" run --addr "$addr" --server-pid "$pid" --mix read \
        --keys 100000 --value-size 100 --json "$out" "$@" >/dev/null
}
# 1. Capacity: closed loop with more callers than slots, so the queue is in play.
load "$tmp/cap.json" -c 16 --preload --warmup 2s --duration 10s
cap=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1]))[0]; print(round([o for o in r["ops"] if o["op"]=="all"][0]["ok_per_sec"]))' "$tmp/cap.json")
# 2. Unloaded: open loop at a tenth of C.
load "$tmp/light.json" -c 16 --rps $((cap / 10)) --warmup 1s --duration 10s
# 3. Overload: 5x C, open loop, for $secs s.
offered=$((cap * 5))
load "$tmp/over.json" -c 64 --rps "$offered" --warmup 1s --duration "${secs}s"
up=$(kill -0 "$pid" 2>/dev/null && echo yes || echo no)

python3 - "$tmp" "$offered" "$secs" "$up" <<'PY'
import json, sys
tmp, offered, secs, up = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
def run(name):
    r = json.load(open(f"{tmp}/{name}.json"))[0]
    return r, [o for o in r["ops"] if o["op"] == "all"][0]
cap_r, cap = run("cap")
_, light = run("light")
over_r, over = run("over")
C = cap["ok_per_sec"]
ms = lambda us: f"{us / 1000:.2f} ms"
rej = over["error_latency"] or {"p50_us": 0, "p99_us": 0}
lag = (over_r["send_lag"] or {}).get("p99_us", 0)
errors = ",".join(f"{k}={v}" for k, v in over["errors"].items()) or "0"
mib = lambda r: f'{r["server"]["max_rss_bytes"] / 2**20:.1f} MiB'
print("| measure | value | target |")
print("|---|---|---|")
print(f"| capacity C (closed loop, c=16) | {C:.0f} calls/s | |")
print(f"| unloaded p99 (open loop at C/10) | {ms(light['latency']['p99_us'])} | |")
print(f"| offered (open loop, 64 connections) | {offered} calls/s; sent {over['calls'] / over_r['window_secs']:.0f}/s, send lag p99 {ms(lag)} | >= 5x C |")
print(f"| server up after {secs} s | {up} | yes |")
print(f"| successful throughput | {over['ok_per_sec']:.0f}/s = {over['ok_per_sec'] / C:.2f}x C | >= 0.8x C |")
print(f"| admitted p99 | {ms(over['latency']['p99_us'])} = {over['latency']['p99_us'] / light['latency']['p99_us']:.1f}x unloaded | <= 5x |")
print(f"| refusals p50 / p99 | {ms(rej['p50_us'])} / {ms(rej['p99_us'])} | p99 < 5 ms |")
print(f"| refusals by code | {errors} | |")
print(f"| server max RSS | {mib(over_r)} (capacity run {mib(cap_r)}) | bounded |")
PY
