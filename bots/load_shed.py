#!/usr/bin/env python3
"""Example load-shed script, written only against gridpresence's public operator API.

It acts on presence, as [00137] describes: sheds loads that are on, largest first, skipping
critical and restricted ones, until the net load falls below a target; if shedding is not
enough it starts a generator that is off. With --price-limit it reads the billing party's
price and, above the limit, sheds every load it may ([0093]).

    python bots/load_shed.py --target-kw 400 [--price-limit 0.70] [--connection FILE] [--json]

Exit code 0 when the target is met (or a generator is starting to meet it), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from gridpresence.agents.operator import GridOperator
from gridpresence.agents.session import ConnectionInfo
from gridpresence.agents.tracker import DeviceView
from gridpresence.protocol import Action, DeviceKind, DeviceState


def net_load_kw(devices: dict[str, DeviceView]) -> float:
    """What the loads draw minus what running generators supply."""
    total = 0.0
    for view in devices.values():
        if not view.present or view.report is None:
            continue
        kw = view.report.telemetry.kw or 0.0
        if view.kind is DeviceKind.LOAD:
            total += kw
        elif view.kind is DeviceKind.GENERATOR:
            total -= kw
    return total


def sheddable(devices: dict[str, DeviceView]) -> list[DeviceView]:
    """Loads that are on and may be shed, largest first."""
    loads = [v for v in devices.values()
             if v.kind is DeviceKind.LOAD and v.present and v.report is not None
             and v.report.state is DeviceState.ON and not v.report.critical]
    return sorted(loads, key=lambda v: _kw(v), reverse=True)


def _kw(view: DeviceView) -> float:
    return (view.report.telemetry.kw or 0.0) if view.report else 0.0


async def shed_to_target(grid: GridOperator, target_kw: float, price_limit: float | None) -> dict[str, object]:
    log: list[dict[str, object]] = []
    price = None
    if price_limit is not None:
        try:
            await grid.wait_tariff(timeout=3)
        except TimeoutError:
            pass
        price = grid.price_now()
        if price is not None and price > price_limit:
            target_kw = 0.0  # too expensive: take off every load we may
    devices = dict(grid.devices)
    skipped = sorted(v.name for v in devices.values() if v.kind is DeviceKind.LOAD and v.report is not None
                     and (v.report.critical or v.report.state is DeviceState.RESTRICTED))
    net = net_load_kw(devices)
    for view in sheddable(devices):
        if net <= target_kw:
            break
        outcome = await grid.command(view.name, Action.SHED)
        log.append({"device": view.name, "action": "shed", "outcome": outcome.summary()})
        if outcome.ok:
            net -= _kw(view)
    started = None
    if net > target_kw:
        generators = sorted((v for v in grid.devices.values() if v.kind is DeviceKind.GENERATOR and v.present
                             and v.state is DeviceState.OFF),
                            key=lambda v: (v.report.telemetry.capacity_kw or 0.0) if v.report else 0.0, reverse=True)
        for gen in generators:
            outcome = await grid.command(gen.name, Action.START)
            log.append({"device": gen.name, "action": "start", "outcome": outcome.summary()})
            if outcome.ok:
                started = gen.name
                break
    return {"target_kw": target_kw, "net_kw_after": round(net, 1), "price": price, "actions": log,
            "skipped": skipped, "generator_started": started, "met": net <= target_kw or started is not None}


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-kw", type=float, required=True)
    parser.add_argument("--price-limit", type=float, default=None, help="$/kWh above which all loads are shed")
    parser.add_argument("--connection", default=".gridpresence/connection.json")
    parser.add_argument("--as", dest="operator", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    info = ConnectionInfo.load(Path(args.connection))
    async with GridOperator.from_connection(info, operator=args.operator, resource="load-shed") as grid:
        report = await shed_to_target(grid, args.target_kw, args.price_limit)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        if report["price"] is not None:
            print(f"price now: {report['price']:.2f}/kWh")
        for step in report["actions"]:  # type: ignore[union-attr]
            print(f"{step['action']} {step['device']}: {step['outcome']}")
        print(f"skipped (critical or restricted): {', '.join(report['skipped']) or 'none'}")  # type: ignore[arg-type]
        print(f"net load now {report['net_kw_after']} kW, target {report['target_kw']} kW"
              + (f"; started {report['generator_started']}" if report["generator_started"] else ""))
    return 0 if report["met"] else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
