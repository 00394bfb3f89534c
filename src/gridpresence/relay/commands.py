"""Command-line entry points of the relay: ``gridpresence relay``, ``mail-device`` and ``alert``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gridpresence import argtypes
from gridpresence.accounts import RELAY, Secrets
from gridpresence.agents.reports import ReportAudience
from gridpresence.agents.session import (
    ConnectionInfo,
    RelayEndpoint,
    SessionError,
    connection_path,
    data_dir,
    ensure_running,
)
from gridpresence.config import FleetError, load_fleet
from gridpresence.relay.mail_device import MailDevice
from gridpresence.relay.service import RelayService, relay_files, relay_port
from gridpresence.relay.commissioning import commission, readers_keys
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.keys import load_secret
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.signals import stop_signal

CONNECTION_FILE, SECRETS_FILE, FLEET_COPY = "connection.json", "secrets.json", "fleet.json"


def publish_relay(connection_file: Path, relay: RelayEndpoint) -> None:
    """Add the relay to a grid's connection file, so operators route through it."""
    data = json.loads(connection_file.read_text(encoding="utf-8"))
    data["relay"] = relay.model_dump(mode="json")
    tmp = connection_file.with_suffix(".relay.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, connection_file)


async def cmd_relay(args: argparse.Namespace) -> int:
    data = Path(args.data)
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(data / FLEET_COPY)
    secrets = Secrets(data / SECRETS_FILE)
    if RELAY not in secrets.passwords:
        raise SessionError(f"{data}: no relay account; run `gridpresence up --data {data}` once with this version")
    queue_path = Path(args.queue) if args.queue else relay_files(data)[0]
    port = relay_port(data, args.bind, args.smtp_port)
    # The grid's CA issues the relay's STARTTLS certificate (kept beside it).
    certs_dir = Path(args.certs) if args.certs else (info.server.ca_file.parent if info.server.ca_file else data / "certs")
    relay = RelayService(fleet, info.server, secrets.password(RELAY), queue_path, certs_dir=certs_dir,
                         smtp_host=args.bind, smtp_port=port, durable=args.durable,
                         keys=PartyKeys.in_data_dir(data, RELAY))
    stop = stop_signal()  # before start: a SIGTERM during start-up still stops cleanly
    await relay.start()
    try:
        publish_relay(data / CONNECTION_FILE, RelayEndpoint(jid=relay.jid, smtp_host=args.bind, smtp_port=relay.smtp_port,
                                                            ca_file=relay.certs.ca))
        counts = relay.queue.counts()
        print(f"relay up: SMTP {args.bind}:{relay.smtp_port}, XMPP {relay.jid}, queue {queue_path} "
              f"({counts.get('queued', 0)} queued)", flush=True)
        await stop.wait()
    finally:
        await relay.stop()
    return 0


async def cmd_mail_device(args: argparse.Namespace) -> int:
    info = ConnectionInfo.load(connection_path(args.connection, args.data))
    if info.relay is None:
        raise SessionError("the connection file names no relay; start one with `gridpresence relay`")
    data = data_dir(args.data, args.connection)
    fleet = load_fleet(Path(args.fleet) if args.fleet else data / FLEET_COPY)
    try:
        spec = fleet.device(args.name)
    except KeyError:
        raise FleetError(f"no device named {args.name!r} in the fleet") from None
    keys = PartyKeys.in_data_dir(data, spec.name)
    audience = ReportAudience.of(fleet, spec)
    if args.commission:
        secrets = Secrets(data / SECRETS_FILE)
        if spec.name not in secrets.passwords:
            raise SessionError(f"{data}: no account for {spec.name}; run `gridpresence up --data {data}` first")
        await ensure_running(info.server)
        found = await commission(spec.name, fleet.jid(spec.name), secrets.password(spec.name), info.server, keys,
                                 audience.everyone)
        print(f"{spec.name}: key announced over PEP; readers' keys kept: {', '.join(sorted(found)) or 'none'}",
              flush=True)
        return 0
    assert keys.secret_file is not None
    device = MailDevice(spec, fleet.jid(spec.name), info.relay, secret=load_secret(keys.secret_file),
                        keyring=readers_keys(keys, spec.name) if args.billing else None, audience=audience)
    try:
        for _ in range(args.count) if args.count else iter(int, 1):
            try:
                if args.billing:
                    sealed = await device.push_billing_report()
                    print(f"{spec.name}: mailed {sealed.summary()}", flush=True)
                else:
                    report = await device.push_report()
                    print(f"{spec.name}: mailed {report.status_text()}", flush=True)
            except (smtplib.SMTPException, OSError, KeyUnavailable) as exc:
                print(f"{spec.name}: relay refused or unreachable: {exc}", flush=True)
                return 1
            if args.count != 1:
                await asyncio.sleep(args.every or spec.refresh_s)
    finally:
        device.close()
    return 0


def register(sub: Any, operator_opts: Callable[[argparse.ArgumentParser], None], default_data: str) -> None:
    relay = sub.add_parser("relay", help="run the email store-and-forward relay for a running grid")
    relay.add_argument("--data", default=default_data, help="the grid's data directory (written by `up`)")
    relay.add_argument("--bind", default="127.0.0.1", help="address the SMTP server listens on")
    relay.add_argument("--smtp-port", type=argtypes.port, help="SMTP port (default: as last time, or a free one)")
    relay.add_argument("--queue", help="queue database (default DATA/relay/queue.sqlite3)")
    relay.add_argument("--durable", action="store_true", help="fsync every stored mail (survives power loss)")
    relay.add_argument("--certs", help="the grid's CA directory, where the relay's STARTTLS certificate is issued "
                                       "(default: that of the CA file in the connection file)")
    relay.set_defaults(run=cmd_relay)

    mail = sub.add_parser("mail-device", help="run a device that reaches the grid by SMTP only")
    mail.add_argument("name", help="the device's name in the fleet")
    mail.add_argument("--data", default=None,
                      help="the grid's data directory (default: the one holding the connection file)")
    mail.add_argument("--connection", help="connection.json (default DATA/connection.json, else "
                                           "$GRIDPRESENCE_CONNECTION, else .gridpresence/connection.json)")
    mail.add_argument("--fleet", help="fleet file (default: the copy in DATA)")
    mail.add_argument("--count", type=argtypes.count, default=0, help="reports to send (0 = until stopped)")
    mail.add_argument("--every", type=argtypes.non_negative, default=0.0, help="seconds between reports (default: refresh_s)")
    mail.add_argument("--commission", action="store_true",
                      help="once, where XMPP is reachable: announce the device's key over PEP and keep its "
                           "readers' keys for billing reports")
    mail.add_argument("--billing", action="store_true",
                      help="mail encrypted billing reports (meters, master IEDs) instead of presence data")
    mail.set_defaults(run=cmd_mail_device, until_stopped=True)  # with --count 0
