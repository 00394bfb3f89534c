#!/usr/bin/env python3
"""Example load-shed script, written only against gridpresence's public operator API.

It acts on presence, as [00137] describes: sheds loads that are on, largest first, skipping
critical and restricted ones, until the net load falls below a target; if shedding is not
enough it starts a generator that is off. With --price-limit it reads the billing party's
price and, above the limit, aims at a net load of 0 kW ([0093]): it sheds until the grid
supplies nothing at that price, not past that point.

    python bots/load_shed.py --target-kw 400 [--price-limit 0.70] [--connection FILE] [--json]

Exit code 0 when the target is met (or a generator is starting to meet it), 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from gridpresence.cli import argtypes
from gridpresence.operator.library import GridOperator, UnknownDevice
from gridpresence.xmpp.session import ConnectionInfo, SessionError, connection_path
from gridpresence.operator.shedding import shed_to_target
from gridpresence.words import progress_line


def _progress(done: int, total: int) -> None:
    """A long round's fan-out: `shed: N/M outcomes back` on stderr (as `gridpresence shed` says it)."""
    line = progress_line("shed", done, total)
    if line is not None:
        print(line, file=sys.stderr, flush=True)


async def run(args: argparse.Namespace) -> int:
    info = ConnectionInfo.load(connection_path(args.connection))
    async with GridOperator.from_connection(info, operator=args.operator, resource="load-shed") as grid:
        report = await shed_to_target(grid, args.target_kw, args.price_limit, progress=_progress)
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-kw", type=argtypes.non_negative, required=True)
    parser.add_argument("--price-limit", type=argtypes.non_negative, default=None,
                        help="price per kWh above which all loads are shed")
    parser.add_argument("--connection", default=None, help="connection.json written by `gridpresence up` (default: "
                                                           "$GRIDPRESENCE_CONNECTION, else .gridpresence/connection.json)")
    parser.add_argument("--as", dest="operator", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        return asyncio.run(run(args))
    except (SessionError, UnknownDevice) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
