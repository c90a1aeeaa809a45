# Sourced by the scripts: build settings shared by the demo, the tests and the
# benchmarks (one build profile: release).
#
# RocksDB's C++ takes 10-17 minutes to compile on 2 cores. After the first build
# its static libraries are kept in a cache OUTSIDE the clone, keyed by the
# librocksdb-sys version, and later builds link them (ROCKSDB_LIB_DIR). Without
# the cache everything still builds, only slowly.

LIFEBOAT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
LIFEBOAT_CACHE="${LIFEBOAT_CACHE:-$HOME/.cache/lifeboat}"
export LIFEBOAT_TOOLS="${LIFEBOAT_TOOLS:-$LIFEBOAT_CACHE/tools}"
export PATH="$HOME/.cargo/bin:$PATH"

rocksdb_sys_version() {
  awk '/^name = "librocksdb-sys"$/ { getline; gsub(/version = |"/, ""); print; exit }' \
    "$LIFEBOAT_ROOT/Cargo.lock"
}
ROCKSDB_CACHE_DIR="$LIFEBOAT_CACHE/rocksdb-$(rocksdb_sys_version)"

if [ -f "$ROCKSDB_CACHE_DIR/librocksdb.a" ] && [ -f "$ROCKSDB_CACHE_DIR/libsnappy.a" ]; then
  export ROCKSDB_LIB_DIR="$ROCKSDB_CACHE_DIR" ROCKSDB_STATIC=1
  export SNAPPY_LIB_DIR="$ROCKSDB_CACHE_DIR" SNAPPY_STATIC=1
fi

# Keeps the RocksDB libraries of a from-source build for the next build.
save_rocksdb_cache() {
  [ -n "${ROCKSDB_LIB_DIR:-}" ] && return 0
  local out
  for out in "$LIFEBOAT_ROOT"/target/release/build/librocksdb-sys-*/out; do
    if [ -f "$out/librocksdb.a" ] && [ -f "$out/libsnappy.a" ]; then
      mkdir -p "$ROCKSDB_CACHE_DIR.tmp"
      cp "$out/librocksdb.a" "$out/libsnappy.a" "$ROCKSDB_CACHE_DIR.tmp/"
      rm -rf "$ROCKSDB_CACHE_DIR" && mv "$ROCKSDB_CACHE_DIR.tmp" "$ROCKSDB_CACHE_DIR"
      echo "cached RocksDB libraries in $ROCKSDB_CACHE_DIR"
      return 0
    fi
  done
}

build_release() {
  (cd "$LIFEBOAT_ROOT" && cargo build --release --workspace --bins --locked "$@")
  save_rocksdb_cache
}
