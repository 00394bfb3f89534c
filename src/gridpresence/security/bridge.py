"""TEMPORARY: public keys of every provisioned party, read from the grid's key directory, until
the PEP keyring (XEP-0373 key lookup over the server) is on main. Only this branch's code paths
use it; it goes away when they switch to the PEP keyring."""

from __future__ import annotations

from pathlib import Path

from gridpresence.security.keyring import StaticKeys
from gridpresence.security.keys import jid_of, load_secret


def provisioned_keys(directory: Path) -> StaticKeys:
    keys = {}
    for path in sorted(Path(directory).glob("*.sec.asc")):
        key = load_secret(path)
        jid = jid_of(key)
        if jid is not None:
            keys[jid] = key.pubkey
    return StaticKeys(keys)
