"""``gridpresence rules replay TRACE.csv [--rules FILE] [--adjust MODE] [--fleet FILE] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gridpresence.agents.billing import tariff_from_spec
from gridpresence.config import BillingSpec, FleetError, load_fleet
from gridpresence.rules.model import AdjustMode, RuleSetError, default_rules, load_rules
from gridpresence.rules.replay import PriorityOptions, TraceError, read_trace, replay

EXIT_OK, EXIT_ERROR = 0, 2


def add_rules_commands(sub: Any) -> None:  # argparse's subparsers action has no public type
    rules = sub.add_parser("rules", help="rule-based fault detection: replay a trace through a rule set")
    rsub = rules.add_subparsers(dest="rules_command", required=True, metavar="RULES_COMMAND")
    rp = rsub.add_parser("replay", help="the alarms a rule set raises over a recorded trace, and its threshold changes")
    rp.add_argument("trace", help="CSV: timestamp, device, state, load_pct, output_kw, fuel_pct, temperature_c, "
                                  "breaker[, verdict]")
    rp.add_argument("--rules", default=None, help="rule set (TOML; default: the built-in alarm rules)")
    rp.add_argument("--adjust", choices=[m.value for m in AdjustMode], default=None,
                    help="threshold adjustment mode for every adjustable rule (default: each rule's own; "
                         "confirm/hybrid leave proposals for an operator)")
    rp.add_argument("--fleet", default=None, help="fleet file: rank alarms by cost per day at its billing party's "
                                                   "tariff, fold faults under a faulty branch (its parents)")
    rp.add_argument("--high-cost", type=float, default=50.0,
                    help="cost per day from which an alarm is sent at once rather than batched (default 50)")
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(run=cmd_rules_replay)


async def cmd_rules_replay(args: argparse.Namespace) -> int:
    try:
        priority = None
        if args.fleet:
            fleet = load_fleet(Path(args.fleet))
            tariff = tariff_from_spec(fleet.billing[0] if fleet.billing else BillingSpec(name="billing"))
            priority = PriorityOptions(tariff, args.high_cost, {d.name: d.parent for d in fleet.devices},
                                       {d.name: d.rated_kw for d in fleet.devices})
        rules = load_rules(Path(args.rules)) if args.rules else default_rules(fleet.alarms if args.fleet else None)
        result = replay(read_trace(Path(args.trace)), rules, AdjustMode(args.adjust) if args.adjust else None,
                        priority)
    except (RuleSetError, TraceError, FleetError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK
    for a in result.alarms:
        verdict = f" [{a['verdict']}]" if a["verdict"] else ""
        ranked = ""
        if "cost_per_day" in a:
            folded = f", folded into {a['folded_into']}" if a["folded_into"] else ""
            ranked = f"  cost/day {a['cost_per_day']:.2f}, {a['sent']}{folded}"
        print(f"{a['at']}  {a['device']}: {a['rule']} ({a['level']}) {a['value']} >< {a['threshold']}{verdict}{ranked}")
    for c in result.changes:
        print(f"{c.at.isoformat()}  change {c.id}: {c.device} {c.rule}.{c.param} {c.old:g} -> {c.new:g} "
              f"by {c.by}: {c.why}")
    for p in result.proposals:
        print(f"proposal {p.id}: {p.device} {p.rule}.{p.param} {p.current:g} -> {p.proposed:g} ({p.mode.value}): {p.why}")
    print(f"{result.samples} samples, {len(result.alarms)} alarms, {len(result.changes)} threshold changes, "
          f"{len(result.proposals)} proposals pending")
    return EXIT_OK
