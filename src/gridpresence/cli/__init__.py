"""``gridpresence``: run the grid network on the embedded server and operate it.

    gridpresence up [--fleet FILE] [--data DIR] [--without NAME...] [--log-level L]
                                                      server + accounts + bots, until Ctrl-C
    gridpresence demo [--once]                        up, then a narrated load-shed scenario
    gridpresence status [--json]                      every device's state and telemetry
    gridpresence watch [--json]                       presence changes, live
    gridpresence shed|restore|start|stop|open|close|read DEVICE... [--json]
    gridpresence set-time DEVICE... [--time ISO]
    gridpresence bots --data DIR --only NAME...       run some bots apart (e.g. to kill one)
    gridpresence relay --data DIR                     the email store-and-forward relay alone
    gridpresence mail-device NAME --data DIR          a device that reaches the grid by SMTP only
    gridpresence alert DEVICE [--timeout S]           wait until a device is available
    gridpresence ack DEVICE [ID]                      acknowledge an alarm (all open ones without ID)
    gridpresence judge DEVICE ID fault|not-a-fault    a verdict on an alarm (thresholds learn from it)
    gridpresence rules replay TRACE.csv [--json]      alarms and threshold changes of a rule set over a trace

Every command finds ``connection.json`` (written by ``up``) the same way
(:func:`gridpresence.xmpp.session.connection_path`): --connection, else DATA/connection.json
for a command given --data, else $GRIDPRESENCE_CONNECTION, else .gridpresence/connection.json.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from gridpresence.cli import argtypes
from gridpresence.server.accounts import Secrets
from gridpresence.host.fleet import FleetBots
from gridpresence.protocol.models import METERING_KINDS
from gridpresence.operator.library import GridOperator, UnknownDevice
from gridpresence.xmpp.session import ConnectionInfo, SessionError, connection_path
from gridpresence.operator.tracker import DeviceChange, DeviceView
from gridpresence.config import FleetError, load_fleet
from gridpresence.host.grid import CONNECTION_FILE, FLEET_COPY, SECRETS_FILE, Grid
from gridpresence.protocol.models import Action, Outcome, OutcomeStatus, PresenceReport
from gridpresence.cli import relay as relay_commands
from gridpresence.cli.rules import add_rules_commands
from gridpresence.rules.model import RuleSetError
from gridpresence.cli import keys as keys_commands
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.ox import OxRefused
from gridpresence.security.keys import KeyFileError
from gridpresence.server import ServerError, ServerPorts
from gridpresence.host.signals import stop_signal, unless_stopped

DEFAULT_DATA = Path(".gridpresence")
DEFAULT_FLEET = Path(__file__).resolve().parents[2] / "bots" / "demo-fleet.toml"
COMMAND_ACTIONS = ("shed", "restore", "start", "stop", "open", "close", "read")

EXIT_OK, EXIT_FAILED_OUTCOME, EXIT_ERROR = 0, 1, 2


class CliError(Exception):
    """An error for the person at the terminal: printed without a traceback, exit code 2."""


# -- output ------------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


def status_rows(devices: Mapping[str, DeviceView]) -> list[list[str]]:
    return status_rows_of([v.as_dict() for v in devices.values()])


def status_rows_of(devices: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The status table, from the devices' JSON form (`DeviceView.as_dict`) alone: the JSON
    output then carries everything the table shows."""
    rows = [["DEVICE", "KIND", "STATE", "TRANSPORT", "LOAD", "KW", "DETAIL"]]
    for d in sorted(devices, key=lambda d: d["name"]):
        t = d["telemetry"]
        detail = []
        if d["health_reason"] and d["state"] in ("presence-error", "unknown", "gone"):
            detail.append(d["health_reason"])
        elif d["restriction"]:
            detail.append(d["restriction"]["text"])
        if "fuel_pct" in t:
            detail.append(f"fuel {t['fuel_pct']:.0f}%")
        if "temperature_c" in t:
            detail.append(f"{t['temperature_c']:.0f}°C")
        if "breaker" in t:
            detail.append(f"breaker {t['breaker']}")
        if "energy_kwh" in t:
            detail.append(f"{t['energy_kwh']:.2f} kWh")
        if d["critical"]:
            detail.append("critical")
        rows.append([d["name"], d["kind"] or "?", d["state"], d["transport"] or "-", _fmt(t.get("load_pct"), "%"),
                     _fmt(t.get("kw")), ", ".join(detail)])
    return rows


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def outcome_dict(name: str, outcome: Outcome) -> dict[str, Any]:
    data = outcome.model_dump(mode="json", exclude_none=True)
    data["name"] = name
    return data


