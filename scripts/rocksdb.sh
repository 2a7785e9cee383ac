#!/usr/bin/env bash
# Sourced by setup.sh. Builds RocksDB's C++ (the sources bundled in librocksdb-sys) once per
# machine, outside the clone, and points every cargo build at that archive
# (ROCKSDB_LIB_DIR, ROCKSDB_STATIC): run.sh's release build and test.sh's debug build then
# share one C++ build (~23 CPU-minutes) instead of paying it once per profile.
#
# It is compiled at -O2, what RocksDB's own release build (its Makefile, DEBUG_LEVEL=0)
# uses, instead of cargo's -O3 for the release profile: cheaper to build, no slower
# (bench/results.md, "RocksDB -O2 against -O3"). CAPKV_ROCKSDB_OPT_LEVEL=3 builds the other.
#
# Needs: cargo, $tools_dir (setup.sh). Sets ROCKSDB_LIB_DIR and ROCKSDB_STATIC.
set -euo pipefail

rocksdb_sys_version=$(awk '/^name = "librocksdb-sys"$/ { getline; gsub(/"/, "", $3); print $3 }' Cargo.lock)
rocksdb_opt_level="${CAPKV_ROCKSDB_OPT_LEVEL:-2}"
# The features RocksDB is compiled with are the workspace's (lz4): part of the name, so a
# change of either builds anew instead of linking a stale archive.
rocksdb_features=$(grep -o '^rocksdb = .*features = \[[^]]*\]' Cargo.toml | sed 's/.*features = \[\(.*\)\]/\1/; s/[^a-z0-9,-]//g; s/,/-/g')
rocksdb_dir="$tools_dir/rocksdb-$rocksdb_sys_version-$rocksdb_features-O$rocksdb_opt_level"

if [ ! -f "$rocksdb_dir/librocksdb.a" ]; then
    echo "setup: building RocksDB ($rocksdb_sys_version) from source, once per machine, into" \
        "$rocksdb_dir: about $(( 23 / $(nproc) + 1 )) minutes on this machine's $(nproc) cores" \
        "(~23 CPU-minutes of C++); cargo's progress follows" >&2
    build_dir="$tools_dir/rocksdb-build"
    started=$(date +%s)
    # Its own target dir, so this build's librocksdb-sys (compiling the C++) never replaces
    # the workspace's (linking the archive). capkv-store-rocks pulls librocksdb-sys in with
    # exactly the workspace's features.
    env -u ROCKSDB_LIB_DIR -u ROCKSDB_STATIC cargo build --release --locked -p capkv-store-rocks \
        --lib --target-dir "$build_dir" \
        --config "profile.release.package.librocksdb-sys.opt-level=$rocksdb_opt_level"
    archive=$(find "$build_dir/release/build" -path '*librocksdb-sys-*/out/librocksdb.a' | head -n 1)
    [ -n "$archive" ] || { echo "setup: RocksDB built but librocksdb.a not found under $build_dir" >&2; exit 1; }
    mkdir -p "$rocksdb_dir.partial"
    cp "$archive" "$rocksdb_dir.partial/librocksdb.a"
    rm -rf "$rocksdb_dir"
    mv "$rocksdb_dir.partial" "$rocksdb_dir"  # whole or absent: an interrupted copy is never used
    rm -rf "$build_dir"
    echo "setup: RocksDB built in $(( $(date +%s) - started )) s" >&2
fi

export ROCKSDB_LIB_DIR="$rocksdb_dir"
export ROCKSDB_STATIC=1
