#!/usr/bin/env bash
# The back-to-back comparison: kv-loadgen's matrix against capkv, Redis (same generator,
# then redis-benchmark right after each case), capkv through the raw client, the two RPC
# floors, capkv raw against redis-benchmark in alternating rounds, the RPC engines side by
# side, many connections, durable puts, then the peer anchors in ../shared/peers (Redis,
# etcd, RocksDB db_bench, TCP floor), in one run so that ratios share the machine's load.
# Writes bench/results.md (or $1).
#
# Placement: kv-server (1 worker), redis-server and the floors on core 1, kv-loadgen (and the
# redis-benchmark it starts) on core 0, so each server gets one core.
# Every process this script starts is stopped by its PID on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source scripts/setup.sh
out="${1:-bench/results.md}"
# SVG plots go beside the results file and are linked from it.
plots="$(dirname "$out")/plots"
mkdir -p "$plots"
# BENCH_QUICK=1 checks the script itself (CI: with CAPKV_PROFILE=debug): every case runs
# for a moment on 1,000 keys and the peers are skipped. Its numbers mean nothing.
quick="${BENCH_QUICK:-0}"
build_bins
bin="$BIN_DIR"
timings=()
[ "$quick" = 1 ] && timings=(--duration 300ms --warmup 0s --keys 1000 --rps 1000,2000)
tmp=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    rm -rf "$tmp"
}
trap cleanup EXIT


start_kv_memory "$bin" "$tmp/kv.log" || exit 1
addr=$kv_addr

# The RPC floors: a bare server answering gets and getManys at once (see
# loadgen/src/floor.rs), on capnp-rpc's RpcSystem and on capkv's engine.
taskset -c 1 "$bin/kv-loadgen" rpc-floor --engine capnp-rpc --listen 127.0.0.1:0 2>"$tmp/floor.log" &
floor_pid=$!; pids+=("$floor_pid")
floor_addr=$(wait_listening "$tmp/floor.log" "$floor_pid" 100) || exit 1
taskset -c 1 "$bin/kv-loadgen" rpc-floor --engine capkv --listen 127.0.0.1:0 2>"$tmp/efloor.log" &
efloor_pid=$!; pids+=("$efloor_pid")
efloor_addr=$(wait_listening "$tmp/efloor.log" "$efloor_pid" 100) || exit 1

redis_port=$(free_port)
start_redis "$redis_port" "$tmp/redis.log" || true

started=$(date -Is)
caption="$started, commit $(git rev-parse --short HEAD), $(nproc) cores, ${CAPKV_PROFILE:-release} build; servers pinned to core 1, kv-loadgen to core 0, 1 thread; 100-byte values"
taskset -c 0 "$bin/kv-loadgen" matrix --plot "$plots" --plot-caption "$caption" --addr "$addr" --server-pid "$kv_pid" \
    --redis-addr "127.0.0.1:$redis_port" --redis-pid "$redis_pid" \
    --floor-addr "$floor_addr" --floor-pid "$floor_pid" \
    --engine-floor-addr "$efloor_addr" --engine-floor-pid "$efloor_pid" \
    --out "$tmp/matrix.md" --json "$tmp/matrix.json" "${timings[@]}" >/dev/null

kill "$kv_pid" "$redis_pid" "$floor_pid" "$efloor_pid"
wait "$kv_pid" "$redis_pid" "$floor_pid" "$efloor_pid" 2>/dev/null || true; pids=()

# capped_conns "ROUNDS SECONDS KEYS" "COUNTS" "PERCENTS": bench/versus.sh's GET, one call in
# flight, at each connection count, Redis driven by the same client work, both servers held
# to each percent of their core (with thousands of connections the generator's core is the
# limit otherwise).
capped_conns() {
    local n pct
    : >"$tmp/capped.md"
    if ! cpu_cap_available; then
        echo "(skipped: no writable cgroup cpu controller here; run as root)" >"$tmp/capped.md"
        return
    fi
    for n in $2; do
        for pct in $3; do
            # $1 unquoted on purpose: ROUNDS SECONDS KEYS are three arguments.
            SERVER_CPU_PCT=$pct bash bench/versus.sh "$bin" $1 -c "$n" --cases get1 \
                --redis-client raw >>"$tmp/capped.md"
            echo >>"$tmp/capped.md"
        done
    done
}

if [ "$quick" = 1 ]; then
    bash bench/versus.sh "$bin" 2 0 1000 >"$tmp/versus.md"
    bash bench/engines.sh "$bin" 1 1 >"$tmp/engines.md"
    bash bench/conns.sh "$bin" 1 50 >"$tmp/conns.md"
    capped_conns "2 0 1000" "50" "50"
    bash bench/keyspace.sh "$bin" 1 10000 >"$tmp/keyspace.md"
    DURABLE_CSV="$tmp/durable.csv" bash bench/durable.sh "$bin" 1 0 >"$tmp/durable.md"
    bash bench/scale.sh "$bin" 1 10000 >"$tmp/scale.md"
else
    bash bench/versus.sh "$bin" >"$tmp/versus.md"
    bash bench/engines.sh "$bin" >"$tmp/engines.md"
    bash bench/conns.sh "$bin" >"$tmp/conns.md"
    capped_conns "6 4 10000" "1000 3000" "50 70"
    bash bench/keyspace.sh "$bin" >"$tmp/keyspace.md"
    DURABLE_CSV="$tmp/durable.csv" bash bench/durable.sh "$bin" >"$tmp/durable.md"
    bash bench/scale.sh "$bin" >"$tmp/scale.md"
fi
"$bin/kv-loadgen" plot-durable --csv "$tmp/durable.csv" --plot "$plots" --plot-caption "$caption"

