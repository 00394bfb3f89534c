"""OpenPGP for XMPP chat without a server: security/ox.py against GnuPG, the engine behind
Profanity's /ox. A <signcrypt/> signed and encrypted by gpg (as Profanity's gpgme call does)
is opened by the device; the device's sealed answer is decrypted and verified by gpg; every
way a message can be wrong is refused with a reason for the sender."""

from __future__ import annotations

import base64
import datetime as dt
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from gpghome import HAVE_GPG, GnuPG
from gridpresence.protocol.models import utcnow
from gridpresence.protocol.openpgp import chat_body, openpgp_to_xml, signcrypt_from_bytes
from gridpresence.security import keys
from gridpresence.security.keyring import StaticKeys
from gridpresence.security.ox import MAX_AGE_S, OxRefused, is_encrypted, open_chat, seal_chat
from gridpresence.security.parts import seal
from gridpresence.security.pgp import pgpy
from pgpy.constants import CompressionAlgorithm

ALICE, DEVICE, BOB = "alice@localhost", "ox-load@localhost", "bob@localhost"
ALICE_KEY, DEVICE_KEY, BOB_KEY = keys.generate(ALICE), keys.generate(DEVICE), keys.generate(BOB)
PINNED = StaticKeys({ALICE: ALICE_KEY, BOB: BOB_KEY})


def profanity_signcrypt(to: str, body: str, stamp: str) -> bytes:
    """The element Profanity 0.13 builds: local time with a +hhmm offset, letters as padding."""
    return (f"<signcrypt xmlns='urn:xmpp:openpgp:0'><to jid='{to}'/><time stamp='{stamp}'/>"
            f"<rpad>KqWbGfdR</rpad><payload><body xmlns='jabber:client'>{body}</body></payload></signcrypt>").encode()


def profanity_stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone(dt.timedelta(hours=2))).strftime("%Y-%m-%dT%H:%M:%S%z")


def element(blob: bytes) -> ET.Element:
    return openpgp_to_xml(blob)


async def open_(blob: bytes, sender: str = ALICE, pinned: StaticKeys = PINNED) -> str:
    return (await open_chat(element(blob), sender, DEVICE, DEVICE_KEY, pinned)).text


@pytest_asyncio.fixture
async def operator_gpg() -> AsyncIterator[GnuPG]:
    """Alice's GnuPG home: her secret key and the device's public key."""
    if not HAVE_GPG:
        pytest.skip("gpg is not installed (Debian package `gnupg`)")
    async with GnuPG() as gpg:
        await gpg.import_key(str(ALICE_KEY))
        await gpg.import_key(str(DEVICE_KEY.pubkey))
        yield gpg


async def gpg_signcrypt(gpg: GnuPG, plain: bytes, signer: str = ALICE, to: str = DEVICE) -> bytes:
    """Sign with ``signer`` and encrypt to ``to`` and to the signer, binary: what gpgme does."""
    out, _ = await gpg.run("--sign", "--encrypt", "--local-user", f"xmpp:{signer}",
                           "--recipient", f"xmpp:{to}", "--recipient", f"xmpp:{signer}", stdin=plain)
    return out


async def test_device_opens_what_gnupg_signed_and_encrypted(operator_gpg: GnuPG) -> None:
    blob = await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", profanity_stamp(utcnow())))
    assert is_encrypted(base64.b64encode(blob).decode())
    opened = await open_chat(element(blob), ALICE, DEVICE, DEVICE_KEY, PINNED)
    assert opened.text == "shed"
    assert keys.fingerprint(opened.key) == keys.fingerprint(ALICE_KEY)
    # A replayed copy has the same identity, so the device recognises it as the same command.
    assert (await open_chat(element(blob), ALICE, DEVICE, DEVICE_KEY, PINNED)).digest == opened.digest


async def test_gnupg_decrypts_and_verifies_the_devices_answer(operator_gpg: GnuPG) -> None:
    sealed = seal_chat("Done: load shed. <ok> & \"quoted\"", DEVICE_KEY, ALICE, ALICE_KEY.pubkey)
    plain, status = await operator_gpg.run("--decrypt", stdin=base64.b64decode(sealed.text or ""))
    assert f"[GNUPG:] VALIDSIG {keys.fingerprint(DEVICE_KEY)}" in status
    assert "[GNUPG:] GOODSIG" in status and "[GNUPG:] DECRYPTION_OKAY" in status
    answer = signcrypt_from_bytes(plain)
    assert chat_body(answer) == "Done: load shed. <ok> & \"quoted\"" and answer.to == (ALICE,)
    assert b"rpad" in plain and b"jabber:client" in plain


