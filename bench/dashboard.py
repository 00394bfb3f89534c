#!/usr/bin/env python3
"""Dashboard update latency: from a command that changes a device's state to the page's
server-sent snapshot showing it, against the operator library's own view of the same change
(the baseline, measured in the same run on the same commands).

    python bench/dashboard.py [--devices 20] [--rounds 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import tempfile
import time
from pathlib import Path

import aiohttp
from common import summary

from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator import GridOperator


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=40)
    args = ap.parse_args()
    fleet = parse_fleet({"domain": "localhost", "operators": [{"name": "op"}, {"name": "viewer"}],
                         "devices": [{"name": f"dev-{i:03d}", "kind": "load", "rated_kw": 10}
                                     for i in range(args.devices)]})
    data = Path(tempfile.mkdtemp(prefix="gp-bench-dash-"))
    grid = Grid(fleet, data)
    await grid.start()
    try:
        assert grid.dashboard is not None
        url = grid.dashboard.url
        ctx = ssl.create_default_context(cafile=str(grid.server.certs.ca))
        seen: dict[str, tuple[str, float]] = {}  # device -> (state, first instant the page showed it)
        async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as http, \
                GridOperator.from_connection(grid.connection, operator="op") as op:
            async with http.post(url + "login", ssl=ctx, data={"operator": "viewer",
                                                               "password": grid.secrets.password("viewer")}) as r:
                assert r.status == 200, r.status
            stream = await http.get(url + "events", ssl=ctx, timeout=aiohttp.ClientTimeout(total=None))

            async def read() -> None:
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        now = time.perf_counter()
                        for d in json.loads(line[6:])["devices"]:
                            if seen.get(d["name"], ("",))[0] != d["state"]:
                                seen[d["name"]] = (d["state"], now)

            reader = asyncio.ensure_future(read())
            page_s, lib_s = [], []
            for i in range(args.rounds):
                name = f"dev-{i % args.devices:03d}"
                action, want = ("shed", "off") if op.device(name).label == "on" else ("restore", "on")
                t0 = time.perf_counter()
                outcome = await op.command(name, action)
                assert outcome.ok, outcome
                await op.wait_for(lambda devs: devs[name].label == want, timeout=10)
                lib_s.append(time.perf_counter() - t0)
                deadline = time.perf_counter() + 10
                while seen.get(name, ("",))[0] != want:
                    if time.perf_counter() > deadline:
                        raise SystemExit(f"the page never showed {name} {want}")
                    await asyncio.sleep(0.002)
                page_s.append(seen[name][1] - t0)
                await asyncio.sleep(0.3)  # let the page's push pacing settle between rounds
            reader.cancel()
            stream.close()
        print(f"dashboard update latency, {args.rounds} state changes of {args.devices} devices:")
        lib = summary("baseline: the operator library sees it", lib_s)
        page = summary("the dashboard page's SSE shows it", page_s)
        print(f"  ratio page/library: median {page['median_ms'] / lib['median_ms']:.2f}x, "
              f"p99 {page['p99_ms'] / lib['p99_ms']:.2f}x")
    finally:
        await grid.stop()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
