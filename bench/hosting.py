#!/usr/bin/env python3
"""Hosted device identities (one XEP-0114 component connection, xmpp/component.py) against c2s
device bots (a session each), same run, same server: login time and memory per identity.

For each size N the grid provisions N hosted loads (NAME@devices.localhost) and N c2s loads;
each round logs one side in, in a process of its own (as `gridpresence bots` does), then the
other, alternating which goes first. Per side it reports the time from the first login to each
identity's session (median, p99, all of them) and the resident memory each identity adds to its
process and to Prosody; the ratio is hosted / c2s, per round, median over rounds.

    python bench/hosting.py [--sizes 100 1000] [--rounds 3] [--c2s-max 1000]
    python bench/hosting.py --profile 2000 [--keep DIR]   # where the bot process's CPU goes

``--profile N`` builds and starts N hosted identities in this process under cProfile (a grid
of N hosted devices, no c2s side; ``--keep DIR`` provisions it once and reuses it) and prints
the CPU per identity, building and starting apart, and the top functions (with ``--keep``, the
whole profile is left in DIR/startup.pstats).

Above ``--c2s-max`` the c2s side stays at that size: compare the per-identity rows (logins per
second, memory per identity), not the totals.

For the hosted side it also reports what the issue's goals name: the time from the start of the
bot process's work (building the bots) to every identity online, the bot process's CPU per
identity, and the whole grid's resident memory at N: Prosody, the bot process, and an operator
(GridOperator in a process of its own) logged in and seeing all N hosted devices with their state.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import pstats
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from common import percentile

from gridpresence.config import parse_fleet
from gridpresence.host.fleet import FleetBots
from gridpresence.host.grid import FLEET_COPY, SECRETS_FILE, Grid
from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceView
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import ConnectionInfo


REFRESH_S = 600.0
OPERATOR_WAIT_S = 300.0  # for the operator to see all N; past it, what it saw is reported


def rss_kib(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fleet_of(n: int, c2s: int) -> dict[str, object]:
    loads = [{"name": f"{side}-{i:05d}", "kind": "load", "rated_kw": 10, "refresh_s": REFRESH_S, "hosting": hosting}
             for side, hosting, count in (("h", "component", n), ("c", "c2s", c2s)) for i in range(count)]
    return {"domain": "localhost", "operators": [{"name": "bench-op"}], "devices": loads}


async def child(data: Path, side: str) -> None:
    """One side's bots in this process: print the login times and memory, stay until stdin closes."""
    fleet = parse_fleet(json.loads((data / FLEET_COPY).read_text()))
    info = ConnectionInfo.load(data / "connection.json")
    names = [d.name for d in fleet.devices if d.name.startswith(f"{side}-")]
    gc.collect()
    before = rss_kib()
    cpu0, start = time.process_time(), time.perf_counter()
    # Physics ticks at the refresh only (as bench/common.py's device process): a 1 s tick of
    # thousands of simulated devices would be measured instead of their logins.
    bots = FleetBots(fleet, info.server, Secrets(data / SECRETS_FILE), only=names, with_services=False, data_dir=data,
                     tick_s=REFRESH_S)
    done: list[float] = []
    t0 = time.perf_counter()
    for agent in bots.devices.values():
        login = agent.login

        async def timed(timeout: float = 20.0, _login=login) -> None:  # type: ignore[no-untyped-def]
            await _login(timeout)
            done.append(time.perf_counter() - t0)

        agent.login = timed  # type: ignore[method-assign]
    await bots.start()
    total = time.perf_counter() - t0
    from_start, cpu = time.perf_counter() - start, time.process_time() - cpu0
    gc.collect()
    print(json.dumps({"n": len(done), "median_s": statistics.median(done), "p99_s": percentile(done, 99),
                      "total_s": total, "from_start_s": from_start, "cpu_s": cpu, "rss_kib": rss_kib() - before,
                      "rss_abs_kib": rss_kib()}), flush=True)  # one short line
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await bots.stop()


