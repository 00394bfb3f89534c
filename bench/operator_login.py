#!/usr/bin/env python3
"""An operator's login at fleet size: from its session start until its library sees every
device present with its state, and where the time goes, process by process.

N loads hosted on the grid's component (one XEP-0114 link, xmpp/component.py) in a process of
their own (bench/remote_side.py), Prosody, and this process (the operator). Each round logs in:

* raw: a plain slixmpp client of the operator's account (another resource): roster, initial
  presence, until all N devices' available presence is in (the baseline, same run, same server);
* ours, first: ``GridOperator.connect`` with no roster kept from before (a new machine);
* ours, returning: ``GridOperator.connect`` again, with the roster (and its XEP-0237 version)
  the first login kept: the server sends no roster items when nothing changed.

Timed from ``session_start`` (the server's session is there; TCP, TLS and SASL are the same for
all three) until every device is seen; the full login (from connect) is printed too. Reported:
median and p99 of each, their ratio to the raw login of the same round, and the CPU seconds each
process (this one, the device host, Prosody) spent from the login's start until every process
was quiet again (the server's and the host's work continues after the operator has seen all).
``--profile DIR`` writes cProfile files of this process and the device host for the last
round's logins.

    python bench/operator_login.py [--devices 2000] [--rounds 3] [--profile DIR]
    PYTHONPATH=OLDER/src python bench/operator_login.py --no-returning   # the code before, same way
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from common import (BenchGrid, client_for, cpu_seconds, operator_login_all_seen, percentile, raw_login_all_seen,
                    summary)

from gridpresence.config import Fleet, parse_fleet
from gridpresence.operator.library import GridOperator

OPERATOR = "bench-op"
WAIT_S = 300.0


def login_fleet(loads: int) -> Fleet:
    """N hosted loads and the operator. The device process's echo responder (bench/remote_side.py)
    needs its accounts: here manufacturers, not billing, whose tariff a login would wait for."""
    return parse_fleet({
        "domain": "localhost",
        "hosting": "component",
        "operators": [{"name": OPERATOR}],
        "manufacturers": [{"name": "echo-a"}, {"name": "echo-b"}],
        "devices": [{"name": f"dev-{i:05d}", "kind": "load", "rated_kw": 10, "refresh_s": 3600}
                    for i in range(loads)],
    })


PHASES: dict[str, dict[str, list[float]]] = {}  # kind -> phase -> seconds, per login


class Login:
    """One login's instants: session start, roster in, first device seen (then all seen)."""

    def __init__(self, client: object) -> None:
        self.t_session: float | None = None
        self.t_roster: float | None = None
        self.t_first: float | None = None
        client.add_event_handler("session_start", self.session_started)  # type: ignore[attr-defined]
        client.add_event_handler("roster_update", self.roster_in)  # type: ignore[attr-defined]

    def session_started(self, _e: object = None) -> None:
        if self.t_session is None:
            self.t_session = time.perf_counter()

    def roster_in(self, _e: object = None) -> None:
        if self.t_roster is None:
            self.t_roster = time.perf_counter()

    def first_seen(self, _e: object = None) -> None:
        if self.t_first is None:
            self.t_first = time.perf_counter()

    def note(self, kind: str, t_all: float) -> None:
        assert self.t_session is not None and self.t_roster is not None and self.t_first is not None
        phases = PHASES.setdefault(kind, {})
        for name, a, b in (("session start -> roster in", self.t_session, self.t_roster),
                           ("roster in -> first device seen", self.t_roster, self.t_first),
                           ("first device -> all seen", self.t_first, t_all)):
            phases.setdefault(name, []).append(b - a)


async def raw_login(bench: BenchGrid, devices: set[str], i: int) -> tuple[float, float]:
    client = client_for(bench.grid, OPERATOR, f"raw-{i}")
    login = Login(client)
    t0, t1 = await raw_login_all_seen(bench.grid, client, devices, WAIT_S, on_device=login.first_seen)
    assert login.t_session is not None
    login.note("raw slixmpp", t1)
    return t1 - t0, t1 - login.t_session


