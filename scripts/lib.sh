# Shell helpers shared by scripts/ and bench/ (sourced, not run).

# wait_listening LOG PID [TRIES]: prints the address from kv-server's JSON "listening"
# line in LOG, polling every 0.1 s at most TRIES times (default 300) while PID lives. On
# failure prints LOG to stderr and returns 1.
wait_listening() {
    local log="$1" pid="$2" tries="${3:-300}" addr=""
    for _ in $(seq "$tries"); do
        addr=$(sed -n 's/.*"message":"listening","addr":"\([0-9.:]*\)".*/\1/p' "$log" | head -n1)
        if [ -n "$addr" ]; then
            echo "$addr"
            return 0
        fi
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    cat "$log" >&2
    return 1
}

# free_port: prints a TCP port free on 127.0.0.1 now (for servers that take no port 0).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# stop_all: stops every process whose PID a script added to its array `pids`, by that
# PID, and waits for each (bench scripts call it between cases and on exit).
stop_all() {
    local p
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
    pids=()
}

# cap_cpu PID PCT: limits process PID (all its threads) to PCT percent of one core, in a
# cgroup of its own (cgroup v2's cpu.max, else v1's cpu controller), refilled every 10 ms so
# that the cap is smooth at the scale of calls. Why: with thousands of connections one
# generator core cannot saturate one server core, so calls/s would measure the generator;
# a server held to part of a core is the limit again, and calls/s its capacity. Needs root;
# fails (status 1, a line on stderr) where no cpu controller can be written. The cgroup is
# removed by uncap_cpu_all once the process is gone.
capped_groups=()
cap_cpu() {
    local pid=$1 pct=$2 period=10000 dir tid
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        dir=/sys/fs/cgroup/capkv-bench-$pid
        grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null ||
            echo +cpu >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
        mkdir -p "$dir" 2>/dev/null && echo "$((period * pct / 100)) $period" >"$dir/cpu.max" 2>/dev/null &&
            echo "$pid" >"$dir/cgroup.procs" 2>/dev/null ||
            { echo "cap_cpu: cannot write a cgroup v2 cpu limit under /sys/fs/cgroup" >&2; return 1; }
    elif [ -d /sys/fs/cgroup/cpu ]; then
        dir=/sys/fs/cgroup/cpu/capkv-bench-$pid
        mkdir -p "$dir" 2>/dev/null && echo "$period" >"$dir/cpu.cfs_period_us" &&
            echo "$((period * pct / 100))" >"$dir/cpu.cfs_quota_us" ||
            { echo "cap_cpu: cannot write a cgroup v1 cpu limit under /sys/fs/cgroup/cpu" >&2; return 1; }
        for tid in $(ls "/proc/$pid/task"); do echo "$tid" >"$dir/tasks" 2>/dev/null || true; done
    else
        echo "cap_cpu: no cgroup cpu controller on this machine" >&2
        return 1
    fi
    capped_groups+=("$dir")
}
# cpu_cap_available: whether cap_cpu can work here (a writable cgroup cpu controller).
cpu_cap_available() {
    if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
        grep -qw cpu /sys/fs/cgroup/cgroup.controllers && [ -w /sys/fs/cgroup ]
    else
        [ -d /sys/fs/cgroup/cpu ] && [ -w /sys/fs/cgroup/cpu ]
    fi
}
# uncap_cpu_all: removes the cgroups cap_cpu made (after their processes have ended).
uncap_cpu_all() {
    local d
    for d in "${capped_groups[@]}"; do rmdir "$d" 2>/dev/null || true; done
    capped_groups=()
}

# rss_kib PID: the process's resident set, in KiB.
rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }

# wait_redis PORT [TRIES]: waits (0.1 s steps, at most TRIES, default 100: 10 s) until
# redis-server on PORT answers.
wait_redis() {
    for _ in $(seq "${2:-100}"); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
    return 1
}

