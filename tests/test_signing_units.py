"""Signed payloads without a server: the XEP-0373 framing, the Ed25519 hot path against pgpy
and GnuPG, the gate's rules, the replay guard across a restart, and the [security] settings."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
from pgpy.constants import CompressionAlgorithm, PubKeyAlgorithm

from gridpresence.config import FleetError, parse_fleet
from gridpresence.protocol.codec import (PayloadError, command_to_text, command_to_xml, outcome_from_xml, outcome_to_xml,
                                        tariff_to_xml)
from gridpresence.protocol.models import Action, Command, Outcome, OutcomeStatus, RejectReason, Tariff, TariffPeriod
from gridpresence.protocol.openpgp import openpgp_from_xml, openpgp_to_xml, sign_from_bytes, sign_to_bytes
from gridpresence.security import fastsig
from gridpresence.security.gate import CommandGate, Refusal, open_command
from gridpresence.security.keyring import KeyChanged, KeyUnavailable, StaticKeys
from gridpresence.security.pgp import pgpy
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.replay import ReplayGuard, ReplayStore
from gridpresence.security.signed import (
    SignatureFailure,
    check_envelope,
    open_signed,
    sign_payload,
    verify_payload,
)
from timebase import NOW, key_for

ALICE, DEVICE, SERIAL = "alice@localhost", "load-1@localhost", "SN-1"
KEY = key_for(ALICE)


def gate(**settings: object) -> CommandGate:
    return CommandGate(DEVICE, SERIAL, SecuritySettings(**settings),  # type: ignore[arg-type]
                       {ALICE: Role.OPERATOR, "billing@localhost": Role.BILLING}, frozenset({"relay@localhost"}))


def signed(cmd: Command, key: pgpy.PGPKey = KEY, to: str = DEVICE, when: dt.datetime | None = None) -> ET.Element:
    return sign_payload(command_to_xml(cmd), to, key, now=when or cmd.issued)


def check(cmd: Command, el: ET.Element | None = None, sender: str = ALICE, now: dt.datetime = NOW,
          **settings: object) -> Command:
    return gate(**settings).check(sender, open_command(el if el is not None else signed(cmd)), KEY.pubkey, now)


def test_any_payload_round_trips_and_names_signer_and_recipient() -> None:
    tariff = Tariff(supplier="s", periods=(TariffPeriod(start_hour=0, end_hour=24, price_per_kwh=0.5),))
    el = sign_payload(tariff_to_xml(tariff), DEVICE, KEY, now=NOW)
    verified = asyncio.run(verify_payload(el, ALICE, StaticKeys({ALICE: KEY})))
    assert verified.signer == ALICE and verified.to == (DEVICE,) and verified.time == NOW
    assert verified.payload.tag == "{urn:gridpresence:0}tariff"
    with pytest.raises(SignatureFailure) as unknown:
        asyncio.run(verify_payload(el, "bob@localhost", StaticKeys({ALICE: KEY})))
    assert unknown.value.reason is RejectReason.UNKNOWN_KEY


def test_envelope_names_the_recipient_and_a_time_in_the_window() -> None:
    content = open_signed(signed(Command.new(Action.READ, ALICE, now=NOW, serial=SERIAL))).content
    check_envelope(content, DEVICE, NOW + dt.timedelta(hours=2), 30)  # a command's age is its expiry's business
    for to, now, age, reason in ((("load-2@localhost", NOW, None, RejectReason.WRONG_RECIPIENT)),
                                 (DEVICE, NOW - dt.timedelta(seconds=31), None, RejectReason.STALE),
                                 (DEVICE, NOW + dt.timedelta(seconds=3631), 3600.0, RejectReason.STALE)):
        with pytest.raises(SignatureFailure) as refused:
            check_envelope(content, to, now, 30, age)
        assert refused.value.reason is reason
    check_envelope(content, DEVICE, NOW + dt.timedelta(seconds=3600), 30, 3600.0)


def test_a_role_that_may_not_issue_the_action_is_refused_before_any_key_lookup() -> None:
    """An operator's firmware offer, a stranger's shed: refused on the claim alone, so a device
    fetches no key (and waits on no PEP lookup) for a command that could never be allowed."""
    offer = open_command(signed(Command.new(Action.FIRMWARE_UPGRADE, ALICE, now=NOW, serial=SERIAL)))
    with pytest.raises(Refusal, match="may not firmware_upgrade") as refused:
        gate().may_issue(offer)
    assert refused.value.reason is RejectReason.NOT_AUTHORISED
    with pytest.raises(Refusal, match="no role"):
        gate().may_issue(open_command(signed(Command.new(Action.SHED, "eve@localhost", now=NOW, serial=SERIAL))))
    gate().may_issue(open_command(signed(Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL))))  # allowed: on to the key


def test_key_lookup_failures_become_reasons() -> None:
    class Changed(StaticKeys):
        async def key_for(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
            raise KeyChanged(jid, "AAAA", "BBBB")

    el = signed(Command.new(Action.READ, ALICE, now=NOW, serial=SERIAL))
    with pytest.raises(SignatureFailure) as changed:
        asyncio.run(verify_payload(el, ALICE, Changed({})))
    assert changed.value.reason is RejectReason.KEY_CHANGED and "AAAA" in changed.value.detail
    assert issubclass(KeyChanged, KeyUnavailable)


def test_signed_bytes_keep_every_name_and_namespace_exactly() -> None:
    """The <sign/> envelope is written from a template: what it says must read back the same,
    whatever the recipient's JID holds and whether the payload has a namespace or none."""
    cmd = command_to_xml(Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL, args={"note": "a<b & 'c'"}))
    odd = 'load-"1"&<2>@localhost'
    content = sign_from_bytes(sign_to_bytes(odd, NOW, cmd))
    assert content.to == (odd,) and content.time == NOW
    assert ET.tostring(content.payload) == ET.tostring(cmd)
    bare = sign_from_bytes(sign_to_bytes(DEVICE, NOW, ET.fromstring("<x a='1'><y/></x>"))).payload
    assert bare.tag == "x" and bare[0].tag == "y" and bare.get("a") == "1"  # still in no namespace
    other = sign_from_bytes(sign_to_bytes(DEVICE, NOW, ET.fromstring("<ns0:x xmlns:ns0='urn:other'/>"))).payload
    assert other.tag == "{urn:other}x"


