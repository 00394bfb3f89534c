"""``gridpresence keys``: every party's key and who pinned what; ``keys repin`` accepts a rotated key."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from slixmpp import JID
from slixmpp.jid import InvalidJID

from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import (
    ConnectionInfo,
    SessionError,
    close_session,
    connection_path,
    data_dir,
    ensure_running,
    make_client,
    open_session,
)
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.keys import KEYS_DIR, KeyFileError, fingerprint, jid_of, load_secret
from gridpresence.security.pep_keyring import PINS_DIR, PartyKeys, PepKeyring
from gridpresence.security.pins import PinStore
from gridpresence.cli.common import EXIT_ERROR, EXIT_OK
from gridpresence.words import table

SECRETS_FILE = "secrets.json"  # as written by `gridpresence up`


class KeysError(Exception):
    """Bad input for a keys command: printed as one line, no traceback."""


def register(sub: Any) -> None:  # argparse's subparsers action has no public type
    keys = sub.add_parser("keys", help="every party's OpenPGP key, who pinned what, and changed keys")
    keys.add_argument("--data", default=None,
                      help="the grid's data directory (default: the one holding the connection file)")
    keys.add_argument("--connection", default=None, help="connection.json written by `up` (finds the data directory)")
    keys.add_argument("--json", action="store_true", help="machine-readable output")
    keys.set_defaults(run=cmd_keys)
    actions = keys.add_subparsers(dest="keys_action", metavar="ACTION")
    repin = actions.add_parser("repin", help="accept the key a party announces now (a deliberate key rotation)")
    repin.add_argument("--data", dest="repin_data", default=None, help="the grid's data directory")
    repin.add_argument("--connection", dest="repin_connection", default=None, help="connection.json written by `up`")
    repin.add_argument("--as", dest="party", required=True, metavar="NAME", help="whose pin to change")
    repin.add_argument("jid", metavar="JID", help="the party whose new key to accept")
    repin.set_defaults(run=cmd_repin)


def _parties(data: Path) -> dict[str, dict[str, str | None]]:
    out: dict[str, dict[str, str | None]] = {}
    for path in sorted((data / KEYS_DIR).glob("*.sec.asc")):
        name = path.name.removesuffix(".sec.asc")
        try:
            key = load_secret(path)
            out[name] = {"jid": jid_of(key), "fingerprint": fingerprint(key)}
        except KeyFileError as exc:
            out[name] = {"jid": None, "fingerprint": None, "error": str(exc)}
    return out


def _pin_files(data: Path) -> dict[str, Path]:
    """Pins of each party: the bots' in DATA/pins/, operators' beside their key files."""
    files = {p.stem: p for p in (data / PINS_DIR).glob("*.json") if not p.name.endswith(".changes.json")}
    files.update({p.name.removesuffix(".pins.json"): p for p in (data / KEYS_DIR).glob("*.pins.json")})
    return dict(sorted(files.items()))


def key_report(data: Path) -> dict[str, Any]:
    if not (data / KEYS_DIR).is_dir():
        raise KeysError(f"{data}: no {KEYS_DIR}/ directory; is this a grid's data directory (`gridpresence up`)?")
    pins, changes = {}, {}
    for name, path in _pin_files(data).items():
        try:
            store = PinStore(path)
        except ValueError as exc:
            raise KeysError(f"{path}: not a pins file: {exc}") from None
        pins[name] = {jid: store.pinned(jid) for jid in store.jids()}
        if store.changes:
            changes[name] = {jid: {"pinned": store.pinned(jid), "offered": offered}
                             for jid, offered in store.changes.items()}
    return {"parties": _parties(data), "pins": pins, "changes": changes}


async def cmd_keys(args: argparse.Namespace) -> int:
    try:
        report = key_report(data_dir(args.data, args.connection))
    except KeysError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    if args.json:
        print(json.dumps(report, indent=1))
        return EXIT_OK
    rows = [["PARTY", "JID", "FINGERPRINT"]]
    rows += [[n, p["jid"] or "-", p["fingerprint"] or f"unreadable: {p.get('error')}"] for n, p in report["parties"].items()]
    print(table(rows))
    pinned = [["PINNED BY", "JID", "FINGERPRINT", "STATUS"]]
    for name, pins in report["pins"].items():
        for jid, fpr in sorted(pins.items()):
            offered = report["changes"].get(name, {}).get(jid)
            status = (f"CHANGED: now offered {offered['offered']}, refused "
                      f"(accept: gridpresence keys repin --as {name} {jid})") if offered else "ok"
            pinned.append([name, jid, fpr, status])
    print()
    print(table(pinned) if len(pinned) > 1 else "no pins yet")
    return EXIT_OK


def _party(data: Path, name: str) -> tuple[str, str, PartyKeys, ConnectionInfo]:
    """(jid, password, key and pins files, connection) of a party of the grid in ``data``."""
    info = ConnectionInfo.load(connection_path(data=data))
    for acc in info.operators:
        if name in (acc.name, acc.jid):
            return acc.jid, acc.password, PartyKeys.beside(acc.key_file, acc.name), info
    secrets = Secrets(data / SECRETS_FILE)
    if name not in secrets.passwords:
        raise KeysError(f"no party named {name!r} in {data}")
    return f"{name}@{info.server.domain}", secrets.passwords[name], PartyKeys.in_data_dir(data, name), info


async def cmd_repin(args: argparse.Namespace) -> int:
    data = data_dir(args.repin_data or args.data, args.repin_connection or args.connection)
    try:
        try:
            target = JID(args.jid).bare
        except InvalidJID:
            raise KeysError(f"{args.jid!r} is not a JID") from None
        if "@" not in target:
            raise KeysError(f"{args.jid!r} is not a party's JID (name@domain)")
        jid, password, keys, info = _party(data, args.party)
        client = make_client(f"{jid}/keys-{os.urandom(3).hex()}", password, info.server)
        ring = PepKeyring(client, keys)
        await ensure_running(info.server)
        await open_session(client, info.server)
        try:
            new = await ring.fetch_announced(target)
            old = ring.repin(target, new)
        finally:
            await close_session(client)
    except (KeysError, SessionError, KeyUnavailable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    print(f"{args.party} now pins {target}: {old or 'nothing'} -> {fingerprint(new)}")
    return EXIT_OK