# Telemetry as a person reads it: field -> (label, unit, decimals); a field not named here
# still shows, under its own name.
READINGS: dict[str, tuple[str, str, int]] = {
    "load_pct": ("load", "%", 1), "kw": ("", " kW", 1), "capacity_kw": ("capacity", " kW", 1),
    "fuel_pct": ("fuel", "%", 0), "temperature_c": ("", " °C", 1), "energy_kwh": ("", " kWh", 2),
    "breaker": ("breaker", "", 0),
}


def readings_text(report: PresenceReport) -> str:
    """Every value of a report, e.g. "on, load 70.9%, 85.1 kW, capacity 120.0 kW, critical"."""
    parts = [report.status_text() if report.restriction else report.state.value]
    for field, value in report.telemetry.model_dump(mode="json", exclude_none=True).items():
        label, unit, decimals = READINGS.get(field, (field, "", 2))
        shown = f"{value:.{decimals}f}" if isinstance(value, float) else str(value)
        parts.append(f"{label} {shown}{unit}".strip())
    if report.critical:
        parts.append("critical")
    return ", ".join(parts)


def outcome_line(name: str, outcome: Outcome, readings: bool = False) -> str:
    """One outcome for a person; `readings`: show every value the device sent (for `read`)."""
    state = ""
    if outcome.report and outcome.ok:
        state = f" -> {readings_text(outcome.report) if readings else outcome.report.status_text()}"
    return f"{name}: {outcome.summary()}{state}"


# -- operator commands ---------------------------------------------------------------------


async def _with_operator(args: argparse.Namespace, body: Callable[[GridOperator], Awaitable[int]]) -> int:
    info = ConnectionInfo.load(connection_path(args.connection))
    grid = GridOperator.from_connection(info, operator=args.operator)
    await grid.connect(settle_s=args.settle)
    try:
        return await body(grid)
    finally:
        await grid.close()


