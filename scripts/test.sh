#!/usr/bin/env bash
# Sets up and runs every check: formatting, clippy (warnings are errors), all tests,
# promtool on monitoring/, and the smoke script against the built binaries. This is what
# CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup.sh
start=$(date +%s)

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy -D warnings"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --locked --workspace
echo "== monitoring (promtool)"
promtool check config monitoring/prometheus.yml
promtool check rules monitoring/alerts.yml
promtool test rules monitoring/alerts_test.yml
echo "== packaging (compose, references, hadolint)"
bash scripts/check-packaging.sh
echo "== smoke"
bash scripts/smoke.sh "$CARGO_TARGET_DIR/debug"

echo "== all checks passed in $(( $(date +%s) - start )) s"
