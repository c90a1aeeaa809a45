#!/usr/bin/env bash
# Initial-sync benchmark: a 4 GiB disk, a quarter of it data (random 1 MiB
# chunks) and the rest zeros, protected from scratch. Reports the time until the
# first recovery point exists (every disk synced and its data acknowledged by the
# process server) with the io_uring and the portable (pread threads) engines, and
# `cat disk > /dev/null` on the same file as the read limit. Page cache warm for all.
# A last row syncs a disk with 1/256 data (io_uring): there the replication stream
# is not the limit, so its scan rate is the read-and-classify rate beside `cat`;
# the agent's start and first handshake (timed on a 64 MiB disk) are taken off.
#   SIZE_GIB=4
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
[ -x target/release/lifeboat-agent ] || build_release
SIZE_GIB="${SIZE_GIB:-4}"
WORK="$(mktemp -d /tmp/lifeboat-syncbench.XXXXXX)"
source scripts/lib.sh
make_disk() { # path, 1 MiB chunks of data per GiB
  python3 - "$1" "$SIZE_GIB" "$2" <<'PY'
import os,sys,random
path,gib,per_gib=sys.argv[1],int(sys.argv[2]),int(sys.argv[3])
random.seed(7)
with open(path,"wb") as f:
    f.truncate(gib<<30)
    for chunk in random.sample(range(gib*1024), gib*per_gib):
        f.seek(chunk<<20); f.write(os.urandom(1<<20))
PY
}
cat_rate() { # path -> MiB/s of `cat path > /dev/null`, the second time (the first
  # brings the holes' pages into the page cache too)
  cat "$1" >/dev/null
  local t0 t1; t0=$(date +%s.%N); cat "$1" >/dev/null; t1=$(date +%s.%N)
  python3 -c "print(f'{($SIZE_GIB<<30)/($t1-$t0)/2**20:.0f}')"
}
DISK="$WORK/disk.img"
make_disk "$DISK" 256     # a quarter of the 1 MiB chunks
CAT=$(cat_rate "$DISK")

run_sync() { # io-mode [label] -> seconds to first point, scan MiB/s, sent MiB, scan s
  local mode=$1 dir="$WORK/${2:-$1}"
  mkdir -p "$dir"
  start_ps "$dir/ps"
  agent_toml "$dir/agent.toml" "$dir/state" "$DISK" "$dir/a.sock" \
    "journal-max-bytes = 1073741824" "io-mode = \"$mode\""
  local t0; t0=$(date +%s.%N)
  start_agent "$dir/agent.toml" "$dir/a.sock" "$dir/state"
  local scanned=""
  for _ in $(seq 6000); do
    st=$("$BIN/lifeboat-agent" status --config "$dir/agent.toml")
    if [ "$(echo "$st" | json 'd["sync"][0]["state"]')" = streaming ] && [ -z "$scanned" ]; then
      scanned=$(date +%s.%N)
    fi
    if [ -n "$scanned" ] && [ "$(echo "$st" | json 'd["positions"]["acked"]>=d["positions"]["captured"]')" = True ]; then break; fi
    sleep 0.05
  done
  local t1; t1=$(date +%s.%N)
  sent=$(echo "$st" | json 'd["sync"][0]["sent-bytes"]')
  python3 -c "print(f'{$t1-$t0:.2f} {($SIZE_GIB<<30)/($scanned-$t0)/2**20:.0f} {$sent/2**20:.0f} {$scanned-$t0:.3f}')"
  kill -KILL "$AGENT_PID" "$PS_PID"
}
U=$(run_sync uring)
P=$(run_sync portable)
DISK="$WORK/sparse.img"
make_disk "$DISK" 4       # 1/256 of the chunks
CAT_S=$(cat_rate "$DISK")
S=$(run_sync uring sparse)
DISK="$WORK/base.img"
truncate -s 64M "$DISK"
B=$(run_sync uring base)
python3 - "$U" "$P" "$CAT" "$SIZE_GIB" "$S" "$CAT_S" "$B" <<'PY'
import sys
u,p=[x.split() for x in sys.argv[1:3]]; cat=sys.argv[3]; g=int(sys.argv[4])
s=sys.argv[5].split(); cat_s=sys.argv[6]; base=float(sys.argv[7].split()[3])
scan=(g<<30)/max(float(s[3])-base, 1e-3)/2**20
print(f"initial sync of a {g} GiB disk (1/4 data, 3/4 zeros), page cache warm")
print(f"{'engine':<22}{'scan MiB/s':>12}{'sent MiB':>10}{'to first point (s)':>20}")
print(f"{'io_uring':<22}{u[1]:>12}{u[2]:>10}{u[0]:>20}")
print(f"{'portable (pread)':<22}{p[1]:>12}{p[2]:>10}{p[0]:>20}")
print(f"{'cat disk > /dev/null':<22}{cat:>12}")
print(f"the same size with 1/256 data, where the stream is not the limit")
print(f"(scan less the {base:.2f} s the agent takes to start and sync a 64 MiB disk):")
print(f"{'io_uring':<22}{scan:>12.0f}{s[2]:>10}{s[0]:>20}")
print(f"{'cat disk > /dev/null':<22}{cat_s:>12}")
print(f"scan time / cat's time: {float(cat_s)/scan:.2f}")
PY