peers="../shared/peers/run-all.sh"
if [ "$quick" = 1 ]; then
    echo "(BENCH_QUICK: peers skipped)" >"$tmp/peers.txt"
elif [ -f "$peers" ]; then
    bash "$peers" >"$tmp/peers.txt" 2>&1 || echo "(peer run failed: see above)" >>"$tmp/peers.txt"
else
    echo "(../shared/peers not found: peers skipped)" >"$tmp/peers.txt"
fi

{
    echo "# capkv benchmark results"
    echo
    echo "Run $started, commit $(git rev-parse --short HEAD), by \`bash bench/run.sh\`."
    echo "kv-server: ${CAPKV_PROFILE:-release} build, 1 worker, pinned to core 1; redis-server 7 pinned to core 1"
    echo "(\`--save '' --appendonly no\`); kv-loadgen pinned to core 0, 1 thread; 100-byte values."
    echo "\"capkv raw\" is the same kv-server driven by \`kv-loadgen --target capkv-raw\`: calls hand-encoded, no"
    echo "RPC runtime in the client, as redis-benchmark has none; compare it with the \`redis-benchmark\` rows and"
    echo "with \"redis raw\", Redis driven by the raw client's RESP twin (\`--target redis-raw\`: the same client work)."
    echo "The floors are \`kv-loadgen rpc-floor\` pinned to core 1: a bare server answering each get and getMany with"
    echo "fixed entries at once (no store, checks or metrics), on capnp-rpc's RpcSystem (\"capnp-rpc floor\", driven by"
    echo "capkv's client library) or on capkv's engine (\"capkv-engine floor, raw\", driven by the raw client): what each"
    echo "RPC runtime alone costs."
    echo
    echo "Plots ($(basename "$plots")/): latency percentile spectra of each case, e.g."
    echo "[GET c=50](plots/spectrum-get-c-50.svg), [GET c=50 x16 in flight](plots/spectrum-get-c-50-x16-in-flight.svg),"
    echo "[PUT c=50](plots/spectrum-put-c-50.svg); [open loop: latency against offered rate](plots/open-loop.svg);"
    echo "[durable puts](plots/durable.svg)."
    echo
    cat "$tmp/matrix.md"
    echo
    echo "## capkv raw against redis-benchmark in alternating rounds (bench/versus.sh)"
    echo
    echo "The server-side engine's bars, judged over rounds rather than one pair: each round runs every case"
    echo "on kv-server (raw client) and on redis-server (redis-benchmark), the order flipped every other round;"
    echo "p99s are both timed from a request's write to the read bringing its reply. \"x (k of n)\" is the"
    echo "median ratio and the rounds in which capkv was ahead on that figure."
    echo
    cat "$tmp/versus.md"
    echo
    echo "## RPC engines (bench/engines.sh): capkv's own against capnp-rpc's RpcSystem"
    echo
    echo "Same kv-server build with \`rpc_engine\` = capkv (default) or capnp-rpc, alternating;"
    echo "memory engine, GET c=50, 10,000 keys; the client is capkv's client library (its own RPC engine) in both."
    echo
    cat "$tmp/engines.md"
    echo
    echo "## Many connections (bench/conns.sh): one call in flight each"
    echo
    echo "kv-server (memory, 1 worker) and redis-server on core 1, the generator on core 0; RSS per connection"
    echo "is (largest RSS while the connections are open - RSS before) / connections. Rows \"kv-loadgen (raw)\" are the"
    echo "same client work on both servers (capkv's raw client, its RESP twin)."
    echo
    cat "$tmp/conns.md"
    echo
    echo "### Server-bound: each server held to part of its core (bench/versus.sh, SERVER_CPU_PCT)"
    echo
    echo "Above, thousands of connections keep the generator's one core busy (its CPU column), so calls/s"
    echo "there measure the generator as much as the server. Here each server is held to 50% and to 70% of"
    echo "its core by a cgroup cpu limit (10 ms period), so that the server is the limit again: capkv driven"
    echo "by the raw client, Redis by its RESP twin (the same client work), GET, one call in flight each,"
    echo "in alternating rounds. How the limit batches the servers' work moves the kernel's share per call"
    echo "(it differs between the two caps); the user-space part is each server's own code."
    echo
    cat "$tmp/capped.md"
    echo "## What a keyspace costs (bench/keyspace.sh): memory engine against Redis"
    echo
    echo "Same keys and 100-byte values, preloaded; RSS per key is (RSS with the keys, after a short GET run"
    echo "lets the allocator settle - RSS before) / keys; GET and PUT c=50, one call in flight each, with"
    echo "kv-loadgen's raw capkv client and its Redis client."
    echo
    cat "$tmp/keyspace.md"
    echo
    echo "## Durable puts (bench/durable.sh): RocksDB (WAL) and memory-log (log) synced before every acknowledgement"
    echo
    echo "Same loadgen for both; redis-server with \`--appendonly yes --appendfsync always\`."
    echo
    cat "$tmp/durable.md"
    echo
    echo "## Storage at scale (bench/scale.sh): RocksDB engine against RocksDB's db_bench"
    echo
    echo "Same RocksDB options (256 MiB block cache, bloom filter, LZ4, incompressible 100-byte values,"
    echo "16-byte keys), same disk; kv-server and db_bench on core 1, kv-loadgen on core 0. db_bench runs"
    echo "in-process (no network, no RPC) with 50 threads; its overwrite writes no idempotency record and"
    echo "reads nothing before writing, where a capkv put looks up the key's version and its record."
    echo
    cat "$tmp/scale.md"
    echo
    echo "## Peer anchors (../shared/peers/run-all.sh), same run"
    echo
    echo '```'
    cat "$tmp/peers.txt"
    echo '```'
} >"$out"
echo "bench: wrote $out" >&2
