#!/usr/bin/env bash
# Fuzzing (not in CI): each cargo-fuzz target under fuzz/ for a few minutes
# (--minutes N or --seconds S each; default 3 min), one after another, on the nightly toolchain with
# AddressSanitizer. Installs cargo-fuzz when it is missing.
#   bench/fuzz.sh [--minutes N | --seconds S] [TARGET...]   (default: every target)
# Targets: frame (stream-protocol frames), register (registration messages),
# nbd_server (a whole NBD client session against an in-memory export),
# segment, catalogue (signed JSON records, base manifests, group and owner
# records), journal and activity_log (the agent's readers).
# The committed seed corpus (fuzz/corpus/<target>, made by
# `cargo +nightly run --manifest-path fuzz/Cargo.toml --example make_seeds`)
# is read only; what the fuzzer adds goes to a working corpus outside the
# clone (${LIFEBOAT_CACHE:-~/.cache/lifeboat}/fuzz-corpus/<target>). A crash
# leaves its input in fuzz/artifacts/<target>/ and the run goes on with the
# next target; the summary names every finding. Exit status 1 when any
# target found one: turn each into a regression test.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=180
TARGETS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --minutes) SECONDS_EACH=$(($2 * 60)); shift 2 ;;
    --seconds) SECONDS_EACH="$2"; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) TARGETS+=("$1"); shift ;;
  esac
done
export PATH="$HOME/.cargo/bin:$PATH"
rustup toolchain list | grep -q '^nightly' || { echo "the nightly toolchain is required (rustup toolchain install nightly)"; exit 1; }
command -v cargo-fuzz >/dev/null || { echo "installing cargo-fuzz..."; cargo install cargo-fuzz --locked >/dev/null; }
[ ${#TARGETS[@]} -gt 0 ] || mapfile -t TARGETS < <(cargo +nightly fuzz list)
WORK="${LIFEBOAT_CACHE:-$HOME/.cache/lifeboat}/fuzz-corpus"
echo "building the fuzz targets (nightly, AddressSanitizer)..."
cargo +nightly fuzz build >/dev/null 2>&1 || cargo +nightly fuzz build
# libFuzzer takes 0 as "no limit".
[ "$SECONDS_EACH" -ge 1 ] || { echo "the time per target must be at least 1 s"; exit 1; }

found=0
summary=()
for t in "${TARGETS[@]}"; do
  mkdir -p "$WORK/$t" "fuzz/artifacts/$t"
  log="$WORK/$t.log"
  echo "fuzzing $t for $SECONDS_EACH s (log $log)..."
  before=$(ls "fuzz/artifacts/$t" | wc -l)
  set +e
  cargo +nightly fuzz run "$t" "$WORK/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$SECONDS_EACH" -timeout=30 -rss_limit_mb=2048 \
    -print_final_stats=1 >"$log" 2>&1
  rc=$?
  set -e
  execs=$(awk '/stat::number_of_executed_units/ { print $2 }' "$log" | tail -1)
  per_s=$(awk '/stat::average_exec_per_sec/ { print $2 }' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | awk '{ print $2 }')
  after=$(ls "fuzz/artifacts/$t" | wc -l)
  new=$((after - before))
  if [ "$rc" -ne 0 ] || [ "$new" -gt 0 ]; then
    found=1
    summary+=("$(printf '%-13s %12s execs %8s/s  cov %6s  FINDING (exit %s): %s' "$t" "${execs:-?}" "${per_s:-?}" "${cov:-?}" "$rc" "$(ls -t "fuzz/artifacts/$t" | head -1)")")
    grep -m1 -E 'panicked|ERROR: AddressSanitizer|ERROR: libFuzzer' "$log" | sed 's/^/    /' || true
  else
    summary+=("$(printf '%-13s %12s execs %8s/s  cov %6s  no finding' "$t" "${execs:-?}" "${per_s:-?}" "${cov:-?}")")
  fi
done
echo
echo "fuzz run of $(date -u +%FT%TZ), $SECONDS_EACH s per target, commit $(git rev-parse --short HEAD)"
printf '%s\n' "${summary[@]}"
exit "$found"
