"""``gridpresence rules replay TRACE.csv [--rules FILE] [--adjust MODE] [--fleet FILE] [--json]``;
``gridpresence rules audit [--data DIR] [--device NAME] [--json]`` (the threshold changes devices
recorded); ``gridpresence rules revert DEVICE CHANGE`` (undo one on the running device)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gridpresence.cli import argtypes
from gridpresence.cli.common import EXIT_ERROR, EXIT_FAILED_OUTCOME, EXIT_OK, operator_opts, with_operator
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import data_dir
from gridpresence.config import BillingSpec, FleetError, load_fleet
from gridpresence.rules.model import AdjustMode, RuleSetError, comparison_text, default_rules, load_rules
from gridpresence.rules.audit_log import read_audit
from gridpresence.rules.replay import PriorityOptions, TraceError, read_trace, replay
from gridpresence.rules.thresholds import Change
from gridpresence.words import replay_kind_line




def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    rules = sub.add_parser("rules", help="rule-based fault detection: replay a trace, audit and revert thresholds")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="RULES_COMMAND")
    rp = rsub.add_parser("replay", help="the alarms a rule set raises over a recorded trace, and its threshold changes")
    rp.add_argument("trace", help="CSV: timestamp, device, state, load_pct, output_kw, fuel_pct, temperature_c, "
                                  "breaker[, kind, mode, command, verdict]")
    rp.add_argument("--rules", default=None, help="rule set (TOML; default: the built-in alarm rules)")
    rp.add_argument("--adjust", choices=[m.value for m in AdjustMode], default=None,
                    help="threshold and settling-time adjustment for every rule (default: each rule's own, "
                         "hybrid: proposals for an operator, who never answers in a replay; auto applies them)")
    rp.add_argument("--fleet", default=None, help="fleet file: rank alarms by cost per day at its billing party's "
                                                   "tariff, fold faults under a faulty branch (its parents)")
    rp.add_argument("--high-cost", type=argtypes.non_negative, default=50.0,
                    help="cost per day from which an alarm is sent at once rather than batched (default 50)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(run=cmd_rules_replay)
    au = rsub.add_parser("audit", help="the threshold changes devices recorded: who, when, old, new, why")
    au.add_argument("--data", default=None,
                    help="the grid's data directory (default: the one holding the connection file)")
    au.add_argument("--connection", default=None, help="connection.json written by `up` (finds the data directory)")
    au.add_argument("--device", default=None, help="one device's changes only")
    au.add_argument("--json", action="store_true", help="machine-readable output")
    au.set_defaults(run=cmd_rules_audit)
    rv = rsub.add_parser("revert", help="undo a threshold change on a running device (the revert is audited)")
    operator_opts(rv)
    rv.add_argument("device", metavar="DEVICE")
    rv.add_argument("change", type=argtypes.index, metavar="CHANGE", help="the change's number (rules audit)")
    rv.set_defaults(run=cmd_rules_revert)


async def cmd_rules_replay(args: argparse.Namespace) -> int:
    try:
        priority, kinds = None, None
        if args.fleet:
            fleet = load_fleet(Path(args.fleet))
            tariff = (fleet.billing[0] if fleet.billing else BillingSpec(name="billing")).tariff()
            priority = PriorityOptions(tariff, args.high_cost, {d.name: d.parent for d in fleet.devices},
                                       {d.name: d.rated_kw for d in fleet.devices})
            kinds = {d.name: d.kind for d in fleet.devices}
        rules = load_rules(Path(args.rules)) if args.rules else default_rules(fleet.alarms if args.fleet else None)
        result = replay(read_trace(Path(args.trace)), rules, AdjustMode(args.adjust) if args.adjust else None,
                        priority, kinds)
    except (RuleSetError, TraceError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK
    for device, (kind, how) in result.kinds.items():
        print(replay_kind_line(device, kind.value, how))
    for a in result.alarms:
        verdict = f" [{a['verdict']}]" if a["verdict"] else ""
        ranked = ""
        if "cost_per_day" in a:
            folded = f", folded into {a['folded_into']}" if a["folded_into"] else ""
            ranked = f"  cost/day {a['cost_per_day']:.2f}, {a['sent']}{folded}"
        print(f"{a['at']}  {a['device']}: {a['rule']} ({a['level']}) {comparison_text(a['value'], a['op'], a['threshold'])}{verdict}{ranked}")
    for c in result.changes:
        print(change_line(c))
    for p in result.proposals:
        print(f"proposal {p.id}: {p.device} {p.rule}.{p.param} {p.current:g} -> {p.proposed:g} ({p.mode.value}): {p.why}")
    print(f"{result.samples} samples, {len(result.alarms)} alarms, {len(result.changes)} threshold changes, "
          f"{len(result.proposals)} proposals pending")
    if result.note:
        print(f"note: {result.note}")
    return EXIT_OK


def change_line(c: Change) -> str:
    return f"{c.at.isoformat()}  change {c.id}: {c.device} {c.rule}.{c.param} {c.old:g} -> {c.new:g} by {c.by}: {c.why}"


async def cmd_rules_audit(args: argparse.Namespace) -> int:
    from gridpresence.host.grid import FLEET_COPY

    # "No changes" is an answer only about a grid: a mistyped --data or --device must not read as one.
    data = data_dir(args.data, args.connection)
    if not (data / FLEET_COPY).is_file():
        print(f"error: {data}: not a grid data directory (no {FLEET_COPY}); give the --data DIR of "
              "`gridpresence up`", file=sys.stderr)
        return EXIT_ERROR
    if args.device is not None:
        try:
            load_fleet(data / FLEET_COPY).device(args.device)
        except FleetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except KeyError:
            print(f"error: no device named {args.device!r} in the fleet of {data}", file=sys.stderr)
            return EXIT_ERROR
    changes = read_audit(data, args.device)
    if args.json:
        print(json.dumps([c.as_dict() for c in changes], indent=2))
    elif not changes:
        print("no threshold changes recorded")
    for c in [] if args.json else changes:
        print(change_line(c))
    return EXIT_OK


async def cmd_rules_revert(args: argparse.Namespace) -> int:
    """Ask the device itself (it is the audit's only writer), as its operator would over chat:
    signed (OX), since a revert changes a threshold and unsigned chat may only look."""
    from gridpresence.security.ox import OxRefused

    async def body(grid: GridOperator) -> int:
        try:
            reply = await grid.ask(args.device, f"revert {args.change}", signed=True)
        except OxRefused as exc:
            print(f"error: cannot send a signed chat line to {args.device}: {exc}", file=sys.stderr)
            return EXIT_ERROR
        except TimeoutError:
            print(f"error: {args.device} did not answer", file=sys.stderr)
            return EXIT_ERROR
        done = f"revert of change {args.change}" in reply
        print(json.dumps({"device": args.device, "change": args.change, "reverted": done, "reply": reply})
              if args.json else reply)
        return EXIT_OK if done else EXIT_FAILED_OUTCOME

    return await with_operator(args, body)
