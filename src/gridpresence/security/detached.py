"""Detached OpenPGP signatures over a mailed payload: how the relay knows device data came
from that device, although it cannot read (and must not need to read) what is inside."""

from __future__ import annotations

from gridpresence.security.pgp import pgpy

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
        # A blob of partial or unknown packets parses to an object with no signature packet,
        # whose every attribute then fails: check for the packet, not for an exception.
        issuer = sig.signer if sig._signature is not None else None
    except Exception as exc:  # pgpy raises many kinds on broken packets, even NotImplementedError
        raise SignatureRefused(f"the signature part is not an OpenPGP signature ({exc or type(exc).__name__})") from None
    if issuer is None:
        raise SignatureRefused("the signature part holds no OpenPGP signature packet")
    if issuer != key.fingerprint.keyid:
        raise SignatureRefused(f"signed by key {issuer}, not by {signer}'s key")
    try:
        good = bool(key.verify(data, sig))
    except Exception as exc:  # as above: a well-formed header over broken signature values
        raise SignatureRefused(f"{signer}'s signature cannot be checked ({exc or type(exc).__name__})") from None
    if not good:
        raise SignatureRefused(f"{signer}'s signature does not match the data (changed on the way?)")