def test_hot_path_messages_verify_with_pgpy_and_gnupg(tmp_path: Path) -> None:
    data = sign_to_bytes(DEVICE, NOW, command_to_xml(Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL)))
    blob = fastsig.sign(data, KEY, NOW)
    assert blob is not None
    message = pgpy.PGPMessage.from_blob(blob)
    assert bool(KEY.pubkey.verify(message)) and bytes(message.message) == data
    (tmp_path / "alice.asc").write_text(str(KEY.pubkey))
    (tmp_path / "cmd.gpg").write_bytes(blob)
    gpg = ["gpg", "--homedir", str(tmp_path), "--batch", "--no-autostart"]
    subprocess.run([*gpg, "--import", str(tmp_path / "alice.asc")], check=True, capture_output=True)
    ok = subprocess.run([*gpg, "--verify", str(tmp_path / "cmd.gpg")], capture_output=True, text=True)
    assert ok.returncode == 0 and "Good signature" in ok.stderr
    flipped = blob.replace(b'action="shed"', b'action="read"')
    (tmp_path / "cmd.gpg").write_bytes(flipped)
    assert subprocess.run([*gpg, "--verify", str(tmp_path / "cmd.gpg")], capture_output=True).returncode != 0


def test_pgpy_made_messages_verify_on_the_hot_path_and_other_shapes_fall_back() -> None:
    data = b"<sign xmlns='urn:xmpp:openpgp:0'/>"
    message = pgpy.PGPMessage.new(data, format="b", compression=CompressionAlgorithm.Uncompressed)
    message |= KEY.sign(message)
    parsed = fastsig.parse(bytes(message))
    assert parsed is not None and fastsig.verify(parsed, KEY.pubkey) is True
    assert fastsig.verify(parsed, KEY) is True  # a party's own secret key checks its signatures too
    assert fastsig.verify(parsed, key_for("bob@localhost").pubkey) is False
    assert fastsig.sign(data, KEY.pubkey, NOW) is None  # a public key cannot sign
    compressed = pgpy.PGPMessage.new(data, format="b", compression=CompressionAlgorithm.ZLIB)
    compressed |= KEY.sign(compressed)
    assert fastsig.parse(bytes(compressed)) is None  # not our shape: pgpy reads it


