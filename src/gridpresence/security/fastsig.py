"""The hot path of signed commands: RFC 4880 signed messages with an Ed25519 key, built and
checked with libsodium (PyNaCl) directly instead of through pgpy's object model.

pgpy spends ~0.45 ms signing and ~0.6 ms verifying a command, almost all of it in packet
objects and generic dispatch. libsodium's Ed25519 takes ~16 µs to sign and ~41 µs to verify
here (OpenSSL's, through ``cryptography``: ~26 and ~87 µs), and a device verifies every command
it takes. This module writes and reads exactly one shape — what pgpy and GnuPG also produce for
a signed binary document: One-Pass Signature (tag 4), Literal Data (tag 11, format ``b``),
Signature (tag 2: v4, type 0x00, EdDSA, SHA-256, hashed creation time and issuer fingerprint,
unhashed issuer key id) — so the result is a standard OpenPGP message (tests verify it with
pgpy and ``gpg --verify``). Anything else (another key type, extra subpackets, old-format
headers) is not read here: :func:`parse` returns None and the caller uses pgpy, which stays
the reference.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct
from typing import NamedTuple

from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from gridpresence.security.pgp import pgpy

EDDSA, SHA256, BINARY_DOC = 22, 8, 0x00
_TAG_OPS, _TAG_LITERAL, _TAG_SIG = 4, 11, 2
_SUB_CREATED, _SUB_ISSUER, _SUB_ISSUER_FPR = 2, 16, 33
_CACHE = "_gridpresence_ed25519"


class FastSigned(NamedTuple):  # a tuple: a third of a frozen dataclass's making, per command
    """A signed message in the one shape this module reads: the data and the signature parts."""

    data: bytes
    hashed: bytes  # the signature's hashed area: what the trailer hashes after the data
    left16: bytes
    signature: bytes  # r || s, 64 bytes
    fingerprint: bytes | None  # issuer fingerprint subpacket (20 bytes), if present
    key_id: bytes | None  # issuer key id subpacket (8 bytes), if present


def _ed25519(key: pgpy.PGPKey) -> tuple[SigningKey | VerifyKey, bytes] | None:
    """(libsodium key, v4 fingerprint bytes) of an Ed25519 primary key, cached on the packet."""
    packet = key._key  # the primary key packet (pgpy has no public accessor for its material)
    cached = packet.__dict__.get(_CACHE)
    if cached is not None and cached[0] is packet.keymaterial:
        return cached[1]  # type: ignore[no-any-return]
    if packet.pkalg != EDDSA:
        value = None
    else:
        material = packet.keymaterial
        nacl_key = (SigningKey(material.__privkey__().private_bytes_raw()) if not key.is_public
                    else VerifyKey(material.__pubkey__().public_bytes_raw()))
        value = (nacl_key, bytes.fromhex(str(key.fingerprint).replace(" ", "")))
    packet.__dict__[_CACHE] = (packet.keymaterial, value)
    return value


def _header(tag: int, length: int) -> bytes:
    """A new-format packet header (RFC 4880 §4.2.2)."""
    if length < 192:
        return bytes((0xC0 | tag, length))
    if length < 8384:
        length -= 192
        return bytes((0xC0 | tag, (length >> 8) + 192, length & 0xFF))
    return bytes((0xC0 | tag, 0xFF)) + struct.pack(">I", length)


def _mpi(value: bytes) -> bytes:
    stripped = value.lstrip(b"\x00")
    bits = len(stripped) * 8 - (8 - stripped[0].bit_length()) if stripped else 0
    return struct.pack(">H", bits) + stripped


def _trailer(hashed: bytes) -> bytes:
    head = bytes((4, BINARY_DOC, EDDSA, SHA256)) + struct.pack(">H", len(hashed)) + hashed
    return head + b"\x04\xff" + struct.pack(">I", len(head))


def sign(data: bytes, key: pgpy.PGPKey, when: dt.datetime) -> bytes | None:
    """A signed message of ``data`` made with the secret Ed25519 ``key``; None for other keys."""
    found = _ed25519(key)
    signer, fpr = found if found is not None else (None, b"")
    if not isinstance(signer, SigningKey):
        return None  # another key type, or a public key: nothing to sign with here
    created = struct.pack(">I", int(when.timestamp()))
    hashed = bytes((5, _SUB_CREATED)) + created + bytes((22, _SUB_ISSUER_FPR, 4)) + fpr
    unhashed = bytes((9, _SUB_ISSUER)) + fpr[-8:]
    digest = hashlib.sha256(data + _trailer(hashed)).digest()
    sig = signer.sign(digest).signature  # OpenPGP's EdDSA signs the hash, not the data (RFC 4880bis §5.2.4)
    body = (bytes((4, BINARY_DOC, EDDSA, SHA256)) + struct.pack(">H", len(hashed)) + hashed
            + struct.pack(">H", len(unhashed)) + unhashed + digest[:2] + _mpi(sig[:32]) + _mpi(sig[32:]))
    ops = bytes((3, BINARY_DOC, SHA256, EDDSA)) + fpr[-8:] + b"\x01"
    literal = b"b\x00" + created + data
    return (_header(_TAG_OPS, len(ops)) + ops + _header(_TAG_LITERAL, len(literal)) + literal
            + _header(_TAG_SIG, len(body)) + body)


def _packets(blob: bytes) -> list[tuple[int, bytes]] | None:
    """New-format packets with definite lengths, or None for anything else."""
    out, i = [], 0
    while i < len(blob):
        if i + 2 > len(blob) or blob[i] & 0xC0 != 0xC0:
            return None
        tag, first = blob[i] & 0x3F, blob[i + 1]
        if first < 192:
            length, i = first, i + 2
        elif first < 224:
            if i + 3 > len(blob):
                return None
            length, i = ((first - 192) << 8) + blob[i + 2] + 192, i + 3
        elif first == 255:
            if i + 6 > len(blob):
                return None
            length, i = struct.unpack(">I", blob[i + 2:i + 6])[0], i + 6
        else:
            return None  # partial body lengths: not a shape made here
        if i + length > len(blob):
            return None
        out.append((tag, blob[i:i + length]))
        i += length
    return out


def _mpi_at(body: bytes, i: int) -> tuple[bytes, int] | None:
    if i + 2 > len(body):
        return None
    n = (struct.unpack(">H", body[i:i + 2])[0] + 7) // 8
    if n > 32 or i + 2 + n > len(body):
        return None
    return body[i + 2:i + 2 + n].rjust(32, b"\x00"), i + 2 + n


def _subpackets(area: bytes) -> dict[int, bytes] | None:
    """Subpackets by type; None if any is not one this module writes (pgpy decides those)."""
    out, i = {}, 0
    while i < len(area):
        n = area[i]
        if n >= 192 or n == 0 or i + 1 + n > len(area):
            return None
        kind, value = area[i + 1] & 0x7F, area[i + 2:i + 1 + n]
        if kind not in (_SUB_CREATED, _SUB_ISSUER, _SUB_ISSUER_FPR) or kind in out:
            return None
        out[kind] = value
        i += 1 + n
    return out


def parse(blob: bytes) -> FastSigned | None:
    """Read a signed message of the one shape :func:`sign` writes; None: let pgpy read it."""
    packets = _packets(blob)
    if packets is None or [t for t, _ in packets] != [_TAG_OPS, _TAG_LITERAL, _TAG_SIG]:
        return None
    literal, body = packets[1][1], packets[2][1]
    if len(literal) < 6 or literal[0:1] != b"b":
        return None
    data = literal[6 + literal[1]:]
    if len(body) < 6 or body[:4] != bytes((4, BINARY_DOC, EDDSA, SHA256)):
        return None
    hlen = struct.unpack(">H", body[4:6])[0]
    hashed, i = body[6:6 + hlen], 6 + hlen
    if i + 2 > len(body):
        return None
    ulen = struct.unpack(">H", body[i:i + 2])[0]
    unhashed, i = body[i + 2:i + 2 + ulen], i + 2 + ulen
    sub_h, sub_u = _subpackets(hashed), _subpackets(unhashed)
    if sub_h is None or sub_u is None or _SUB_ISSUER_FPR in sub_u or _SUB_CREATED in sub_u:
        return None
    left16 = body[i:i + 2]
    r = _mpi_at(body, i + 2)
    s = _mpi_at(body, r[1]) if r is not None else None
    if r is None or s is None or s[1] != len(body):
        return None
    fpr = sub_h.get(_SUB_ISSUER_FPR)
    if fpr is not None and (len(fpr) != 21 or fpr[0] != 4):
        return None
    return FastSigned(data=data, hashed=hashed, left16=left16, signature=r[0] + s[0],
                      fingerprint=fpr[1:] if fpr is not None else None,
                      key_id=sub_h.get(_SUB_ISSUER, sub_u.get(_SUB_ISSUER)))


def verify(signed: FastSigned, key: pgpy.PGPKey) -> bool | None:
    """Whether ``key``'s Ed25519 primary made the signature; None if ``key`` is not Ed25519."""
    found = _ed25519(key)
    if found is None:
        return None
    nacl_key, fpr = found
    public = nacl_key.verify_key if isinstance(nacl_key, SigningKey) else nacl_key
    if signed.fingerprint is not None and signed.fingerprint != fpr:
        return False
    if signed.fingerprint is None and signed.key_id != fpr[-8:]:
        return False
    digest = hashlib.sha256(signed.data + _trailer(signed.hashed)).digest()
    if digest[:2] != signed.left16:
        return False
    try:
        public.verify(digest, signed.signature)
    except BadSignatureError:
        return False
    return True
