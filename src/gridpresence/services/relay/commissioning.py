"""Commissioning a mail-only device ([00116]): once, where it can still reach the XMPP server
(on the grid's side, before it goes behind its mail-only firewall), the device logs in as itself,
announces its OpenPGP key over PEP (XEP-0373) so the relay and its readers find it there, and
looks up its readers' keys over PEP (pinned on first use). It keeps those readers' public keys in
``NAME.readers.json`` beside its secret key: behind the firewall it seals billing reports to
them without any lookup."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from gridpresence.xmpp.session import Endpoint, close_session, make_client, open_session
from gridpresence.security.keyring import KeyUnavailable, StaticKeys
from gridpresence.security.keys import KeyFileError, fingerprint, parse_key
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring

log = logging.getLogger(__name__)


def readers_path(keys: PartyKeys, name: str) -> Path:
    if keys.secret_file is None:
        raise KeyFileError(f"{name} has no key file: a mail-only device needs its own key to sign")
    return keys.secret_file.with_name(f"{name}.readers.json")


async def commission(name: str, jid: str, password: str, endpoint: Endpoint, keys: PartyKeys,
                     readers: tuple[str, ...], timeout: float = 20.0) -> dict[str, str]:
    """Announce the device's key and fetch its readers' keys over PEP; returns reader ->
    fingerprint for those found (a reader without a published key is left out, with a warning)."""
    client = make_client(f"{jid}/commissioning", password, endpoint, plugins=("xep_0060",))
    keyring = PepKeyring(client, keys)
    await open_session(client, endpoint, timeout)
    found: dict[str, str] = {}
    try:
        if not await keyring.announced(timeout):
            raise KeyUnavailable(jid, "could not announce the device's own key over PEP")
        armored = {}
        for reader in readers:
            try:
                key = await keyring.key_for(reader, timeout)
            except KeyUnavailable as exc:
                log.warning("%s: reader %s left out: %s", name, reader, exc.reason)
                continue
            armored[reader] = str(key)
            found[reader] = fingerprint(key)
    finally:
        await close_session(client)
    path = readers_path(keys, name)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(armored, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
    return found


def readers_keys(keys: PartyKeys, name: str) -> StaticKeys:
    """The readers' public keys the device was commissioned with."""
    path = readers_path(keys, name)
    try:
        armored = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KeyFileError(f"{path}: {name} was not commissioned; run `gridpresence mail-device {name} "
                           "--commission` where it can reach the XMPP server") from None
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a readers' key file: {exc}") from None
    return StaticKeys({jid: parse_key(blob, what=f"{path}: key of {jid}") for jid, blob in armored.items()})