@pytest.mark.timeout(60)
def test_a_non_ed25519_key_signs_and_verifies_through_pgpy() -> None:
    rsa = pgpy.PGPKey.new(PubKeyAlgorithm.RSAEncryptOrSign, 2048)
    rsa.add_uid(pgpy.PGPUID.new("xmpp:carol@localhost"), usage={pgpy.constants.KeyFlags.Sign},
                hashes=[pgpy.constants.HashAlgorithm.SHA256])
    cmd = Command.new(Action.READ, "carol@localhost", now=NOW, serial=SERIAL)
    sealed = open_signed(signed(cmd, key=rsa))
    assert sealed.fast is None
    assert sealed.verify(rsa.pubkey, "carol@localhost").signer == "carol@localhost"
    with pytest.raises(SignatureFailure):
        sealed.verify(KEY.pubkey, "carol@localhost")


def test_gate_accepts_the_right_command_and_refuses_each_wrong_one() -> None:
    cmd = Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL)
    assert check(cmd) == cmd
    assert check(cmd, sender="relay@localhost") == cmd  # a relay may carry it

    def reason(**kw: object) -> RejectReason:
        with pytest.raises(Refusal) as refused:
            check(**kw)  # type: ignore[arg-type]
        assert refused.value.command_id == kw["cmd"].id  # type: ignore[attr-defined]
        return refused.value.reason

    assert reason(cmd=cmd, el=signed(cmd, key=key_for(ALICE))) is RejectReason.BAD_SIGNATURE
    assert reason(cmd=cmd, el=signed(cmd, to="load-2@localhost")) is RejectReason.WRONG_RECIPIENT
    assert reason(cmd=cmd, sender="bob@localhost") is RejectReason.NOT_AUTHORISED
    other = Command.new(Action.SHED, ALICE, now=NOW, serial="SN-2")
    assert reason(cmd=other) is RejectReason.WRONG_SERIAL
    reset = Command.new(Action.BILLING_RESET, ALICE, now=NOW, serial=SERIAL)
    assert reason(cmd=reset) is RejectReason.NOT_AUTHORISED
    assert reason(cmd=cmd, now=NOW - dt.timedelta(seconds=31)) is RejectReason.STALE  # signed in the future
    assert reason(cmd=cmd, el=signed(cmd, when=NOW + dt.timedelta(seconds=-60))) is RejectReason.STALE
    long = Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL, ttl_s=7200)
    assert reason(cmd=long, max_ttl_s=3600) is RejectReason.STALE
    assert check(long) == long  # under the default one-day limit
    allowed = Command.new(Action.BILLING_RESET, ALICE, now=NOW, serial=SERIAL)
    assert check(allowed, allow={"operator": ["billing_reset"], "billing": [], "manufacturer": []}) == allowed
    # ... the policy is configuration


