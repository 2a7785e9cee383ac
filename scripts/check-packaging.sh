#!/usr/bin/env bash
# Packaging checks (run by scripts/test.sh): compose.yaml is valid in every profile, every
# file compose.yaml and the Containerfile reference exists, hadolint passes on the
# Containerfile, and the shell scripts parse. No Docker engine is needed.
set -euo pipefail
cd "$(dirname "$0")/.."

for profile in "" monitoring ha; do
    docker-compose -f compose.yaml ${profile:+--profile "$profile"} config -q
done

missing=0
# Host paths mounted or built by compose (./...), and the Containerfile's local COPY sources.
refs=$(grep -oE '\./[A-Za-z0-9_./-]+' compose.yaml | sed 's/:$//' | sort -u)
refs+=" $(sed -n 's/^COPY \([^-][^ ]*\) .*/\1/p' Containerfile)"
refs+=" $(sed -n 's/^ *dockerfile: *//p' compose.yaml)"
for f in $refs; do
    [ -e "$f" ] || { echo "missing: $f (referenced by compose.yaml or Containerfile)" >&2; missing=1; }
done
[ "$missing" -eq 0 ]

"$HADOLINT" --config .hadolint.yaml Containerfile

for s in scripts/*.sh bench/*.sh; do
    bash -n "$s"
done
echo "packaging: compose valid, references present, hadolint clean, scripts parse"
