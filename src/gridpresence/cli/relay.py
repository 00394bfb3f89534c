"""Command-line entry points of the relay: ``gridpresence relay``, ``mail-device`` and ``alert``."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import smtplib
import socket
import sys
from pathlib import Path
from typing import Any

from gridpresence.host.processes import heartbeat
from gridpresence.cli import argtypes
from gridpresence.cli.common import DEFAULT_DATA
from gridpresence.server.accounts import RELAY, Secrets
from gridpresence.security.reports import ReportAudience
from gridpresence.xmpp.session import (
    ConnectionInfo,
    RelayEndpoint,
    SessionError,
    connection_path,
    data_dir,
    ensure_running,
)
from gridpresence.config import FleetError, load_fleet
from gridpresence.services.relay.mail_device import MAIL_DEVICES_DIR, MailDevice
from gridpresence.services.relay.service import RelayService, relay_files, relay_port
from gridpresence.services.relay.commissioning import commission, readers_keys, readers_path
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.keys import load_secret
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.transport.mail import smtp_reply
from gridpresence.host.signals import stop_signal

CONNECTION_FILE, SECRETS_FILE, FLEET_COPY = "connection.json", "secrets.json", "fleet.json"


def publish_relay(connection_file: Path, relay: RelayEndpoint | None, *,
                  only_if: RelayEndpoint | None = None) -> None:
    """Name `relay` in a grid's connection file (None: no relay), so operators route through it;
    with `only_if`, only while the file still names that one (another may have taken over)."""
    data = json.loads(connection_file.read_text(encoding="utf-8"))
    if only_if is not None and data.get("relay") != only_if.model_dump(mode="json"):
        return
    if relay is None:
        data.pop("relay", None)
    else:
        data["relay"] = relay.model_dump(mode="json")
    tmp = connection_file.with_suffix(".relay.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2)
    os.replace(tmp, connection_file)


def answering(relay: RelayEndpoint, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the relay's SMTP port (the relay is running)."""
    try:
        with socket.create_connection((relay.smtp_host, relay.smtp_port), timeout=timeout):
            return True
    except OSError:
        return False


async def cmd_relay(args: argparse.Namespace) -> int:
    data = Path(args.data)
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    # One relay per grid: a second one would take over the connection file's entry, and when it
    # stopped, operators and mail-only devices would be sent to a port nobody listens on.
    if info.relay is not None and answering(info.relay):
        raise SessionError(f"a relay is already running for {data} (SMTP {info.relay.smtp_host}:{info.relay.smtp_port}, "
                           "started by `gridpresence up` or another `gridpresence relay`); stop it first")
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
                         keys=PartyKeys.in_data_dir(data, RELAY), advertise=args.advertise)
    stop = stop_signal()  # before start: a SIGTERM during start-up still stops cleanly
    await relay.start()
    mine = RelayEndpoint(jid=relay.jid, smtp_host=args.advertise or args.bind, smtp_port=relay.smtp_port,
                         ca_file=relay.certs.ca)
    try:
        publish_relay(data / CONNECTION_FILE, mine)
        counts = relay.queue.counts()
        print(f"relay up: SMTP {args.bind}:{relay.smtp_port}, XMPP {relay.jid}, queue {queue_path} "
              f"({counts.get('queued', 0)} queued)", flush=True)
        beating = heartbeat()  # under `up --processes`: tells the supervisor this loop still runs
        await stop.wait()
        if beating is not None:
            beating.cancel()
    finally:
        await relay.stop()
        publish_relay(data / CONNECTION_FILE, info.relay, only_if=mine)  # the entry as it was before us
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
    audience = fleet.report_audience(spec)
    if args.commission:
        await ensure_running(info.server)
        found = await _commission(data, spec.name, fleet.jid(spec.name), info, keys, audience)
        print(f"{spec.name}: key announced over PEP; readers' keys kept: {', '.join(sorted(found)) or 'none'}",
              flush=True)
        return 0
    if not readers_path(keys, spec.name).exists():
        # Not commissioned yet: the relay could not check its signatures (451). Where the XMPP
        # server is reachable (as when following the README), do it now, once.
        try:
            found = await _commission(data, spec.name, fleet.jid(spec.name), info, keys, audience, timeout=10.0)
            print(f"{spec.name}: commissioned (key announced over PEP; readers' keys kept: "
                  f"{', '.join(sorted(found)) or 'none'})", flush=True)
        except (SessionError, KeyUnavailable, OSError, TimeoutError) as exc:
            print(f"{spec.name}: not commissioned, and the XMPP server is not reachable to do it now ({exc}); "
                  f"if the relay answers 451, run `gridpresence mail-device {spec.name} --commission` where it is",
                  file=sys.stderr, flush=True)
    assert keys.secret_file is not None
    device = MailDevice(spec, fleet.jid(spec.name), info.relay, secret=load_secret(keys.secret_file),
                        keyring=readers_keys(keys, spec.name) if args.billing else None, audience=audience,
                        state_file=data / MAIL_DEVICES_DIR / f"{spec.name}.json")
    try:
        for _ in range(args.count) if args.count else iter(int, 1):
            try:
                if args.billing:
                    sealed = await device.push_billing_report()
                    print(f"{spec.name}: mailed {sealed.summary()}", flush=True)
                else:
                    report = await device.push_report()
                    print(f"{spec.name}: mailed {report.status_text()}", flush=True)
            except smtplib.SMTPResponseException as exc:
                hint = (f" (the relay cannot find {spec.name}'s key over PEP: run `gridpresence mail-device "
                        f"{spec.name} --commission` where the XMPP server is reachable)"
                        if exc.smtp_code == 451 and "4.7.1" in smtp_reply(exc) else "")
                print(f"{spec.name}: relay refused: {exc.smtp_code} {smtp_reply(exc)}{hint}", flush=True)
                return 1
            except (smtplib.SMTPException, OSError, KeyUnavailable) as exc:
                print(f"{spec.name}: relay refused or unreachable: {exc}", flush=True)
                return 1
            if args.count != 1:
                await asyncio.sleep(args.every or spec.refresh_s)
    finally:
        device.close()
    return 0


async def _commission(data: Path, name: str, jid: str, info: ConnectionInfo, keys: PartyKeys,
                      audience: ReportAudience, timeout: float = 20.0) -> dict[str, str]:
    secrets = Secrets(data / SECRETS_FILE)
    if name not in secrets.passwords:
        raise SessionError(f"{data}: no account for {name}; run `gridpresence up --data {data}` first")
    return await commission(name, jid, secrets.password(name), info.server, keys, audience.everyone, timeout)


def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    relay = sub.add_parser("relay", help="run the email store-and-forward relay for a running grid")
    relay.add_argument("--data", default=str(DEFAULT_DATA), help="the grid's data directory (written by `up`)")
    relay.add_argument("--bind", default="127.0.0.1", help="address the SMTP server listens on")
    relay.add_argument("--advertise", help="the name other machines reach the relay at, written into the connection "
                                           "file (default: --bind; a container's service name)")
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
