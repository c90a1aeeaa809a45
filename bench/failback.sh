#!/usr/bin/env bash
# Failback benchmark (issue 9). One run, on this machine, file:// store:
#  1. Reprotect: a SIZE_MIB (4096) MiB disk of random data is protected and
#     failed over; 1 % of the recovered copy's 4 KiB blocks change (the
#     recovered machine ran); `lifeboat-mt reprotect` makes the recovered
#     side's agent stream to the master target, which writes the original
#     disk after a checksum resync. Wall time (agent start → resync done) and
#     bytes sent (hashes + blocks, counted by the agent), beside the disk size
#     and beside `rsync --no-whole-file --inplace -B 4096` of the same pair.
#  2. Instant recovery: `lifeboat-mt serve-point` of the point, folded into
#     a base by a short retention (the tail after the base is empty): time
#     until the export answers its first read (qemu-io), and the hydration
#     rate to a file, beside `cp` of the failed-over image (page cache dropped
#     for neither: both read warm sources).
#   SIZE_MIB=4096 KEEP=1 (keep the scratch directory)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-mt ] || build_release
for t in rsync qemu-io; do command -v "$t" >/dev/null || { echo "$t is required (scripts/install-deps.sh)"; exit 1; }; done
SIZE_MIB="${SIZE_MIB:-4096}"
WORK="$(mktemp -d /tmp/lifeboat-failback-bench.XXXXXX)"
source scripts/lib.sh
secs() { python3 -c "print(f'{$2-$1:.2f}')"; }

DISK="$WORK/disk.img"
echo "writing a ${SIZE_MIB} MiB image of random data..."
head -c "$((SIZE_MIB * 1024 * 1024))" /dev/urandom >"$DISK"
# A short retention: the synced disk is folded into a base of chunks, the
# history instant recovery serves from (only the tail after it is fetched first).
start_ps "$WORK/ps" '[retention]
keep = "10s"
fine-window = "10s"
tiers = []
compact-every = "2s"'
agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" "journal-max-bytes = 1073741824"
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
status() { "$BIN/lifeboat-agent" status --config "$1"; }
echo "initial sync..."
until [ "$(status "$WORK/agent.toml" | json 'all(s["state"]=="streaming" for s in d["sync"]) and d["positions"]["acked"]>=d["positions"]["captured"]')" = True ]; do sleep 1; done
SEQ=$("$BIN/lifeboat-agent" tag --config "$WORK/agent.toml" --label bench)
until "$BIN/lifeboat-mt" points --store "file://$WORK/ps/store" --machine machine-1 --json 2>/dev/null \
  | json "any(p['seq']==$SEQ for p in d['points'])" | grep -q True; do sleep 0.5; done
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
echo "waiting for the fold into a base..."
until [ "$("$BIN/lifeboat-mt" points --store "file://$WORK/ps/store" --machine machine-1 --json 2>/dev/null \
  | json "(d.get('base') or {}).get('seq', 0) >= $SEQ")" = True ]; do sleep 1; done

echo "failover..."
T0=$(date +%s.%N)
"$BIN/lifeboat-mt" failover --store "file://$WORK/ps/store" --machine machine-1 --point "$SEQ" \
  --out "$WORK/recovered" --key-file "$WORK/ps/kek.key" >/dev/null 2>"$WORK/failover.err"
T1=$(date +%s.%N)
FAILOVER_T=$(secs "$T0" "$T1")
RECOVERED="$WORK/recovered/disk.raw"
cmp "$RECOVERED" "$DISK" || { echo "failover differs from the source"; exit 1; }

# The recovered machine runs: 1 % of its blocks change.
change_blocks "$RECOVERED" "$SIZE_MIB" 9
CHANGED_BYTES=$((SIZE_MIB * 256 / 100 * 4096))
cp "$DISK" "$WORK/rsync-target.img"

