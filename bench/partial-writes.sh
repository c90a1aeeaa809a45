#!/usr/bin/env bash
# Sub-4 KiB writers: fio's NBD engine, 512-byte random writes at queue depth 32
# (each covers its 4 KiB block in part, so the agent reads the block and sends a
# HASHES entry after the write), beside 4 KiB ones, against qemu-nbd and
# lifeboat-agent replicating to lifeboat-ps, on the same 1 GiB file in the page
# cache, in one run.   RUNTIME=10 (seconds per fio run)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
RUNTIME="${RUNTIME:-10}"
WORK="$(mktemp -d /tmp/lifeboat-partial-writes.XXXXXX)"
source scripts/lib.sh
DISK="$WORK/disk.img"
truncate -s 1G "$DISK"
dd if=/dev/zero of="$DISK" bs=1M count=1024 conv=notrunc status=none
iops() { fio_one "$@" | cut -d" " -f1; }
qemu-nbd -f raw -x disk -k "$WORK/q.sock" -t -e 4 "$DISK" & PIDS+=($!)
wait_sock "$WORK/q.sock"
Q5=$(iops "nbd+unix:///disk?socket=$WORK/q.sock" randwrite 512 32 q5)
Q4=$(iops "nbd+unix:///disk?socket=$WORK/q.sock" randwrite 4k 32 q4)
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true
start_ps "$WORK/ps"
agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" "journal-max-bytes = 1073741824"
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
AURI="nbd+unix:///disk?socket=$WORK/a.sock"
A5=$(iops "$AURI" randwrite 512 32 a5)
A4=$(iops "$AURI" randwrite 4k 32 a4)
printf '%-28s %10s %10s %6s\n' "" "lifeboat" "qemu-nbd" "ratio"
printf '%-28s %10s %10s %6s\n' "512 randwrite qd32 (IOPS)" "$A5" "$Q5" "$(python3 -c "print(f'{$A5/$Q5:.2f}')")"
printf '%-28s %10s %10s %6s\n' "4k randwrite qd32 (IOPS)" "$A4" "$Q4" "$(python3 -c "print(f'{$A4/$Q4:.2f}')")"
echo "agent state: $("$BIN/lifeboat-agent" status --config "$WORK/agent.toml" | json 'd["state"]')"
