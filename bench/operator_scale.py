#!/usr/bin/env python3
"""The operator side at fleet size, on the synthetic fleet `gridpresence up --devices N` runs.

1. Login: from an operator's session start to its library seeing all N devices with their
   state (roster, probes, the presence burst), against a raw slixmpp login of the same account
   (another resource) that counts the N devices' presence stanzas, same run, same server.
2. Presence fan-out: what a reading that moves past the deadband costs. The device bots run in
   this process with an operator, the watchdog and the console online; each round moves every
   load's reading once (no state change), in steps of 1 % of the loads, once told the old way
   (every reading a broadcast to every subscriber, by the loads and by the meters and masters
   whose sums move with them) and once the new way (directed to the telemetry audience online),
   alternating which goes first. Reported: presence stanzas the operator, watchdog and console
   receive per change, CPU per change of Prosody and of this process, and the ratios new/old.
3. Status at size: the filter and summary over the operator's N views (ms per pass).

    python bench/operator_scale.py [--devices 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import client_for, cpu_seconds, operator_login_all_seen, percentile, raw_login_all_seen, summary
from slixmpp import Presence

from gridpresence.config import parse_fleet, synthetic_fleet_data
from gridpresence.host.fleet import FleetBots
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.operator.selection import DeviceFilter, FleetSummary
from gridpresence.protocol import DeviceKind
from gridpresence.protocol.codec import q


async def our_login(grid: Grid, n: int, i: int) -> float:
    t0, t1 = await operator_login_all_seen(GridOperator.from_connection(grid.connection, resource=f"login-{i}"), n, 120)
    return t1 - t0


async def raw_login(grid: Grid, devices: set[str], i: int) -> float:
    t0, t1 = await raw_login_all_seen(grid, client_for(grid, "alice", f"raw-{i}"), devices, 120)
    return t1 - t0


async def readings_round(grid: Grid, bots: FleetBots, directed: bool,
                         counts: dict[str, int]) -> tuple[int, float, float]:
    """Every load's reading moves past the deadband once (no state change), told the old way
    (every reading broadcast, by every device: the loads, and the meters and masters whose sums
    move with them) or the new (directed to the telemetry audience); (changes, Prosody CPU s,
    this process's CPU s: the devices, watchdog, console and operator). Paced in steps of 1 % of
    the loads, so the server's queue, not the burst, is measured."""
    agents = [a for a in bots.devices.values() if a.spec.kind is DeviceKind.LOAD]
    for agent in bots.devices.values():
        agent.directed_readings = directed
    step = max(1, len(agents) // 100)
    prosody = int(grid.server.pidfile_path.read_text().strip())
    cpu0, own0, changes = cpu_seconds(prosody), cpu_seconds(os.getpid()), 0
    want = counts["operator"] + len(agents)
    for i, agent in enumerate(agents):
        sim = agent.sim
        sim.utilisation = 0.3 if sim.utilisation > 0.6 else 0.9  # type: ignore[attr-defined]
        if agent.publish(force=False) is not None:
            changes += 1
        if i % step == 0:
            await asyncio.sleep(0.005)
    async with asyncio.timeout(60):
        while counts["operator"] < want:
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # the parents' own readings, and the server's last work
    for agent in bots.devices.values():
        agent.directed_readings = True
    return changes, cpu_seconds(prosody) - cpu0, cpu_seconds(os.getpid()) - own0


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    data = synthetic_fleet_data(args.devices, refresh_s=3600)  # refreshes out of the counts
    fleet = parse_fleet(data)
    names = [d.name for d in fleet.devices]
    grid = Grid(fleet, Path(tempfile.mkdtemp(prefix="gridbench-ops-")), only=["watchdog", "console"], tick_s=3600)
    await grid.start()
    # The device bots in this process too (their physics is poked below), with a start-up
    # time-out for a busy machine.
    bots = FleetBots(fleet, grid.endpoint, grid.secrets, only=names, tick_s=3600, with_services=False,
                     data_dir=grid.data_dir)
    t0 = time.perf_counter()
    await bots.start()
    print(f"{args.devices} device bots (synthetic fleet) logged in in {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict[str, object] = {}
    jids = {fleet.jid(n) for n in names}
    try:
        ours, raw = [], []
        for i in range(args.rounds):
            raw.append(await raw_login(grid, jids, i))
            ours.append(await our_login(grid, args.devices, i))
        print(f"operator login until all {args.devices} are seen with their state ({args.rounds} rounds):")
        results["login_raw"] = summary("raw slixmpp login, all presence in", raw)
        results["login_ours"] = summary("GridOperator.connect, all seen with state", ours)
        ratios = [o / r for o, r in zip(ours, raw)]
        print(f"  ratio to raw: median {statistics.median(ratios):.2f}x, worst {max(ratios):.2f}x", flush=True)

        # Presence fan-out: count what each subscriber in this process receives.
        op = GridOperator.from_connection(grid.connection, resource="fanout")
        await op.connect(timeout=120, settle_s=60, tariff_s=0)
        counts = {"operator": 0, "watchdog": 0, "console": 0}
        clients = {"operator": op.client, "watchdog": grid.bots.watchdog.client,  # type: ignore[union-attr]
                   "console": grid.bots.console.grid.client}  # type: ignore[union-attr]
        for who, client in clients.items():
            def on(pres: Presence, who: str = who) -> None:
                if pres["from"].bare in jids and pres.xml.find(q("device")) is not None:
                    counts[who] += 1
            client.add_event_handler("presence", on)
        per: dict[str, list[float]] = {"broadcast": [], "directed": []}
        cpu: dict[str, list[float]] = {"broadcast": [], "directed": []}
        own: dict[str, list[float]] = {"broadcast": [], "directed": []}
        got: dict[str, dict[str, int]] = {"broadcast": dict.fromkeys(counts, 0), "directed": dict.fromkeys(counts, 0)}
        for i in range(args.rounds):
            for way in (("broadcast", "directed") if i % 2 == 0 else ("directed", "broadcast")):
                before = dict(counts)
                n, spent, mine = await readings_round(grid, bots, way == "directed", counts)
                own[way].append(mine / n)
                delivered = sum(counts.values()) - sum(before.values())
                for who in counts:
                    got[way][who] += counts[who] - before[who]
                per[way].append(delivered / n)
                cpu[way].append(spent / n)
        await op.close()
        print(f"presence fan-out, every load of {args.devices} devices moving its reading once ({args.rounds} rounds):")
        for way in per:
            print(f"  {way:<9}: {statistics.median(per[way]):.2f} stanzas to the subscribers here per change "
                  f"({', '.join(f'{w} {c}' for w, c in got[way].items())}); Prosody "
                  f"{statistics.median(cpu[way]) * 1e6:.0f} us CPU per change (p99 {percentile(cpu[way], 99) * 1e6:.0f}), "
                  f"bots' process {statistics.median(own[way]) * 1e6:.0f} us")
        ratio = statistics.median(cpu["directed"]) / statistics.median(cpu["broadcast"])
        total = ((statistics.median(cpu["directed"]) + statistics.median(own["directed"]))
                 / (statistics.median(cpu["broadcast"]) + statistics.median(own["broadcast"])))
        print(f"  CPU per change, directed / broadcast: Prosody {ratio:.2f}x, Prosody + bots {total:.2f}x", flush=True)
        results["fanout"] = {"stanzas_per_change": {w: statistics.median(v) for w, v in per.items()},
                             "prosody_us_per_change": {w: statistics.median(v) * 1e6 for w, v in cpu.items()},
                             "bots_us_per_change": {w: statistics.median(v) * 1e6 for w, v in own.items()},
                             "received": got, "ratio_cpu_prosody": ratio, "ratio_cpu_total": total}

        # Status at size: filter + summary over the N views.
        op = GridOperator.from_connection(grid.connection, resource="status")
        await op.connect(timeout=120, settle_s=60, tariff_s=0)
        chosen = DeviceFilter.parse(["kind=load", "state=on"])
        passes = []
        for _ in range(50):
            t = time.perf_counter()
            views = list(chosen.select(op.devices.values()))
            FleetSummary.of(views)
            passes.append(time.perf_counter() - t)
        await op.close()
        print(f"status --filter kind=load state=on over {args.devices} views:")
        results["status_filter"] = summary("filter + summary, one pass", passes)
        print(json.dumps(results))
    finally:
        await bots.stop()
        await grid.stop()
        shutil.rmtree(grid.data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
