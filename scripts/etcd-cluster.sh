#!/usr/bin/env bash
# Runs a 3-member etcd cluster (Debian's etcd-server, installed by scripts/setup.sh) on
# free loopback ports, for kv-server's etcd engine, until interrupted; prints its client
# URLs, e.g.:
#   bash scripts/etcd-cluster.sh /tmp/etcd &
#   kv-server --engine etcd --etcd-endpoints <the URLs it printed>   # with limits that fit:
#   CAPKV_LIMITS__MAX_BATCH_ITEMS=127 (etcd's --max-txn-ops 128, less the batch's record)
# Development and tests only: production runs a supported upstream etcd (3.5 or later,
# deploy/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
dir="${1:-$(mktemp -d)}"
pids=()
trap stop_all EXIT
trap 'exit 0' INT TERM
start_etcd_cluster "$dir"
echo "etcd cluster up (data in $dir): $ETCD_ENDPOINTS"
wait
