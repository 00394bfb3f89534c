"""The operator's sub-commands: status, watch, alarms, ack, judge, quality, the device actions
(shed, restore, start, stop, open, close, read, set-time) and alert."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
from collections.abc import Callable
from typing import Any

from gridpresence.cli import argtypes
from gridpresence.cli.common import (
    COMMAND_ACTIONS,
    EXIT_FAILED_OUTCOME,
    EXIT_OK,
    CliError,
    operator_opts,
    outcome_dict,
    with_operator,
)
from gridpresence.operator.library import FAN_OUT_BATCH, GridOperator
from gridpresence.protocol.codec import BATCH_COMMANDS_MAX
from gridpresence.operator.selection import FILTER_SYNTAX, DeviceFilter, FleetSummary
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol.models import METERING_KINDS, Action, HealthStatus, OutcomeStatus
from gridpresence.words import PROGRESS_FROM, outcome_line, progress_line, status_rows, summary_line, table


# How long a filtered command waits for devices not heard from yet before leaving them out.
UNTOLD_WAIT_S = 5.0
UNTOLD_NAMES_SHOWN = 5


def _filter(args: argparse.Namespace) -> DeviceFilter:
    return DeviceFilter.parse(getattr(args, "filter", None) or ())


async def _chosen(chosen: DeviceFilter, grid: GridOperator) -> tuple[list[DeviceView], list[str]]:
    """The devices `chosen` selects, by name, and the names of those it cannot tell yet.

    A filter asks about state or criticality; a device that has not reported yet has neither,
    so it waits (bounded) for those that may still report, and says on stderr which it left out: a shed of
    ``critical=no`` loads must not take a silent critical load, nor act on a partial view
    without saying so."""
    views, untold = chosen.split(grid.devices.values())
    if untold:
        # Only those that may yet report: a device gone before its first report will not now.
        waiting = {v.jid for v in untold if v.present or v.health is HealthStatus.UNKNOWN}
        views_now = grid.tracker.views
        deadline = asyncio.get_running_loop().time() + UNTOLD_WAIT_S
        # Polled, not per change: at fleet size a check of every waiting view per presence would be quadratic.
        while waiting and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
            waiting = {j for j in waiting if j in views_now and chosen.verdict(views_now[j]) is None}
        views, untold = chosen.split(grid.devices.values())
    names = sorted(v.name for v in untold)
    if names:
        shown = ", ".join(names[:UNTOLD_NAMES_SHOWN]) + (", …" if len(names) > UNTOLD_NAMES_SHOWN else "")
        print(f"note: {len(names)} device{'s have' if len(names) != 1 else ' has'} not reported yet, so the filter "
              f"{chosen} cannot tell {'them' if len(names) != 1 else 'it'}: not selected ({shown})",
              file=sys.stderr, flush=True)
    return sorted(views, key=lambda v: v.name), names


async def cmd_status(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
        chosen = _filter(args)
        views, untold = await _chosen(chosen, grid)
        summary = FleetSummary.of(views)
        tariff = grid.tariff
        if args.json:
            tail = {"summary": summary.as_dict(), "filter": str(chosen) or None, "not_reported": len(untold),
                    "price_per_kwh": grid.price_now(), "currency": tariff.currency if tariff else None,
                    "supplier": tariff.supplier if tariff else None}
            if args.summary:
                print(json.dumps(tail), flush=True)
                return EXIT_OK
            # Streamed: one device a line as it is rendered (a reader may go line by line), and
            # the whole output still one JSON document (json.load of it works as before).
            out = sys.stdout
            out.write('{"devices": [')
            for i, view in enumerate(views):
                out.write(("\n" if not i else ",\n") + json.dumps(view.as_dict()))
            out.write("\n], " + json.dumps(tail)[1:] + "\n")
            out.flush()
        else:
            if not args.summary:
                print(table(status_rows({v.name: v for v in views})))
                print()
            print(summary_line(summary.total, summary.present, summary.by_kind, summary.by_state)
                  + (f" (filter: {chosen})" if chosen else ""))
            if tariff and not args.summary:  # --summary is that one line, for a script or a glance
                print(f"price now: {grid.price_now():.2f} {tariff.currency}/kWh ({tariff.supplier})")
        return EXIT_OK

    return await with_operator(args, body)


def _watch_line(view: DeviceView, as_json: bool) -> str:
    """What `watch` shows of a device, without the time a text line starts with (nor the JSON
    line's cause): a presence whose line would be the same as the last one shown is not news."""
    if as_json:
        return json.dumps(view.as_dict())
    detail = view.health_reason if view.label in ("presence-error", "gone") else (
        view.report.status_text() if view.report else "")
    return f"{view.name:<14} {view.label:<15} {detail}"


async def cmd_watch(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
        chosen = _filter(args)
        # What is true now comes first, then each change: the table, or one JSON line per
        # device with "cause": "snapshot" (a script knows the watch is live once it has them).
        now = sorted(chosen.select(grid.devices.values()), key=lambda v: v.name)
        if args.json:
            for view in now:
                print(json.dumps({"cause": "snapshot", **view.as_dict()}))
            sys.stdout.flush()
        else:
            print(table(status_rows({v.name: v for v in now})), flush=True)
            print("-- watching; Ctrl-C to stop --", flush=True)
        # The last line shown of each device: its periodic refresh, saying what it said, is no
        # change to a person (the tracker still takes it: it is what keeps the device fresh).
        shown = {view.name: _watch_line(view, args.json) for view in now}
        count = 0
        async for change in grid.changes():
            cur = change.current
            # A device leaving the filter (load on -> off with state=on) is a change to show too,
            # and so is one entering it, whether or not its line changed.
            crossed = False
            if chosen:
                was, is_now = chosen.matches(change.previous), chosen.matches(cur)
                if not (was or is_now):
                    continue
                crossed = was != is_now
            line = _watch_line(cur, args.json)
            if not crossed and shown.get(cur.name) == line:
                continue
            shown[cur.name] = line
            if args.json:  # the line shown, with the cause first (as json.dumps of both writes it)
                print(f'{{"cause": {json.dumps(change.cause)}, {line[1:]}', flush=True)
            else:
                print(f"{dt.datetime.now():%H:%M:%S} {line}", flush=True)
            count += 1
            if args.count and count >= args.count:
                break
        return EXIT_OK

    return await with_operator(args, body)


async def cmd_alarms(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
        if not args.json:
            print(f"-- alarms to {grid.jid} as they arrive; Ctrl-C to stop --", flush=True)
        count = 0
        async for alarm in grid.new_alarms():
            if args.json:
                print(alarm.model_dump_json(exclude_none=True), flush=True)
            else:
                print(f"{alarm.raised:%H:%M:%S} {alarm.level.value.upper():<7} {alarm.device} alarm {alarm.id} "
                      f"{alarm.status.value}: {alarm.text}", flush=True)
            count += 1
            if args.count and count >= args.count:
                break
        return EXIT_OK

    return await with_operator(args, body)


async def cmd_quality(args: argparse.Namespace) -> int:
    """Ask meters / master IEDs for a billing report now and print the power-quality part, the
    one an operator can decrypt ([0085]); the billing part is not ours to read."""
    async def body(grid: GridOperator) -> int:
        if grid.reports is None:
            raise CliError("this operator has no OpenPGP key file in the connection file; cannot read reports")
        for name in args.devices:  # unknown names and devices that meter nothing fail first
            view = grid.device(name)
            if view.kind not in METERING_KINDS:
                raise CliError(f"{name} is a {view.kind.value if view.kind else 'device'}: "
                               "only meters and master IEDs send billing reports")
        for name in args.devices:
            grid.request_report(name)
        failed = 0
        for name in args.devices:
            try:
                q = await grid.wait_quality(name, since=started, timeout=args.timeout)
            except TimeoutError:
                print(f"{name}: no billing report within {args.timeout:g} s", flush=True)
                failed += 1
                continue
            if args.json:
                print(q.model_dump_json(), flush=True)
            else:
                print(f"{name}: {q.voltage_v:.1f} V ({q.voltage_min_v:.1f}-{q.voltage_max_v:.1f}), "
                      f"{q.frequency_hz:.3f} Hz, PF {q.power_factor:.3f}, THD {q.thd_pct:.1f} %, "
                      f"load {q.load_pct:.1f} %, {q.sags} sags since {q.period_start:%H:%M:%S} UTC", flush=True)
        return EXIT_FAILED_OUTCOME if failed else EXIT_OK

    started = dt.datetime.now(dt.timezone.utc)
    return await with_operator(args, body)


def _progress(action: str) -> Callable[[int, int], None]:
    """A long fan-out's progress on stderr (stdout stays the outcomes, --json or not)."""
    def say(done: int, total: int) -> None:
        line = progress_line(action, done, total)
        if line is not None:
            print(line, file=sys.stderr, flush=True)
    return say


async def _targets(args: argparse.Namespace, grid: GridOperator) -> list[str]:
    """The named devices, then those the filter selects (each once, names first)."""
    names = list(dict.fromkeys(args.devices))
    for name in names:
        grid.device(name)  # unknown names fail before anything is sent
    chosen = _filter(args)
    if chosen:
        named = set(names)
        views, _ = await _chosen(chosen, grid)
        names += [v.name for v in views if v.name not in named]
    if not names:
        raise CliError(f"no device matches the filter {chosen}" if chosen else "name the devices, or give --filter")
    return names


async def cmd_action(args: argparse.Namespace) -> int:
    action = Action(args.action.replace("-", "_"))
    extra = {"time": args.time} if action is Action.SET_TIME else None
    if not args.devices and not args.filter:
        raise CliError(f"name the devices to {args.action}, or select them with --filter KEY=VALUE")

    async def body(grid: GridOperator) -> int:
        names = await _targets(args, grid)
        progress = _progress(args.action)
        if args.until_available:
            from gridpresence.operator.availability import command_group

            outcomes = await command_group(grid, names, action, args=extra, timeout_s=args.until_available)
        else:
            outcomes = await grid.command_many(names, action, args=extra, ttl_s=args.ttl, wait_final=args.wait,
                                               progress=progress)
        if args.json:
            print(json.dumps([outcome_dict(n, o) for n, o in outcomes.items()], indent=2))
        else:
            for name, outcome in outcomes.items():
                print(outcome_line(name, outcome, readings=action is Action.READ))
        # "queued" is not a failure: the relay holds the command (use --wait for the final outcome).
        fine = (OutcomeStatus.EXECUTED, OutcomeStatus.QUEUED)
        return EXIT_OK if all(o.status in fine for o in outcomes.values()) else EXIT_FAILED_OUTCOME

    return await with_operator(args, body)


async def cmd_alert(args: argparse.Namespace) -> int:
    from gridpresence.operator.availability import wait_available

    async def body(grid: GridOperator) -> int:
        try:
            view = await wait_available(grid, args.device, timeout=args.timeout)
        except TimeoutError:
            print(f"{args.device}: not available within {args.timeout:g} s ({grid.device(args.device).label})")
            return EXIT_FAILED_OUTCOME
        print(f"{view.name}: available ({view.report.status_text() if view.report else view.label})", flush=True)
        return EXIT_OK

    return await with_operator(args, body)


async def cmd_alarm_reply(args: argparse.Namespace) -> int:
    """`ack` and `judge`: the chat lines an operator answers an alarm with (`ack ID`,
    `not a fault ID`, `fault ID`), sent signed (OX chat) when this operator has a key, so they
    pass wherever a device asks a signature for them."""
    if args.command == "ack":
        line, done_prefix = f"ack {args.alarm}" if args.alarm else "ack", "Acknowledged:"
    else:
        line, done_prefix = f"{'fault' if args.verdict == 'fault' else 'not a fault'} {args.alarm}", "Recorded:"

    async def body(grid: GridOperator) -> int:
        grid.device(args.device)  # an unknown name fails before anything is sent
        reply = await grid.ask(args.device, line, timeout=args.timeout, signed=grid.keyring.secret_key is not None)
        done = reply.startswith(done_prefix)
        print(json.dumps({"device": args.device, "alarm": args.alarm, "done": done, "reply": reply})
              if args.json else f"{args.device}: {reply}", flush=True)
        return EXIT_OK if done else EXIT_FAILED_OUTCOME

    try:
        return await with_operator(args, body)
    except TimeoutError:
        raise CliError(f"{args.device} did not answer within {args.timeout:g} s") from None


async def cmd_pending(args: argparse.Namespace) -> int:
    """The commands this operator sent from a process that ended before their outcome came:
    their outcomes now (waited for until each expires, or taken meanwhile by another session of
    the operator and kept for this), and those another live process of the same operator still
    waits for. An outcome shown is no longer kept."""

    async def body(grid: GridOperator) -> int:
        others = [e for e in grid.issuer.store.entries() if e.command_id not in grid.inherited]
        done = await grid.inherited_outcomes()
        if args.json:
            print(json.dumps({"outcomes": [{**outcome_dict(name, o), "action": e.action} for name, e, o in done],
                              "awaited_elsewhere": [{"command_id": e.command_id, "device": e.device,
                                                     "action": e.action, "pid": e.pid} for e in others]}, indent=2))
        else:
            if not done and not others:
                print("no command of yours is waiting for an outcome")
            for name, entry, outcome in done:
                print(f"{entry.action} {outcome_line(name, outcome)}")
            for entry in others:
                print(f"{entry.command_id} {entry.action} {entry.device}: still awaited by process {entry.pid}")
        sys.stdout.flush()  # written (a closed pipe raises here): only then forgotten
        grid.shown(done)
        return EXIT_OK

    return await with_operator(args, body)


def filter_opt(p: argparse.ArgumentParser, *, names: bool = False) -> None:
    """--filter; ``names``: the command also takes DEVICE names, which must come before it."""
    where = ". It takes every word after it: device names go before --filter" if names else ""
    p.add_argument("--filter", nargs="+", type=argtypes.filter_term, default=[], metavar="KEY=VALUE",
                   help="only devices matching every key (values of a key, comma-separated, are alternatives): "
                        + FILTER_SYNTAX + where)


def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    status = sub.add_parser("status", help="every device's state and telemetry, and a summary line")
    operator_opts(status)
    filter_opt(status)
    status.add_argument("--summary", action="store_true",
                        help="only the summary line (counts by kind and state); with --json, one object of the "
                             "summary, filter and price, without the devices")
    status.epilog = ("--json is streamed: `{\"devices\": [`, then one device object a line (each but the last "
                     "followed by a comma), then the summary, filter and price; one JSON document in all "
                     "(with --summary: one line, no devices). "
                     "`watch --json` is JSON Lines (one object a line).")
    status.set_defaults(run=cmd_status)
    watch = sub.add_parser("watch", help="show presence changes live (a device's line when what it shows changed)")
    operator_opts(watch)
    filter_opt(watch)
    watch.add_argument("--count", type=argtypes.count, default=0,
                       help="stop after this many lines of changes (default 0: until Ctrl-C)")
    watch.epilog = ("A device's presence that shows nothing new (its periodic refresh, same state and readings) "
                    "prints no line; one entering or leaving --filter always does.")
    watch.set_defaults(run=cmd_watch, until_stopped=True)
    alarms = sub.add_parser("alarms", help="show alarms sent to this operator as they arrive (acknowledge: `ack`)")
    operator_opts(alarms)
    alarms.add_argument("--count", type=argtypes.count, default=0,
                        help="stop after this many alarms (default 0: until Ctrl-C)")
    alarms.set_defaults(run=cmd_alarms, until_stopped=True)
    ack = sub.add_parser("ack", help="acknowledge a device's alarm (all its open alarms without an ID)")
    operator_opts(ack)
    ack.add_argument("device", metavar="DEVICE")
    ack.add_argument("alarm", nargs="?", default=None, metavar="ID", help="the alarm's id (as `alarms` shows it)")
    ack.add_argument("--timeout", type=argtypes.positive, default=10.0, help="seconds to wait for the device's answer")
    ack.set_defaults(run=cmd_alarm_reply)
    judge = sub.add_parser("judge", help="judge a device's alarm a fault or not a fault (its thresholds learn)")
    operator_opts(judge)
    judge.add_argument("device", metavar="DEVICE")
    judge.add_argument("alarm", metavar="ID", help="the alarm's id (as `alarms` shows it)")
    judge.add_argument("verdict", choices=("fault", "not-a-fault"))
    judge.add_argument("--timeout", type=argtypes.positive, default=10.0, help="seconds to wait for the device's answer")
    judge.set_defaults(run=cmd_alarm_reply)
    quality = sub.add_parser("quality", help="ask meters for a billing report and show its power-quality part")
    operator_opts(quality)
    quality.add_argument("devices", nargs="+", help="meters or master IEDs, by name")
    quality.add_argument("--timeout", type=argtypes.positive, default=10.0, help="seconds to wait for each report")
    quality.set_defaults(run=cmd_quality)
    for action in (*COMMAND_ACTIONS, "set-time"):
        p = sub.add_parser(action, help=f"{action} one or more devices and print the outcomes",
                           description=f"{action} devices named and/or chosen by --filter (both: every device "
                           "named plus every one the filter matches), signed, and print each one's outcome. "
                           f"A fan-out sends devices hosted on a component in batches of up to {BATCH_COMMANDS_MAX} "
                           f"under one signature (XEP-0033 multicast), others {FAN_OUT_BATCH} signed commands at a "
                           f"time; from {PROGRESS_FROM} devices "
                           f"it reports `{action}: N/M outcomes back` on stderr at each tenth (stdout stays the "
                           "outcomes).")
        operator_opts(p)
        p.add_argument("devices", nargs="*", metavar="DEVICE", help="devices by name (none: those --filter matches)")
        filter_opt(p, names=True)
        p.add_argument("--ttl", type=argtypes.positive, default=30.0, help="seconds before the command expires")
        p.add_argument("--wait", action="store_true",
                       help="for a device without presence, wait for the relay's final outcome instead of 'queued'")
        p.add_argument("--until-available", type=argtypes.non_negative, default=0.0, metavar="S",
                       help="retry members that are absent or restricted until they are available, for up to S seconds")
        if action == "set-time":
            p.add_argument("--time", default=None, help="ISO 8601 time with zone (default: now)")
        p.set_defaults(run=cmd_action, action=action)
    pending = sub.add_parser("pending", help="the outcomes of commands an earlier, ended process of yours sent "
                                             "(waits until each expires)")
    operator_opts(pending)
    pending.set_defaults(run=cmd_pending)
    alert = sub.add_parser("alert", help="wait until a device is available, then print it")
    operator_opts(alert)
    alert.add_argument("device", metavar="DEVICE")
    alert.add_argument("--timeout", type=argtypes.positive, default=3600.0, help="give up after this many seconds (exit 1)")
    alert.set_defaults(run=cmd_alert)
