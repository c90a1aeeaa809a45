#!/usr/bin/env bash
# NBD front-end benchmark: fio's nbd engine, 4k randwrite qd32 (and 1M seqwrite qd8),
# against the agent's NBD server over a plain file (io_uring and portable disk I/O,
# and a null backend that measures the NBD layer alone), qemu-nbd and nbdkit, all on
# the same 1 GiB raw file in one run.
#
# usage: bench/nbd-frontend.sh [seconds per run, default 10]
# Needs: fio, qemu-nbd, nbdkit. Builds agent/examples/nbd-file.rs (CARGO_TARGET_DIR
# is honoured).
set -euo pipefail
RUNTIME=${1:-10}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
cargo build --release -q -p lifeboat-agent --example nbd-file --manifest-path "$ROOT/Cargo.toml"
SERVER="$TARGET/release/examples/nbd-file"

DIR=$(mktemp -d)
PID=""
cleanup() {
    if [ -n "$PID" ]; then kill "$PID" 2>/dev/null || true; wait "$PID" 2>/dev/null || true; fi
    rm -rf "$DIR"
}
trap cleanup EXIT
IMG="$DIR/disk.raw"
SOCK="$DIR/nbd.sock"
dd if=/dev/zero of="$IMG" bs=1M count=1024 status=none   # allocated, in page cache

wait_socket() { for _ in $(seq 100); do [ -S "$SOCK" ] && return 0; sleep 0.05; done; echo "server did not start" >&2; return 1; }

run_fio() { # name uri rw bs depth
    fio --name=b --ioengine=nbd --uri="$2" --rw="$3" --bs="$4" --iodepth="$5" \
        --runtime="$RUNTIME" --time_based --output-format=json --output="$DIR/fio.json" >/dev/null
    python3 - "$DIR/fio.json" "$1" "$3" "$4" "$5" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(f"{sys.argv[2]:<22} {sys.argv[3]:<10} bs={sys.argv[4]:<3} qd={sys.argv[5]:<3} "
      f"{j['iops']:>10.0f} IOPS {j['bw_bytes']/2**30:6.2f} GiB/s  "
      f"p50={j['clat_ns']['percentile']['50.000000']/1000:.0f}us "
      f"p99={j['clat_ns']['percentile']['99.000000']/1000:.0f}us")
PY
}

bench() { # name uri
    run_fio "$1" "$2" randwrite 4k 32
    run_fio "$1" "$2" write 1M 8
}

stop() { kill "$PID"; wait "$PID" 2>/dev/null || true; PID=""; rm -f "$SOCK"; }

echo "# $(uname -r), $(nproc) CPUs, load $(cut -d' ' -f1-3 /proc/loadavg)"
for mode in uring portable null; do
    "$SERVER" "$IMG" "$SOCK" "$mode" 2>/dev/null & PID=$!
    wait_socket
    bench "lifeboat-$mode" "nbd+unix:///disk?socket=$SOCK"
    stop
done

qemu-nbd -f raw -x disk -k "$SOCK" -t -e 4 "$IMG" & PID=$!
wait_socket
bench "qemu-nbd (writeback)" "nbd+unix:///disk?socket=$SOCK"
stop

nbdkit -f -U "$SOCK" file "$IMG" & PID=$!
wait_socket
bench "nbdkit file" "nbd+unix:///?socket=$SOCK"
stop
