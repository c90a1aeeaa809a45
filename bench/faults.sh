#!/usr/bin/env bash
# Long run of the seeded fault harness (tests/src/faults.rs): seeds back to back
# for MINUTES, each a workload through the agent's NBD export while the seed's
# schedule kills the agent and the process server, cuts/stalls/delays their
# link, stops the S3 store and powers off the agent's state directory and the
# server's cache (powerfs); each seed ends with every recovery point failed over
# and compared byte for byte. Prints, at the end: seeds run, faults injected by
# kind, writes acknowledged, writes lost (must be 0), failovers compared (all
# equal). Needs root and /dev/fuse.
#   bench/faults.sh [--minutes N (30)] [--seed FIRST] [--secs PER_SEED (120)] [--kinds k1,k2]
#   LIFEBOAT_FAULT_MAX_WRITE=8M lowers the largest write (default: the export's 32 MiB).
#   LIFEBOAT_BENCH_BIN=DIR runs the binaries in DIR (a copy, so that a rebuild
#   during the run does not change them under it).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/cargo-env.sh
MINUTES=30
SEED="$(( $(date +%s) % 1000000 ))"
SECS=120
KINDS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) MINUTES="$2"; shift 2 ;;
    --seed) SEED="$2"; shift 2 ;;
    --secs) SECS="$2"; shift 2 ;;
    --kinds) KINDS=(--kinds "$2"); shift 2 ;;
    *) echo "usage: $0 [--minutes N] [--seed FIRST] [--secs PER_SEED] [--kinds k1,k2]"; exit 2 ;;
  esac
done
[ -x target/release/lifeboat-faults ] && [ -x target/release/lifeboat-powerfs ] || build_release
WORK="$(mktemp -d /tmp/lifeboat-faults.XXXXXX)"
source scripts/lib.sh
BIN="${LIFEBOAT_BENCH_BIN:-$BIN}"
KEEP=1   # failed seeds keep their directories under $WORK; passing ones are removed
echo "fault harness: ${MINUTES} min from seed $SEED, ${SECS} s per seed, work in $WORK"
set +e
"$BIN/lifeboat-faults" --minutes "$MINUTES" --seed "$SEED" --secs "$SECS" --failovers 20 --work "$WORK" "${KINDS[@]}" \
  2> >(tee "$WORK/faults.log" >&2)
RC=$?
set -e
sleep 1
python3 - "$WORK/faults.log" <<'PY'
import re, sys, collections
runs = [l for l in open(sys.argv[1]) if l.startswith("FAULTS-RESULT ")]
tot = collections.Counter(); kinds = collections.Counter(); failed = []
for l in runs:
    kv = dict(f.split("=", 1) for f in l.split()[1:])
    for k in ("ops", "writes", "flushes", "lost", "failovers", "equal", "points"):
        tot[k] += int(kv[k])
    tot["lost-to-takeover"] += int(kv.get("points-lost-to-takeover", 0))
    tot["folded"] += int(kv.get("points-folded", 0))
    if kv["faults"] != "none":
        for f in kv["faults"].split(","):
            k, n = f.split(":"); kinds[k] += int(n)
    if kv["failures"] != "0":
        failed.append(kv["seed"])
print()
print(f"seeds run:            {len(runs)}" + (f"  (failed: {', '.join(failed)})" if failed else ""))
print(f"faults injected:      {sum(kinds.values())}")
for k, n in sorted(kinds.items()):
    print(f"  {k:<20}{n}")
print(f"operations:           {tot['ops']}")
print(f"writes acknowledged:  {tot['writes']}  (flushes {tot['flushes']})")
print(f"writes lost:          {tot['lost']}  (must be 0)")
print(f"points taken:         {tot['points']}  (held only by a server taken over from, not listed: {tot['lost-to-takeover']}; folded by retention: {tot['folded']})")
print(f"failovers compared:   {tot['failovers']}  equal: {tot['equal']}" + ("" if tot['failovers'] == tot['equal'] else "  <-- NOT ALL EQUAL"))
PY
if [ "$RC" != 0 ]; then echo "some seeds broke invariants: their directories are kept under $WORK"; exit 1; fi
rm -rf "$WORK"
