#!/usr/bin/env python3
"""Command fan-out: shed N devices at once and wait for every outcome (N = 100 and 1000).

Baseline, same run, same server: raw slixmpp chat round trips between two plain clients,
1000 of them in flight at once (throughput) and one at a time (latency).
Goal (issue 2): fan-out to 1000 devices <= 1.5 x the baseline's time for 1000 round trips.

    python bench/fanout.py [--sizes 100 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from common import BenchGrid, EchoPair, bench_fleet, summary

from gridpresence.agents.operator import GridOperator
from gridpresence.protocol import Action, OutcomeStatus


async def fan_out(op: GridOperator, names: list[str], action: Action) -> float:
    t0 = time.perf_counter()
    outcomes = await op.command_many(names, action, ttl_s=60)
    elapsed = time.perf_counter() - t0
    bad = [o for o in outcomes.values() if o.status is not OutcomeStatus.EXECUTED]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(names)} commands not executed, e.g. {bad[0]}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    largest = max(args.sizes)
    t0 = time.perf_counter()
    bench = BenchGrid(bench_fleet(largest))
    await bench.start()
    grid = bench.grid
    print(f"{largest} device bots logged in (in one process) in {time.perf_counter() - t0:.1f} s", flush=True)
    results: dict[str, object] = {}
    echo = EchoPair(grid)
    await echo.start()
    op = GridOperator.from_connection(grid.connection, resource="bench")
    await op.connect(timeout=60, settle_s=30)
    assert sum(v.present for v in op.devices.values()) == largest, "not every device is present"
    try:
        await echo.sequential(50)  # warm-up
        await echo.pipelined(200)
        for _ in range(2):
            await fan_out(op, sorted(op.devices)[:100], Action.SHED)
            await fan_out(op, sorted(op.devices)[:100], Action.RESTORE)

        print("baseline (raw slixmpp chat round trips):")
        seq = await echo.sequential(1000)
        results["baseline_sequential"] = summary("1 round trip at a time (x1000)", seq)
        pipe = [await echo.pipelined(1000) for _ in range(args.repeats)]
        results["baseline_pipelined_1000"] = summary("1000 round trips in flight (total)", pipe)
        seq_total = sum(seq)
        print(f"  {'1000 sequential round trips (total)':<44}         {seq_total * 1000:9.1f} ms")

        for n in sorted(args.sizes):
            names = sorted(op.devices)[:n]
            times = []
            for _ in range(args.repeats):
                times.append(await fan_out(op, names, Action.SHED))
                await fan_out(op, names, Action.RESTORE)
            print(f"fan-out to {n} devices:")
            results[f"fanout_{n}"] = summary(f"shed {n}, all outcomes back", times)
            med = statistics.median(times)
            print(f"  ratio to 1000 pipelined round trips: {med / statistics.median(pipe):.2f}x   "
                  f"to 1000 sequential: {med / seq_total:.2f}x   per command {med / n * 1e6:.0f} us", flush=True)
            results[f"fanout_{n}"]["ratio_to_pipelined"] = med / statistics.median(pipe)  # type: ignore[index]
            results[f"fanout_{n}"]["ratio_to_sequential"] = med / seq_total  # type: ignore[index]
        print(json.dumps(results))
    finally:
        await op.close()
        await echo.stop()
        await bench.stop()


if __name__ == "__main__":
    asyncio.run(main())
