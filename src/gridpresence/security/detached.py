"""Detached OpenPGP signatures over a mailed payload: how the relay knows device data came
from that device, although it cannot read (and must not need to read) what is inside."""

from __future__ import annotations

from gridpresence.security.pgp import pgpy

PGPError = pgpy.errors.PGPError


class SignatureRefused(Exception):
    """No signature, not a signature, someone else's, or the data changed; the text says which."""


def sign_detached(data: bytes, key: pgpy.PGPKey) -> str:
    """An ASCII-armored signature of `data` by the secret `key`."""
    return str(key.sign(data))


def verify_detached(data: bytes, signature: str | bytes | None, signer: str, key: pgpy.PGPKey) -> None:
    """Raise :class:`SignatureRefused` unless `signature` is `signer`'s (public `key`) over `data`."""
    if not signature:
        raise SignatureRefused(f"not signed: data from {signer} must carry {signer}'s OpenPGP signature")
    try:
        sig = pgpy.PGPSignature.from_blob(signature)
    except (ValueError, PGPError, TypeError, IndexError) as exc:
        raise SignatureRefused(f"the signature part is not an OpenPGP signature ({exc})") from None
    if sig.signer != key.fingerprint.keyid:
        raise SignatureRefused(f"signed by key {sig.signer}, not by {signer}'s key")
    try:
        good = bool(key.verify(data, sig))
    except PGPError as exc:
        raise SignatureRefused(f"{signer}'s signature cannot be checked ({exc})") from None
    if not good:
        raise SignatureRefused(f"{signer}'s signature does not match the data (changed on the way?)")
