#!/usr/bin/env python3
"""Command fan-out: shed N devices at once and wait for every outcome, for each N of --sizes.

Baseline, same run, same server, per size: N raw slixmpp chat round trips between two plain
clients, all N in flight at once (issue 16's goal: a signed shed of N <= 2x that time, at N =
1000 and 10,000). Each round measures the baseline and the fan-out back to back, so the
machine's drift hits both; the ratio is taken per round and its median and worst are reported.
For each size it also prints the CPU each process spends per command (this one: operator and
watchdog; the device host's; Prosody's) and per raw round trip: on a small machine the three
compete for the cores, so CPU added anywhere shows in the time.

``--hosting component`` hosts the devices as identities on the grid's XEP-0114 component (one
connection, xmpp/component.py), as a fleet of thousands is run; ``c2s`` gives each its own
session. ``--signatures both`` also runs each fan-out unsigned (a second session of the same
operator without a key; the bench fleet lets the same devices take both), alternating which
goes first, and reports signed/unsigned per round.

``--batches both`` also runs each signed fan-out with one message per device instead of the
multicast batches (PROTOCOL.md, "Commands in batches"; what a host without XEP-0033 gets),
alternating which goes first, and reports batched/per-device per round; ``off`` sends only
per-device messages.

``--profile DIR`` adds one cProfiled shed (and restore) of the largest size after the measured
rounds, in this process and in the device process: DIR/operator.pstats and DIR/host.pstats.

The device bots (all N in one process) and the echo responder run in a second process, as
they would on other hardware; this process holds the operator and the watchdog service.

    python bench/fanout.py [--sizes 1000 10000] [--rounds 5] [--hosting c2s|component]
                           [--signatures on|off|both] [--batches on|off|both] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import statistics
import time
from pathlib import Path

from common import BenchGrid, CpuMeter, EchoPair, bench_fleet, percentile, summary

from gridpresence.operator.library import GridOperator
from gridpresence.protocol import Action, OutcomeStatus

TTL_S = 300.0  # long enough that a slow shed of 10,000 on a busy machine is measured, not expired


async def fan_out(op: GridOperator, names: list[str], action: Action, meter: CpuMeter | None = None,
                  kind: str = "") -> float:
    t0 = time.perf_counter()
    if meter is not None:
        with meter.measure(kind):
            outcomes = await op.command_many(names, action, ttl_s=TTL_S)
    else:
        outcomes = await op.command_many(names, action, ttl_s=TTL_S)
    elapsed = time.perf_counter() - t0
    bad = [o for o in outcomes.values() if o.status is not OutcomeStatus.EXECUTED]
    if bad or len(outcomes) != len(names):
        raise SystemExit(f"{len(bad)} of {len(names)} commands not executed, e.g. {bad[0] if bad else '-'}")
    return elapsed


def compared(what: str, times: list[float], ratios: list[float], key: str, label: str) -> dict[str, object]:
    """summary() of ``times``, with the median and worst of the rounds' ``ratios``, printed."""
    stats: dict[str, object] = dict(summary(what, times))
    stats[f"ratio_{key}_median"] = statistics.median(ratios)
    stats[f"ratio_{key}_worst"] = max(ratios)
    print(f"  {label} median {statistics.median(ratios):.2f}x (worst round {max(ratios):.2f}x)", flush=True)
    return stats


async def per_device(op: GridOperator, names: list[str], meter: CpuMeter, kind: str) -> float:
    """A signed shed (and its restore) with one message per device: what a host without
    XEP-0033 multicast gets."""
    op.batches = False
    try:
        elapsed = await fan_out(op, names, Action.SHED, meter, kind)
        await fan_out(op, names, Action.RESTORE)
    finally:
        op.batches = True
    return elapsed


async def connected(op: GridOperator, devices: int) -> None:
    """Log in and wait until every device is present (the echo pair are billing parties that
    send no tariff: `connect`'s settling would wait out its whole time for one)."""
    await op.connect(timeout=120, settle_s=0.5, tariff_s=0)
    await op.wait_for(lambda devs: sum(v.present for v in devs.values()) >= devices, timeout=300)


