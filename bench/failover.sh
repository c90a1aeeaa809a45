#!/usr/bin/env bash
# Failover benchmark: materialising a point from a base plus later segments.
#
# A DISK_GIB (4) GiB disk of 50 %-compressible data is protected; retention
# (keep 10 s) folds it into a base; then LATER_GIB (1) GiB of 64 KiB random
# writes follow in segments. The process server is stopped, and
# `lifeboat-mt failover --point latest` recovers the disk from the file://
# store alone, once with `--io-engine uring` and once with `portable` (each
# re-reading the image to compare it with the point's recorded checksums),
# and once with uring and `--skip-checksum`, each beside `cp` of the
# recovered image in the same run (the machine's write limit). The image
# must equal the source byte for byte.
# Then CYCLES (10) rewrites of the disk's first 1 GiB under the same
# retention, and the store's size once folded, beside the disk's size.
#   LIFEBOAT_BENCH_BIN=DIR runs the binaries in DIR (a copy, so that a
#   rebuild does not change them under a run).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-mt ] || build_release
DISK_GIB="${DISK_GIB:-4}"
LATER_GIB="${LATER_GIB:-1}"
CYCLES="${CYCLES:-10}"
WORK="$(mktemp -d /tmp/lifeboat-failover.XXXXXX)"
source scripts/lib.sh
BIN="${LIFEBOAT_BENCH_BIN:-$BIN}"
DISK="$WORK/disk.img"
STORE="file://$WORK/ps/store"
now() { date +%s.%N; }
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

fio --name=fill --filename="$DISK" --rw=write --bs=1M --size="${DISK_GIB}G" \
    --buffer_compress_percentage=50 --refill_buffers=1 --ioengine=psync >/dev/null

