#!/usr/bin/env python3
"""The whole grid's resident memory as `gridpresence up --devices N --hosting component` runs
it: the synthetic fleet (masters, breakers, branch meters, loads, generators, with their rules
and alarms) hosted on the component link, and every service (watchdog, relay, console, billing,
historian, dashboard) in the same `up` process. The issue's goal: 10,000 devices, whole grid
<= 1.5 GB resident.

    ../.venv/bin/python grid_memory.py [--devices 2000] [--settle 20] [--baseline] [--every S]

It starts `up` as a process of its own on a fresh data directory, waits for its "Ctrl-C stops
everything." line and `--settle` seconds more (the first presence refreshes, the services'
views filled), reads VmRSS of the `up` process and of Prosody, prints them whole and per
device, and stops `up` with Ctrl-C (SIGINT) as a user does. ``--baseline`` runs a second `up`
of N plain loads (the same services, a fleet file of loads only): what the synthetic fleet's
kinds, rules and alarms add. bench/hosting.py measures plain hosted loads without services.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gridpresence.config import fleet_toml, synthetic_fleet_data

READY = "Ctrl-C stops everything."
GOAL_MIB = 1500 * 1000 * 1000 / 2**20  # 1.5 GB
UP_WAIT_S = 1800.0  # 10,000 devices take minutes on this machine


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def plain_loads(n: int, data: Path) -> Path:
    """A fleet file of `n` plain hosted loads (the synthetic fleet's operators and billing)."""
    shape = synthetic_fleet_data(n, hosting="component")
    shape["devices"] = [{"name": f"load-{i:05d}", "kind": "load", "rated_kw": 10.0, "refresh_s": 60.0}
                        for i in range(n)]
    path = data.with_name(data.name + "-fleet.toml")
    path.write_text(fleet_toml(shape))
    return path


def measure(n: int, settle_s: float, fleet: Path | None = None, every_s: float = 0.0) -> dict[str, float]:
    """One `up` brought up, measured and stopped; its data directory removed after."""
    data = Path(tempfile.mkdtemp(prefix="gridbench-memory-"))
    # A fleet file says its own hosting (`up` refuses a shape option without --devices).
    source = ["--fleet", str(fleet)] if fleet is not None else ["--devices", str(n), "--hosting", "component"]
    argv = [sys.executable, "-m", "gridpresence", "up", *source, "--data", str(data)]
    log = (data.parent / (data.name + ".log")).open("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        assert proc.stdout is not None
        while True:
            line = proc.stdout.readline()
            if not line:
                log.seek(0)
                raise SystemExit(f"`up` ended before it was up:\n{log.read()[-2000:]}")
            if READY in line:
                break
            if time.perf_counter() - t0 > UP_WAIT_S:
                raise SystemExit(f"`up` not up within {UP_WAIT_S:.0f} s")
        up_s = time.perf_counter() - t0
        prosody = int((data / "prosody.pid").read_text().strip())
        end = time.perf_counter() + settle_s
        while every_s and time.perf_counter() + every_s < end:  # the growth over the settle, if asked
            time.sleep(every_s)
            up_mib, prosody_mib = rss_kib(proc.pid) / 1024, rss_kib(prosody) / 1024
            print(f"    {time.perf_counter() - t0 - up_s:6.0f} s after up: up {up_mib:7.1f} MiB, Prosody "
                  f"{prosody_mib:6.1f} MiB, whole grid {up_mib + prosody_mib:7.1f} MiB", flush=True)
        time.sleep(max(0.0, end - time.perf_counter()))
        return {"up_s": up_s, "up_mib": rss_kib(proc.pid) / 1024, "prosody_mib": rss_kib(prosody) / 1024}
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # an orderly stop: Prosody goes down with it
            try:
                proc.communicate(timeout=300)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()
        shutil.rmtree(data, ignore_errors=True)
        Path(log.name).unlink(missing_ok=True)


def report(label: str, n: int, got: dict[str, float]) -> None:
    grid = got["up_mib"] + got["prosody_mib"]
    print(f"  {label} (up in {got['up_s']:.0f} s)", flush=True)
    for name, mib in (("up process", got["up_mib"]), ("Prosody", got["prosody_mib"]), ("whole grid", grid)):
        print(f"    {name + ' RSS':<20}{mib:9.1f} MiB   {mib * 1024 / n:7.1f} KiB / device", flush=True)
    print(f"    whole grid / goal   {grid / GOAL_MIB:9.2f}     (goal {GOAL_MIB:.0f} MiB = 1.5 GB at 10,000 devices)",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--settle", type=float, default=20.0, help="seconds after `up` is up before measuring")
    parser.add_argument("--baseline", action="store_true", help="also N plain loads, same services")
    parser.add_argument("--every", type=float, default=0.0, metavar="S",
                        help="also print the resident memory every S seconds of the settle (its growth)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    n = args.devices
    print(f"N = {n}: `gridpresence up --devices {n} --hosting component`", flush=True)
    report("synthetic fleet", n, measure(n, args.settle, every_s=args.every))
    if args.baseline:
        scratch = Path(tempfile.mkdtemp(prefix="gridbench-memory-fleet-"))
        try:
            report("baseline: plain loads", n, measure(n, args.settle, plain_loads(n, scratch / "loads")))
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
