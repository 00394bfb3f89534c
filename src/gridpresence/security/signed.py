"""Signed grid payloads (XEP-0373 §3 ``<sign/>``): any payload element — a command, a tariff,
a firmware offer — is wrapped for one recipient and signed with the issuer's OpenPGP key.

Sign: :func:`sign_payload` → ``<openpgp/>`` element. Verify in two steps, because the signer's
JID comes from the content when a relay carries the command: :func:`open_signed` parses without
trusting anything, then :meth:`Sealed.verify` checks the signature with the key the caller
looked up for the claimed signer (:func:`verify_payload` does both with a :class:`KeyLookup`).
Every refusal is a :class:`SignatureFailure` with a reject reason and words.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from xml.etree import ElementTree as ET

from pgpy.constants import CompressionAlgorithm

from gridpresence.protocol.codec import PayloadError, commands_by_device, q
from gridpresence.protocol.models import RejectReason, utcnow
from gridpresence.protocol.openpgp import (
    SignContent,
    openpgp_from_xml,
    openpgp_to_xml,
    sign_from_bytes,
    sign_to_bytes,
)
from gridpresence.security import fastsig
from gridpresence.security.keyring import KeyChanged, KeyLookup, KeyUnavailable
from gridpresence.security.keys import fingerprint
from gridpresence.security.pgp import pgpy


class SignatureFailure(Exception):
    """A signed payload refused: ``reason`` for the outcome, the message for people."""

    def __init__(self, reason: RejectReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Verified:
    """A payload whose signature checked out, with who signed it and when."""

    payload: ET.Element
    signer: str  # bare JID whose key made the signature
    fingerprint: str
    time: dt.datetime
    to: tuple[str, ...]


class Sealed(NamedTuple):  # a tuple: a third of a frozen dataclass's making, per command
    """An ``<openpgp/>`` element opened but not yet verified: read it, trust nothing in it.
    ``fast``: the message in the shape :mod:`fastsig` checks itself; otherwise pgpy does."""

    content: SignContent
    blob: bytes
    fast: fastsig.FastSigned | None = None
    # The keys this very message was checked with, and whether it checked out: a batch of
    # commands (one signature for many devices of one host, xmpp/component.py) is verified
    # once per key, not by each of its devices.
    checked: list[tuple[pgpy.PGPKey, bool]] | None = None
    # A batch's commands by device (codec.commands_by_device), read once for all of them.
    parts: dict[str, ET.Element | None] | None = None

    def command_for(self, device: str) -> ET.Element:
        """The ``<command/>`` for ``device`` (bare JID): the payload itself, or its part of a
        batch; :class:`SignatureFailure` if a batch holds none for it (or two)."""
        if self.parts is None:
            return self.content.payload
        found = self.parts.get(device)
        if found is None:
            raise SignatureFailure(RejectReason.WRONG_RECIPIENT, f"the batch holds no one command for {device}")
        return found

    @property
    def payload(self) -> ET.Element:
        return self.content.payload

    def verify(self, key: pgpy.PGPKey, signer: str) -> Verified:
        """Check the signature with ``signer``'s public key; :class:`SignatureFailure` if it
        was not made by that key over exactly these bytes."""
        self.check(key, signer)
        return Verified(payload=self.content.payload, signer=signer, fingerprint=fingerprint(key),
                        time=self.content.time, to=self.content.to)

    def check(self, key: pgpy.PGPKey, signer: str) -> None:
        """:meth:`verify` without building its result (a device's command gate needs none)."""
        # (the same key object over the same bytes: the same answer)
        good = next((ok for k, ok in self.checked if k is key), None) if self.checked is not None else None
        if good is None:
            good = self._verify(key)
            if self.checked is not None:
                self.checked.append((key, good))
        if not good:
            raise SignatureFailure(RejectReason.BAD_SIGNATURE,
                                   f"the signature is not {signer}'s key {fingerprint(key)} over this content")

    def _verify(self, key: pgpy.PGPKey) -> bool:
        good = fastsig.verify(self.fast, key) if self.fast is not None else None
        if good is None:
            try:
                good = bool(key.verify(pgpy.PGPMessage.from_blob(self.blob)))
            except Exception:  # pgpy: "No signatures to verify" when no signature is by this key
                good = False
        return good


def check_envelope(content: SignContent, to: str, now: dt.datetime, skew_s: float,
                   max_age_s: float | None = None) -> None:
    """XEP-0373 §3.2 for the receiver: the ``<sign/>`` must name ``to`` (bare JID), and its time
    must not be ahead of ``now`` by more than ``skew_s`` nor, with ``max_age_s``, older than that
    (a command has its own expiry instead; a tariff or price has none)."""
    if to not in content.to:
        raise SignatureFailure(RejectReason.WRONG_RECIPIENT, f"signed for {', '.join(content.to)[:200]}, not {to}")
    ahead = (content.time - now).total_seconds()
    if ahead > skew_s:
        raise SignatureFailure(RejectReason.STALE, f"signed {ahead:.0f} s in the future")
    if max_age_s is not None and -ahead > max_age_s + skew_s:
        raise SignatureFailure(RejectReason.STALE, f"signed {-ahead:.0f} s ago, more than {max_age_s:g} s")


def sign_payload(payload: ET.Element | str, to_jid: str | Sequence[str], key: pgpy.PGPKey,
                 now: dt.datetime | None = None) -> ET.Element:
    """``payload`` for ``to_jid`` (bare JID, or several for a batch), signed with the secret
    ``key``: an ``<openpgp/>``. ``payload`` may come serialised (one element, its namespace
    declared: codec's ``*_to_text``)."""
    when = now or utcnow()
    data = sign_to_bytes(to_jid, when, payload)
    blob = fastsig.sign(data, key, when)
    if blob is None:  # not an Ed25519 key: the general path
        message = pgpy.PGPMessage.new(data, format="b", compression=CompressionAlgorithm.Uncompressed)
        message |= key.sign(message)
        blob = bytes(message)
    return openpgp_to_xml(blob)


def open_signed(el: ET.Element | None) -> Sealed:
    """Parse an ``<openpgp/>`` element; the signature is not checked yet. The copies of one
    multicast batch share their ``<openpgp/>`` element (xmpp/component.py): it is opened once,
    and its :class:`Sealed` remembers the keys it checked out with."""
    if el is None:
        return _open(el)
    for seen, opened in _OPENED:
        if seen is el:
            if isinstance(opened, SignatureFailure):
                raise SignatureFailure(opened.reason, opened.detail)
            return opened
    try:
        sealed = _open(el)
        if sealed.content.payload.tag == _BATCH:
            try:
                parts = commands_by_device(sealed.content.payload)
            except PayloadError as exc:
                raise SignatureFailure(RejectReason.INVALID_ARGUMENTS, str(exc)) from None
            sealed = sealed._replace(checked=[], parts=parts)
    except SignatureFailure as exc:
        _OPENED.append((el, exc))  # (a broken one, multicast to a thousand, is read once too)
        raise
    _OPENED.append((el, sealed))
    return sealed


_BATCH = q("commands")
# The elements opened last, with what came of it (each held here, so no other element can have
# its id meanwhile): the copies of a multicast follow one another.
_OPENED: collections.deque[tuple[ET.Element, Sealed | SignatureFailure]] = collections.deque(maxlen=4)


def _open(el: ET.Element | None) -> Sealed:
    try:
        blob = openpgp_from_xml(el)
    except PayloadError as exc:
        raise SignatureFailure(RejectReason.BAD_SIGNATURE, str(exc)) from None
    fast = fastsig.parse(blob)
    data = fast.data if fast is not None else _pgpy_literal(blob)
    try:
        content = sign_from_bytes(data)
    except PayloadError as exc:
        raise SignatureFailure(RejectReason.BAD_SIGNATURE, str(exc)) from None
    return Sealed(content=content, blob=blob, fast=fast)


def _pgpy_literal(blob: bytes) -> bytes:
    """The signed data of a message in a shape :mod:`fastsig` does not read, through pgpy."""
    try:
        message = pgpy.PGPMessage.from_blob(blob)
        data = message.message if message.type == "literal" else None
    except Exception as exc:  # pgpy raises many kinds (even NotImplementedError) on broken packets
        raise SignatureFailure(RejectReason.BAD_SIGNATURE, f"not an OpenPGP message: {type(exc).__name__}") from None
    if not isinstance(data, (bytes, bytearray)):
        raise SignatureFailure(RejectReason.BAD_SIGNATURE, "the OpenPGP message holds no binary literal data")
    if not message.signatures:
        raise SignatureFailure(RejectReason.UNSIGNED, "the OpenPGP message carries no signature")
    return bytes(data)


async def key_of(signer: str, keys: KeyLookup, timeout: float = 5.0) -> pgpy.PGPKey:
    """``signer``'s pinned key: from the cache, else fetched; refusals as :class:`SignatureFailure`."""
    key = keys.cached(signer)
    if key is not None:
        return key
    try:
        return await keys.key_for(signer, timeout)
    except KeyChanged as exc:
        raise SignatureFailure(RejectReason.KEY_CHANGED, str(exc)) from None
    except KeyUnavailable as exc:
        raise SignatureFailure(RejectReason.UNKNOWN_KEY, str(exc)) from None


async def verify_payload(el: ET.Element, signer: str, keys: KeyLookup, timeout: float = 5.0) -> Verified:
    """Open ``el`` and verify it was signed by ``signer`` (bare JID) with their pinned key."""
    sealed = open_signed(el)
    return sealed.verify(await key_of(signer, keys, timeout), signer)
