#!/usr/bin/env python3
"""RPO sampler for bench/rpo.sh and bench/load.sh, measured from outside the daemons.

Every --every seconds it asks each agent's control socket for the highest
sequence number it has captured, and the process server's control socket for
each machine's `uploaded` seq (everything up to it is in the object store).
A sample (t, captured) is settled at the first poll t' where uploaded >=
captured: its RPO is t' - t. Writes are acknowledged to the client after they
are captured, so this over-states the RPO by at most one poll interval plus
the time between capture and acknowledgement; it never under-states it.

It also counts the objects created in a file:// store (a set of paths seen,
walked once a second: objects created and removed within a second are missed)
and samples the process server's RSS, CPU time and backpressure state.

Prints one JSON document on stdout: per machine p50/p99/max RPO and sample
count; objects created per second and per hour; process-server RSS (max,
MiB) and CPU (cores busy on average); whether and when backpressure was on.
"""

import argparse
import json
import os
import socket
import sys
import time


def ask(path, timeout=5.0):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    s.sendall(b'{"cmd":"status"}\n')
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(1 << 20)
        if not chunk:
            break
        buf += chunk
    s.close()
    return json.loads(buf)


def pct(xs, p):
    if not xs:
        return None
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(p / 100.0 * (len(xs) - 1)))))
    return xs[i]


def proc_cpu_rss(pid):
    """(utime+stime seconds, RSS MiB) of a process."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return cpu, rss


def walk(root):
    out = set()
    for d, _, files in os.walk(root):
        for n in files:
            out.add(os.path.join(d, n))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ps-sock", required=True)
    ap.add_argument("--ps-pid", type=int, required=True)
    ap.add_argument("--agent", action="append", default=[], help="MACHINE=CONTROL_SOCKET")
    ap.add_argument("--store", help="file:// store directory whose new objects are counted")
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--every", type=float, default=0.05)
    args = ap.parse_args()
    agents = dict(a.split("=", 1) for a in args.agent)

    pending = {m: [] for m in agents}  # machine -> [(t, captured)]
    rpos = {m: [] for m in agents}
    errors = []
    seen = walk(args.store) if args.store else set()
    created = 0
    next_walk = time.monotonic() + 1.0
    cpu0, rss_max = proc_cpu_rss(args.ps_pid)
    t_start = time.monotonic()
    cpu_end = None
    backpressure_at = None
    end = t_start + args.seconds
    drain_until = end + 30.0  # let the last samples settle
    while True:
        now = time.monotonic()
        sampling = now < end
        if not sampling and (all(not p for p in pending.values()) or now > drain_until):
            break
        if sampling:
            for m, sock in agents.items():
                try:
                    t_ask = time.monotonic()  # before: every write captured by then counts
                    st = ask(sock)
                    pending[m].append((t_ask, st["positions"]["captured"]))
                except (OSError, ValueError, KeyError) as e:
                    errors.append(f"agent {m}: {e}")
        try:
            ps = ask(args.ps_sock)
        except (OSError, ValueError) as e:
            errors.append(f"process server: {e}")
            time.sleep(args.every)
            continue
        t = time.monotonic()
        if ps.get("health", {}).get("backpressure") and backpressure_at is None:
            backpressure_at = t - t_start
        for mst in ps.get("machines", []):
            m = mst["machine"]
            if m not in pending:
                continue
            keep = []
            for (t0, seq) in pending[m]:
                if mst["uploaded"] >= seq:
                    rpos[m].append(t - t0)
                else:
                    keep.append((t0, seq))
            pending[m] = keep
        _, rss = proc_cpu_rss(args.ps_pid)
        rss_max = max(rss_max, rss)
        if not sampling and cpu_end is None:
            cpu_end = (proc_cpu_rss(args.ps_pid)[0], time.monotonic())
            if args.store:
                created += len(walk(args.store) - seen)
        if args.store and t >= next_walk and sampling:
            now_seen = walk(args.store)
            created += len(now_seen - seen)
            seen |= now_seen
            next_walk = t + 1.0
        time.sleep(max(0.0, args.every - (time.monotonic() - now)))
    if cpu_end is None:
        cpu_end = (proc_cpu_rss(args.ps_pid)[0], time.monotonic())
    out = {
        "seconds": args.seconds,
        "machines": {
            m: {
                "samples": len(r),
                "unsettled": len(pending[m]),
                "p50": pct(r, 50),
                "p99": pct(r, 99),
                "max": max(r) if r else None,
            }
            for m, r in rpos.items()
        },
        "objects": created,
        "objects_per_s": created / args.seconds,
        "objects_per_hour": created / args.seconds * 3600,
        "ps_rss_mib": rss_max,
        "ps_cpu_cores": (cpu_end[0] - cpu0) / (cpu_end[1] - t_start),
        "backpressure_at_s": backpressure_at,
        "errors": errors[:5],
    }
    json.dump(out, sys.stdout)
    print()


if __name__ == "__main__":
    main()