async def test_refusals_say_why(operator_gpg: GnuPG) -> None:
    fresh = profanity_stamp(utcnow())
    # Signed with Bob's key but sent from Alice's account: not the key pinned for Alice.
    await operator_gpg.import_key(str(BOB_KEY))
    by_bob = await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", fresh), signer=BOB)
    with pytest.raises(OxRefused, match=r"signed by key \w+, not alice@localhost's"):
        await open_(by_bob)
    assert await open_(by_bob, sender=BOB) == "shed"  # and it is Bob's, genuinely

    # Encrypted, not signed.
    out, _ = await operator_gpg.run("--encrypt", "--recipient", f"xmpp:{DEVICE}",
                                    stdin=profanity_signcrypt(DEVICE, "shed", fresh))
    with pytest.raises(OxRefused, match="carries no signature"):
        await open_(out)

    # Encrypted to someone else: the device cannot read it.
    to_bob = await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", fresh), to=BOB)
    with pytest.raises(OxRefused, match=r"not for ox-load@localhost.*/ox discover, /ox request"):
        await open_(to_bob)

    # Addressed (inside the signature) to another device: a forwarded copy.
    other = await gpg_signcrypt(operator_gpg, profanity_signcrypt("load-a@localhost", "shed", fresh))
    with pytest.raises(OxRefused, match="the signed recipients are load-a@localhost"):
        await open_(other)

    # Stale, and from the future.
    old = profanity_stamp(utcnow() - dt.timedelta(seconds=MAX_AGE_S + 40))
    with pytest.raises(OxRefused, match=r"signed \d+ s ago"):
        await open_(await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", old)))
    ahead = profanity_stamp(utcnow() + dt.timedelta(minutes=5))
    with pytest.raises(OxRefused, match="in the future"):
        await open_(await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", ahead)))

    # No key known for the sender.
    with pytest.raises(OxRefused, match="no usable OpenPGP key for alice@localhost"):
        await open_(await gpg_signcrypt(operator_gpg, profanity_signcrypt(DEVICE, "shed", fresh)),
                    pinned=StaticKeys({}))


@pytest.mark.parametrize(("text", "why"), [
    ("not base64 !", "not valid base64"),
    (base64.b64encode(b"hello, device").decode(), "not an OpenPGP message"),
    (base64.b64encode(bytes(pgpy.PGPMessage.new(b"plain"))).decode(), "not encrypted"),
    ("A" * 200_000, "larger than"),
])
async def test_malformed_openpgp_content_is_refused(text: str, why: str) -> None:
    el = openpgp_to_xml(b"")
    el.text = text
    with pytest.raises(OxRefused, match=why):
        await open_chat(el, ALICE, DEVICE, DEVICE_KEY, PINNED)


@pytest.mark.parametrize(("plain", "why"), [
    (b"<crypt xmlns='urn:xmpp:openpgp:0'/>", "not <signcrypt"),
    (b"<signcrypt xmlns='urn:xmpp:openpgp:0'><to jid='ox-load@localhost'/><time stamp='yesterday'/>"
     b"<payload><body xmlns='jabber:client'>shed</body></payload></signcrypt>", "no valid <time stamp"),
    (b"<signcrypt xmlns='urn:xmpp:openpgp:0'><to jid='ox-load@localhost'/><time stamp='%s'/>"
     b"<payload/></signcrypt>" % f"{utcnow():%Y-%m-%dT%H:%M:%SZ}".encode(), "a <payload/> with an element"),
    (b"<signcrypt xmlns='urn:xmpp:openpgp:0'><time stamp='%s'/>"
     b"<payload><body xmlns='jabber:client'>shed</body></payload></signcrypt>" % f"{utcnow():%Y-%m-%dT%H:%M:%SZ}".encode(),
     "names no recipient"),
    (b"<signcrypt xmlns='urn:xmpp:openpgp:0'><to jid='ox-load@localhost'/><time stamp='%s'/>"
     b"<payload><command xmlns='urn:gridpresence:0'/></payload></signcrypt>" % f"{utcnow():%Y-%m-%dT%H:%M:%SZ}".encode(),
     "holds no chat <body"),
    (b"\x00\xff not xml", "not well-formed XML"),
])
async def test_bad_signcrypt_content_is_refused_even_when_signed(plain: bytes, why: str) -> None:
    message = pgpy.PGPMessage.new(plain, compression=CompressionAlgorithm.Uncompressed)
    message |= ALICE_KEY.sign(message)
    with pytest.raises(OxRefused, match=why):
        await open_(bytes(DEVICE_KEY.pubkey.encrypt(message)))


async def test_a_body_beside_chat_states_and_receipt_requests_is_read() -> None:
    """Gajim's OpenPGP plugin encrypts every stanza element but hints into the payload."""
    stamp = f"{utcnow():%Y-%m-%dT%H:%M:%SZ}"
    plain = (f"<signcrypt xmlns='urn:xmpp:openpgp:0'><to jid='{DEVICE}'/><time stamp='{stamp}'/><rpad>xyz</rpad>"
             "<payload><active xmlns='http://jabber.org/protocol/chatstates'/><body xmlns='jabber:client'>status</body>"
             "<request xmlns='urn:xmpp:receipts'/></payload></signcrypt>").encode()
    message = pgpy.PGPMessage.new(plain, compression=CompressionAlgorithm.Uncompressed)
    message |= ALICE_KEY.sign(message)
    assert await open_(bytes(DEVICE_KEY.pubkey.encrypt(message))) == "status"


def test_encrypted_messages_are_told_from_signed_only_ones() -> None:
    sealed = seal(ET.Element("{jabber:client}body"), ALICE_KEY, {DEVICE: DEVICE_KEY.pubkey})
    assert is_encrypted(base64.b64encode(sealed).decode())
    signed = pgpy.PGPMessage.new(b"<sign xmlns='urn:xmpp:openpgp:0'/>", compression=CompressionAlgorithm.Uncompressed)
    signed |= ALICE_KEY.sign(signed)
    assert not is_encrypted(base64.b64encode(bytes(signed)).decode())
    assert not is_encrypted("") and not is_encrypted("%%%%") and not is_encrypted("AAAA")
