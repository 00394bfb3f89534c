#!/usr/bin/env python3
"""Presence propagation: from a device's state change to the operator library seeing it.

100 device bots and the operator run in one event loop, so one clock times both ends
(perf_counter). Changes are paced (default 100 per second, round robin over the devices).
Baseline, same run, same server: a plain slixmpp client's presence (status text only) seen by
a plain slixmpp client. Goal (issue 2): p50 <= 5 ms and p99 <= 50 ms at 100 devices.

    python bench/presence_latency.py [--devices 100] [--changes 2000] [--rate 100]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from common import bench_fleet, summary

from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.operator.tracker import DeviceChange
from gridpresence.host.grid import Grid
from gridpresence.protocol import Action
from gridpresence.protocol.models import utcnow


async def grid_latencies(grid: Grid, op: GridOperator, changes: int, rate: float) -> list[float]:
    agents = list(grid.bots.devices.values())  # type: ignore[union-attr]
    sent: dict[tuple[str, int], float] = {}
    got: list[float] = []
    done = asyncio.Event()

    def seen(change: DeviceChange) -> None:
        report = change.current.report
        if report is None:
            return
        t0 = sent.pop((change.current.jid, report.seq), None)
        if t0 is not None:
            got.append(time.perf_counter() - t0)
            if len(got) == changes:
                done.set()

    stop = op.tracker.listen(seen)
    try:
        for i in range(changes):
            agent = agents[i % len(agents)]
            action = Action.RESTORE if agent.sim.state.value == "off" else Action.SHED
            t0 = time.perf_counter()
            agent.sim.execute(action, {}, utcnow())
            report = agent.publish(force=True)
            assert report is not None
            sent[(agent.jid, report.seq)] = t0
            await asyncio.sleep(1 / rate)
        await asyncio.wait_for(done.wait(), 30)
    finally:
        stop()
    return got


class RawPair:
    """Plain slixmpp: a device account's presence, seen by an operator account's second resource."""

    def __init__(self, grid: Grid) -> None:
        self.endpoint = grid.endpoint
        self.sender = make_client("dev-0000@localhost/raw", grid.secrets.password("dev-0000"), self.endpoint)
        self.receiver = make_client("bench-op@localhost/raw", grid.secrets.password("bench-op"), self.endpoint)
        self.sent: dict[str, float] = {}
        self.got: list[float] = []
        self.receiver.add_event_handler("presence", self._seen)

    def _seen(self, pres) -> None:  # type: ignore[no-untyped-def]
        t0 = self.sent.pop(pres["status"], None)
        if t0 is not None and pres["from"].resource == "raw":
            self.got.append(time.perf_counter() - t0)

    async def start(self) -> None:
        for client in (self.receiver, self.sender):
            await open_session(client, self.endpoint)
            await client.get_roster()
            client.send_presence()
        await asyncio.sleep(0.5)

    async def stop(self) -> None:
        for client in (self.sender, self.receiver):
            await close_session(client)

    async def latencies(self, changes: int, rate: float) -> list[float]:
        self.got = []
        for i in range(changes):
            status = f"change {i}"
            self.sent[status] = time.perf_counter()
            self.sender.send_presence(pstatus=status, pshow="away" if i % 2 else None)
            await asyncio.sleep(1 / rate)
        async with asyncio.timeout(30):
            while len(self.got) < changes:
                await asyncio.sleep(0.01)
        return self.got


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--changes", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=100.0, help="changes per second")
    args = parser.parse_args()
    fleet = bench_fleet(args.devices)
    grid = Grid(fleet, Path(tempfile.mkdtemp(prefix="gridbench-")), only=[d.name for d in fleet.devices] + ["watchdog"],
                tick_s=300)
    await grid.start()
    op = GridOperator.from_connection(grid.connection, resource="bench")
    await op.connect(settle_s=10)
    raw = RawPair(grid)
    await raw.start()
    try:
        await grid_latencies(grid, op, 200, args.rate)  # warm-up
        await raw.latencies(200, args.rate)
        print(f"presence propagation, {args.devices} devices online, {args.rate:g} changes/s:")
        base = await raw.latencies(args.changes, args.rate)
        results = {"baseline": summary("raw slixmpp presence (status only)", base)}
        ours = await grid_latencies(grid, op, args.changes, args.rate)
        results["gridpresence"] = summary("device change -> operator library view", ours)
        ratio = statistics.median(ours) / statistics.median(base)
        print(f"  ratio to baseline: median {ratio:.2f}x, p99 "
              f"{results['gridpresence']['p99_ms'] / results['baseline']['p99_ms']:.2f}x", flush=True)
        print(json.dumps(results))
    finally:
        await raw.stop()
        await op.close()
        await grid.stop()
        import shutil

        shutil.rmtree(grid.data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
