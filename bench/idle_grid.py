#!/usr/bin/env python3
"""The idle grid's cost: CPU of a whole `gridpresence up` (a synthetic fleet hosted on the
component, every service in the one process) while nobody does anything.

Each side starts `gridpresence up --devices N --hosting component` in a process of its own,
waits for "Ctrl-C stops everything.", lets it settle, then reads the process's utime+stime over
a few windows and prints the median CPU per device-second. The baseline is the same fleet with
every device on a ticking task of its own (``DeviceAgent.shared_ticker = False``), measured
back to back with the shared ticker; the ratio is shared / baseline. The machine is shared: the
load average is printed with each window.

    python bench/idle_grid.py [--devices 2000] [--windows 3] [--window-s 10] [--settle-s 15]
    python bench/idle_grid.py --only shared      # just the figure (no baseline)
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import cpu_seconds

READY = "Ctrl-C stops everything."
# `gridpresence up`, with the ticker chosen before the command runs.
RUN_UP = ("import sys; from gridpresence.device.agent import DeviceAgent; DeviceAgent.shared_ticker = {shared}; "
          "from gridpresence.cli import main; sys.argv[0] = 'gridpresence'; sys.exit(main())")


def measure(side: str, devices: int, windows: int, window_s: float, settle_s: float) -> float:
    """Median CPU milliseconds per device-second of one `up` over ``windows`` windows."""
    data = Path(tempfile.mkdtemp(prefix=f"idle-{side}-"))
    code = RUN_UP.format(shared=side == "shared")
    proc = subprocess.Popen([sys.executable, "-c", code, "up", "--devices", str(devices), "--hosting", "component",
                             "--data", str(data)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == READY:
                break
        else:
            raise SystemExit(f"{side}: `gridpresence up` ended before it was up")
        threading.Thread(target=proc.stdout.read, daemon=True).start()  # a full pipe would stall it
        time.sleep(settle_s)
        per_device: list[float] = []
        for _ in range(windows):
            c0, t0 = cpu_seconds(proc.pid), time.monotonic()
            time.sleep(window_s)
            c1, t1 = cpu_seconds(proc.pid), time.monotonic()
            ms = (c1 - c0) * 1000 / ((t1 - t0) * devices)
            per_device.append(ms)
            print(f"  {side:<9} window: {ms:.4f} ms CPU per device-second "
                  f"({(c1 - c0) / (t1 - t0) * 100:.0f} % of a core; load average {os.getloadavg()[0]:.2f})", flush=True)
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
    args = ap.parse_args()
    sides = [args.only] if args.only else ["per-task", "shared"]
    print(f"idle grid: {args.devices} hosted devices, {args.windows} x {args.window_s:.0f} s windows "
          f"on {os.cpu_count()} cores", flush=True)
    got = {side: measure(side, args.devices, args.windows, args.window_s, args.settle_s) for side in sides}
    for side, ms in got.items():
        print(f"  {side:<9} median {ms:.4f} ms CPU per device-second", flush=True)
    if len(got) == 2:
        print(f"  ratio shared / per-task: {got['shared'] / got['per-task']:.2f}", flush=True)


if __name__ == "__main__":
    main()
