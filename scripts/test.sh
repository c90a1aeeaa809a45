#!/usr/bin/env bash
# Runs the whole test suite: unit tests of every crate and the end-to-end tests
# against real NBD clients (qemu-io, fio, nbdfuse + loop + ext4) and real object
# stores (local files, Azurite, s3s-fs). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh
source scripts/cargo-env.sh
build_release
# End-to-end tests start several servers each; two at a time suits 2 cores.
cargo test --release --workspace --locked -- --test-threads=2 "$@"
