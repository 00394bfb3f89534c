"""The sub-commands that run the grid: up, demo and bots (some of a fleet's bots apart)."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from gridpresence.cli import argtypes
from gridpresence.cli.common import DEFAULT_DATA, DEFAULT_FLEET, EXIT_FAILED_OUTCOME, EXIT_OK, CliError
from gridpresence.config import MAX_SYNTHETIC_DEVICES, Fleet, fleet_toml, load_fleet, synthetic_fleet, synthetic_fleet_data
from gridpresence.host.fleet import FleetBots
from gridpresence.host.grid import CONNECTION_FILE, FLEET_COPY, SECRETS_FILE, Grid
from gridpresence.host.processes import HUNG_AFTER_S, heartbeat
from gridpresence.host.signals import stop_signal, unless_stopped
from gridpresence.server import ServerError, ServerPorts
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import ConnectionInfo, ensure_running


def _ports(args: argparse.Namespace) -> ServerPorts | None:
    given = [args.c2s_port, args.http_port, args.https_port]
    if not any(given):
        return None
    from gridpresence.server import free_port

    return ServerPorts(c2s=args.c2s_port or free_port(args.bind), http=args.http_port or free_port(args.bind),
                       https=args.https_port or free_port(args.bind), component=free_port(args.bind))


def _say(line: str) -> None:
    """How far a long start is, for the person waiting (and a supervising `up`)."""
    print(line, flush=True)


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
    for sim, gateway in grid.sites:
        played = ("played by the field simulator (pymodbus's own Modbus server)" if sim is not None
                  else "its field simulator did NOT start (see the log): the IEDs show no answer")
        print(f"  field gateway: {', '.join(gateway.devices)}, {played}")
    apart = [n for n in grid.gateway_ieds if n not in grid.simulated_ieds]
    if apart:
        print(f"  {len(apart)} IEDs of the fleet's sites have accounts: run `gridpresence gateway SITE.toml "
              f"--data {grid.data_dir}` to bring them online")
    for child in grid.children:
        print(f"  {child.name}: process {child.pid}, supervised")
    if info.relay is not None:
        print(f"  store-and-forward relay {info.relay.jid}: SMTP {info.relay.smtp_host}:{info.relay.smtp_port}")
    if info.dashboard:
        print(f"  dashboard: {info.dashboard} (log in as an operator above; the browser must trust CA {info.server.ca_file})")
    if bots is not None and bots.historian is not None:
        print(f"  historian recording to {info.history} (export: gridpresence history DEVICE --csv)")
    print("Ctrl-C stops everything.", flush=True)


# --log-level: Prosody's level names, and the Python logging level each stands for.
LOG_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING, "error": logging.ERROR}


def _fleet_of(args: argparse.Namespace) -> Fleet:
    """The fleet file, or a synthetic fleet of --devices N (not both: which would win?)."""
    if args.devices:
        if args.fleet is not None:
            raise CliError("give --fleet FILE or --devices N, not both")
        if args.devices > C2S_ADVICE_ABOVE and args.hosting is None:
            print(f"note: {args.devices:,} devices each on a c2s session of its own log in slowly (an account, TLS "
                  "and a stream each, tens a second on a small machine); --hosting component hosts them all "
                  "on one connection (about a thousand a second)", file=sys.stderr, flush=True)
        return synthetic_fleet(args.devices, **_synthetic_shape(args))
    shaped = [f"--{k}" for k, v in vars(args).items() if k in _SHAPE and v is not None]
    if shaped:  # a fleet file says its own ratings, refresh and hosting
        raise CliError(f"{', '.join(shaped)} {'shapes' if len(shaped) == 1 else 'shape'} a synthetic fleet: give "
                       f"{'it' if len(shaped) == 1 else 'them'} with --devices N (a fleet file says its own)")
    return load_fleet(Path(args.fleet or DEFAULT_FLEET))


C2S_ADVICE_ABOVE = 1000  # synthetic devices beyond which `up` says what --hosting component is for
_SHAPE = {"seed": "seed", "refresh": "refresh_s", "hosting": "hosting"}  # option -> synthetic_fleet's keyword


def _synthetic_shape(args: argparse.Namespace) -> dict[str, Any]:
    """The options given (synthetic_fleet_data's own defaults for the others)."""
    return {kw: getattr(args, opt) for opt, kw in _SHAPE.items() if getattr(args, opt, None) is not None}


async def cmd_fleet_generate(args: argparse.Namespace) -> int:
    """`fleet generate N`: the synthetic fleet `up --devices N` runs, as a fleet file to edit."""
    text = fleet_toml(synthetic_fleet_data(args.devices, **_synthetic_shape(args)))
    if args.out is None:
        print(text, end="")
    else:
        try:
            Path(args.out).write_text(text, encoding="utf-8")
        except OSError as exc:
            raise CliError(f"{args.out}: cannot write the fleet file: {exc.strerror or exc}") from None
        print(f"wrote {args.devices} devices to {args.out}", flush=True)
    return EXIT_OK


def synthetic_opts(p: argparse.ArgumentParser, *, optional: bool) -> None:
    how: dict[str, Any] = dict(type=device_count, metavar="N")
    if optional:
        p.add_argument("--devices", default=0, help="instead of --fleet: a synthetic fleet of N devices, 1 to "
                       f"{MAX_SYNTHETIC_DEVICES:,} (substations of masters, breakers, branch meters, loads, generators)",
                       **how)
    else:
        p.add_argument("devices", help=f"how many devices (1 to {MAX_SYNTHETIC_DEVICES:,})", **how)
    # No argparse defaults: synthetic_fleet_data's are the defaults, and `up` can tell a shape
    # option given without --devices.
    p.add_argument("--seed", type=argtypes.Number(ge=0, integer=True), default=None,
                   help="the synthetic fleet's seed (ratings, utilisation; the same N and seed, the same fleet; "
                        "default 0)")
    p.add_argument("--refresh", type=argtypes.Number(ge=0.2, le=86400), default=None, metavar="S",
                   help="the synthetic devices' presence refresh interval in seconds (default 60)")
    p.add_argument("--hosting", choices=["c2s", "component"], default=None,
                   help="the synthetic devices' way to the server: c2s (an account and connection each; the "
                        "default) or component (all hosted over the server's XEP-0114 component: thousands in "
                        "one process)")


device_count = argtypes.Number(ge=1, le=MAX_SYNTHETIC_DEVICES, integer=True)


async def cmd_up(args: argparse.Namespace, scenario: Callable[[Grid], Awaitable[None]] | None = None) -> int:
    stop = stop_signal()  # first: from here on Ctrl-C is an orderly stop, never a traceback or an orphan Prosody
    if args.log_level:
        logging.getLogger().setLevel(LOG_LEVELS[args.log_level])
    fleet = _fleet_of(args)
    grid = Grid(fleet, Path(args.data), bind=args.bind, ports=_ports(args), prosody_bin=args.prosody,
                without=args.without, log_level=args.log_level or "info", processes=args.processes,
                history=args.history, dashboard_port=args.dashboard_port or 0,
                advertise=args.advertise, hung_after_s=getattr(args, "hung_after", None) or HUNG_AFTER_S,
                progress=_say)
    if getattr(args, "provision_only", False):
        try:
            grid.server.refuse_if_running_elsewhere()
        except ServerError as exc:  # a second `up` of a deployment already running: leave it be
            print(f"{exc}; nothing changed", flush=True)
            return EXIT_OK
        grid.provision()
        print(f"provisioned {grid.data_dir}: config {grid.server.config_path}, connection file {grid.connection_file}; "
              f"run the server with `gridpresence server --data {grid.data_dir}`", flush=True)
        return EXIT_OK
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

    if args.devices:
        raise CliError("the demo's scenario is written for its own fleet's devices; run a synthetic fleet with "
                       "`gridpresence up --devices N`")
    return await cmd_up(args, scenario=lambda grid: run_scenario(grid.connection, grid.fleet, grid.connection_file))


async def cmd_scenario(args: argparse.Namespace) -> int:
    """The demo's scenario against a grid already running (its server and bots elsewhere)."""
    from gridpresence.host.demo import run_scenario

    data = Path(args.data)
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(data / FLEET_COPY)
    if args.queue_for and args.queue_for not in {d.name for d in fleet.devices}:
        raise CliError(f"no device named {args.queue_for!r} in the fleet")
    await ensure_running(info.server)
    if args.queue_for:
        from gridpresence.host.demo import run_relay_step

        done = await run_relay_step(info, args.queue_for, ttl_s=args.ttl, away_timeout_s=args.timeout)
        return EXIT_OK if done else EXIT_FAILED_OUTCOME
    await run_scenario(info, fleet, data / CONNECTION_FILE)
    return EXIT_OK


async def cmd_server(args: argparse.Namespace) -> int:
    """Prosody alone, from the config `up --provision-only` rendered: exec'd, so it is the
    process a supervisor (a container's init) signals. Its health check: gridpresence.host.health."""
    config = Path(args.data) / "prosody.cfg.lua"
    if not config.exists():
        raise CliError(f"{config}: not found; provision first with `gridpresence up --provision-only --data {args.data}`")
    binary = shutil.which(args.prosody)
    if binary is None:
        raise CliError(f"the Prosody XMPP server ({args.prosody!r}) was not found; install it with "
                       "`apt-get install prosody`")
    os.execv(binary, [binary, "--config", str(config), "-F"])


async def cmd_dashboard(args: argparse.Namespace) -> int:
    """The operators' dashboard alone (a container of its own), against a grid running elsewhere:
    HTTPS with a certificate from the grid's CA, the historian's store the connection file names."""
    from gridpresence.server.certs import cert_ips, ensure_certificates
    from gridpresence.services.dashboard import Dashboard

    data = Path(args.data)
    connection_file = data / CONNECTION_FILE
    info = ConnectionInfo.load(connection_file)
    secrets_path = data / SECRETS_FILE
    if not secrets_path.exists():
        raise CliError(f"{secrets_path}: not found; provision first with `gridpresence up --provision-only --data {data}`")
    fleet = load_fleet(data / FLEET_COPY)
    secrets = Secrets(secrets_path)
    stop = stop_signal()
    certs_dir = info.server.ca_file.parent if info.server.ca_file else data / "certs"
    cert = ensure_certificates(certs_dir, fleet.domain, cert_ips(args.bind), service="dashboard",
                               hosts=[args.advertise] if args.advertise else [])
    passwords = {o.name: secrets.password(o.name) for o in fleet.operators}
    # Each login reads the connection file afresh: a relay started (or moved) later is used.
    dashboard = Dashboard(fleet, lambda: ConnectionInfo.load(connection_file), passwords, info.history,
                          (str(cert.cert), str(cert.key)), bind=args.bind, port=args.port)
    await dashboard.start()
    try:
        print(f"dashboard up: https://{args.advertise or args.bind}:{dashboard.port}/ (log in as an operator; "
              f"the browser must trust CA {cert.ca})", flush=True)
        await stop.wait()
    finally:
        await dashboard.stop()
    return EXIT_OK


async def cmd_bots(args: argparse.Namespace) -> int:
    data = Path(args.data)
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    if not args.only:
        raise CliError("name the bots to run: --only NAME...")
    stop = stop_signal()  # before the bots start, as in `up`
    fleet = load_fleet(Path(args.fleet) if args.fleet else data / FLEET_COPY)
    secrets_path = data / SECRETS_FILE
    if not secrets_path.exists():
        raise CliError(f"{secrets_path}: not found; run `gridpresence up --data {data}` first")
    # Names decide: devices and billing, or the watchdog and console services run apart too.
    bots = FleetBots(fleet, info.server, Secrets(secrets_path), only=args.only, data_dir=data)
    if not bots.bots:
        raise CliError(f"no bot named {', '.join(args.only)} in the fleet")
    try:
        await unless_stopped(bots.start(progress=_say), stop)  # under `up --processes`: read by the supervisor
        services = [b for b in ("watchdog", "console") if getattr(bots, b) is not None]
        print(f"running {', '.join(sorted(bots.devices) + sorted(bots.billing) + services)}", flush=True)
        beating = heartbeat()  # under `up --processes`: tells the supervisor this loop still runs
        await stop.wait()
        if beating is not None:
            beating.cancel()
    finally:
        await bots.stop()  # closes the devices' replay guard too
    return EXIT_OK


def server_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fleet", default=None, help=f"fleet file (TOML; default {DEFAULT_FLEET.name})")
    synthetic_opts(p, optional=True)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="data directory (config, accounts, logs)")
    p.add_argument("--bind", default="127.0.0.1", help="address the server listens on")
    p.add_argument("--c2s-port", type=int, help="XMPP client port (default: free or as last time)")
    p.add_argument("--http-port", type=int, help="HTTP (BOSH) port")
    p.add_argument("--https-port", type=int, help="HTTPS (BOSH) port")
    p.add_argument("--prosody", default="prosody", help="Prosody executable")
    p.add_argument("--advertise", help="the name other machines reach the server at, when not --bind (a "
                                       "container's service name): written into the connection file")
    p.add_argument("--without", nargs="+", default=[], metavar="NAME",
                   help="devices whose accounts are made but whose bots are held back (run them apart "
                        "with `gridpresence bots --only NAME`)")
    p.add_argument("--processes", action="store_true",
                   help="run the devices, the services and the relay as separate supervised processes "
                        "(one hung or crashed process does not stop the others)")
    p.add_argument("--hung-after", type=argtypes.positive, metavar="SECONDS",
                   help=f"with --processes: a process whose heartbeat stopped this long is hung, and is "
                        f"killed and started again (default {HUNG_AFTER_S:g})")
    p.add_argument("--dashboard-port", type=int, help="HTTPS port of the operators' dashboard (default: a free one)")
    p.add_argument("--history", metavar="URL",
                   help="the historian's store: postgresql://… or a SQLite file (default: DATA/history.sqlite)")
    p.add_argument("--log-level", choices=list(LOG_LEVELS),
                   help="log level of gridpresence and of Prosody (DATA/prosody.log); default: "
                        "-v for ours, info for Prosody's")


