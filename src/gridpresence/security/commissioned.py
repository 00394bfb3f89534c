"""Public keys handed over at commissioning, for the one case PEP cannot serve: a device behind
a mail-only firewall never logs in to the XMPP server, so it can neither announce its own key
over PEP nor look up its readers' keys there. It is commissioned from the grid's key directory
(``DIR/keys``, written at provisioning) with its secret key and its readers' public keys; the
relay, on the grid's host, checks such a device's mail with the key provisioned for it when the
device has announced none over PEP. Everyone else finds keys over PEP only
(:mod:`gridpresence.security.pep_keyring`)."""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

from gridpresence.security.keyring import KeyLookup, KeyUnavailable, StaticKeys
from gridpresence.security.keys import jid_of, load_secret
from gridpresence.security.pgp import pgpy


def commissioned_keys(directory: Path, jids: Collection[str] | None = None) -> StaticKeys:
    """The public keys of the parties provisioned in `directory` (only `jids`, if given)."""
    keys = {}
    for path in sorted(Path(directory).glob("*.sec.asc")):
        key = load_secret(path)
        jid = jid_of(key)
        if jid is not None and (jids is None or jid in jids):
            keys[jid] = key.pubkey
    return StaticKeys(keys)


class FirstOf:
    """Look a key up in `primary` (PEP); only if it has none, in `fallback` (commissioned)."""

    def __init__(self, primary: KeyLookup, fallback: KeyLookup) -> None:
        self.primary = primary
        self.fallback = fallback

    def cached(self, jid: str) -> pgpy.PGPKey | None:
        return self.primary.cached(jid) or self.fallback.cached(jid)

    async def key_for(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
        try:
            return await self.primary.key_for(jid, timeout)
        except KeyUnavailable as exc:
            if type(exc) is not KeyUnavailable:  # a changed key is refused, never papered over
                raise
            try:
                return await self.fallback.key_for(jid, timeout)
            except KeyUnavailable:
                raise exc from None