serve_ps() {
  "$BIN/lifeboat-ps" serve --config "$WORK/ps/ps.toml" >>"$WORK/ps.log" 2>&1 &
  PS_PID=$!; PIDS+=("$PS_PID")
  # A restart over a cache of gigabytes takes a while to open it.
  for _ in $(seq 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$PS_PORT") 2>/dev/null && return 0
    kill -0 "$PS_PID" 2>/dev/null || break
    sleep 0.05
  done
  echo "lifeboat-ps did not listen within 60 s (log: $WORK/ps.log)"; tail -5 "$WORK/ps.log"; exit 1
}
PS_PORT=$(free_port)
"$BIN/lifeboat-ps" init --dir "$WORK/ps" --listen "127.0.0.1:$PS_PORT" >/dev/null
cat >>"$WORK/ps/ps.toml" <<TOML

[retention]
keep = "10s"
fine-window = "10s"
tiers = []
compact-every = "2s"
reader-grace = "0s"
TOML
PS_CERTS="$WORK/ps/machines/machine-1"
serve_ps
agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" "journal-max-bytes = 1073741824"
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
AURI="nbd+unix:///disk?socket=$WORK/a.sock"
points_json() { "$BIN/lifeboat-mt" points --store "$STORE" --machine machine-1 --json 2>/dev/null; }
wait_streaming() {
  for _ in $(seq 12000); do
    [ "$("$BIN/lifeboat-agent" status --config "$WORK/agent.toml" | json 'd["state"] == "streaming" and all(x["state"] == "streaming" for x in d["sync"])')" = True ] && return 0
    sleep 0.1
  done
  echo "the agent never reached streaming"; exit 1
}
# wait_stored SEQ: the store's durable stream reaches SEQ.
wait_stored() {
  for _ in $(seq 12000); do
    [ "$(points_json | json 'd["stream-end"]')" -ge "$1" ] && return 0
    sleep 0.1
  done
  echo "the store never reached seq $1"; exit 1
}
# wait_base SEQ: a base at or after SEQ exists.
wait_base() {
  for _ in $(seq 3000); do
    [ "$(points_json | json '(d.get("base") or {}).get("seq", 0)')" -ge "$1" ] && return 0
    sleep 0.2
  done
  echo "no base reached seq $1"; tail -20 "$WORK/ps.log"; exit 1
}
tag() { "$BIN/lifeboat-agent" tag --config "$WORK/agent.toml"; }

wait_streaming
T=$(tag); wait_stored "$T"
echo "initial sync of ${DISK_GIB} GiB stored (seq $T); waiting for retention to fold it into a base"
wait_base "$T"
fio --name=later --ioengine=nbd --uri="$AURI" --rw=randwrite --bs=64k --iodepth=8 \
    --size="${DISK_GIB}G" --io_size="${LATER_GIB}G" --buffer_compress_percentage=50 \
    --refill_buffers=1 --randrepeat=0 >/dev/null
wait_streaming
T=$(tag); wait_stored "$T"
# The point's checksums follow its tag: once they are stored, `latest` is
# that point and failover compares the image with them.
wait_stored "$((T + 1))"
# Freeze the store: no further fold.
kill -TERM "$AGENT_PID" "$PS_PID"; wait "$PS_PID" 2>/dev/null || true
BASE=$(points_json | json 'd["base"]["seq"]')
SEGS=$(points_json | json 'len([p for p in d["points"]])')
# Both sides read from the page cache: the store's objects (just written)
# and, for cp, the recovered image. One row per write engine, each beside
# cp of the image it wrote.
# The last row skips the re-read that compares the image with the point's
# checksums (what the checked rows add).
for RUN in uring portable uring:skip-checksum; do
  ENGINE="${RUN%%:*}"
  EXTRA=(); [ "$RUN" != "${RUN#*:}" ] && EXTRA=(--skip-checksum)
  OUT="$WORK/recovered-$ENGINE"
  F0=$(now)
  "$BIN/lifeboat-mt" failover --store "$STORE" --machine machine-1 --point latest --io-engine "$ENGINE" \
    "${EXTRA[@]}" --out "$OUT" --key-file "$WORK/ps/kek.key" >"$WORK/failover-$ENGINE.out" 2>"$WORK/failover-$ENGINE.err"
  F1=$(now)
  cmp "$OUT/disk.raw" "$DISK" || { echo "MISMATCH ($ENGINE): the recovered disk differs from the source"; exit 1; }
  C0=$(now); cp --sparse=always "$OUT/disk.raw" "$WORK/copy.img"; sync -f "$WORK/copy.img"; C1=$(now)
  rm -f "$WORK/copy.img"
  FT=$(secs "$F0" "$F1"); CT=$(secs "$C0" "$C1")
  head -1 "$WORK/failover-$ENGINE.out"
  echo "failover ${DISK_GIB} GiB disk (base at seq $BASE + ${LATER_GIB} GiB of later writes), latest, --io-engine $ENGINE ${EXTRA[*]:-(checked)}: lifeboat-mt $FT s (byte-equal), cp of the image $CT s, ratio $(python3 -c "print(f'{$FT/$CT:.2f}')") (target <= 1.5)"
  echo "  $(grep 'images written with' "$WORK/failover-$ENGINE.err" | sed 's/^ *//'); $(grep -E 'checksums (match|not compared)' "$WORK/failover-$ENGINE.out" | sed 's/^ *//')"
  rm -rf "$OUT"
done

# Store size after CYCLES rewrites of 1 GiB.
serve_ps
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
wait_streaming
for i in $(seq "$CYCLES"); do
  fio --name=cycle --ioengine=nbd --uri="$AURI" --rw=write --bs=1M --iodepth=8 --size=1G \
      --buffer_compress_percentage=50 --refill_buffers=1 >/dev/null
  wait_streaming
  tag >/dev/null
done
wait_streaming
T=$(tag); wait_stored "$T"
sleep 12; wait_base "$T"; sleep 6   # folded, and two collection runs after it
STORED=$(du -sb "$WORK/ps/store" | cut -f1)
echo "store after $CYCLES rewrite cycles of 1 GiB (50% compressible): $(python3 -c "print(f'{$STORED/2**30:.2f}')") GiB for a ${DISK_GIB} GiB disk ($(python3 -c "print(f'{$CYCLES}')") GiB written after the first copy)"
