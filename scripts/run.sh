#!/usr/bin/env bash
# Sets up, builds (release; CAPKV_PROFILE=debug for a debug build) and runs kv-server.
# Extra arguments go to kv-server,
# e.g. `bash scripts/run.sh --listen 127.0.0.1:7070 --config capkv.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh
source scripts/setup.sh
build_bins
echo "run: kv-client is at $BIN_DIR/kv-client" >&2
exec "$BIN_DIR/kv-server" "$@"
