"""``gridpresence gateway SITE.toml``: a site's Modbus and DNP3 IEDs as device identities on the grid;
``gridpresence field-sim SITE.toml``: the site's Modbus IEDs played by a real Modbus server."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from gridpresence.cli.common import EXIT_OK, CliError
from gridpresence.config import load_fleet
from gridpresence.gateway.site import Dnp3TcpLink, ModbusTcpLink, SiteError, load_site
from gridpresence.host.gateway import Gateway, GatewayError, play_site
from gridpresence.host.grid import FLEET_COPY, SECRETS_FILE
from gridpresence.host.processes import heartbeat
from gridpresence.host.signals import stop_signal, unless_stopped
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import ConnectionInfo, connection_path, data_dir


async def cmd_gateway(args: argparse.Namespace) -> int:
    stop = stop_signal()  # first, as in `up`: Ctrl-C during start-up is an orderly stop too
    try:
        site = load_site(Path(args.site))
    except SiteError as exc:
        raise CliError(str(exc)) from None
    data = data_dir(args.data, args.connection)
    info = ConnectionInfo.load(connection_path(args.connection, args.data))
    secrets_path = data / SECRETS_FILE
    if not secrets_path.exists():
        raise CliError(f"{secrets_path}: not found; the gateway logs in with the accounts `gridpresence up` made there")
    fleet = load_fleet(Path(args.fleet) if args.fleet else data / FLEET_COPY)
    try:
        gateway = Gateway(site, fleet, info.server, Secrets(secrets_path), data_dir=data)
    except GatewayError as exc:
        raise CliError(str(exc)) from None
    # --simulate: the grid plays the site's IEDs itself, as `up` does for [[sites]] simulate = true.
    sim = await play_site(site) if args.simulate else None
    try:
        await unless_stopped(gateway.start(), stop)
        if not stop.is_set():
            for name, field in gateway.ieds.items():
                status = field.status
                shown = "answering" if status.report is not None else status.problem
                print(f"  {name}@{fleet.domain}: {field.ied.link.protocol} ({field.ied.map}), {shown}")
            print(f"gateway up: {len(gateway.devices)} IEDs of {args.site}. Ctrl-C stops it.", flush=True)
            args.until_stopped = True
            beating = heartbeat()  # under `up --processes`: tells the supervisor this loop still runs
            await stop.wait()
            if beating is not None:
                beating.cancel()
        print("stopping...", flush=True)
    finally:
        await gateway.stop()  # goodbyes ("gone"), then the field links close
        if sim is not None:
            await sim.stop()
    return EXIT_OK


async def cmd_field_sim(args: argparse.Namespace) -> int:
    from gridpresence.gateway.simulator import FieldSimulator, SimulatorError

    stop = stop_signal()
    try:
        sim = FieldSimulator(load_site(Path(args.site)), ieds=args.ied or None)
        await sim.start()
    except (SiteError, SimulatorError) as exc:
        raise CliError(str(exc)) from None
    try:
        for name, ied in sim.ieds.items():
            link = ied.ied.link
            where = (f"{link.host}:{link.port}" if isinstance(link, ModbusTcpLink | Dnp3TcpLink)
                     else getattr(link, "device", "?"))
            print(f"  {name}: {link.protocol} {where} unit {getattr(link, 'unit', '?')} ({ied.ied.map})")
        print(f"field simulator up: {len(sim.ieds)} IEDs of {args.site}. Ctrl-C stops it.", flush=True)
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await sim.stop()
    return EXIT_OK


def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    p = sub.add_parser("gateway", help="host a site's Modbus/DNP3 IEDs as device identities (see README)")
    p.add_argument("site", help="site file (TOML): the IEDs, their links and point maps")
    p.add_argument("--data", default=None, help="the grid's data directory (accounts, keys; default: the "
                                                "connection file's directory)")
    p.add_argument("--connection", help="connection.json written by `up`")
    p.add_argument("--fleet", default=None, help="fleet file (default: the copy in the data directory)")
    p.add_argument("--simulate", action="store_true", help="also play the site's Modbus IEDs with the field "
                                                           "simulator (as `up` does for [[sites]] simulate = true)")
    p.set_defaults(run=cmd_gateway)
    sim = sub.add_parser("field-sim", help="play a site's Modbus IEDs with a real Modbus server (demo, tests)")
    sim.add_argument("site", help="site file (TOML): each Modbus IED is served on its link, laid out by its map")
    sim.add_argument("--ied", action="append", help="only this IED (repeatable; default: every Modbus IED)")
    sim.set_defaults(run=cmd_field_sim)