def test_broken_envelopes_are_refused_with_a_reason() -> None:
    def opened(el: ET.Element) -> RejectReason:
        with pytest.raises(Refusal) as refused:
            open_command(el)
        return refused.value.reason

    assert opened(openpgp_to_xml(b"\x00 garbage")) is RejectReason.BAD_SIGNATURE
    bad_b64 = ET.Element("{urn:xmpp:openpgp:0}openpgp")
    bad_b64.text = "%%%"
    assert opened(bad_b64) is RejectReason.BAD_SIGNATURE
    literal = pgpy.PGPMessage.new(sign_to_bytes(DEVICE, NOW, ET.Element("x")), format="b")
    assert opened(openpgp_to_xml(bytes(literal))) is RejectReason.UNSIGNED
    weird = sign_payload(ET.fromstring("<command xmlns='urn:gridpresence:0' id='c1' action='explode'/>"), DEVICE, KEY)
    with pytest.raises(Refusal) as unknown:
        open_command(weird)
    assert unknown.value.reason is RejectReason.NOT_SUPPORTED and unknown.value.command_id == "c1"
    for text in (b"<sign xmlns='urn:xmpp:openpgp:0'/>", b"not xml", b"<other/>",
                 b"<sign xmlns='urn:xmpp:openpgp:0'><to jid='a'/><time stamp='yesterday'/><payload/></sign>"):
        with pytest.raises(PayloadError):
            sign_from_bytes(text)
    with pytest.raises(PayloadError):
        openpgp_from_xml(ET.Element("openpgp"))


def test_replay_guard_remembers_across_a_restart_and_forgets_after_expiry(tmp_path: Path) -> None:
    import time

    store = ReplayStore(tmp_path / "replay.sqlite3")
    guard = ReplayGuard(store, DEVICE)
    done = Outcome(command_id="c1", device=DEVICE, status=OutcomeStatus.EXECUTED, detail="load shed")
    guard.record(ALICE, "c1", time.time() + 60, done)
    guard.record(ALICE, "old", time.time() - 1, done)
    assert guard.seen(ALICE, "c1") is not None and guard.seen("bob@localhost", "c1") is None
    store.close()
    again = ReplayGuard(ReplayStore(tmp_path / "replay.sqlite3"), DEVICE)
    seen = again.seen(ALICE, "c1")
    assert seen is not None and seen.outcome == done  # a restarted device still knows it, and what it did
    assert again.seen(ALICE, "old") is None  # past its expiry: the window refuses it anyway
    assert ReplayGuard(again.store, "load-2@localhost").seen(ALICE, "c1") is None  # per device


def test_outcome_carries_the_first_outcome_one_level_deep() -> None:
    first = Outcome(command_id="c1", device=DEVICE, status=OutcomeStatus.EXECUTED, detail="load shed")
    replay = Outcome(command_id="c1", device=DEVICE, status=OutcomeStatus.REJECTED, reason=RejectReason.REPLAYED,
                     detail="already had", first=first)
    assert outcome_from_xml(outcome_to_xml(replay)) == replay
    nested = outcome_to_xml(replay)
    inner = nested.find("{urn:gridpresence:0}first/{urn:gridpresence:0}outcome")
    assert inner is not None
    inner.append(outcome_to_xml(replay).find("{urn:gridpresence:0}first"))  # type: ignore[arg-type]
    with pytest.raises(PayloadError):
        outcome_from_xml(nested)


def test_security_settings_in_the_fleet_file() -> None:
    base = {"operators": [{"name": "olga"}], "devices": [{"name": "pump", "kind": "load", "rated_kw": 3}]}
    fleet = parse_fleet(base)
    assert fleet.security.allows(Role.BILLING, Action.BILLING_RESET)
    assert not fleet.security.allows(Role.OPERATOR, Action.BILLING_RESET)
    assert not fleet.security.allows(Role.MANUFACTURER, Action.SHED)
    assert fleet.security.unsigned_chat_actions == () and fleet.security.require_signatures
    assert fleet.devices[0].serial.startswith("SN-") and parse_fleet(base).devices[0].serial == fleet.devices[0].serial
    with pytest.raises(FleetError, match=r"security.allow.operator\[0\]"):
        parse_fleet({**base, "security": {"allow": {"operator": ["fly"], "billing": [], "manufacturer": []}}})
    with pytest.raises(FleetError, match="missing: manufacturer"):
        parse_fleet({**base, "security": {"allow": {"operator": [], "billing": []}}})
    with pytest.raises(FleetError, match="security.clock_skew_s"):
        parse_fleet({**base, "security": {"clock_skew_s": -1}})
    with pytest.raises(FleetError, match=r"devices\[0\] \(pump\)\.serial"):
        parse_fleet({**base, "devices": [{"name": "pump", "kind": "load", "rated_kw": 3, "serial": "no spaces"}]})
    made = parse_fleet({**base, "manufacturers": [{"name": "acme"}]})
    assert made.roles()["acme@localhost"] is Role.MANUFACTURER


