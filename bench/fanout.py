#!/usr/bin/env python3
"""Command fan-out: shed N devices at once and wait for every outcome (N = 100 and 1000).

Baseline, same run, same server: raw slixmpp chat round trips between two plain clients,
1000 of them one at a time (the chat round-trip time x 1000) and 1000 in flight at once.
Each round measures the baselines and the fan-outs back to back, so the machine's drift hits
both; ratios are taken per round and their median is reported. For the largest size it also
prints the CPU time each process (this one, the device bots', Prosody) spent per shed: on a
small machine the three compete for the cores, so CPU added anywhere shows in the time.
Goal (issue 2): fan-out to 1000 devices <= 1.5 x the baseline's time for 1000 round trips.

``--signatures both`` (issue 5) runs every fan-out twice per round, signed (the operator's key)
and unsigned (a second session of the same operator without a key; the bench fleet lets the
same devices take both), alternating which goes first, and reports signed/unsigned per round.
Goal: a signed fan-out of 1000 <= 1.3 x the unsigned one.

The device bots (all N in one process) and the echo responder run in a second process, as
they would on other hardware; this process holds the operator and the watchdog service.

    python bench/fanout.py [--sizes 100 1000] [--rounds 7] [--signatures on|off|both]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from common import BenchGrid, CpuMeter, EchoPair, bench_fleet, percentile, summary

from gridpresence.operator.library import GridOperator
from gridpresence.protocol import Action, OutcomeStatus


async def fan_out(op: GridOperator, names: list[str], action: Action, meter: CpuMeter | None = None,
                  kind: str = "") -> float:
    t0 = time.perf_counter()
    if meter is not None:
        with meter.measure(kind):
            outcomes = await op.command_many(names, action, ttl_s=60)
    else:
        outcomes = await op.command_many(names, action, ttl_s=60)
    elapsed = time.perf_counter() - t0
    bad = [o for o in outcomes.values() if o.status is not OutcomeStatus.EXECUTED]
    if bad:
        raise SystemExit(f"{len(bad)} of {len(names)} commands not executed, e.g. {bad[0]}")
    return elapsed


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--signatures", choices=("on", "off", "both"), default="on")
    args = parser.parse_args()
    largest = max(args.sizes)
    t0 = time.perf_counter()
    bench = BenchGrid(bench_fleet(largest, require_signatures=args.signatures == "on"))
    await bench.start()
    print(f"{largest} device bots logged in (in one process) in {time.perf_counter() - t0:.1f} s", flush=True)
    echo = EchoPair(bench.grid)
    await echo.start()
    op = GridOperator.from_connection(bench.grid.connection, resource="bench")
    if args.signatures == "off":
        op.issuer.key = None
    await op.connect(timeout=60, settle_s=30)
    plain: GridOperator | None = None
    if args.signatures == "both":
        plain = GridOperator.from_connection(bench.grid.connection, resource="bench-unsigned")
        plain.issuer.key = None  # the same operator, sending unsigned commands
        await plain.connect(timeout=60, settle_s=30)
    present = sum(v.present for v in op.devices.values())
    if present != largest:
        raise SystemExit(f"only {present} of {largest} devices are present")
    names = sorted(op.devices)
    try:
        await echo.sequential(100)  # warm-up
        await echo.pipelined(200)
        # First contact: every device looks the operator's key up over PEP (XEP-0373) once.
        first = await fan_out(op, names, Action.SHED)
        await fan_out(op, names, Action.RESTORE)
        if op.issuer.key is not None:
            print(f"first signed fan-out to {len(names)} devices, each fetching the operator's key over PEP: "
                  f"{first * 1000:.0f} ms", flush=True)
        if plain is not None:
            await fan_out(plain, names, Action.SHED)
            await fan_out(plain, names, Action.RESTORE)

        seq_rtts: list[float] = []
        seq_totals: list[float] = []
        pipelined: list[float] = []
        fan: dict[int, list[float]] = {n: [] for n in args.sizes}
        ratio_seq: dict[int, list[float]] = {n: [] for n in args.sizes}
        ratio_pipe: dict[int, list[float]] = {n: [] for n in args.sizes}
        unsigned: dict[int, list[float]] = {n: [] for n in args.sizes}
        ratio_sig: dict[int, list[float]] = {n: [] for n in args.sizes}
        meter = CpuMeter(bench.pids())  # for the largest size: where each shed's CPU goes
        signed_kind = "signed" if op.issuer.key is not None else "unsigned"
        for round_no in range(args.rounds):
            rtts = await echo.sequential(1000)
            seq_rtts += rtts
            seq_totals.append(sum(rtts))
            pipelined.append(await echo.pipelined(1000))
            for n in args.sizes:
                m = meter if n == largest else None
                if plain is not None and round_no % 2 == 0:  # alternate which goes first
                    unsigned[n].append(await fan_out(plain, names[:n], Action.SHED, m, "unsigned"))
                    await fan_out(plain, names[:n], Action.RESTORE)
                elapsed = await fan_out(op, names[:n], Action.SHED, m, signed_kind)
                await fan_out(op, names[:n], Action.RESTORE)
                if plain is not None and round_no % 2 == 1:
                    unsigned[n].append(await fan_out(plain, names[:n], Action.SHED, m, "unsigned"))
                    await fan_out(plain, names[:n], Action.RESTORE)
                if plain is not None:
                    ratio_sig[n].append(elapsed / unsigned[n][-1])
                fan[n].append(elapsed)
                ratio_seq[n].append(elapsed / seq_totals[-1])
                ratio_pipe[n].append(elapsed / pipelined[-1])

        results: dict[str, object] = {}
        print(f"baseline, raw slixmpp chat round trips ({args.rounds} rounds):")
        results["baseline_rtt"] = summary("one round trip (1000 per round, one at a time)", seq_rtts)
        results["baseline_1000_sequential"] = summary("1000 round trips one at a time (total)", seq_totals)
        results["baseline_1000_pipelined"] = summary("1000 round trips in flight at once (total)", pipelined)
        for n in args.sizes:
            print(f"fan-out to {n} devices (shed, every outcome back):")
            stats = summary(f"shed {n}", fan[n])
            stats["ratio_to_1000_sequential_median"] = statistics.median(ratio_seq[n])
            stats["ratio_to_1000_sequential_p99"] = percentile(ratio_seq[n], 99)
            stats["ratio_to_1000_pipelined_median"] = statistics.median(ratio_pipe[n])
            print(f"  ratio to 1000 round trips one at a time: median {stats['ratio_to_1000_sequential_median']:.2f}x"
                  f" (worst round {stats['ratio_to_1000_sequential_p99']:.2f}x);  to 1000 in flight: median "
                  f"{stats['ratio_to_1000_pipelined_median']:.2f}x;  {statistics.median(fan[n]) / n * 1e6:.0f} us"
                  " per command", flush=True)
            results[f"fanout_{n}"] = stats
            if plain is not None:
                base = summary(f"shed {n}, unsigned (same devices)", unsigned[n])
                base["ratio_signed_to_unsigned_median"] = statistics.median(ratio_sig[n])
                base["ratio_signed_to_unsigned_worst"] = max(ratio_sig[n])
                print(f"  signed / unsigned: median {base['ratio_signed_to_unsigned_median']:.2f}x (worst round "
                      f"{base['ratio_signed_to_unsigned_worst']:.2f}x; goal for 1000: <= 1.3x)", flush=True)
                results[f"fanout_{n}_unsigned"] = base
        for kind in meter.spent:
            results[f"cpu_ms_per_shed_{largest}_{kind}"] = meter.report(kind, args.rounds, f"shed of {largest}")
        print(json.dumps(results))
    finally:
        if plain is not None:
            await plain.close()
        await op.close()
        await echo.stop()
        await bench.stop()


if __name__ == "__main__":
    asyncio.run(main())