def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    up = sub.add_parser("up", help="start the embedded server and the fleet's bots")
    server_opts(up)
    up.add_argument("--provision-only", action="store_true",
                    help="render the server's config, make accounts, keys and the connection file, then exit "
                         "(the server and bots run apart: `gridpresence server`, `bots`, `relay`)")
    up.set_defaults(run=cmd_up)
    demo = sub.add_parser("demo", help="up, then play the load-shed scenario")
    server_opts(demo)
    demo.add_argument("--once", action="store_true", help="stop after the scenario")
    demo.set_defaults(run=cmd_demo)

    bots = sub.add_parser("bots", help="run some of a fleet's bots against a running grid")
    bots.add_argument("--fleet", default=None, help="fleet file (default: the copy in --data)")
    bots.add_argument("--data", default=str(DEFAULT_DATA))
    bots.add_argument("--only", nargs="+", metavar="NAME", help="devices, billing parties, watchdog, console")
    bots.set_defaults(run=cmd_bots)

    fleet = sub.add_parser("fleet", help="fleet files: `fleet generate N` writes a synthetic fleet")
    fleet_sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="WHAT")
    generate = fleet_sub.add_parser("generate", help="a synthetic fleet of N devices as a fleet file (TOML)")
    synthetic_opts(generate, optional=False)
    generate.add_argument("--out", help="file to write (default: standard output)")
    generate.set_defaults(run=cmd_fleet_generate)

    server = sub.add_parser("server", help="run the XMPP server alone from the config `up --provision-only` rendered")
    server.add_argument("--data", default=str(DEFAULT_DATA))
    server.add_argument("--prosody", default="prosody", help="Prosody executable")
    server.set_defaults(run=cmd_server)

    dash = sub.add_parser("dashboard", help="run the operators' web dashboard alone against a running grid")
    dash.add_argument("--data", default=str(DEFAULT_DATA))
    dash.add_argument("--bind", default="127.0.0.1", help="address the dashboard listens on")
    dash.add_argument("--port", type=argtypes.port, default=8443, help="its HTTPS port")
    dash.add_argument("--advertise", help="a further name the dashboard is reached at (its certificate names it)")
    dash.set_defaults(run=cmd_dashboard)

    scenario = sub.add_parser("scenario", help="play the demo's scenario against a running grid")
    scenario.add_argument("--data", default=str(DEFAULT_DATA))
    scenario.add_argument("--queue-for", metavar="DEVICE",
                          help="play only the relay step: once DEVICE has no presence (its container stopped), "
                               "queue a command at the relay and wait for the device's outcome when it is back")
    scenario.add_argument("--ttl", type=argtypes.positive, default=300.0, help="that command's expiry, in seconds")
    scenario.add_argument("--timeout", type=argtypes.positive, default=120.0,
                          help="seconds to wait for DEVICE to go away")
    scenario.set_defaults(run=cmd_scenario)