def _pgpy_verdict(blob: bytes, key: pgpy.PGPKey) -> bool:
    """The reference: pgpy's verdict on a signed message (any error is a refusal)."""
    try:
        return bool(key.verify(pgpy.PGPMessage.from_blob(blob)))
    except Exception:
        return False


def test_the_hot_path_agrees_with_pgpy_on_seeded_valid_tampered_foreign_and_malformed_messages() -> None:
    """Seeded fuzz of the libsodium path (security/fastsig.py) against pgpy: every message it
    reads, it judges as pgpy does — valid ones (its own and pgpy's) accepted, each tampered byte
    of the signed part, another key, or a malformed message refused — and what it does not read
    (None) pgpy decides, through Sealed.verify. Bytes outside what the signature covers (the
    unhashed issuer key id, the literal packet's name and date) are not tampering; a changed
    quick check (the digest's left 16 bits) the hot path refuses, as GnuPG does, and pgpy not."""
    import random
    rng = random.Random(16)
    bob = key_for("bob@localhost")
    fast_read = 0
    for i in range(60):
        cmd = Command.new(Action.SHED if i % 2 else Action.RESTORE, ALICE, now=NOW, serial=SERIAL,
                          args={"note": "".join(rng.choice("ab<&'\" ") for _ in range(rng.randrange(8)))})
        data = sign_to_bytes(DEVICE, NOW, command_to_text(cmd))
        if i % 3 == 0:  # pgpy's own making
            message = pgpy.PGPMessage.new(data, format="b", compression=CompressionAlgorithm.Uncompressed)
            message |= KEY.sign(message)
            good = bytes(message)
        else:
            made = fastsig.sign(data, KEY, NOW)
            assert made is not None
            good = made
        variants = [(good, KEY.pubkey), (good, bob.pubkey)]
        for _ in range(6):  # one byte flipped anywhere
            blob = bytearray(good)
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
            variants.append((bytes(blob), KEY.pubkey))
        cut = rng.randrange(1, len(good))
        variants += [(good[:cut], KEY.pubkey), (good + bytes([rng.randrange(256)]), KEY.pubkey),
                     (bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))), KEY.pubkey)]
        for blob, key in variants:
            parsed = fastsig.parse(blob)
            reference = _pgpy_verdict(blob, key)
            if parsed is None:
                continue  # pgpy's to read (Sealed.verify falls back to it)
            fast_read += 1
            verdict = fastsig.verify(parsed, key)
            if verdict != reference:  # where pgpy looks at what no signature covers, or looks less
                first = fastsig.parse(good)
                assert first is not None and blob != good, i
                if verdict:  # an unhashed key id or the literal's name or date changed: the signed part did not
                    assert parsed.data == data and parsed.hashed == first.hashed, (i, blob.hex())
                else:  # the two left bytes of the digest changed: pgpy skips that quick check, GnuPG does not
                    assert parsed.left16 != first.left16 and parsed.signature == first.signature, (i, blob.hex())
            if verdict and blob != good:
                assert parsed.data == data  # never a different content accepted
    assert fast_read >= 300  # the fuzz did exercise the hot path


