#!/usr/bin/env python3
"""Issue 14: how long a grid takes to be whole again after its Prosody is killed -9.

A grid of N loads plus every service (relay, watchdog, console, billing) runs under `Grid` (what
`gridpresence up` runs) with an operator library session. Each round kills Prosody -9 and times
(a) the supervised restart and (b) the moment every party has a session again and every
watcher (operator, relay, watchdog, console) sees every device present. Baseline, same run: the
grid's cold start (server, logins of every party, the operator's first full view).

Goal (issue 14): every party present again <= 5 s after Prosody is back.

    python bench/recovery.py [--loads 125] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from gridpresence.config import parse_fleet  # noqa: E402
from gridpresence.host.grid import Grid  # noqa: E402
from gridpresence.operator.library import GridOperator  # noqa: E402
from gridpresence.xmpp.reconnect import reconnector_of  # noqa: E402


def fleet(loads: int):  # type: ignore[no-untyped-def]
    return parse_fleet({
        "domain": "localhost", "presence_grace_s": 5.0,
        "operators": [{"name": "alice"}],
        "billing": [{"name": "billing", "peak_price": 0.8, "off_peak_price": 0.6}],
        "devices": [{"name": f"load-{i}", "kind": "load", "rated_kw": 20, "refresh_s": 300} for i in range(loads)],
    })


async def whole(grid: Grid, op: GridOperator) -> None:
    assert grid.bots is not None and grid.relay is not None and grid.bots.watchdog and grid.bots.console
    clients = [b.client for b in (*grid.bots.devices.values(), *grid.bots.billing.values(), grid.bots.watchdog)]
    clients += [grid.bots.console.grid.client, grid.relay.client, op.client]
    watchers = [op.tracker, grid.relay.tracker, grid.bots.watchdog.tracker, grid.bots.console.grid.tracker]
    names = list(grid.bots.devices)
    while not (all(reconnector_of(c).online.is_set() for c in clients) and grid.relay._online
               and all(t.views[t.jid_by_name[n]].present for t in watchers for n in names)):
        await asyncio.sleep(0.02)


class Phases:
    """When each party's connection and session came back in a round, for `--phases`: what the
    recovery waits on (first TCP connect, login, last device seen by the last watcher)."""

    def __init__(self, grid: Grid, op: GridOperator) -> None:
        assert grid.bots is not None and grid.relay is not None
        self.clients = [b.client for b in grid.bots.devices.values()]
        self.clients += [grid.relay.client, op.client, *(b.client for b in grid.bots.billing.values())]
        self.connected: dict[int, float] = {}
        self.started: dict[int, float] = {}
        self.tries: dict[int, int] = {}
        for i, c in enumerate(self.clients):
            c.add_event_handler("connected", lambda _e, i=i: self.connected.setdefault(i, time.monotonic()))
            c.add_event_handler("session_start", lambda _e, i=i: self.started.setdefault(i, time.monotonic()))
            c.add_event_handler("connection_failed", lambda _e, i=i: self.tries.__setitem__(i, self.tries.get(i, 0) + 1))

    def reset(self) -> None:
        self.connected.clear(), self.started.clear(), self.tries.clear()

    def report(self, up_at: float, whole_at: float) -> None:
        def q(xs: list[float]) -> str:
            xs = sorted(xs)
            return f"median {statistics.median(xs):5.2f} max {xs[-1]:5.2f}" if xs else "none"
        print(f"    phases (s after Prosody back): TCP connected {q([t - up_at for t in self.connected.values()])}; "
              f"session {q([t - up_at for t in self.started.values()])}; "
              f"login {q([self.started[i] - self.connected[i] for i in self.started if i in self.connected])}; "
              f"refused tries {sum(self.tries.values())}; "
              f"over BOSH {sum(c.transport_name == 'bosh' for c in self.clients)}; whole {whole_at - up_at:.2f}", flush=True)


async def main(loads: int, rounds: int, phases: bool = False) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-recovery-") as tmp:
        cold = time.monotonic()
        grid = Grid(fleet(loads), Path(tmp) / "grid")
        await grid.start()
        op = GridOperator.from_connection(grid.connection, resource="bench")
        await op.connect(settle_s=5.0)
        try:
            await asyncio.wait_for(whole(grid, op), 60)
            baseline = time.monotonic() - cold
            restart, back = [], []
            watch = Phases(grid, op) if phases else None
            for _ in range(rounds):
                if watch:
                    watch.reset()
                before = len(grid.server_restarts)
                os.kill(int(grid.server.pidfile_path.read_text()), signal.SIGKILL)
                died = time.monotonic()
                while len(grid.server_restarts) == before:
                    await asyncio.sleep(0.01)
                up_at = died + grid.server_restarts[-1]
                await asyncio.sleep(0.2)  # let every party notice the loss before we test for "whole"
                await asyncio.wait_for(whole(grid, op), 60)
                restart.append(grid.server_restarts[-1])
                back.append(time.monotonic() - up_at)
                if watch:
                    watch.report(up_at, time.monotonic())
                await asyncio.sleep(2.0)
        finally:
            await op.close()
            await grid.stop()
    print(f"recovery after Prosody kill -9, {loads} loads + relay, watchdog, console, billing, operator "
          f"(load average {os.getloadavg()[0]:.1f})")
    summary("supervised Prosody restart", restart)
    s = summary("all parties back, after Prosody is", back)
    print(f"  baseline: cold start of the same grid {baseline:.2f} s; recovery median / cold start = "
          f"{s['median_ms'] / 1000 / baseline:.2f}")
    print(f"  goal <= 5 s after Prosody is back: {'met' if max(back) <= 5.0 else 'NOT met'} (max {max(back):.2f} s)")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--loads", type=int, default=125)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--phases", action="store_true", help="per round: when connections and sessions came back")
    a = p.parse_args()
    asyncio.run(main(a.loads, a.rounds, a.phases))
