#!/usr/bin/env bash
# Checksum resync benchmark. One run: a SIZE (2 GiB) image of random data is
# protected (initial sync), the agent is stopped cleanly, 1 % of its 4 KiB
# blocks are changed at random behind its back and its activity logs deleted;
# then, on the same pair of files (replica = the image before the change):
#   (a) `lifeboat-ps resync` (bytes on the wire = hashes + blocks, counted by
#       the agent),
#   (b) `rsync --ignore-times --inplace --no-whole-file -B 4096 --stats` (bytes sent+received).
# Prints wall time and bytes on the wire for both. Then the read side: a resync
# of the unchanged disk (every byte read and hashed, nothing sent) with the
# io_uring engine and with the portable one (pread threads), beside
# `cat disk > /dev/null` as the read limit (page cache warm for all three).
#   SIZE_MIB=2048
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
command -v rsync >/dev/null || { echo "rsync is required"; exit 1; }
SIZE_MIB="${SIZE_MIB:-2048}"
WORK="$(mktemp -d /tmp/lifeboat-resync-bench.XXXXXX)"
source scripts/lib.sh
status() { "$BIN/lifeboat-agent" status --config "$WORK/agent.toml"; }

DISK="$WORK/disk.img"
echo "writing a ${SIZE_MIB} MiB image of random data..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$DISK"

start_ps "$WORK/ps"
agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" "journal-max-bytes = 1073741824"
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
echo "initial sync..."
until [ "$(status | json 'all(s["state"]=="streaming" for s in d["sync"]) and d["positions"]["acked"]>=d["positions"]["captured"]')" = True ]; do sleep 1; done
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true

# The replica's copy for rsync, then 1 % of the blocks change at random.
cp "$DISK" "$WORK/replica.img"
change_blocks "$DISK" "$SIZE_MIB" 7
rm -f "$WORK"/agent-state/al-*.rec
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
until [ "$(status | json 'd["connected"] and d["state"]=="streaming"')" = True ]; do sleep 0.2; done

T0=$(date +%s.%N)
"$BIN/lifeboat-ps" resync --config "$WORK/ps/ps.toml" --machine machine-1 >"$WORK/resync.out"
T1=$(date +%s.%N)
DONE=$(tail -1 "$WORK/resync.out")
OURS_T=$(python3 -c "print(f'{$T1-$T0:.2f}')")
OURS_HASH=$(echo "$DONE" | json 'd["hash-bytes"]')
OURS_BLOCK=$(echo "$DONE" | json 'd["block-bytes"]')

T0=$(date +%s.%N)
# --ignore-times: the quick check (size + mtime) must not skip the file.
rsync --ignore-times --inplace --no-whole-file -B 4096 --stats "$DISK" "$WORK/replica.img" >"$WORK/rsync.out"
T1=$(date +%s.%N)
RS_T=$(python3 -c "print(f'{$T1-$T0:.2f}')")
RS_SENT=$(awk '/^Total bytes sent:/ {gsub(",","",$4); print $4}' "$WORK/rsync.out")
RS_RECV=$(awk '/^Total bytes received:/ {gsub(",","",$4); print $4}' "$WORK/rsync.out")
cmp -s "$DISK" "$WORK/replica.img" || { echo "rsync left the files different"; exit 1; }

# The read side: nothing differs now, so a resync is read + hash + region hashes.
resync_rate() { # io-mode -> sets RATE_T (seconds) and RATE_R (MiB/s)
  kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
  agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" \
    "journal-max-bytes = 1073741824" "io-mode = \"$1\""
  start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
  until [ "$(status | json 'd["connected"] and d["state"]=="streaming"')" = True ]; do sleep 0.2; done
  local t0 t1
  t0=$(date +%s.%N)
  "$BIN/lifeboat-ps" resync --config "$WORK/ps/ps.toml" --machine machine-1 >"$WORK/resync-$1.out"
  t1=$(date +%s.%N)
  tail -1 "$WORK/resync-$1.out" | json 'd["block-bytes"]' | grep -qx 0 || { echo "a resync of the unchanged disk sent blocks"; exit 1; }
  RATE_T=$(python3 -c "print(f'{$t1-$t0:.2f}')")
  RATE_R=$(python3 -c "print(f'{$SIZE_MIB/($t1-$t0):.0f}')")
}
resync_rate uring; URING_T=$RATE_T; URING_R=$RATE_R
resync_rate portable; PORT_T=$RATE_T; PORT_R=$RATE_R
T0=$(date +%s.%N); cat "$DISK" >/dev/null; T1=$(date +%s.%N)
CAT_T=$(python3 -c "print(f'{$T1-$T0:.2f}')"); CAT_R=$(python3 -c "print(f'{$SIZE_MIB/($T1-$T0):.0f}')")

printf '\n%-22s %10s %16s %s\n' "" "wall s" "wire bytes" "detail"
printf '%-22s %10s %16s %s\n' "lifeboat resync" "$OURS_T" "$((OURS_HASH + OURS_BLOCK))" "hashes $OURS_HASH + blocks $OURS_BLOCK"
printf '%-22s %10s %16s %s\n' "rsync -B 4096" "$RS_T" "$((RS_SENT + RS_RECV))" "sent $RS_SENT + received $RS_RECV"

printf '\nresync of the unchanged %s MiB disk (read + hash, nothing sent):\n' "$SIZE_MIB"
printf '%-22s %10s %10s\n' "" "wall s" "MiB/s"
printf '%-22s %10s %10s\n' "io_uring" "$URING_T" "$URING_R"
printf '%-22s %10s %10s\n' "portable (pread)" "$PORT_T" "$PORT_R"
printf '%-22s %10s %10s\n' "cat disk > /dev/null" "$CAT_T" "$CAT_R"