def test_command_text_reads_back_as_the_command_element_does() -> None:
    """codec.command_to_text (what an issuer signs) against command_to_xml, seeded: both read
    back as the same command, whatever the args and serial hold."""
    import random
    from gridpresence.protocol.codec import command_from_xml
    rng = random.Random(7)
    chars = "aZ09 <>&'\"\t\n=/é"
    for i in range(200):
        args = {f"k{j}": "".join(rng.choice(chars) for _ in range(rng.randrange(10))) for j in range(rng.randrange(3))}
        cmd = Command.new(list(Action)[i % len(Action)], ALICE, now=NOW, args=args,
                          serial="".join(rng.choice("AZ09-._:") for _ in range(rng.randrange(1, 8))))
        text = command_to_text(cmd)
        assert command_from_xml(ET.fromstring(text)) == command_from_xml(command_to_xml(cmd)) == cmd, text
        content = sign_from_bytes(sign_to_bytes(DEVICE, NOW, text))
        assert command_from_xml(content.payload) == cmd


def test_command_text_is_the_general_writers_text_byte_for_byte() -> None:
    """codec's field-by-field command attributes against _attrs' general loop, seeded: the same
    bytes (what is signed) for any id, issuer, serial or none, time zone and microseconds."""
    import datetime as dt
    import random
    from gridpresence.protocol import codec
    assert codec._COMMAND_SHAPE_KNOWN  # a field added to Command: the general way (and update the writer)
    rng = random.Random(11)
    zones = [dt.timezone.utc, dt.timezone(dt.timedelta(hours=-5)), dt.timezone(dt.timedelta(hours=5, minutes=30))]
    for i in range(300):
        when = (NOW + dt.timedelta(seconds=rng.randrange(-10**6, 10**6), microseconds=rng.choice([0, rng.randrange(10**6)])))
        cmd = Command.new(list(Action)[i % len(Action)], rng.choice([ALICE, "a&b<c>\"@x.example"]),
                          now=when.astimezone(rng.choice(zones)), ttl_s=rng.choice([0.5, 30.0, 86400.0]),
                          serial=rng.choice([None, "SN-1", "a.b:c_d"]))
        assert codec._command_attrs(cmd) == codec._general_command_attrs(cmd), cmd


def test_a_signed_commands_wire_text_reads_back_as_its_element() -> None:
    """operator/issuer.py's wire_text (what it writes and what a pending entry keeps) is the
    same <openpgp/> as the element; an unsigned command goes through the serialiser."""
    from gridpresence.operator.issuer import wire_text
    cmd = Command.new(Action.SHED, ALICE, now=NOW, serial=SERIAL)
    wire = signed(cmd)
    back = ET.fromstring(wire_text(wire))
    assert back.tag == wire.tag and openpgp_from_xml(back) == openpgp_from_xml(wire)
    assert open_command(back).command == cmd
    plain = command_to_xml(cmd)
    assert ET.tostring(ET.fromstring(wire_text(plain))) == ET.tostring(plain)


def _reading(read: object, data: bytes) -> object:
    """What a reader of signed content makes of ``data``: every part of the element, or the error."""
    try:
        c = read(data)  # type: ignore[operator]
    except PayloadError as exc:
        return ("error", str(exc))
    p = c.payload
    return (c.to, c.time, p.tag, list(p.attrib.items()), p.text, p.tail, len(p))