async def our_login(bench: BenchGrid, n: int, resource: str, returning: bool) -> tuple[float, float]:
    """``returning``: with the roster the previous login of the operator kept beside its key
    (operator/roster_cache.py); else as on a new machine, nothing kept."""
    acc = bench.grid.connection.operator(OPERATOR)
    kept = Path(acc.key_file).with_name(f"{acc.name}.roster.json") if acc.key_file else None
    if not returning and kept is not None:
        kept.unlink(missing_ok=True)
    op = GridOperator.from_connection(bench.grid.connection, operator=OPERATOR, resource=resource)
    login = Login(op.client)
    fetch = getattr(op, "_fetch_roster", None)  # (its answer is taken from the XML: no roster_update event)
    if fetch is not None:  # (None: the code before it, run with PYTHONPATH for the before figures)
        async def timed_fetch() -> None:
            await fetch()
            login.roster_in()

        op._fetch_roster = timed_fetch  # type: ignore[method-assign]
    op.tracker.listen(lambda change: login.first_seen() if change.current.present else None)
    t0, t1 = await operator_login_all_seen(op, n, WAIT_S)
    assert login.t_session is not None
    login.note("ours, returning" if returning else "ours, first login", t1)
    return t1 - t0, t1 - login.t_session


async def quiet(pids: dict[str, int], limit_s: float = 60.0) -> None:
    """Until no process of the bench uses more than 5 % of a core over half a second."""
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        before = {k: cpu_seconds(p) for k, p in pids.items()}
        await asyncio.sleep(0.5)
        if all(cpu_seconds(p) - before[k] < 0.025 for k, p in pids.items()):
            return


async def measured(pids: dict[str, int], cpu: dict[str, list[float]],
                   login: Callable[[], Awaitable[tuple[float, float]]]) -> tuple[float, float]:
    await quiet(pids)
    before = {k: cpu_seconds(p) for k, p in pids.items()}
    result = await login()
    await quiet(pids)
    for k, p in pids.items():
        cpu.setdefault(k, []).append(cpu_seconds(p) - before[k])
    return result


async def main(args: argparse.Namespace) -> None:
    fleet = login_fleet(args.devices)
    jids = {fleet.jid(d.name) for d in fleet.devices}
    bench = BenchGrid(fleet)
    t = time.perf_counter()
    await bench.start()
    print(f"{args.devices} hosted devices up in {time.perf_counter() - t:.0f} s", flush=True)
    pids = bench.pids()
    kinds = ("raw slixmpp", "ours, first login", "ours, returning")
    timings: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    cpu: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    try:
        for i in range(args.rounds):
            last = i == args.rounds - 1 and args.profile
            timings[kinds[0]].append(await measured(pids, cpu[kinds[0]], lambda: raw_login(bench, jids, i)))
            for kind, keep in ((kinds[1], False), (kinds[2], True))[:1 if args.no_returning else 2]:
                prof = cProfile.Profile() if last else None
                if prof is not None:
                    await bench.remote_profile()
                    prof.enable()
                timings[kind].append(await measured(
                    pids, cpu[kind], lambda: our_login(bench, args.devices, f"{kind[:4]}-{i}", keep)))
                if prof is not None:
                    prof.disable()
                    name = "returning" if keep else "first"
                    prof.dump_stats(str(Path(args.profile) / f"operator-{name}.prof"))
                    await bench.remote_profile(Path(args.profile).resolve() / f"devices-{name}.prof")
        print(f"operator login, {args.devices} hosted devices, {args.rounds} rounds:")
        print(" session start -> all seen with state:")
        raw = [s for _, s in timings[kinds[0]]]
        kinds = tuple(k for k in kinds if timings[k])
        for kind in kinds:
            summary(kind, [s for _, s in timings[kind]])
        print(" connect -> all seen with state:")
        for kind in kinds:
            summary(kind, [c for c, _ in timings[kind]])
        for kind in kinds[1:]:
            ratios = [s / r for (_, s), r in zip(timings[kind], raw)]
            print(f"  {kind}: ratio to raw (session start -> all seen) median {statistics.median(ratios):.2f}x, "
                  f"worst {max(ratios):.2f}x")
        print(" phases, median (the returning login's roster answer is its version only):")
        for kind in kinds:
            print(f"  {kind:<20} " + "; ".join(f"{name} {statistics.median(v):.2f} s"
                                             for name, v in PHASES.get(kind, {}).items()))
        print(" CPU seconds per login (from its start until every process is quiet again), median:")
        for kind in kinds:
            per = {k: statistics.median(v) for k, v in cpu[kind].items()}
            print(f"  {kind:<20} " + ", ".join(f"{k} {v:.2f} s (p99 {percentile(cpu[kind][k], 99):.2f})"
                                             for k, v in per.items())
                  + f"; total {sum(per.values()):.2f} s", flush=True)
    finally:
        await bench.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-returning", action="store_true", help="no returning operator's login (before roster keeping)")
    parser.add_argument("--profile", help="a directory: cProfile of this process and the device host, last round")
    args = parser.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    asyncio.run(main(args))
