#!/usr/bin/env bash
# Sets up, builds (release) and runs kv-server. Extra arguments go to kv-server,
# e.g. `bash scripts/run.sh --listen 127.0.0.1:7070 --config capkv.toml`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
# The whole workspace, like CI: building single packages unifies dependency features
# differently and would rebuild RocksDB (~12 min) for nothing.
cargo build --release --locked --workspace --bins
echo "run: kv-client is at $CARGO_TARGET_DIR/release/kv-client" >&2
exec "$CARGO_TARGET_DIR/release/kv-server" "$@"