def test_the_signed_command_template_reads_as_the_parser_does_on_seeded_variants() -> None:
    """protocol/openpgp.py reads the one shape an issuer writes around a command without args
    without the XML parser: seeded, on commands as written and mutated (a byte flipped, cut,
    inserted, characters that need escaping or normalising, a repeated or reserved attribute,
    args), the content read is the parser's to the last attribute and its order, or the parser
    reads it (never a different element, never one the parser refuses)."""
    import random
    from gridpresence.protocol import openpgp
    rng = random.Random(1616)
    specials = ["&amp;", '"', "'", "<", ">", "\t", "\n", "é", "\x01", " ", "xmlns", "ox:", "/>", "=", "&#65;"]
    fast = 0
    for i in range(3000):
        cmd = Command.new(list(Action)[i % len(Action)], rng.choice([ALICE, "o@x", "a.b-c@d.e"]), now=NOW,
                          serial=rng.choice([SERIAL, None, "A:B.C-9"]),
                          args={"note": "x"} if i % 11 == 0 else None)
        data = sign_to_bytes(rng.choice([DEVICE, "d@devices.x"]), NOW, command_to_text(cmd))
        kind = i % 6
        if kind == 1:  # one byte flipped
            b = bytearray(data)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            data = bytes(b)
        elif kind == 2:  # something inserted where it may or may not matter
            at = rng.randrange(len(data))
            data = data[:at] + rng.choice(specials).encode() + data[at:]
        elif kind == 3:  # an attribute added: new, repeated, reserved, or with an odd value
            name = rng.choice(["id", "action", "serial", "xmlns", "xml-x", "extra", "a-b"])
            value = rng.choice(["v", "", "a&amp;b", "t\tab", "q'q", "1 2"])
            data = data.replace(b" />", f' {name}="{value}" />'.encode(), 1)
        elif kind == 4:  # cut short or spaced differently
            data = data[:rng.randrange(len(data))] if rng.random() < 0.5 else data.replace(b" />", b"/>", 1)
        reference = _reading(openpgp.parse_sign, data)
        assert _reading(openpgp.sign_from_bytes, data) == reference, data
        fast += openpgp._signed_command(data) is not None
        if openpgp._signed_command(data) is not None:
            assert reference[0] != "error", data  # the template never takes what the parser refuses
    assert fast >= 1000  # the fuzz did exercise the template


def test_the_gate_judges_seeded_commands_alike_through_the_template_and_the_parser(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the gate, seeded: valid, tampered, wrong key, expired, wrong serial,
    wrong recipient, future, malformed — the same command or the same refusal whether the
    signed content is read by the template or by the parser."""
    import random
    from gridpresence.protocol import openpgp
    rng = random.Random(1617)
    bob = key_for("bob@localhost")

    def verdict(el: ET.Element, now: dt.datetime) -> object:
        try:
            return check(Command.new(Action.READ, ALICE, now=NOW), el=el, now=now)
        except Refusal as refusal:
            return (refusal.reason, refusal.detail, refusal.command_id)

    seen: set[object] = set()
    for i in range(240):
        cmd = Command.new(rng.choice([Action.SHED, Action.RESTORE, Action.READ]), ALICE, now=NOW,
                          serial=rng.choice([SERIAL, SERIAL, "SN-2"]), ttl_s=rng.choice([30.0, 1.0]))
        kind = i % 6
        key = bob if kind == 1 else KEY
        when = NOW + dt.timedelta(seconds=rng.choice([0, 0, 45, -90]))
        data = sign_to_bytes(rng.choice([DEVICE, DEVICE, "load-2@localhost"]), when, command_to_text(cmd))
        if kind == 2:  # tampered before signing would be valid: tamper after
            blob = fastsig.sign(data, key, when)
            assert blob is not None
            b = bytearray(blob)
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            el = openpgp_to_xml(bytes(b))
        elif kind == 3:  # malformed content, validly signed
            el = openpgp_to_xml(fastsig.sign(data.replace(b"action=", rng.choice([b"action=", b"x="]), 1)
                                             .replace(b'" />', rng.choice([b'" />', b'"/>', b'" x="1" />']), 1),
                                             key, when) or b"")
        else:
            el = openpgp_to_xml(fastsig.sign(data, key, when) or b"")
        now = NOW + dt.timedelta(seconds=rng.choice([0, 5, 40]))  # 40 s: past a 30 s command's expiry window
        through_template = verdict(el, now)
        with monkeypatch.context() as m:
            m.setattr(openpgp, "_signed_command", lambda data: None)
            assert verdict(el, now) == through_template, (i, through_template)
        seen.add(through_template[0] if isinstance(through_template, tuple) else "accepted")
    assert seen >= {"accepted", RejectReason.BAD_SIGNATURE, RejectReason.STALE, RejectReason.WRONG_SERIAL,
                    RejectReason.WRONG_RECIPIENT, RejectReason.INVALID_ARGUMENTS}, seen
