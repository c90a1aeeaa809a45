#!/usr/bin/env bash
# Checksum resync benchmark. One run: a SIZE (2 GiB) image of random data is
# protected (initial sync), the agent is stopped cleanly, 1 % of its 4 KiB
# blocks are changed at random behind its back and its activity logs deleted;
# then, on the same pair of files (replica = the image before the change):
#   (a) `lifeboat-ps resync` (bytes on the wire = hashes + blocks, counted by
#       the agent),
#   (b) `rsync --inplace --no-whole-file -B 4096 --stats` (bytes sent+received;
#       --ignore-times, as both files may carry the same mtime second).
# Prints wall time and bytes on the wire for both.   SIZE_MIB=2048
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
command -v rsync >/dev/null || { echo "rsync is required"; exit 1; }
BIN="$PWD/target/release"
SIZE_MIB="${SIZE_MIB:-2048}"
WORK="$(mktemp -d /tmp/lifeboat-resync-bench.XXXXXX)"
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }
status() { "$BIN/lifeboat-agent" status --config "$WORK/agent.toml"; }
field() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }

DISK="$WORK/disk.img"
echo "writing a ${SIZE_MIB} MiB image of random data..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$DISK"

PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$BIN/lifeboat-ps" init --dir "$WORK/ps" --listen "127.0.0.1:$PORT" >/dev/null
"$BIN/lifeboat-ps" serve --config "$WORK/ps/ps.toml" >"$WORK/ps.log" 2>&1 & PIDS+=($!)
C="$WORK/ps/machines/machine-1"
cat >"$WORK/agent.toml" <<TOML
machine = "machine-1"
server = "127.0.0.1:$PORT"
ca-cert = "$C/ca.pem"
client-cert = "$C/client.pem"
client-key = "$C/client.key"
state-dir = "$WORK/agent-state"
journal-max-bytes = 1073741824
[[disk]]
id = "disk"
path = "$DISK"
socket = "$WORK/a.sock"
TOML
start_agent() {
  rm -f "$WORK/a.sock" "$WORK/agent-state/control.sock"
  "$BIN/lifeboat-agent" run --config "$WORK/agent.toml" >>"$WORK/agent.log" 2>&1 & PIDS+=($!)
  AGENT=$!
  wait_sock "$WORK/a.sock"; wait_sock "$WORK/agent-state/control.sock"
}
start_agent
echo "initial sync..."
until [ "$(status | field 'all(s["state"]=="streaming" for s in d["sync"]) and d["positions"]["acked"]>=d["positions"]["captured"]')" = True ]; do sleep 1; done
kill -TERM "$AGENT"; wait "$AGENT" 2>/dev/null || true

# The replica's copy for rsync, then 1 % of the blocks change at random.
cp "$DISK" "$WORK/replica.img"
python3 - "$DISK" "$SIZE_MIB" <<'PY'
import os, random, sys
path, mib = sys.argv[1], int(sys.argv[2])
blocks = mib * 256
random.seed(7)
chosen = random.sample(range(blocks), blocks // 100)
with open(path, "r+b") as f:
    for b in chosen:
        f.seek(b * 4096); f.write(os.urandom(4096))
print(f"changed {len(chosen)} blocks ({len(chosen) * 4096} bytes)")
PY
rm -f "$WORK"/agent-state/al-*.rec
start_agent
until [ "$(status | field 'd["connected"] and d["state"]=="streaming"')" = True ]; do sleep 0.2; done

T0=$(date +%s.%N)
"$BIN/lifeboat-ps" resync --config "$WORK/ps/ps.toml" --machine machine-1 >"$WORK/resync.out"
T1=$(date +%s.%N)
DONE=$(tail -1 "$WORK/resync.out")
OURS_T=$(python3 -c "print(f'{$T1-$T0:.2f}')")
OURS_HASH=$(echo "$DONE" | field 'd["hash-bytes"]')
OURS_BLOCK=$(echo "$DONE" | field 'd["block-bytes"]')

T0=$(date +%s.%N)
rsync --inplace --no-whole-file --ignore-times -B 4096 --stats "$DISK" "$WORK/replica.img" >"$WORK/rsync.out"
T1=$(date +%s.%N)
RS_T=$(python3 -c "print(f'{$T1-$T0:.2f}')")
RS_SENT=$(awk '/^Total bytes sent:/ {gsub(",","",$4); print $4}' "$WORK/rsync.out")
RS_RECV=$(awk '/^Total bytes received:/ {gsub(",","",$4); print $4}' "$WORK/rsync.out")
cmp -s "$DISK" "$WORK/replica.img" || { echo "rsync left the files different"; exit 1; }

printf '\n%-22s %10s %16s %s\n' "" "wall s" "wire bytes" "detail"
printf '%-22s %10s %16s %s\n' "lifeboat resync" "$OURS_T" "$((OURS_HASH + OURS_BLOCK))" "hashes $OURS_HASH + blocks $OURS_BLOCK"
printf '%-22s %10s %16s %s\n' "rsync -B 4096" "$RS_T" "$((RS_SENT + RS_RECV))" "sent $RS_SENT + received $RS_RECV"
