"""Per-party encryption ([0085]): one part of a message, signed by its sender and readable only
by the parties it is encrypted to.

A part is an XEP-0373 ``<signcrypt/>`` (see :mod:`gridpresence.protocol.openpgp`) inside one
OpenPGP message: signed with the sender's key, then encrypted with one session key to each
recipient's encryption subkey. A party outside the audience (another department, the relay that
carries it) holds ciphertext it cannot open.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from enum import StrEnum
from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.models import utcnow
from gridpresence.protocol.openpgp import Signcrypt, signcrypt_from_bytes, signcrypt_to_bytes
from gridpresence.security.pgp import pgpy

PGPError, PGPDecryptionError = pgpy.errors.PGPError, pgpy.errors.PGPDecryptionError
CIPHER = pgpy.constants.SymmetricKeyAlgorithm.AES256
# A part older than this, or this far in the future, is refused: an old report replayed as new,
# or a sender whose clock is badly off (its readings' period would be wrong too).
MAX_SKEW = dt.timedelta(days=1)


class PartProblem(StrEnum):
    NOT_OPENPGP = "not-openpgp"  # not an OpenPGP message at all
    NOT_ENCRYPTED = "not-encrypted"
    CORRUPT = "corrupt"  # encrypted to us, but changed on the way (integrity check failed)
    UNSIGNED = "unsigned"
    WRONG_SIGNER = "wrong-signer"  # signed, but not by the party it claims to come from
    BAD_SIGNATURE = "bad-signature"  # signed by that party's key, but the data was changed
    NOT_SIGNCRYPT = "not-signcrypt"  # decrypted, but not a valid <signcrypt/>
    STALE = "stale"  # its <time/> is too far from now


class PartError(Exception):
    """A sealed part that could not be opened; ``reason`` says why in a few words."""


class NotForYou(PartError):
    """The part is not encrypted to this party's key (or does not name it as a recipient)."""

    def __init__(self, jid: str, detail: str = "not encrypted to this party's key") -> None:
        super().__init__(f"part is not for {jid}: {detail}")
        self.jid = jid


class BadPart(PartError):
    def __init__(self, problem: PartProblem, detail: str) -> None:
        super().__init__(f"{problem.value}: {detail}")
        self.problem = problem


def seal(payload: ET.Element, signer: pgpy.PGPKey, recipients: Mapping[str, pgpy.PGPKey],
         now: dt.datetime | None = None) -> bytes:
    """Sign `payload` with the sender's secret key and encrypt it to every recipient (bare JID ->
    public key); returns the binary OpenPGP message."""
    if not recipients:
        raise ValueError("a sealed part needs at least one recipient")
    content = Signcrypt(to=tuple(recipients), time=now or utcnow(), payload=payload)
    message = pgpy.PGPMessage.new(signcrypt_to_bytes(content), compression=pgpy.constants.CompressionAlgorithm.Uncompressed)
    message |= signer.sign(message)
    session_key = CIPHER.gen_key()  # one session key, wrapped once per recipient
    for key in recipients.values():
        message = key.encrypt(message, cipher=CIPHER, sessionkey=session_key)
    del session_key
    return bytes(message)


def unseal(data: bytes, me: str, my_key: pgpy.PGPKey, sender: str, sender_key: pgpy.PGPKey,
           now: dt.datetime | None = None) -> Signcrypt:
    """Open a part addressed to `me` with `my_key` and check it was signed by `sender`'s key,
    names `me` among its recipients and is fresh. Raises :class:`NotForYou` or :class:`BadPart`."""
    try:
        message = pgpy.PGPMessage.from_blob(data)
    except Exception as exc:  # pgpy raises many kinds for broken packets, even NotImplementedError
        raise BadPart(PartProblem.NOT_OPENPGP, f"not an OpenPGP message ({type(exc).__name__}: {exc})") from None
    if not message.is_encrypted:
        raise BadPart(PartProblem.NOT_ENCRYPTED, "the part is not encrypted")
    try:
        clear = my_key.decrypt(message)
    except PGPError as exc:
        raise NotForYou(me, str(exc).lower()) from None
    except (PGPDecryptionError, ValueError, TypeError) as exc:
        raise BadPart(PartProblem.CORRUPT, f"the part does not decrypt ({exc})") from None
    if not clear.is_signed:
        raise BadPart(PartProblem.UNSIGNED, f"the part carries no signature of {sender}")
    if sender_key.fingerprint.keyid not in clear.signers:
        raise BadPart(PartProblem.WRONG_SIGNER, f"signed by key {', '.join(sorted(clear.signers))}, not {sender}'s")
    if not sender_key.verify(clear):
        raise BadPart(PartProblem.BAD_SIGNATURE, f"{sender}'s signature does not match the part")
    text = clear.message
    try:
        content = signcrypt_from_bytes(text.encode() if isinstance(text, str) else bytes(text))
    except PayloadError as exc:
        raise BadPart(PartProblem.NOT_SIGNCRYPT, str(exc)) from None
    if me not in content.to:
        # Encrypted to our key, but the signed recipient list does not name us: forwarded.
        raise NotForYou(me, f"the signed recipients are {', '.join(content.to)}")
    if abs((now or utcnow()) - content.time) > MAX_SKEW:
        raise BadPart(PartProblem.STALE, f"made at {content.time:%Y-%m-%d %H:%M:%S} UTC")
    return content