async def raw(echo: EchoPair, n: int, meter: CpuMeter) -> float:
    with meter.measure(f"raw {n}"):
        return await echo.pipelined(n)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--signatures", choices=("on", "off", "both"), default="on")
    parser.add_argument("--hosting", choices=("c2s", "component"), default="c2s")
    parser.add_argument("--batches", choices=("on", "off", "both"), default="on")
    parser.add_argument("--profile", type=Path, default=None, metavar="DIR")
    args = parser.parse_args()
    largest = max(args.sizes)
    t0 = time.perf_counter()
    bench = BenchGrid(bench_fleet(largest, require_signatures=args.signatures == "on", hosting=args.hosting))
    await bench.start()
    print(f"{largest} devices ({args.hosting}) logged in (in one process) in {time.perf_counter() - t0:.1f} s",
          flush=True)
    echo = EchoPair(bench.grid)
    await echo.start()
    t0 = time.perf_counter()
    op = GridOperator.from_connection(bench.grid.connection, resource="bench")
    op.batches = args.batches != "off"
    if args.signatures == "off":
        op.issuer.key = None
    await connected(op, largest)
    print(f"the operator sees all {largest} in {time.perf_counter() - t0:.1f} s", flush=True)
    plain: GridOperator | None = None
    if args.signatures == "both":
        plain = GridOperator.from_connection(bench.grid.connection, resource="bench-unsigned")
        plain.issuer.key = None  # the same operator, sending unsigned commands
        await connected(plain, largest)
    present = sum(v.present for v in op.devices.values())
    if present != largest:
        raise SystemExit(f"only {present} of {largest} devices are present")
    names = sorted(op.devices)
    try:
        await echo.sequential(100)  # warm-up
        await echo.pipelined(min(largest, 1000))
        # First contact: every device looks the operator's key up over PEP (XEP-0373) once.
        first = await fan_out(op, names, Action.SHED)
        await fan_out(op, names, Action.RESTORE)
        if op.issuer.key is not None:
            print(f"first signed fan-out to {len(names)} devices: {first * 1000:.0f} ms", flush=True)
        if plain is not None:
            await fan_out(plain, names, Action.SHED)
            await fan_out(plain, names, Action.RESTORE)

        rtts: list[float] = []
        pipelined: dict[int, list[float]] = {n: [] for n in args.sizes}
        fan: dict[int, list[float]] = {n: [] for n in args.sizes}
        ratio: dict[int, list[float]] = {n: [] for n in args.sizes}
        unsigned: dict[int, list[float]] = {n: [] for n in args.sizes}
        ratio_sig: dict[int, list[float]] = {n: [] for n in args.sizes}
        alone: dict[int, list[float]] = {n: [] for n in args.sizes}  # --batches both: one message per device
        ratio_alone: dict[int, list[float]] = {n: [] for n in args.sizes}
        meter = CpuMeter(bench.pids())
        signed_kind = "signed" if op.issuer.key is not None else "unsigned"
        for round_no in range(args.rounds):
            rtts += await echo.sequential(200)
            for n in args.sizes:
                pipelined[n].append(await raw(echo, n, meter))
                if plain is not None and round_no % 2 == 0:  # alternate which goes first
                    unsigned[n].append(await fan_out(plain, names[:n], Action.SHED, meter, f"unsigned {n}"))
                    await fan_out(plain, names[:n], Action.RESTORE)
                if args.batches == "both" and round_no % 2 == 0:  # alternate which goes first
                    alone[n].append(await per_device(op, names[:n], meter, f"per-device {n}"))
                elapsed = await fan_out(op, names[:n], Action.SHED, meter, f"{signed_kind} {n}")
                await fan_out(op, names[:n], Action.RESTORE)
                if args.batches == "both" and round_no % 2 == 1:
                    alone[n].append(await per_device(op, names[:n], meter, f"per-device {n}"))
                if args.batches == "both":
                    ratio_alone[n].append(alone[n][-1] / pipelined[n][-1])
                if plain is not None and round_no % 2 == 1:
                    unsigned[n].append(await fan_out(plain, names[:n], Action.SHED, meter, f"unsigned {n}"))
                    await fan_out(plain, names[:n], Action.RESTORE)
                if plain is not None:
                    ratio_sig[n].append(elapsed / unsigned[n][-1])
                fan[n].append(elapsed)
                ratio[n].append(elapsed / pipelined[n][-1])
                also = (f"; one message per device {alone[n][-1] * 1000:.0f} ms: {ratio_alone[n][-1]:.2f}x"
                        if args.batches == "both" else "")
                print(f"  round {round_no + 1}: shed {n} {elapsed * 1000:.0f} ms, {n} raw in flight "
                      f"{pipelined[n][-1] * 1000:.0f} ms: {ratio[n][-1]:.2f}x{also}", flush=True)

        results: dict[str, object] = {"hosting": args.hosting}
        print(f"{args.rounds} rounds, devices {args.hosting}:")
        results["baseline_rtt"] = summary("one raw round trip (200 per round, one at a time)", rtts)
        for n in args.sizes:
            print(f"size {n}:")
            results[f"baseline_{n}_pipelined"] = summary(f"{n} raw round trips in flight at once", pipelined[n])
            stats = summary(f"{signed_kind} shed of {n}, every outcome back", fan[n])
            stats["ratio_to_raw_median"] = statistics.median(ratio[n])
            stats["ratio_to_raw_worst"] = max(ratio[n])
            print(f"  ratio to {n} raw round trips in flight: median {stats['ratio_to_raw_median']:.2f}x (worst "
                  f"round {stats['ratio_to_raw_worst']:.2f}x; goal <= 2x);  {statistics.median(fan[n]) / n * 1e6:.0f}"
                  " us per command", flush=True)
            results[f"fanout_{n}"] = stats
            results[f"cpu_us_per_command_{n}"] = meter.report_us(f"{signed_kind} {n}", args.rounds * n,
                                                                 f"command ({signed_kind} shed of {n})")
            results[f"cpu_us_per_raw_round_trip_{n}"] = meter.report_us(f"raw {n}", args.rounds * n,
                                                                        f"raw round trip ({n} in flight)")
            if args.batches == "both":
                results[f"fanout_{n}_per_device"] = compared(
                    f"signed shed of {n}, one message per device", alone[n], ratio_alone[n], "to_raw",
                    "one message per device: ratio to raw")
                results[f"cpu_us_per_command_{n}_per_device"] = meter.report_us(
                    f"per-device {n}", args.rounds * n, f"command (signed, one message per device, shed of {n})")
            if plain is not None:
                results[f"fanout_{n}_unsigned"] = compared(
                    f"shed {n}, unsigned (same devices)", unsigned[n], ratio_sig[n], "signed_to_unsigned",
                    "signed / unsigned:")
                results[f"cpu_us_per_command_{n}_unsigned"] = meter.report_us(
                    f"unsigned {n}", args.rounds * n, f"command (unsigned shed of {n})")
        if args.profile is not None:
            await profiled(bench, op, names[:largest], args.profile.resolve())
        print(json.dumps(results))
    finally:
        if plain is not None:
            await plain.close()
        await op.close()
        await echo.stop()
        await bench.stop()


async def profiled(bench: BenchGrid, op: GridOperator, names: list[str], out: Path) -> None:
    """One shed and restore of ``names`` under cProfile here and in the device process."""
    out.mkdir(parents=True, exist_ok=True)
    await bench.remote_profile()
    profile = cProfile.Profile()
    profile.enable()
    try:
        await fan_out(op, names, Action.SHED)
        await fan_out(op, names, Action.RESTORE)
    finally:
        profile.disable()
    profile.dump_stats(out / "operator.pstats")
    await bench.remote_profile(out / "host.pstats")
    print(f"profiles of a shed and restore of {len(names)} (2 x {len(names)} commands): {out}/operator.pstats, "
          f"{out}/host.pstats", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
