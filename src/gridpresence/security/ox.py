"""OpenPGP for XMPP (XEP-0373/0374) chat messages: open one an operator's client sent, seal
the answer back. Interoperates with GnuPG-based clients (Profanity's ``/ox``).

Opening a message checks, in this order, and refuses with a reason written for the sender:
it is an OpenPGP message encrypted to this party's key; it is signed by the key pinned for
the sender's JID; its ``<signcrypt/>`` names this party in ``<to/>``; its ``<time/>`` is
fresh. A message that passes is a signed chat line; its digest is its identity, so a copy
replayed inside the freshness window is recognised as the same command.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from gridpresence.protocol.models import Signcrypt, utcnow
from gridpresence.security.ox_xml import OxXmlError, signcrypt_from_xml, signcrypt_to_xml
from gridpresence.security.keyring import KeyLookup, KeyUnavailable
from gridpresence.security.keys import fingerprint
from gridpresence.security.pgp import pgpy
from pgpy.constants import CompressionAlgorithm, SymmetricKeyAlgorithm

MAX_MESSAGE_BYTES = 64 * 1024  # a chat command is a few hundred bytes once encrypted
# Freshness of <time/>: MAX_AGE_S + MAX_AHEAD_S must not exceed how long a device remembers
# a chat command's id (chat.CHAT_TTL_S, 30 s), so a replay inside the window is recognised.
MAX_AGE_S = 20.0
MAX_AHEAD_S = 10.0  # the sender's clock may run ahead a little
CIPHER = SymmetricKeyAlgorithm.AES256


class OxRefused(Exception):
    """An OX message this party will not act on; the text says why, for the sender."""


@dataclass(frozen=True)
class Opened:
    content: Signcrypt
    digest: str  # hex SHA-256 of the signed plaintext: the same for every copy of one message
    key: pgpy.PGPKey  # the sender's pinned key that signed it: the answer is encrypted to it


def is_encrypted(message_b64: str) -> bool:
    """Whether an ``<openpgp/>`` element holds an encrypted message (``<signcrypt/>``, OX chat)
    rather than a signed-only one (``<sign/>``, a signed grid payload): an encrypted OpenPGP
    message starts with a session-key packet, tag 1 or 3 (RFC 4880 §4.2-4.3). Reads one byte."""
    try:
        first = base64.b64decode(message_b64[:4], validate=True)[:1]
    except (binascii.Error, ValueError):
        return False
    if not first or not first[0] & 0x80:
        return False
    tag = first[0] & 0x3F if first[0] & 0x40 else (first[0] >> 2) & 0x0F  # new / old packet format
    return tag in (1, 3)


def decrypt(message_b64: str, own: pgpy.PGPKey) -> pgpy.PGPMessage:
    """The decrypted (still signed) OpenPGP message inside an ``<openpgp/>`` element."""
    if len(message_b64) > MAX_MESSAGE_BYTES * 4 // 3 + 4:
        raise OxRefused(f"the OpenPGP message is longer than {MAX_MESSAGE_BYTES} bytes")
    try:
        blob = base64.b64decode(message_b64, validate=True)
    except (binascii.Error, ValueError):
        raise OxRefused("the <openpgp/> element does not hold base64 data") from None
    try:
        message = pgpy.PGPMessage.from_blob(blob)
    except Exception:  # pgpy raises many types for malformed packets
        raise OxRefused("the <openpgp/> element does not hold an OpenPGP message") from None
    if not message.is_encrypted:
        raise OxRefused("the OpenPGP message is not encrypted; send it with OX encryption on (/ox start)")
    try:
        return own.decrypt(message)
    except Exception:
        raise OxRefused(f"the message is not encrypted to this party's key {fingerprint(own)}; "
                        "fetch its current key from its PEP node (/ox discover, /ox request)") from None


def verified_plaintext(message: pgpy.PGPMessage, sender: str, key: pgpy.PGPKey) -> bytes:
    """The plaintext of ``message`` if ``key`` (the one pinned for ``sender``) signed it."""
    if not message.is_signed:
        raise OxRefused("the message is encrypted but not signed; commands must be signed")
    try:
        good = bool(key.verify(message))
    except Exception:  # no signature by this key at all
        good = False
    if not good:
        raise OxRefused(f"its signature does not verify with the key pinned for {sender} ({fingerprint(key)})")
    text = message.message
    return text.encode("utf-8") if isinstance(text, str) else bytes(text)


def check_fresh_and_mine(content: Signcrypt, me: str, now: dt.datetime) -> None:
    if me not in content.to:
        raise OxRefused(f"it is addressed to {', '.join(content.to)[:200]}, not to {me}")
    age = (now - content.time).total_seconds()
    if age > MAX_AGE_S:
        raise OxRefused(f"it was signed {age:.0f} s ago; signed commands must arrive within {MAX_AGE_S:.0f} s "
                        "(check the sender's clock)")
    if age < -MAX_AHEAD_S:
        raise OxRefused(f"it is dated {-age:.0f} s in the future; check the sender's clock")


async def open_message(message_b64: str, sender: str, me: str, own: pgpy.PGPKey, keys: KeyLookup,
                       now: dt.datetime | None = None) -> Opened:
    """Decrypt, verify and check one OX message from ``sender`` (bare JID) to ``me``."""
    decrypted = decrypt(message_b64, own)
    try:
        key = await keys.key_for(sender)
    except KeyUnavailable as exc:
        raise OxRefused(str(exc)) from None
    plaintext = verified_plaintext(decrypted, sender, key)
    try:
        content = signcrypt_from_xml(plaintext)
    except OxXmlError as exc:
        raise OxRefused(str(exc)) from None
    check_fresh_and_mine(content, me, now or utcnow())
    return Opened(content, hashlib.sha256(plaintext).hexdigest(), key)


def seal(content: Signcrypt, signer: pgpy.PGPKey, recipients: Sequence[pgpy.PGPKey]) -> str:
    """``content`` signed by ``signer`` and encrypted to every recipient, base64 for ``<openpgp/>``."""
    message = pgpy.PGPMessage.new(signcrypt_to_xml(content), compression=CompressionAlgorithm.Uncompressed)
    message |= signer.sign(message)
    session_key = CIPHER.gen_key()  # one session key, wrapped for each recipient
    for key in recipients:
        try:
            message = key.encrypt(message, cipher=CIPHER, sessionkey=session_key)
        except Exception as exc:  # e.g. a key without an encryption subkey
            raise OxRefused(f"cannot encrypt to key {fingerprint(key)}: {exc}") from None
    return base64.b64encode(bytes(message)).decode("ascii")
