# Sourced (after scripts/cargo-env.sh) by scripts/demo.sh and bench/*.sh: starts a
# process server and an agent on 127.0.0.1 and stops everything by PID on exit.
# The caller sets WORK (a scratch directory, removed on exit unless KEEP=1).

BIN="$LIFEBOAT_ROOT/target/release"
PIDS=()
lb_cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  [ "${KEEP:-0}" = 1 ] || rm -rf "$WORK"
}
trap lb_cleanup EXIT

# json EXPR: evaluates a Python expression over the JSON on stdin (as `d`).
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_sock() { for _ in $(seq 400); do [ -S "$1" ] && return 0; sleep 0.05; done; echo "no socket $1"; exit 1; }

# fio_one URI RW BS DEPTH NAME: one fio run of the nbd engine over 1 GiB for
# RUNTIME seconds, 50 %-compressible data; prints "iops bw_MiB".
fio_one() {
  fio --name="$5" --ioengine=nbd --uri="$1" --rw="$2" --bs="$3" --iodepth="$4" \
      --size=1G --runtime="$RUNTIME" --time_based --randrepeat=0 \
      --buffer_compress_percentage=50 --refill_buffers=1 \
      --output-format=json --output="$WORK/$5.json" >/dev/null
  python3 -c "import json; j=json.load(open('$WORK/$5.json'))['jobs'][0]['write']; print(f\"{j['iops']:.0f} {j['bw_bytes']/2**20:.0f}\")"
}

# start_ps DIR [CONFIG_TAIL] [SED_EXPR]: `lifeboat-ps init` into DIR (CONFIG_TAIL
# appended to its ps.toml, SED_EXPR applied to it) and serve it on a free port.
# Sets PS_PORT, PS_PID and PS_CERTS (machine-1's certificates).
start_ps() {
  PS_PORT=$(free_port)
  "$BIN/lifeboat-ps" init --dir "$1" --listen "127.0.0.1:$PS_PORT" >/dev/null
  [ -z "${2:-}" ] || printf '\n%s\n' "$2" >>"$1/ps.toml"
  [ -z "${3:-}" ] || sed -i "$3" "$1/ps.toml"
  "$BIN/lifeboat-ps" serve --config "$1/ps.toml" >"$1.log" 2>&1 &
  PS_PID=$!; PIDS+=("$PS_PID")
  PS_CERTS="$1/machines/machine-1"
}

# agent_toml FILE STATE_DIR DISK SOCKET [TOP_LEVEL_EXTRA] [DISK_EXTRA]: an agent
# config on the server started by start_ps, for $AGENT_MACHINE (default
# machine-1) with the certificates in $AGENT_CERTS (default machine-1's) and
# one disk, id $AGENT_DISK (default "disk").
agent_toml() {
  local certs="${AGENT_CERTS:-$PS_CERTS}"
  cat >"$1" <<TOML
machine = "${AGENT_MACHINE:-machine-1}"
server = "127.0.0.1:$PS_PORT"
ca-cert = "$certs/ca.pem"
client-cert = "$certs/client.pem"
client-key = "$certs/client.key"
state-dir = "$2"
${5:-}

[[disk]]
id = "${AGENT_DISK:-disk}"
path = "$3"
socket = "$4"
${6:-}
TOML
}

# add_disk FILE ID PATH SOCKET: one more [[disk]] in the agent config FILE.
add_disk() {
  printf '\n[[disk]]\nid = "%s"\npath = "%s"\nsocket = "%s"\n' "$2" "$3" "$4" >>"$1"
}

# wait_streaming CONFIG: waits (up to 60 s) until every disk of the agent has
# finished its initial sync.
wait_streaming() {
  local st
  for _ in $(seq 600); do
    st=$("$BIN/lifeboat-agent" status --config "$1")
    [ "$(echo "$st" | json 'all(s["state"] == "streaming" for s in d["sync"])')" = True ] && return 0
    sleep 0.1
  done
  echo "the agent of $1 did not finish its initial sync: $st"; exit 1
}

# start_agent CONFIG SOCKET STATE_DIR: runs the agent until its sockets exist.
# Sets AGENT_PID; the log goes to CONFIG.log.
start_agent() {
  rm -f "$2" "$3/control.sock"
  "$BIN/lifeboat-agent" run --config "$1" >>"$1.log" 2>&1 &
  AGENT_PID=$!; PIDS+=("$AGENT_PID")
  wait_sock "$2"; wait_sock "$3/control.sock"
}

# change_blocks FILE SIZE_MIB SEED: 1 % of FILE's 4 KiB blocks, chosen at
# random (seeded), get random data.
change_blocks() {
  python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys
path, mib, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
blocks = mib * 256
random.seed(seed)
chosen = random.sample(range(blocks), blocks // 100)
with open(path, "r+b") as f:
    for b in chosen:
        f.seek(b * 4096); f.write(os.urandom(4096))
print(f"changed {len(chosen)} blocks ({len(chosen) * 4096} bytes) of {path}")
PY
}
