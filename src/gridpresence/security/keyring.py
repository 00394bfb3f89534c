"""How a party finds the public key of another: the interface every signer, verifier and
encrypter uses. The implementation that fetches keys over PEP (XEP-0373) and pins them on
first use lives beside it; tests of pure crypto may use :class:`StaticKeys`."""

from __future__ import annotations

from typing import Protocol

from gridpresence.security.pgp import pgpy


class KeyUnavailable(Exception):
    """No usable key for ``jid``; ``reason`` says why (not published, timed out, bad key...)."""

    def __init__(self, jid: str, reason: str) -> None:
        super().__init__(f"no usable OpenPGP key for {jid}: {reason}")
        self.jid = jid
        self.reason = reason


class KeyChanged(KeyUnavailable):
    """The key offered for ``jid`` is not the one pinned on first use: refused, loudly."""

    def __init__(self, jid: str, pinned: str, offered: str) -> None:
        super().__init__(jid, f"key changed: pinned {pinned}, now offered {offered}")
        self.pinned = pinned
        self.offered = offered


class KeyLookup(Protocol):
    def cached(self, jid: str) -> pgpy.PGPKey | None:
        """The pinned public key of ``jid`` if already known, without waiting (hot path)."""

    async def key_for(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
        """The pinned public key of ``jid``, fetched if needed; raises :class:`KeyUnavailable`."""


class StaticKeys:
    """A fixed set of public keys by bare JID (pure-crypto unit tests, offline tools)."""

    def __init__(self, keys: dict[str, pgpy.PGPKey]) -> None:
        self._keys = {jid: key.pubkey if not key.is_public else key for jid, key in keys.items()}

    def cached(self, jid: str) -> pgpy.PGPKey | None:
        return self._keys.get(jid)

    async def key_for(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
        key = self._keys.get(jid)
        if key is None:
            raise KeyUnavailable(jid, "not in this key set")
        return key
