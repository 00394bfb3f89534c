#!/usr/bin/env python3
"""The idle grid's cost: CPU of a whole `gridpresence up` (a synthetic fleet hosted on the
component, every service in the one process) while nobody does anything, what its devices send
while idle, and how long an operator's `status` takes beside it.

Each side starts `gridpresence up --devices N --hosting component` in a process of its own,
waits for "Ctrl-C stops everything.", lets it settle, then reads the process's utime+stime over
a few windows and prints the median CPU per device-second. In each window it also counts, in the
child (its `DeviceAgent.publish` and directed sends wrapped, a snapshot on SIGUSR1), what the
devices sent, by device kind: broadcasts for a change of health or state (every subscriber),
directed readings past the deadband (the telemetry audience), timed refreshes, session starts,
and publishes that sent nothing (a tick or a meter's re-sum that finds nothing to tell builds no
report and calls no publish: these are the others). The baseline is the same fleet
with every device on a ticking task of its own (``DeviceAgent.shared_ticker = False``), measured
back to back with the shared ticker; the ratio is shared / baseline. ``--status K`` then runs the
operator's `gridpresence status --summary` K times (median and p99 wall time, devices present)
and `status --json` once. The machine is shared: the load average is printed with each window.

    python bench/idle_grid.py [--devices 2000] [--windows 3] [--window-s 10] [--settle-s 15]
    python bench/idle_grid.py --only shared --devices 10000 --settle-s 60 --status 5
    python bench/idle_grid.py --only shared --devices 10000 --profile /tmp/idle   # where the CPU goes
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import pstats
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_seconds, percentile

READY = "Ctrl-C stops everything."
# `gridpresence up`, with the ticker chosen and the devices' sends counted before the command runs.
RUN_UP = """
import collections, json, os, signal, sys
from gridpresence.device.agent import DeviceAgent
DeviceAgent.shared_ticker = {shared}
counts = collections.Counter()
publish, directed = DeviceAgent.publish, DeviceAgent._send_directed

def counted_publish(self, force=True, answer=None):
    before, sent = self._broadcast, counts["sent"]
    report = publish(self, force, answer)
    kind = self.spec.kind.value
    if self._broadcast is not before:
        what = "session start" if before is None else "refresh" if force else "health"
    else:
        what = "reading" if counts["sent"] != sent else "nothing"
    counts[what + " " + kind] += 1
    return report

def counted_directed(self, pres):
    counts["sent"] += 1
    return directed(self, pres)

def snapshot(_sig, _frame):
    path = os.environ["IDLE_COUNTS"]
    with open(path + ".tmp", "w") as f:
        json.dump(dict(counts), f)
    os.replace(path + ".tmp", path)

import cProfile
profile = [None]

def toggle_profile(_sig, _frame):  # SIGUSR2: start a profile of the loop; the next one writes it
    if profile[0] is None:
        profile[0] = cProfile.Profile()
        profile[0].enable()
    else:
        profile[0].disable()
        profile[0].dump_stats(os.environ["IDLE_PROFILE"])
        profile[0] = None

DeviceAgent.publish, DeviceAgent._send_directed = counted_publish, counted_directed
signal.signal(signal.SIGUSR1, snapshot)
signal.signal(signal.SIGUSR2, toggle_profile)
from gridpresence.cli import main
sys.argv[0] = "gridpresence"
sys.exit(main())
"""
WHAT = ("health", "reading", "refresh", "session start", "nothing")


def snapshot(proc: subprocess.Popen[str], path: Path, timeout: float = 10.0) -> collections.Counter[str]:
    """The child's counts now (it writes them on SIGUSR1)."""
    path.unlink(missing_ok=True)
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit("`gridpresence up` wrote no counts")
        time.sleep(0.02)
    return collections.Counter(json.loads(path.read_text()))


def rates(before: collections.Counter[str], after: collections.Counter[str], seconds: float) -> str:
    """What the devices sent per second in a window, by what and kind."""
    diff = after - before
    parts = []
    for what in WHAT:
        kinds = {k[len(what) + 1:]: n for k, n in diff.items() if k.startswith(what + " ")}
        if kinds:
            total = sum(kinds.values()) / seconds
            detail = ", ".join(f"{n / seconds:.1f} {k}" for k, n in sorted(kinds.items(), key=lambda x: -x[1]))
            parts.append(f"{what} {total:.1f}/s ({detail})")
    return "; ".join(parts) or "nothing"


