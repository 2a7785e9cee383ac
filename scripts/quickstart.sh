#!/usr/bin/env bash
# Brings the compose stack up (kv-server with the monitoring profile), waits until the
# server is ready, makes a few calls, and prints where the dashboards and traces are.
# Needs a Docker engine with docker-compose (or `docker compose`). Stop with:
#   docker-compose --profile monitoring down        (add -v to drop the data volume)
set -euo pipefail
cd "$(dirname "$0")/.."
compose="docker-compose"
command -v docker-compose >/dev/null 2>&1 || compose="docker compose"
token="${CAPKV_TOKEN:-dev-token}"

$compose --profile monitoring up -d --build

echo "waiting for kv-server to be ready (/readyz)..."
ready=""
for _ in $(seq 120); do
    if curl -fsS http://127.0.0.1:9464/readyz >/dev/null 2>&1; then ready=yes; break; fi
    sleep 1
done
[ -n "$ready" ] || { echo "kv-server not ready after 120 s; see: $compose logs kv-server" >&2; exit 1; }

kv() { $compose exec -T kv-server kv-client --addr 127.0.0.1:7070 --token "$token" "$@"; }
kv put quickstart:hello world
kv get quickstart:hello
kv incr quickstart:visits
kv scan --prefix quickstart:

cat <<URLS

capkv is up.
  RPC            127.0.0.1:7070   (kv-client --addr 127.0.0.1:7070 --token \$CAPKV_TOKEN ...)
  Metrics        http://127.0.0.1:9464/metrics   (/healthz, /readyz)
  Grafana        http://127.0.0.1:3000/d/capkv   (dashboard "capkv")
  Prometheus     http://127.0.0.1:9090/alerts
  Traces         http://127.0.0.1:16686          (Jaeger; service kv-server)
URLS