async def profile(n: int, keep: Path | None) -> None:
    """N hosted identities built and started in this process under cProfile, on a real server."""
    data = keep or Path(tempfile.mkdtemp(prefix="gridbench-hosting-"))
    fresh = not (data / FLEET_COPY).exists()
    grid = Grid(parse_fleet(fleet_of(n, 0)), data, bots=False, dashboard=False)
    t = time.perf_counter()
    await grid.start()
    print(f"N = {n}: grid {'provisioned and ' if fresh else ''}up in {time.perf_counter() - t:.1f} s", flush=True)
    try:
        fleet = parse_fleet(json.loads((data / FLEET_COPY).read_text()))
        info = ConnectionInfo.load(data / "connection.json")
        names = [d.name for d in fleet.devices if d.name.startswith("h-")]
        gc.collect()
        prof = cProfile.Profile()
        cpu0 = time.process_time()
        prof.enable()
        bots = FleetBots(fleet, info.server, Secrets(data / SECRETS_FILE), only=names, with_services=False,
                         data_dir=data, tick_s=REFRESH_S)
        cpu1 = time.process_time()
        await bots.start()
        prof.disable()
        cpu2 = time.process_time()
        print(f"  CPU per identity: {1000 * (cpu2 - cpu0) / n:.2f} ms (building {1000 * (cpu1 - cpu0) / n:.2f}, "
              f"starting {1000 * (cpu2 - cpu1) / n:.2f}; under cProfile, which adds its own)", flush=True)
        if keep is not None:
            prof.dump_stats(str(keep / "startup.pstats"))  # for pstats' own browser
        for order in ("tottime", "cumulative"):
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats(order).print_stats(30)
            print(out.getvalue(), flush=True)
        await bots.stop()
    finally:
        await grid.stop()
        if keep is None:
            shutil.rmtree(data, ignore_errors=True)


