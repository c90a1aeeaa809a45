#!/usr/bin/env bash
# Data-path benchmark. In one run, on the same 1 GiB file in the page cache:
# fio's NBD engine (4 KiB random writes at queue depth 32, 1 MiB sequential
# writes at queue depth 8) against
#   (a) lifeboat-agent while it replicates to a lifeboat-ps on this machine,
#   (b) qemu-nbd (writeback cache),
#   (c) nbdkit's file plugin;
# then the end-to-end rate from write to durable in the object store
# (compressible data). Prints a table with the ratios.
#   RUNTIME=10 (seconds per fio run)   E2E_SIZE=2G
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
RUNTIME="${RUNTIME:-10}"
E2E_SIZE="${E2E_SIZE:-2G}"
WORK="$(mktemp -d /tmp/lifeboat-bench.XXXXXX)"
source scripts/lib.sh
DISK="$WORK/disk.img"
truncate -s 1G "$DISK"
dd if=/dev/zero of="$DISK" bs=1M count=1024 conv=notrunc status=none   # allocated, in the page cache

# (b) qemu-nbd
qemu-nbd -f raw -x disk -k "$WORK/q.sock" -t -e 4 "$DISK" & PIDS+=($!)
wait_sock "$WORK/q.sock"
Q4=$(fio_one "nbd+unix:///disk?socket=$WORK/q.sock" randwrite 4k 32 q4)
Q1=$(fio_one "nbd+unix:///disk?socket=$WORK/q.sock" write 1M 8 q1)
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# (c) nbdkit file plugin
nbdkit -f -U "$WORK/k.sock" file "$DISK" & PIDS+=($!)
wait_sock "$WORK/k.sock"
K4=$(fio_one "nbd+unix:///?socket=$WORK/k.sock" randwrite 4k 32 k4)
K1=$(fio_one "nbd+unix:///?socket=$WORK/k.sock" write 1M 8 k1)
kill -TERM "${PIDS[-1]}"; wait "${PIDS[-1]}" 2>/dev/null || true

# (a) lifeboat-agent replicating to lifeboat-ps (file:// store on this machine)
start_ps "$WORK/ps"
agent_toml "$WORK/agent.toml" "$WORK/agent-state" "$DISK" "$WORK/a.sock" "journal-max-bytes = 1073741824"
start_agent "$WORK/agent.toml" "$WORK/a.sock" "$WORK/agent-state"
AURI="nbd+unix:///disk?socket=$WORK/a.sock"
A4=$(fio_one "$AURI" randwrite 4k 32 a4)
A1=$(fio_one "$AURI" write 1M 8 a1)

# End to end: write E2E_SIZE of compressible data, time until it is durable in the store.
STORE="file://$WORK/ps/store"
wait_durable() {
  local cap end st
  # All writes are in the stream once the agent is `streaming` (after a bitmap
  # episode the resync must have resent the dirty regions first).
  for _ in $(seq 6000); do
    st=$("$BIN/lifeboat-agent" status --config "$WORK/agent.toml")
    [ "$(echo "$st" | json 'd["state"]')" = streaming ] && break
    sleep 0.1
  done
  cap=$(echo "$st" | json 'd["positions"]["captured"]')
  for _ in $(seq 6000); do
    end=$("$BIN/lifeboat-mt" points --store "$STORE" --machine machine-1 --json | json 'd["stream-end"]')
    [ "$end" -ge "$cap" ] && return 0
    sleep 0.1
  done
  echo "store never reached seq $cap"; exit 1
}
wait_durable
T0=$(date +%s.%N)
fio --name=e2e --ioengine=nbd --uri="$AURI" --rw=write --bs=1M --iodepth=8 --size=1G \
    --io_size="$E2E_SIZE" --buffer_compress_percentage=50 --refill_buffers=1 \
    --output-format=json --output="$WORK/e2e.json" >/dev/null
T1=$(date +%s.%N)
wait_durable
T2=$(date +%s.%N)
STORED=$(du -sb "$WORK/ps/store" | cut -f1)
RSS_A=$(ps -o rss= -p "$AGENT_PID" | tr -d ' ')
RSS_P=$(ps -o rss= -p "$PS_PID" | tr -d ' ')

# Materialising the disk: failover at latest (from the store alone) vs cp of the source.
kill -TERM "$AGENT_PID" "$PS_PID"; sleep 0.5
F0=$(date +%s.%N)
"$BIN/lifeboat-mt" failover --store "$STORE" --machine machine-1 --point latest \
  --out "$WORK/recovered" --key-file "$WORK/ps/kek.key" >/dev/null 2>&1
F1=$(date +%s.%N)
cmp -s "$WORK/recovered/disk.raw" "$DISK" || { echo "MISMATCH: recovered disk differs"; exit 1; }
rm -rf "$WORK/recovered"
C0=$(date +%s.%N); cp --sparse=always "$DISK" "$WORK/copy.img"; C1=$(date +%s.%N)
echo "materialise 1 GiB disk: lifeboat-mt failover latest $(python3 -c "print(f'{$F1-$F0:.2f}')") s (byte-equal), cp $(python3 -c "print(f'{$C1-$C0:.2f}')") s"

python3 - "$A4" "$Q4" "$K4" "$A1" "$Q1" "$K1" "$T0" "$T1" "$T2" "$E2E_SIZE" "$STORED" "$RSS_A" "$RSS_P" "$RUNTIME" <<'PY'
import sys
a4,q4,k4,a1,q1,k1=[tuple(map(float,x.split())) for x in sys.argv[1:7]]
t0,t1,t2=map(float,sys.argv[7:10])
size=sys.argv[10]; stored=int(sys.argv[11]); rss_a=int(sys.argv[12]); rss_p=int(sys.argv[13]); rt=sys.argv[14]
n=float(size[:-1])*{'G':2**30,'M':2**20}[size[-1]]
print(f"fio nbd engine, 1 GiB raw file in the page cache, {rt} s per run")
print(f"{'workload':<26}{'lifeboat-agent (a)':>20}{'qemu-nbd (b)':>14}{'nbdkit file (c)':>17}{'a/b':>7}{'a/c':>7}")
print(f"{'4k randwrite qd32 (IOPS)':<26}{a4[0]:>20.0f}{q4[0]:>14.0f}{k4[0]:>17.0f}{a4[0]/q4[0]:>7.2f}{a4[0]/k4[0]:>7.2f}")
print(f"{'1M seqwrite qd8 (MiB/s)':<26}{a1[1]:>20.0f}{q1[1]:>14.0f}{k1[1]:>17.0f}{a1[1]/q1[1]:>7.2f}{a1[1]/k1[1]:>7.2f}")
print(f"end to end: {size} written in {t1-t0:.2f} s, durable in the object store after {t2-t0:.2f} s "
      f"= {n/(t2-t0)/1e6:.0f} MB/s write-to-durable (last write to durable: {t2-t1:.2f} s)")
print(f"stored {stored/2**20:.0f} MiB for {n/2**20:.0f} MiB written (50% compressible); RSS agent {rss_a/1024:.0f} MiB, process server {rss_p/1024:.0f} MiB")
PY