# start_redis PORT LOG [FLAG...]: redis-server on 127.0.0.1:PORT pinned to core 1, as every
# benchmark runs it (no snapshots, no append-only file, 10,000 clients, warnings to LOG);
# FLAGs follow and win (e.g. `--appendonly yes --appendfsync always --dir D`). Sets
# redis_pid, adds it to `pids` (what stop_all stops), and waits until it answers (status 1
# if it never does). With the array `redis_wrap` set, the server runs under that command
# instead of `taskset -c 1` (bench/misses.sh: valgrind), and is given a minute to answer.
start_redis() {
    local port=$1 log=$2 wrap=(taskset -c 1) tries=100
    shift 2
    if [ -n "${redis_wrap+set}" ]; then wrap=("${redis_wrap[@]}") tries=600; fi
    "${wrap[@]}" redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no \
        --maxclients 10000 --daemonize no --loglevel warning "$@" >"$log" 2>&1 &
    redis_pid=$!
    pids+=("$redis_pid")
    wait_redis "$port" "$tries"
}

# start_kv_memory BIN_DIR LOG: kv-server from BIN_DIR as the benchmarks run it (memory
# engine, 1 worker, JSON logs to LOG) pinned to core 1. Sets kv_pid, adds it to `pids`
# (what stop_all stops), and sets kv_addr to the address it listens on (status 1 if it
# never says).
start_kv_memory() {
    taskset -c 1 "$1/kv-server" --engine memory --listen 127.0.0.1:0 --workers 1 \
        --log-format json 2>"$2" &
    kv_pid=$!
    pids+=("$kv_pid")
    kv_addr=$(wait_listening "$2" "$kv_pid" 100)
}

# build_bins: builds the workspace's binaries in the profile $CAPKV_PROFILE (release by
# default; CI passes debug, which its tests have already built) and sets BIN_DIR. Always
# the whole workspace: building single packages unifies dependency features differently
# and would rebuild RocksDB (~12 min) for nothing. Debug builds every target, as
# `cargo test` does: without the dev-dependencies, features unify differently again and
# the test build's binaries would be rebuilt.
build_bins() {
    local profile="${CAPKV_PROFILE:-release}"
    case "$profile" in
        release) cargo build --release --locked --workspace --bins ;;
        debug) cargo build --locked --workspace --all-targets ;;
        *) echo "CAPKV_PROFILE is release or debug, not '$profile'" >&2; return 2 ;;
    esac
    BIN_DIR="$CARGO_TARGET_DIR/$profile"
}

# start_etcd_cluster DIR: starts a 3-member etcd cluster (Debian's etcd-server) on free
# loopback ports with its data and logs under DIR, adds the members' PIDs to the array
# `pids` (stop_all stops them), waits (at most 30 s) until every member is healthy, and
# sets ETCD_ENDPOINTS to the members' client URLs, comma-separated.
start_etcd_cluster() {
    local dir="$1" i initial="" client=() peer=()
    mkdir -p "$dir"
    for i in 0 1 2; do
        client[i]=$(free_port)
        peer[i]=$(free_port)
        initial+="${initial:+,}m$i=http://127.0.0.1:${peer[i]}"
    done
    for i in 0 1 2; do
        etcd --name "m$i" --data-dir "$dir/m$i" \
            --listen-client-urls "http://127.0.0.1:${client[i]}" \
            --advertise-client-urls "http://127.0.0.1:${client[i]}" \
            --listen-peer-urls "http://127.0.0.1:${peer[i]}" \
            --initial-advertise-peer-urls "http://127.0.0.1:${peer[i]}" \
            --initial-cluster "$initial" --initial-cluster-state new \
            --initial-cluster-token "capkv-$$" --log-level warn --logger zap \
            >"$dir/m$i.log" 2>&1 &
        pids+=($!)
    done
    ETCD_ENDPOINTS=""
    for i in 0 1 2; do
        ETCD_ENDPOINTS+="${ETCD_ENDPOINTS:+,}http://127.0.0.1:${client[i]}"
        local ok=""
        for _ in $(seq 300); do
            if curl -fsS "http://127.0.0.1:${client[i]}/health" 2>/dev/null | grep -q '"health":"true"'; then
                ok=1
                break
            fi
            sleep 0.1
        done
        [ -n "$ok" ] || { cat "$dir/m$i.log" >&2; return 1; }
    done
    export ETCD_ENDPOINTS
}