async def cmd_status(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
        devices = dict(grid.devices)
        if args.json:
            tariff = grid.tariff
            print(json.dumps({"devices": [devices[n].as_dict() for n in sorted(devices)],
                              "price_per_kwh": grid.price_now(),
                              "currency": tariff.currency if tariff else None,
                              "supplier": tariff.supplier if tariff else None}, indent=2))
        else:
            print(table(status_rows(devices)))
            if grid.tariff:
                print(f"\nprice now: {grid.price_now():.2f} {grid.tariff.currency}/kWh ({grid.tariff.supplier})")
        return EXIT_OK

    return await _with_operator(args, body)


def _change_text(change: DeviceChange) -> str:
    cur = change.current
    detail = cur.health_reason if cur.label in ("presence-error", "gone") else (
        cur.report.status_text() if cur.report else "")
    return f"{dt.datetime.now():%H:%M:%S} {cur.name:<14} {cur.label:<15} {detail}"


async def cmd_watch(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
        if not args.json:
            print(table(status_rows(dict(grid.devices))), flush=True)
            print("-- watching; Ctrl-C to stop --", flush=True)
        count = 0
        async for change in grid.changes():
            if args.json:
                print(json.dumps({"cause": change.cause, **change.current.as_dict()}), flush=True)
            else:
                print(_change_text(change), flush=True)
            count += 1
            if args.count and count >= args.count:
                break
        return EXIT_OK

    return await _with_operator(args, body)


async def cmd_alarms(args: argparse.Namespace) -> int:
    async def body(grid: GridOperator) -> int:
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

    return await _with_operator(args, body)


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
    return await _with_operator(args, body)


async def cmd_action(args: argparse.Namespace) -> int:
    action = Action(args.action.replace("-", "_"))
    extra = {"time": args.time} if action is Action.SET_TIME else None

    async def body(grid: GridOperator) -> int:
        for name in args.devices:
            grid.device(name)  # unknown names fail before anything is sent
        if args.until_available:
            from gridpresence.operator.availability import command_group

            outcomes = await command_group(grid, args.devices, action, args=extra, timeout_s=args.until_available)
        else:
            outcomes = await grid.command_many(args.devices, action, args=extra, ttl_s=args.ttl, wait_final=args.wait)
        if args.json:
            print(json.dumps([outcome_dict(n, o) for n, o in outcomes.items()], indent=2))
        else:
            for name, outcome in outcomes.items():
                print(outcome_line(name, outcome, readings=action is Action.READ))
        # "queued" is not a failure: the relay holds the command (use --wait for the final outcome).
        fine = (OutcomeStatus.EXECUTED, OutcomeStatus.QUEUED)
        return EXIT_OK if all(o.status in fine for o in outcomes.values()) else EXIT_FAILED_OUTCOME

    return await _with_operator(args, body)


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

    return await _with_operator(args, body)


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
        return await _with_operator(args, body)
    except TimeoutError:
        raise CliError(f"{args.device} did not answer within {args.timeout:g} s") from None


# -- server commands -----------------------------------------------------------------------


def _ports(args: argparse.Namespace) -> ServerPorts | None:
    given = [args.c2s_port, args.http_port, args.https_port]
    if not any(given):
        return None
    from gridpresence.server import free_port

    return ServerPorts(c2s=args.c2s_port or free_port(args.bind), http=args.http_port or free_port(args.bind),
                       https=args.https_port or free_port(args.bind), component=free_port(args.bind))


def _print_welcome(grid: Grid) -> None:
    info = grid.connection
    print(f"grid is up: XMPP server {info.server.host}:{info.server.c2s_port} (domain {info.server.domain}, TLS, "
          f"CA {info.server.ca_file})")
    if info.server.bosh_url:
        print(f"BOSH (for clients behind web-only firewalls): {info.server.bosh_url}")
    print(f"connection file: {grid.connection_file}")
    for acc in info.operators:
        print(f"  operator login: {acc.jid}  password: {acc.password}")
    bots = grid.bots
    if bots:
        print(f"  {len(bots.devices)} device bots, {len(bots.billing)} billing, watchdog {info.watchdog}")
        if bots.console is not None:
            print(f"  chat with the fleet console: {bots.console.grid.jid} (type help); devices answer chat too")
    if info.relay is not None:
        print(f"  store-and-forward relay {info.relay.jid}: SMTP {info.relay.smtp_host}:{info.relay.smtp_port}")
    print("Ctrl-C stops everything.", flush=True)


# --log-level: Prosody's level names, and the Python logging level each stands for.
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


async def cmd_up(args: argparse.Namespace, scenario: Callable[[Grid], Awaitable[None]] | None = None) -> int:
    stop = stop_signal()  # first: from here on Ctrl-C is an orderly stop, never a traceback or an orphan Prosody
    if args.log_level:
        logging.getLogger().setLevel(LOG_LEVELS[args.log_level])
    fleet = load_fleet(Path(args.fleet))
    grid = Grid(fleet, Path(args.data), bind=args.bind, ports=_ports(args), prosody_bin=args.prosody,
                without=args.without, log_level=args.log_level or "info")
    try:
        await unless_stopped(grid.start(), stop)
        if not stop.is_set():
            _print_welcome(grid)
            if scenario is not None:
                await unless_stopped(scenario(grid), stop)
            if not getattr(args, "once", False):
                await stop.wait()
        print("stopping...", flush=True)
    finally:
        await grid.stop()  # also after a failed or interrupted start: whatever came up goes down
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace) -> int:
    from gridpresence.host.demo import run_scenario

    return await cmd_up(args, scenario=run_scenario)


async def cmd_bots(args: argparse.Namespace) -> int:
    stop = stop_signal()  # first, as in `up`
    data = Path(args.data)
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(Path(args.fleet) if args.fleet else data / FLEET_COPY)
    secrets_path = data / SECRETS_FILE
    if not secrets_path.exists():
        raise CliError(f"{secrets_path}: not found; run `gridpresence up --data {data}` first")
    bots = FleetBots(fleet, info.server, Secrets(secrets_path), only=args.only, with_services=False, data_dir=data)
    if not bots.bots:
        raise CliError(f"no bot named {', '.join(args.only)} in the fleet")
    try:
        await unless_stopped(bots.start(), stop)
        print(f"running {', '.join(sorted(bots.devices) + sorted(bots.billing))}", flush=True)
        await stop.wait()
    finally:
        await bots.stop()  # closes the devices' replay guard too
    return EXIT_OK


# -- argument parsing ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gridpresence", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv for debug)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def server_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--fleet", default=str(DEFAULT_FLEET), help="fleet file (TOML)")
        p.add_argument("--data", default=str(DEFAULT_DATA), help="data directory (config, accounts, logs)")
        p.add_argument("--bind", default="127.0.0.1", help="address the server listens on")
        p.add_argument("--c2s-port", type=int, help="XMPP client port (default: free or as last time)")
        p.add_argument("--http-port", type=int, help="HTTP (BOSH) port")
        p.add_argument("--https-port", type=int, help="HTTPS (BOSH) port")
        p.add_argument("--prosody", default="prosody", help="Prosody executable")
        p.add_argument("--without", nargs="+", default=[], metavar="NAME",
                       help="devices whose accounts are made but whose bots are held back (run them apart "
                            "with `gridpresence bots --only NAME`)")
        p.add_argument("--log-level", choices=list(LOG_LEVELS),
                       help="log level of gridpresence and of Prosody (DATA/prosody.log); default: "
                            "-v for ours, info for Prosody's")

    up = sub.add_parser("up", help="start the embedded server and the fleet's bots")
    server_opts(up)
    up.set_defaults(run=cmd_up)
    demo = sub.add_parser("demo", help="up, then play the load-shed scenario")
    server_opts(demo)
    demo.add_argument("--once", action="store_true", help="stop after the scenario")
    demo.set_defaults(run=cmd_demo)

    bots = sub.add_parser("bots", help="run some of a fleet's bots against a running grid")
    bots.add_argument("--fleet", default=None, help="fleet file (default: the copy in --data)")
    bots.add_argument("--data", default=str(DEFAULT_DATA))
    bots.add_argument("--only", nargs="+", required=True, metavar="NAME")
    bots.set_defaults(run=cmd_bots)

    def operator_opts(p: argparse.ArgumentParser) -> None:
        p.add_argument("--connection", help="connection.json written by `up`")
        p.add_argument("--as", dest="operator", help="operator name (default: the first)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.add_argument("--settle", type=argtypes.non_negative, default=1.0, help="seconds to wait for presence on connect")

    status = sub.add_parser("status", help="every device's state and telemetry")
    operator_opts(status)
    status.set_defaults(run=cmd_status)
    watch = sub.add_parser("watch", help="show presence changes live")
    operator_opts(watch)
    watch.add_argument("--count", type=argtypes.count, default=0, help="stop after this many changes")
    watch.set_defaults(run=cmd_watch, until_stopped=True)
    alarms = sub.add_parser("alarms", help="show alarms sent to this operator as they arrive (acknowledge: `ack`)")
    operator_opts(alarms)
    alarms.add_argument("--count", type=argtypes.count, default=0, help="stop after this many alarms")
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
        p = sub.add_parser(action, help=f"{action} one or more devices and print the outcomes")
        operator_opts(p)
        p.add_argument("devices", nargs="+", metavar="DEVICE")
        p.add_argument("--ttl", type=argtypes.positive, default=30.0, help="seconds before the command expires")
        p.add_argument("--wait", action="store_true",
                       help="for a device without presence, wait for the relay's final outcome instead of 'queued'")
        p.add_argument("--until-available", type=argtypes.non_negative, default=0.0, metavar="S",
                       help="retry members that are absent or restricted until they are available, for up to S seconds")
        if action == "set-time":
            p.add_argument("--time", default=None, help="ISO 8601 time with zone (default: now)")
        p.set_defaults(run=cmd_action, action=action)
    alert = sub.add_parser("alert", help="wait until a device is available, then print it")
    operator_opts(alert)
    alert.add_argument("device", metavar="DEVICE")
    alert.add_argument("--timeout", type=argtypes.positive, default=3600.0, help="give up after this many seconds (exit 1)")
    alert.set_defaults(run=cmd_alert)
    relay_commands.register(sub, operator_opts, str(DEFAULT_DATA))
    add_rules_commands(sub, operator_opts, _with_operator)
    keys_commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)]
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if getattr(args, "action", None) == "set-time" and not args.time:
        args.time = dt.datetime.now(dt.timezone.utc).isoformat()
    try:
        return asyncio.run(args.run(args))
    except (CliError, FleetError, KeyFileError, KeyUnavailable, OxRefused, RuleSetError, ServerError, SessionError,
            UnknownDevice) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        # Ending a command that runs until stopped (watch, alarms) is what Ctrl-C is for.
        return EXIT_OK if getattr(args, "until_stopped", False) else EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`status | head`): as the Python docs advise for SIGPIPE, point
        # stdout at devnull so the flush at exit cannot fail again, and leave quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED_OUTCOME


if __name__ == "__main__":
    sys.exit(main())
