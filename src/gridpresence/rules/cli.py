"""``gridpresence rules replay TRACE.csv [--rules FILE] [--adjust MODE] [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from gridpresence.rules.model import AdjustMode, RuleSetError, default_rules, load_rules
from gridpresence.rules.replay import TraceError, read_trace, replay

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
    rp.add_argument("--json", action="store_true", help="machine-readable output")
    rp.set_defaults(run=cmd_rules_replay)


async def cmd_rules_replay(args: argparse.Namespace) -> int:
    try:
        rules = load_rules(Path(args.rules)) if args.rules else default_rules()
        result = replay(read_trace(Path(args.trace)), rules, AdjustMode(args.adjust) if args.adjust else None)
    except (RuleSetError, TraceError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
        return EXIT_OK
    for a in result.alarms:
        verdict = f" [{a['verdict']}]" if a["verdict"] else ""
        print(f"{a['at']}  {a['device']}: {a['rule']} ({a['level']}) {a['value']} >< {a['threshold']}{verdict}")
    for c in result.changes:
        print(f"{c.at.isoformat()}  change {c.id}: {c.device} {c.rule}.{c.param} {c.old:g} -> {c.new:g} "
              f"by {c.by}: {c.why}")
    for p in result.proposals:
        print(f"proposal {p.id}: {p.device} {p.rule}.{p.param} {p.current:g} -> {p.proposed:g} ({p.mode.value}): {p.why}")
    print(f"{result.samples} samples, {len(result.alarms)} alarms, {len(result.changes)} threshold changes, "
          f"{len(result.proposals)} proposals pending")
    return EXIT_OK