def status_runs(data: Path, runs: int, devices: int) -> None:
    """The operator's `status --summary` beside the idle grid, then `status --json` once."""
    cli = [sys.executable, "-m", "gridpresence", "status", "--connection", str(data / "connection.json")]
    took: list[float] = []
    for _ in range(runs):
        t0 = time.monotonic()
        out = subprocess.run([*cli, "--summary"], capture_output=True, text=True, timeout=300)
        took.append(time.monotonic() - t0)
        print(f"    status --summary {took[-1]:.2f} s: {out.stdout.strip() or out.stderr.strip()[-200:]}", flush=True)
    print(f"  status --summary: median {statistics.median(took):.2f} s, p99 {percentile(took, 99):.2f} s "
          f"over {runs} runs", flush=True)
    t0 = time.monotonic()
    out = subprocess.run([*cli, "--json"], capture_output=True, text=True, timeout=300)
    wall = time.monotonic() - t0
    try:
        doc = json.loads(out.stdout)
        health = collections.Counter(d["health"] for d in doc["devices"])
        print(f"  status --json {wall:.2f} s: {len(doc['devices'])} devices ({doc['summary']['present']} present), "
              f"health {dict(health.most_common())}", flush=True)
    except (ValueError, KeyError) as exc:
        print(f"  status --json {wall:.2f} s: unreadable ({exc}): {out.stderr.strip()[-200:]}", flush=True)


def measure(side: str, devices: int, windows: int, window_s: float, settle_s: float, status: int,
            profile: Path | None = None) -> float:
    """Median CPU milliseconds per device-second of one `up` over ``windows`` windows."""
    data = Path(tempfile.mkdtemp(prefix=f"idle-{side}-"))
    counts = data / "counts.json"
    code = RUN_UP.format(shared=side == "shared")
    proc = subprocess.Popen([sys.executable, "-c", code, "up", "--devices", str(devices), "--hosting", "component",
                             "--data", str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "IDLE_COUNTS": str(counts), "IDLE_PROFILE": str(profile or "")})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == READY:
                break
        else:
            raise SystemExit(f"{side}: `gridpresence up` ended before it was up")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe would stall it
        start = snapshot(proc, counts)
        time.sleep(settle_s)
        settled = snapshot(proc, counts)
        print(f"  {side:<9} first {settle_s:.0f} s: {rates(start, settled, settle_s)}", flush=True)
        per_device: list[float] = []
        for _ in range(windows):
            c0, t0, n0 = cpu_seconds(proc.pid), time.monotonic(), snapshot(proc, counts)
            time.sleep(window_s)
            c1, t1, n1 = cpu_seconds(proc.pid), time.monotonic(), snapshot(proc, counts)
            ms = (c1 - c0) * 1000 / ((t1 - t0) * devices)
            per_device.append(ms)
            print(f"  {side:<9} window: {ms:.4f} ms CPU per device-second "
                  f"({(c1 - c0) / (t1 - t0) * 100:.0f} % of a core; load average {os.getloadavg()[0]:.2f})\n"
                  f"            sent: {rates(n0, n1, t1 - t0)}", flush=True)
        if profile is not None:
            profile.unlink(missing_ok=True)
            proc.send_signal(signal.SIGUSR2)
            time.sleep(window_s)
            proc.send_signal(signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not profile.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)  # (written whole)
            print(f"  {side:<9} profile of {window_s:.0f} s idle: {profile}", flush=True)
            pstats.Stats(str(profile)).sort_stats("tottime").print_stats(25)
        if status:
            status_runs(data, status, devices)
        return statistics.median(per_device)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(120)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(data, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--devices", type=int, default=2000)
    ap.add_argument("--windows", type=int, default=3)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--settle-s", type=float, default=15.0)
    ap.add_argument("--only", choices=["shared", "per-task"], help="measure one side only")
    ap.add_argument("--status", type=int, default=0, metavar="K",
                    help="then run the operator's `status --summary` K times and `status --json` once")
    ap.add_argument("--profile", type=Path, metavar="FILE",
                    help="after the windows, cProfile the idle process's loop for one window into FILE and print its top")
    args = ap.parse_args()
    sides = [args.only] if args.only else ["per-task", "shared"]
    print(f"idle grid: {args.devices} hosted devices, {args.windows} x {args.window_s:.0f} s windows "
          f"on {os.cpu_count()} cores", flush=True)
    got = {side: measure(side, args.devices, args.windows, args.window_s, args.settle_s, args.status,
                         args.profile.with_suffix(f".{side}.pstats") if args.profile else None) for side in sides}
    for side, ms in got.items():
        print(f"  {side:<9} median {ms:.4f} ms CPU per device-second", flush=True)
    if len(got) == 2:
        print(f"  ratio shared / per-task: {got['shared'] / got['per-task']:.2f}", flush=True)


if __name__ == "__main__":
    main()