async def operator_child(data: Path, n: int) -> None:
    """An operator logged in until it sees all `n` hosted devices with their state: print the
    time that took from its session start and its resident memory, stay until stdin closes."""
    op = GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"), resource="bench")
    t0 = time.perf_counter()
    await op.connect(timeout=300, settle_s=0, tariff_s=0)
    def seen(d: Mapping[str, DeviceView]) -> int:
        return sum(1 for name, v in d.items() if name.startswith("h-") and v.present and v.state is not None)

    try:
        try:
            await op.wait_for(lambda d: seen(d) >= n, OPERATOR_WAIT_S)
            took: float | None = time.perf_counter() - t0
        except TimeoutError:  # said, and the memory still measured
            took = None
        gc.collect()
        print(json.dumps({"seen_s": took, "seen": seen(op.devices), "rss_abs_kib": rss_kib()}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await op.close()


async def _spawn(*args: str) -> tuple[asyncio.subprocess.Process, dict[str, float]]:
    """A child process of this script, and the one line it prints when it is ready."""
    proc = await asyncio.create_subprocess_exec(sys.executable, __file__, *args, stdin=asyncio.subprocess.PIPE,
                                                stdout=asyncio.subprocess.PIPE)
    line = await asyncio.wait_for(proc.stdout.readline(), 1800)  # type: ignore[union-attr]
    if not line:
        raise SystemExit(f"the {' '.join(args)} process ended early")
    return proc, json.loads(line)


async def _end(proc: asyncio.subprocess.Process) -> None:
    proc.stdin.close()  # type: ignore[union-attr]
    await asyncio.wait_for(proc.wait(), 300)


async def one_side(data: Path, side: str, prosody_pid: int) -> dict[str, float]:
    prosody_before = rss_kib(prosody_pid)
    proc, got = await _spawn("--child", side, str(data))
    await asyncio.sleep(1.0)  # the server settles the sessions' presence
    prosody_added = rss_kib(prosody_pid) - prosody_before
    n = got["n"]
    out = {"total_s": got["total_s"], "per_s": n / got["total_s"], "median_s": got["median_s"], "p99_s": got["p99_s"],
           "rss_kib_per_identity": got["rss_kib"] / n, "prosody_kib_per_identity": prosody_added / n,
           "from_start_s": got["from_start_s"], "cpu_ms_per_identity": 1000 * got["cpu_s"] / n}
    try:
        if side == "h":  # the whole grid at N: Prosody, this bot process, an operator seeing all N
            op, seen = await _spawn("--operator", str(n), str(data))
            if seen["seen_s"] is None:
                print(f"  the operator saw {seen['seen']} of {n} within {OPERATOR_WAIT_S:.0f} s", flush=True)
            out.update(operator_seen_s=seen["seen_s"] if seen["seen_s"] is not None else float("nan"),
                       operator_rss_mib=seen["rss_abs_kib"] / 1024,
                       bots_rss_mib=got["rss_abs_kib"] / 1024, prosody_rss_mib=rss_kib(prosody_pid) / 1024)
            out["grid_rss_mib"] = out["operator_rss_mib"] + out["bots_rss_mib"] + out["prosody_rss_mib"]
            await _end(op)
    finally:
        await _end(proc)
    return out


async def main(sizes: list[int], rounds: int, c2s_max: int) -> None:
    for n in sizes:
        data = Path(tempfile.mkdtemp(prefix="gridbench-hosting-"))
        c2s = min(n, c2s_max)
        grid = Grid(parse_fleet(fleet_of(n, c2s)), data, bots=False, dashboard=False)
        t = time.perf_counter()
        await grid.start()
        print(f"N = {n}: grid provisioned and up in {time.perf_counter() - t:.1f} s", flush=True)
        prosody = int(grid.server.pidfile_path.read_text().strip())
        results: dict[str, list[dict[str, float]]] = {"hosted": [], "c2s": []}
        try:
            for r in range(rounds):
                order = [("h", "hosted"), ("c", "c2s")] if r % 2 == 0 else [("c", "c2s"), ("h", "hosted")]
                for side, label in order:
                    results[label].append(await one_side(data, side, prosody))
                    print(f"  round {r + 1}, {label}: " + json.dumps({k: round(v, 2) for k, v in results[label][-1].items()}),
                          flush=True)  # as it comes: a long run that fails later still told this
        finally:
            await grid.stop()
            shutil.rmtree(data, ignore_errors=True)
        print(f"  {'metric':<36}{f'hosted {n}':>12}{f'c2s {c2s}':>12}{'ratio':>8}  (median of {rounds} rounds)")
        for key, unit, scale in (("total_s", "s", 1), ("per_s", "1/s", 1), ("median_s", "ms", 1000), ("p99_s", "ms", 1000),
                                 ("rss_kib_per_identity", "KiB", 1), ("prosody_kib_per_identity", "KiB", 1)):
            hosted = statistics.median(x[key] for x in results["hosted"]) * scale
            c2s = statistics.median(x[key] for x in results["c2s"]) * scale
            ratios = [h[key] / c[key] for h, c in zip(results["hosted"], results["c2s"]) if c[key]]
            ratio = f"{statistics.median(ratios):8.2f}" if ratios else "       -"
            label = {"total_s": "all logged in", "per_s": "identities logged in per second", "median_s": "login, median", "p99_s": "login, p99",
                     "rss_kib_per_identity": "bot process RSS / identity",
                     "prosody_kib_per_identity": "Prosody RSS / identity"}[key]
            print(f"  {label + f' ({unit})':<36}{hosted:12.1f}{c2s:12.1f}{ratio}", flush=True)
        print(f"  hosted {n}, median of {rounds} rounds (goals: online <= 30 s from start, grid <= 1.5 GB resident):")
        for key, label in (("from_start_s", "online from start (s)"), ("cpu_ms_per_identity", "bot CPU / identity (ms)"),
                           ("operator_seen_s", "operator sees all (s)"), ("prosody_rss_mib", "Prosody RSS (MiB)"),
                           ("bots_rss_mib", "bot process RSS (MiB)"), ("operator_rss_mib", "operator RSS (MiB)"),
                           ("grid_rss_mib", "whole grid RSS (MiB)")):
            print(f"    {label:<34}{statistics.median(x[key] for x in results['hosted']):12.1f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--child":
        asyncio.run(child(Path(sys.argv[3]), sys.argv[2]))
        sys.exit(0)
    if len(sys.argv) == 4 and sys.argv[1] == "--operator":
        asyncio.run(operator_child(Path(sys.argv[3]), int(sys.argv[2])))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", type=int, metavar="N", help="profile building and starting N hosted identities")
    parser.add_argument("--keep", type=Path, help="with --profile: the grid's data directory, provisioned once")
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--c2s-max", type=int, default=1000,
                        help="the c2s baseline's size above it (thousands of c2s logins take many minutes here): "
                             "compare the per-identity rows then")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.profile:
        asyncio.run(profile(args.profile, args.keep))
        sys.exit(0)
    asyncio.run(main(args.sizes, args.rounds, args.c2s_max))
