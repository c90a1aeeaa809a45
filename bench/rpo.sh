#!/usr/bin/env bash
# RPO under steady churn: one machine writing 20 MB/s (10^6 bytes) to each of two
# disks, Azure Site Recovery's per-disk churn limit (fio's nbd engine, 64 KiB
# random writes, queue depth 4, 50 %-compressible), replicated to a process
# server with a file:// store on this machine. bench/rpo_sampler.py measures the
# RPO from outside (a write's capture by the agent until the process server has
# it in the store) every 50 ms, and counts the objects created in the store.
#   SECS=60 (seconds of churn)   RATE_MB=20 (per disk)
#   SEGMENT_AGE=500ms (the process server's segment-max-age)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
SECS="${SECS:-60}"
RATE_MB="${RATE_MB:-20}"
WORK="$(mktemp -d /tmp/lifeboat-rpo.XXXXXX)"
source scripts/lib.sh

start_ps "$WORK/ps" "" "s/^segment-max-age = .*/segment-max-age = \"${SEGMENT_AGE:-500ms}\"/"
for d in 1 2; do truncate -s 2G "$WORK/disk$d.img"; done
AGENT_DISK=disk1 agent_toml "$WORK/agent.toml" "$WORK/state" "$WORK/disk1.img" "$WORK/d1.sock" \
  "journal-max-bytes = 1073741824"
add_disk "$WORK/agent.toml" disk2 "$WORK/disk2.img" "$WORK/d2.sock"
start_agent "$WORK/agent.toml" "$WORK/d1.sock" "$WORK/state"
wait_sock "$WORK/d2.sock"
wait_streaming "$WORK/agent.toml"

fio --kb_base=1000 --ioengine=nbd --rw=randwrite --bs=64k --iodepth=4 --size=2G \
    --rate="${RATE_MB}M" --runtime="$((SECS + 5))" --time_based --randrepeat=0 \
    --buffer_compress_percentage=50 --refill_buffers=1 \
    --name=disk1 --uri="nbd+unix:///disk1?socket=$WORK/d1.sock" \
    --name=disk2 --uri="nbd+unix:///disk2?socket=$WORK/d2.sock" \
    --output-format=json --output="$WORK/fio.json" >/dev/null &
FIO=$!; PIDS+=("$FIO")
sleep 3   # past fio's ramp
python3 bench/rpo_sampler.py --ps-sock "$WORK/ps/cache/control.sock" --ps-pid "$PS_PID" \
  --agent "machine-1=$WORK/state/control.sock" --store "$WORK/ps/store" \
  --seconds "$SECS" >"$WORK/rpo.json"
wait "$FIO"

python3 - "$WORK/rpo.json" "$WORK/fio.json" "$RATE_MB" "$AGENT_PID" "${SEGMENT_AGE:-500ms}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); f = json.load(open(sys.argv[2]))
rate = sys.argv[3]
got = sum(j["write"]["bw_bytes"] for j in f["jobs"]) / 1e6
m = r["machines"]["machine-1"]
agent_rss = 0
with open(f"/proc/{sys.argv[4]}/status") as s:
    for line in s:
        if line.startswith("VmRSS:"):
            agent_rss = int(line.split()[1]) / 1024
print(f"RPO, one machine, 2 disks x {rate} MB/s (fio measured {got:.1f} MB/s in all), {r['seconds']:.0f} s, segment-max-age {sys.argv[5]}")
print(f"{'':<34}{'p50 (s)':>9}{'p99 (s)':>9}{'max (s)':>9}{'samples':>9}")
print(f"{'lifeboat (sampled from outside)':<34}{m['p50']:>9.2f}{m['p99']:>9.2f}{m['max']:>9.2f}{m['samples']:>9}")
print(f"{'target (issue 11, item 7)':<34}{'':>9}{'< 0.50':>9}   with <= 2 objects/s per machine")
print(f"objects created in the store: {r['objects']} = {r['objects_per_s']:.2f}/s = {r['objects_per_hour']:.0f}/hour")
print(f"RSS agent {agent_rss:.0f} MiB, process server {r['ps_rss_mib']:.0f} MiB; process server CPU {r['ps_cpu_cores']:.2f} cores")
if m["unsettled"] or r["errors"]:
    print(f"unsettled samples {m['unsettled']}, errors {r['errors']}")
    sys.exit(1)
PY
