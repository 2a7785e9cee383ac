#!/usr/bin/env bash
# Installs what building and testing capkv needs on Debian, when it is missing.
# Idempotent: a warm machine installs nothing. Sourced by run.sh and test.sh.
set -euo pipefail

need_apt=()
command -v capnp >/dev/null 2>&1 || need_apt+=(capnproto)
command -v cc >/dev/null 2>&1 || need_apt+=(build-essential)
command -v pkg-config >/dev/null 2>&1 || need_apt+=(pkg-config)

if ((${#need_apt[@]})); then
    echo "setup: installing ${need_apt[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -q
    $SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q "${need_apt[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found. Install Rust >= 1.85 (https://rustup.rs) and retry." >&2
    exit 1
fi

# One target dir outside the clone: it survives fresh clones and acts as CI's build cache.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/capkv-target}"
