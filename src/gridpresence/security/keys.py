"""Every party's OpenPGP key: made when the party is provisioned, kept in ``DIR/keys/``.

A key is an Ed25519 primary (sign, certify) with a Curve25519 subkey (encrypt), and the user
id ``xmpp:JID`` that XEP-0373 requires, so OX-capable chat clients and GnuPG accept it.
The secret key file (mode 0600) is what a party must hold to issue signed commands: knowing
an account's password without it is not enough.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from dataclasses import dataclass
from pathlib import Path

from gridpresence.security.pgp import pgpy
from pgpy.constants import (
    CompressionAlgorithm,
    EllipticCurveOID,
    HashAlgorithm,
    KeyFlags,
    PubKeyAlgorithm,
    SymmetricKeyAlgorithm,
)

KEYS_DIR = "keys"


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not the kind of key this party needs."""


def xmpp_uid(jid: str) -> str:
    """XEP-0373 §4.1: the user id of an OpenPGP key used for XMPP is ``xmpp:`` + bare JID."""
    return f"xmpp:{jid}"


def fingerprint(key: pgpy.PGPKey) -> str:
    """The v4 fingerprint as 40 upper-case hex digits (the form of XEP-0373's node names)."""
    return str(key.fingerprint).replace(" ", "").upper()


def generate(jid: str, created: dt.datetime | None = None) -> pgpy.PGPKey:
    """A new secret key for ``jid`` (~2 ms), made now or at ``created`` (key, user id and subkey
    binding alike: GnuPG refuses a signature older than the key that made it)."""
    key = pgpy.PGPKey.new(PubKeyAlgorithm.EdDSA, EllipticCurveOID.Ed25519, created=created)
    key.add_uid(
        pgpy.PGPUID.new(xmpp_uid(jid)),
        usage={KeyFlags.Sign, KeyFlags.Certify},
        hashes=[HashAlgorithm.SHA256, HashAlgorithm.SHA512],
        ciphers=[SymmetricKeyAlgorithm.AES256, SymmetricKeyAlgorithm.AES128],
        compression=[CompressionAlgorithm.Uncompressed, CompressionAlgorithm.ZLIB],
        created=created,
    )
    sub = pgpy.PGPKey.new(PubKeyAlgorithm.ECDH, EllipticCurveOID.Curve25519, created=created)
    key.add_subkey(sub, usage={KeyFlags.EncryptCommunications, KeyFlags.EncryptStorage}, created=created)
    return key


def parse_key(blob: str | bytes, *, what: str = "key") -> pgpy.PGPKey:
    """One OpenPGP key from armored or binary data; a clear error otherwise."""
    try:
        key, _ = pgpy.PGPKey.from_blob(blob)
    except Exception as exc:  # pgpy raises a zoo of types for bad input
        raise KeyFileError(f"{what} is not an OpenPGP key: {exc}") from None
    return key


def jid_of(key: pgpy.PGPKey) -> str | None:
    """The bare JID named by the key's ``xmpp:`` user id, if it has one."""
    for uid in key.userids:
        if uid.name.startswith("xmpp:"):
            return str(uid.name[5:])
    return None


@dataclass(frozen=True)
class PublicPart:
    """What announcing a key needs of it (XEP-0373 §4.1): no secret material, no pgpy objects."""

    fingerprint: str
    created: dt.datetime
    data: bytes  # the public key, binary OpenPGP

    @classmethod
    def of(cls, key: pgpy.PGPKey) -> PublicPart:
        public = key.pubkey if not key.is_public else key
        return cls(fingerprint(public), public.created, bytes(public))


def public_part(secret_file: Path) -> PublicPart:
    """The public part of the key in ``secret_file``, from the note beside it (``….pub.json``)
    when the note is of this very file (size and modification time); else the key is parsed
    and the note written. Parsing a key with pgpy costs ~11 ms: a host logging thousands of
    identities in announces them all from their notes."""
    note = secret_file.with_name(secret_file.name + ".pub.json")
    try:
        stat = secret_file.stat()
        data = json.loads(note.read_text(encoding="ascii"))
        if data["key_size"] == stat.st_size and data["key_mtime_ns"] == stat.st_mtime_ns:
            return PublicPart(data["fingerprint"], dt.datetime.fromisoformat(data["created"]),
                              base64.b64decode(data["public"], validate=True))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no note, an old one, or an unreadable one: the key itself decides
    part = PublicPart.of(load_secret(secret_file))
    write_public_note(secret_file, part)
    return part


def write_public_note(secret_file: Path, part: PublicPart) -> None:
    """Best effort: a key directory we may not write to only costs the parse next time."""
    note = secret_file.with_name(secret_file.name + ".pub.json")
    try:
        stat = secret_file.stat()
        tmp = note.with_name(f".{note.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"fingerprint": part.fingerprint, "created": part.created.isoformat(),
                                   "public": base64.b64encode(part.data).decode(), "key_size": stat.st_size,
                                   "key_mtime_ns": stat.st_mtime_ns}), encoding="ascii")
        os.replace(tmp, note)
    except OSError:
        pass


@dataclass(frozen=True)
class KeyStore:
    """Secret keys of the parties this process provisions or runs, one file each."""

    directory: Path

    def secret_path(self, name: str) -> Path:
        return self.directory / f"{name}.sec.asc"

    def ensure(self, name: str, jid: str) -> Path:
        """The party's key file, made on first provisioning; a second run keeps the key."""
        path = self.secret_path(name)
        if not path.exists():
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            key = generate(jid)
            write_secret(path, key)
            write_public_note(path, PublicPart.of(key))  # its first announcement needs no parse
        return path

    def secret(self, name: str) -> pgpy.PGPKey:
        return load_secret(self.secret_path(name))


def write_secret(path: Path, key: pgpy.PGPKey) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(str(key))
    os.replace(tmp, path)


def load_secret(path: Path) -> pgpy.PGPKey:
    try:
        blob = path.read_text(encoding="ascii")
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
    key = parse_key(blob, what=str(path))
    if key.is_public:
        raise KeyFileError(f"{path} holds a public key; signing needs the secret key")
    return key