# Reprotect through a master target onto the original disk.
MT_PORT=$(free_port)
cat >"$WORK/mt.toml" <<TOML
listen = "127.0.0.1:$MT_PORT"
ca-cert = "$WORK/ps/ca.pem"
server-cert = "$WORK/ps/server.pem"
server-key = "$WORK/ps/server.key"
state-dir = "$WORK/mt-state"
TOML
"$BIN/lifeboat-mt" serve --config "$WORK/mt.toml" >"$WORK/mt.log" 2>&1 &
MT_PID=$!; PIDS+=("$MT_PID")
until grep -q "lifeboat-mt serving" "$WORK/mt.log"; do sleep 0.1; done
reprotect() {
  "$BIN/lifeboat-mt" reprotect --config "$WORK/mt.toml" --machine machine-1 --to "disk=$DISK" \
    --recovered "$WORK/recovered" --agent-config "$WORK/away.toml" --certs "$PS_CERTS" --json "$@"
}
reprotect >/dev/null
T0=$(date +%s.%N)
start_agent "$WORK/away.toml" "$WORK/recovered/disk.sock" "$WORK/recovered/agent-state"
reprotect --wait --timeout 1h >"$WORK/reprotect.json" 2>"$WORK/reprotect.err"
T1=$(date +%s.%N)
REPROTECT_T=$(secs "$T0" "$T1")
AWAY=$(status "$WORK/away.toml")
HASH_B=$(echo "$AWAY" | json 'd["checksum-resync"]["hash-bytes"]')
BLOCK_B=$(echo "$AWAY" | json 'd["checksum-resync"]["block-bytes"]')
SYNC_B=$(echo "$AWAY" | json 'sum(s.get("sent-bytes", 0) for s in d["sync"])')
until [ "$(status "$WORK/away.toml" | json 'd["positions"]["acked"]>=d["positions"]["captured"]')" = True ]; do sleep 0.2; done
kill -TERM "$AGENT_PID"; wait "$AGENT_PID" 2>/dev/null || true
kill -TERM "$MT_PID"; wait "$MT_PID" 2>/dev/null || true
cmp "$DISK" "$RECOVERED" && EQUAL=byte-equal || EQUAL=DIFFERS

T0=$(date +%s.%N)
rsync --ignore-times --inplace --no-whole-file -B 4096 --stats "$RECOVERED" "$WORK/rsync-target.img" >"$WORK/rsync.out"
T1=$(date +%s.%N)
RSYNC_T=$(secs "$T0" "$T1")
RSYNC_B=$(awk '/Total bytes sent:/ {gsub(",","",$4); s=$4} /Total bytes received:/ {gsub(",","",$4); r=$4} END {print s+r}' "$WORK/rsync.out")

# Instant recovery of the point failed over above.
rm -rf "$WORK/recovered/agent-state"
T0=$(date +%s.%N)
"$BIN/lifeboat-mt" serve-point --store "file://$WORK/ps/store" --machine machine-1 --point "$SEQ" \
  --key-file "$WORK/ps/kek.key" --state-dir "$WORK/instant" --hydrate "disk=$WORK/hydrated.img" \
  >"$WORK/serve-point.log" 2>&1 &
SP_PID=$!; PIDS+=("$SP_PID")
until qemu-io -r -f raw -c "read 0 4096" "nbd+unix:///disk?socket=$WORK/instant/nbd.sock" >/dev/null 2>&1; do sleep 0.02; done
T1=$(date +%s.%N)
TTFB=$(secs "$T0" "$T1")
until grep -q "hydration complete" "$WORK/serve-point.log"; do
  kill -0 "$SP_PID" 2>/dev/null || { cat "$WORK/serve-point.log"; exit 1; }
  sleep 0.2
done
HYDRATION=$(grep "hydration complete" "$WORK/serve-point.log")
H_SECS=$(echo "$HYDRATION" | sed -E 's/.* copied in ([0-9.]+) s.*/\1/')
kill -TERM "$SP_PID"; wait "$SP_PID" 2>/dev/null || true
# The hydrated disk is the point (no writes went to the export).
"$BIN/lifeboat-mt" failover --store "file://$WORK/ps/store" --machine machine-1 --point "$SEQ" \
  --out "$WORK/point" --key-file "$WORK/ps/kek.key" >/dev/null 2>&1
cmp "$WORK/hydrated.img" "$WORK/point/disk.raw" && H_EQUAL=byte-equal || H_EQUAL=DIFFERS
T0=$(date +%s.%N)
cp "$WORK/point/disk.raw" "$WORK/cp.img"
sync "$WORK/cp.img"
T1=$(date +%s.%N)
CP_T=$(secs "$T0" "$T1")

SIZE_B=$((SIZE_MIB * 1024 * 1024))
python3 - <<PY
size, changed = $SIZE_B, $CHANGED_BYTES
ours = $HASH_B + $BLOCK_B + $SYNC_B
print(f"disk {size >> 20} MiB, {changed} bytes changed on the recovered side (1 % of the 4 KiB blocks); failover took $FAILOVER_T s")
print(f"reprotect (lifeboat-mt reprotect, checksum resync): $REPROTECT_T s, {ours} bytes sent ({$HASH_B} hashes + {$BLOCK_B} blocks + {$SYNC_B} copy) = {ours / size * 100:.2f} % of the disk, {ours / changed:.2f}x the changed bytes; original disk $EQUAL")
print(f"rsync --no-whole-file -B 4096 of the same pair: $RSYNC_T s, {$RSYNC_B} bytes sent+received = {$RSYNC_B / size * 100:.2f} % of the disk")
print(f"instant recovery: export answered its first read after $TTFB s (qemu-io, from launch)")
h = float("$H_SECS")
print(f"hydration: {size >> 20} MiB in {h:.2f} s = {size / h / 1e6:.0f} MB/s ({'$H_EQUAL'} to the point); cp of the failed-over image: $CP_T s = {size / $CP_T / 1e6:.0f} MB/s")
PY
