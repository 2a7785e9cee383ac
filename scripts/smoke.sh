#!/usr/bin/env bash
# Smoke test: start kv-server (RocksDB in a temp dir) on a free loopback port, call health,
# version and a put/get through kv-client, stop it with SIGTERM, start it again on the same
# data and read the key back; every server is stopped by its PID.
# Usage: scripts/smoke.sh [BIN_DIR]   (default: $CARGO_TARGET_DIR/debug)
# With CAPKV_ADDR set, skips starting a server and checks that one instead.
set -euo pipefail
source "$(dirname "$0")/lib.sh"
bin="${1:-${CARGO_TARGET_DIR:-/var/tmp/capkv-target}/debug}"
work=$(mktemp -d)
log="$work/server.log"
pid=""
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

start_server() {
    : >"$log"
    "$bin/kv-server" --engine rocksdb --data-dir "$work/data" --listen 127.0.0.1:0 \
        --log-format json 2>"$log" &
    pid=$!
    addr=$(wait_listening "$log" "$pid") || { echo "smoke: server did not start" >&2; exit 1; }
}

stop_server() {
    kill -TERM "$pid"
    status=0
    wait "$pid" || status=$?
    pid=""
    [ "$status" -eq 0 ] || { echo "smoke: server exit status $status" >&2; exit 1; }
}

addr="${CAPKV_ADDR:-}"
[ -n "$addr" ] || start_server

kv() { "$bin/kv-client" --addr "$addr" "$@"; }
kv health | grep -q "ready=true"
kv version | grep -q "^capkv "
kv put smoke-key "smoke value" >/dev/null
[ "$(kv get smoke-key)" = "smoke value" ]
kv --json get smoke-key | grep -q '"value":"smoke value"'
kv put smoke-kept "still here" >/dev/null
kv delete smoke-key >/dev/null

if [ -n "$pid" ]; then
    stop_server
    start_server
    [ "$(kv get smoke-kept)" = "still here" ] || { echo "smoke: data lost across restart" >&2; exit 1; }
    kv delete smoke-kept >/dev/null
    stop_server
else
    kv delete smoke-kept >/dev/null
fi
echo "smoke: ok ($addr)"
