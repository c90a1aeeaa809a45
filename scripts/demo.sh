#!/usr/bin/env bash
# The main job on the embedded default: a process server on 127.0.0.1 with a
# local-filesystem object store, an agent protecting a 1 GiB sample disk, a real
# write workload (fio's NBD engine) through the agent's NBD export, a
# crash-consistent point, failovers at that point and at `latest`, and a
# byte-for-byte check of both recovered disks. Prints the figures; exits non-zero
# on any mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/install-deps.sh --demo
source scripts/cargo-env.sh
build_release
WORK="$(mktemp -d /tmp/lifeboat-demo.XXXXXX)"
source scripts/lib.sh
now() { date +%s.%N; }

start_ps "$WORK/ps"
echo "== process server (127.0.0.1:$PS_PORT, store file://$WORK/ps/store)"
echo "== agent protecting a 1 GiB sample disk"
mkdir -p "$WORK/agent"
truncate -s 1G "$WORK/agent/disk.img"
agent_toml "$WORK/agent/agent.toml" "$WORK/agent/state" "$WORK/agent/disk.img" "$WORK/agent/disk.sock"
start_agent "$WORK/agent/agent.toml" "$WORK/agent/disk.sock" "$WORK/agent/state"
URI="nbd+unix:///disk?socket=$WORK/agent/disk.sock"
STORE="file://$WORK/ps/store"
echo "== initial sync (the disk is new: zero chunks are skipped)"
"$BIN/lifeboat-agent" progress --config "$WORK/agent/agent.toml"

fio_run() { # name rw bs depth size
  fio --name="$1" --ioengine=nbd --uri="$URI" --rw="$2" --bs="$3" --iodepth="$4" --size="$5" \
      --buffer_compress_percentage=50 --refill_buffers=1 --randrepeat=0 \
      --output-format=json --output="$WORK/$1.json" >/dev/null
  python3 - "$WORK/$1.json" <<'PY'
import json,sys
j=json.load(open(sys.argv[1]))["jobs"][0]["write"]
print(f"   {j['io_bytes']/2**20:.0f} MiB written, {j['bw_bytes']/2**20:.0f} MiB/s, {j['iops']:.0f} IOPS")
PY
}

echo "== workload 1: 4 KiB random writes, queue depth 32, 256 MiB"
fio_run rand randwrite 4k 32 256M
TAG=$("$BIN/lifeboat-agent" tag --config "$WORK/agent/agent.toml")
cp --sparse=always "$WORK/agent/disk.img" "$WORK/source-at-tag.img"
echo "   crash-consistent point taken at seq $TAG (source captured for comparison)"

echo "== workload 2: 1 MiB sequential writes, queue depth 8, 512 MiB"
fio_run seq write 1M 8 512M
T_END=$(now)
# Everything written is in the stream once the agent is `streaming` again (a
# full journal switches it to `bitmap`; the resync then resends dirty regions).
for _ in $(seq 1200); do
  ST=$("$BIN/lifeboat-agent" status --config "$WORK/agent/agent.toml")
  [ "$(echo "$ST" | json 'd["state"]')" = streaming ] && break
  sleep 0.1
done
[ "$(echo "$ST" | json 'd["state"]')" = streaming ] || { echo "FAIL: the agent did not return to streaming: $ST"; exit 1; }
CAPTURED=$(echo "$ST" | json 'd["positions"]["captured"]')
for _ in $(seq 1200); do
  END=$("$BIN/lifeboat-mt" points --store "$STORE" --machine machine-1 --json | json 'd["stream-end"]')
  [ "$END" -ge "$CAPTURED" ] && break
  sleep 0.1
done
T_DURABLE=$(now)
[ "$END" -ge "$CAPTURED" ] || { echo "FAIL: the store did not reach seq $CAPTURED (at $END)"; exit 1; }
STORED=$(du -sb "$WORK/ps/store" | cut -f1)

echo "== recovery points"
"$BIN/lifeboat-mt" points --store "$STORE" --machine machine-1

echo "== failover at point $TAG and at latest (reading only the object store)"
kill -TERM "$PS_PID"   # the process server is gone: recovery needs only the store
"$BIN/lifeboat-mt" failover --store "$STORE" --machine machine-1 --point "$TAG" \
  --out "$WORK/recovered-tag" --key-file "$WORK/ps/kek.key"
"$BIN/lifeboat-mt" failover --store "$STORE" --machine machine-1 --point latest \
  --out "$WORK/recovered-latest" --key-file "$WORK/ps/kek.key"

status=0
if cmp -s "$WORK/recovered-tag/disk.raw" "$WORK/source-at-tag.img"; then
  echo "OK: disk at point $TAG is byte-for-byte the source at that point"
else
  echo "MISMATCH: disk at point $TAG differs from the source at that point"; status=1
fi
if cmp -s "$WORK/recovered-latest/disk.raw" "$WORK/agent/disk.img"; then
  echo "OK: disk at latest (seq $END) is byte-for-byte the source"
else
  echo "MISMATCH: disk at latest differs from the source"; status=1
fi
python3 - "$T_END" "$T_DURABLE" "$STORED" "$WORK" <<'PY'
import json,sys
t_end,t_dur,stored,work=float(sys.argv[1]),float(sys.argv[2]),int(sys.argv[3]),sys.argv[4]
w=sum(json.load(open(f"{work}/{n}.json"))["jobs"][0]["write"]["io_bytes"] for n in ("rand","seq"))
print(f"figures: data written {w/2**20:.0f} MiB; stored (zstd+AES-GCM) {stored/2**20:.0f} MiB; "
      f"time from the last write to durable in the object store {t_dur-t_end:.2f} s (RPO at the end of the workload)")
PY
exit $status
