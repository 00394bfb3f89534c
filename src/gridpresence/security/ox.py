"""OpenPGP for XMPP (XEP-0373/0374) chat messages: open one an operator's client sent, seal
the answer back. Interoperates with GnuPG-based clients (Profanity's ``/ox``, go-sendxmpp).

A chat message is a ``<signcrypt/>`` part (:mod:`gridpresence.security.parts` does the
crypto) whose payload is one ``<body xmlns='jabber:client'/>``. Opening one checks, and refuses
with a reason written for the sender: it is encrypted to this party's key; it is signed by the
key pinned for the sender's JID; its ``<to/>`` names this party; and, stricter than other
parts because it may be a command, its ``<time/>`` is at most :data:`MAX_AGE_S` old. The
digest of the OpenPGP message is its identity, so a copy replayed inside that window is
recognised as the same command.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.models import utcnow
from gridpresence.protocol.openpgp import chat_body, chat_payload, openpgp_from_xml, openpgp_to_xml
from gridpresence.security.keyring import KeyLookup, KeyUnavailable
from gridpresence.security.keys import fingerprint
from gridpresence.security.parts import NotForYou, PartError, seal, unseal
from gridpresence.security.pgp import pgpy

# Freshness of <time/>: MAX_AGE_S + MAX_AHEAD_S must not exceed how long a device remembers
# a chat command's id (chat.CHAT_TTL_S, 30 s), so a replay inside the window is recognised.
MAX_AGE_S = 20.0
MAX_AHEAD_S = 10.0  # the sender's clock may run ahead a little


class OxRefused(Exception):
    """An OX message this party will not act on; the text says why, for the sender."""


@dataclass(frozen=True)
class Opened:
    text: str  # the chat line
    digest: str  # hex SHA-256 of the OpenPGP message: the same for every copy of it
    key: pgpy.PGPKey  # the sender's pinned key that signed it: the answer is encrypted to it


def is_encrypted(message_b64: str) -> bool:
    """Whether an ``<openpgp/>`` element holds an encrypted message (``<signcrypt/>``, OX chat)
    rather than a signed-only one (``<sign/>``, a signed grid payload): an encrypted OpenPGP
    message starts with a session-key packet, tag 1 or 3 (RFC 4880 §4.2-4.3). Reads one byte."""
    try:
        first = base64.b64decode(message_b64.lstrip()[:4], validate=True)[:1]
    except (binascii.Error, ValueError):
        return False
    if not first or not first[0] & 0x80:
        return False
    tag = first[0] & 0x3F if first[0] & 0x40 else (first[0] >> 2) & 0x0F  # new / old packet format
    return tag in (1, 3)


async def open_chat(openpgp: ET.Element, sender: str, me: str, own: pgpy.PGPKey, keys: KeyLookup,
                    now: dt.datetime | None = None) -> Opened:
    """Open one OX chat message from ``sender`` (bare JID) to ``me``; :class:`OxRefused` if not."""
    try:
        blob = openpgp_from_xml(openpgp)
    except PayloadError as exc:
        raise OxRefused(str(exc)) from None
    try:
        key = await keys.key_for(sender)
    except KeyUnavailable as exc:
        raise OxRefused(str(exc)) from None
    now = now or utcnow()
    try:
        content = unseal(blob, me, own, sender, key, now)
        text = chat_body(content)
    except NotForYou as exc:
        raise OxRefused(f"{exc} ({fingerprint(own)}); fetch its current key from its PEP node "
                        "(Profanity: /ox discover, /ox request)") from None
    except (PartError, PayloadError) as exc:
        raise OxRefused(str(exc)) from None
    age = (now - content.time).total_seconds()
    if age > MAX_AGE_S:
        raise OxRefused(f"it was signed {age:.0f} s ago; signed commands must arrive within {MAX_AGE_S:.0f} s "
                        "(check the sender's clock)")
    if age < -MAX_AHEAD_S:
        raise OxRefused(f"it is dated {-age:.0f} s in the future; check the sender's clock")
    return Opened(text, hashlib.sha256(blob).hexdigest(), key)


def seal_chat(text: str, signer: pgpy.PGPKey, to: str, key: pgpy.PGPKey) -> ET.Element:
    """``text`` as an OX chat ``<openpgp/>`` for ``to`` (bare JID), signed and encrypted to ``key``."""
    try:
        return openpgp_to_xml(seal(chat_payload(text), signer, {to: key}))
    except Exception as exc:  # pgpy, e.g. a key without an encryption subkey
        raise OxRefused(f"cannot encrypt to key {fingerprint(key)}: {exc}") from None
