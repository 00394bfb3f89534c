"""Signed commands on a real Prosody: a device acts only on a command its issuer's key signed,
for this device and serial, from a role the fleet's [security] policy allows, inside the time
window, once. Everything else is refused with its reason and the device's state stays as it was.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio
from slixmpp import JID, ClientXMPP, Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from conftest import Env
from gridpresence.host.fleet import device_agent
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.protocol.codec import command_to_xml, outcome_from_xml, q, tariff_to_xml
from gridpresence.protocol.models import (
    Action,
    Command,
    DeviceState,
    Outcome,
    OutcomeStatus,
    RejectReason,
    Tariff,
    TariffPeriod,
)
from gridpresence.protocol.openpgp import openpgp_from_xml, openpgp_to_xml
from gridpresence.security.keys import fingerprint, generate, write_secret
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.security.pins import PinStore
from gridpresence.security.pgp import pgpy
from gridpresence.security.replay import ReplayStore
from gridpresence.security.signed import sign_payload

pytestmark = pytest.mark.timeout(120)


class WirePeer:
    """A party's own XMPP session sending hand-made (signed or not) command stanzas."""

    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.outcomes: dict[str, asyncio.Future[Outcome]] = {}
        client.register_handler(Callback("outcome", StanzaPath("message/grid_outcome"),
                                         self._on_outcome))  # type: ignore[arg-type]

    def _on_outcome(self, msg: Message) -> None:
        outcome = outcome_from_xml(msg.xml.find(q("outcome")))
        fut = self.outcomes.setdefault(outcome.command_id, asyncio.get_running_loop().create_future())
        if not fut.done():
            fut.set_result(outcome)

    async def send(self, to: str, el: ET.Element, cmd_id: str, timeout: float = 5.0) -> Outcome:
        self.outcomes[cmd_id] = asyncio.get_running_loop().create_future()
        msg = self.client.make_message(mto=to, mtype="normal")
        msg.append(el)
        msg.send()
        return await asyncio.wait_for(self.outcomes[cmd_id], timeout)


async def wire_peer(env: Env, name: str) -> WirePeer:
    client = make_client(f"{env.fleet.jid(name)}/wire-{os.urandom(3).hex()}", env.grid.secrets.password(name),
                         env.grid.endpoint)
    peer = WirePeer(client)
    await open_session(client, env.grid.endpoint)
    return peer


@pytest_asyncio.fixture
async def alice_wire(env: Env) -> AsyncIterator[WirePeer]:
    peer = await wire_peer(env, "alice")
    yield peer
    await close_session(peer.client)


def key(env: Env, name: str) -> pgpy.PGPKey:
    return env.grid.keys.secret(name)


def shed_for(alice: GridOperator, name: str, **kw: object) -> Command:
    view = alice.devices[name]
    return Command.new(Action.SHED, alice.jid, serial=alice.serial_of(view), **kw)  # type: ignore[arg-type]


async def unchanged(alice: GridOperator, name: str, state: DeviceState = DeviceState.ON) -> None:
    """The device is still in `state` after a refusal (a read round trip lets any effect show)."""
    read = await alice.command(name, Action.READ)
    assert read.ok and read.report is not None and read.report.state is state, read
    assert alice.devices[name].state is state


def tampered(el: ET.Element, old: bytes, new: bytes) -> ET.Element:
    blob = openpgp_from_xml(el)
    assert old in blob and len(old) == len(new)
    return openpgp_to_xml(blob.replace(old, new))


# -- the happy path and what presence tells ----------------------------------------------------


async def test_presence_carries_the_serial_and_the_library_signs(env: Env, alice: GridOperator) -> None:
    view = alice.devices["sig-load"]
    assert view.report is not None and view.report.serial == "ACME-0001"
    assert alice.devices["load-a"].report.serial == env.fleet.device("load-a").serial  # type: ignore[union-attr]
    assert alice.issuer.key is not None
    done = await alice.command("sig-load", Action.SHED)
    assert done.ok and done.report is not None and done.report.state is DeviceState.OFF
    assert (await alice.command("sig-load", Action.RESTORE)).ok


# -- each way a command can be wrong: refused, reason given, nothing changes ---------------------


async def test_unsigned_command_is_refused(alice: GridOperator, alice_wire: WirePeer) -> None:
    cmd = shed_for(alice, "sig-load")
    outcome = await alice_wire.send(alice.devices["sig-load"].full_jid or "", command_to_xml(cmd), cmd.id)
    assert outcome.reason is RejectReason.UNSIGNED and "signed" in outcome.detail
    await unchanged(alice, "sig-load")


async def test_signed_by_another_key_or_tampered_is_refused(env: Env, alice: GridOperator,
                                                            alice_wire: WirePeer) -> None:
    to = alice.devices["sig-load"].full_jid or ""
    jid = alice.devices["sig-load"].jid
    cmd = shed_for(alice, "sig-load")
    by_bob = sign_payload(command_to_xml(cmd), jid, key(env, "bob"))  # alice's command, bob's key
    outcome = await alice_wire.send(to, by_bob, cmd.id)
    assert outcome.reason is RejectReason.BAD_SIGNATURE and "alice@localhost" in outcome.detail
    read = Command.new(Action.READ, alice.jid, serial="ACME-0001")
    good = sign_payload(command_to_xml(read), jid, key(env, "alice"))
    flipped = tampered(good, b"action=\"read\"", b"action=\"shed\"")  # a read turned into a shed
    outcome = await alice_wire.send(to, flipped, read.id)
    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.BAD_SIGNATURE
    garbage = openpgp_to_xml(b"\x99\x00 not OpenPGP")
    msg = alice_wire.client.make_message(mto=to, mtype="normal")
    msg.append(garbage)
    msg.send()
    await unchanged(alice, "sig-load")


async def test_replay_is_refused_with_the_first_outcome(env: Env, alice: GridOperator, alice_wire: WirePeer) -> None:
    to = alice.devices["sig-load"].full_jid or ""
    cmd = shed_for(alice, "sig-load")
    signed = sign_payload(command_to_xml(cmd), alice.devices["sig-load"].jid, key(env, "alice"), now=cmd.issued)
    first = await alice_wire.send(to, signed, cmd.id)
    assert first.ok
    assert (await alice.command("sig-load", Action.RESTORE)).ok
    again = await alice_wire.send(to, signed, cmd.id)  # the captured bytes, sent again
    assert again.status is OutcomeStatus.REJECTED and again.reason is RejectReason.REPLAYED
    assert again.first is not None and again.first.status is OutcomeStatus.EXECUTED
    assert "already had" in again.detail
    await unchanged(alice, "sig-load")
    # The issuer's own library, resending its command, learns the first outcome instead.
    resent = await alice.send_command(cmd, to)
    assert resent.ok and "had this command already" in resent.detail
    await unchanged(alice, "sig-load")


async def test_expired_and_out_of_window_commands_are_refused(env: Env, alice: GridOperator,
                                                              alice_wire: WirePeer) -> None:
    to, jid, k = alice.devices["sig-load"].full_jid or "", alice.devices["sig-load"].jid, key(env, "alice")
    now = dt.datetime.now(dt.timezone.utc)
    late = shed_for(alice, "sig-load", ttl_s=10, now=now - dt.timedelta(seconds=60))
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(late), jid, k, now=late.issued), late.id)
    assert outcome.status is OutcomeStatus.EXPIRED
    future = shed_for(alice, "sig-load", now=now + dt.timedelta(seconds=300))
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(future), jid, k, now=future.issued), future.id)
    assert outcome.reason is RejectReason.STALE and "future" in outcome.detail
    forever = shed_for(alice, "sig-load", ttl_s=30 * 86400)
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(forever), jid, k, now=forever.issued), forever.id)
    assert outcome.reason is RejectReason.STALE and "longer than" in outcome.detail
    backdated = shed_for(alice, "sig-load")  # signed now, claims an issue time an hour ago
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(backdated), jid, k,
                                                     now=now + dt.timedelta(seconds=-3600)), backdated.id)
    assert outcome.reason is RejectReason.STALE
    await unchanged(alice, "sig-load")


async def test_wrong_serial_and_wrong_device_are_refused(env: Env, alice: GridOperator, alice_wire: WirePeer) -> None:
    to, jid, k = alice.devices["sig-load"].full_jid or "", alice.devices["sig-load"].jid, key(env, "alice")
    other = Command.new(Action.SHED, alice.jid, serial="ACME-9999")
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(other), jid, k), other.id)
    assert outcome.reason is RejectReason.WRONG_SERIAL and "ACME-0001" in outcome.detail
    unbound = Command.new(Action.SHED, alice.jid)
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(unbound), jid, k), unbound.id)
    assert outcome.reason is RejectReason.WRONG_SERIAL
    # Signed for load-a, delivered to sig-load: the <to/> inside the signature says otherwise.
    cmd = shed_for(alice, "sig-load")
    outcome = await alice_wire.send(to, sign_payload(command_to_xml(cmd), env.fleet.jid("load-a"), k), cmd.id)
    assert outcome.reason is RejectReason.WRONG_RECIPIENT
    await unchanged(alice, "sig-load")


async def test_roles_decide_who_may_issue_what(env: Env, alice: GridOperator) -> None:
    billing = env.grid.bots.billing["billing"]  # type: ignore[union-attr]
    meter, serial = env.fleet.jid("sig-meter"), env.fleet.device("sig-meter").serial
    shed = await billing.command(alice.devices["sig-load"].jid, "ACME-0001", Action.SHED)
    assert shed.reason is RejectReason.NOT_AUTHORISED and "only operator may" in shed.detail
    await unchanged(alice, "sig-load")
    await asyncio.sleep(1.2)  # the meter's register counts up
    by_operator = await alice.command("sig-meter", Action.BILLING_RESET)
    assert by_operator.reason is RejectReason.NOT_AUTHORISED and "only billing may" in by_operator.detail
    read = await alice.command("sig-meter", Action.READ)
    before = read.report.telemetry.energy_kwh if read.report else None
    assert before is not None and before > 0, "the refused reset left the register alone"
    reset = await billing.command(meter, serial, Action.BILLING_RESET)
    assert reset.ok and "billing register reset" in reset.detail, reset
    assert reset.report is not None and (reset.report.telemetry.energy_kwh or 0) < before


async def test_prices_reach_devices_only_signed_by_billing(env: Env, alice: GridOperator) -> None:
    billing = env.grid.bots.billing["billing"]  # type: ignore[union-attr]
    device = env.grid.bots.devices["sig-meter"]  # type: ignore[union-attr]
    errors: asyncio.Queue[Message] = asyncio.Queue()
    try:
        billing.set_price(1.25)  # signed for each device and operator
        async with asyncio.timeout(5):
            while device.prices.price() != 1.25 or alice.price_now() != 1.25:
                await asyncio.sleep(0.05)
        peers = {name: await wire_peer(env, name) for name in ("billing", "alice")}
        for peer in peers.values():
            peer.client.add_event_handler("message_error", errors.put_nowait)
        cheap = Tariff(supplier="x", kind="real-time", periods=(TariffPeriod(start_hour=0, end_hour=24,
                                                                             price_per_kwh=0.01),))
        attempts = [
            ("billing", tariff_to_xml(cheap), "unsigned"),  # billing's password without its key
            ("billing", sign_payload(tariff_to_xml(cheap), device.jid, key(env, "alice")), "bad-signature"),
            ("billing", sign_payload(tariff_to_xml(cheap), env.fleet.jid("load-a"), key(env, "billing")),
             "wrong-recipient"),
            ("alice", sign_payload(tariff_to_xml(cheap), device.jid, key(env, "alice")), "not a billing party"),
        ]
        for sender, el, why in attempts:
            msg = peers[sender].client.make_message(mto=device.jid, mtype="normal", mbody="cheap power")
            msg.append(el)
            msg.send()
            refused = await asyncio.wait_for(errors.get(), 5)
            assert why in refused["error"]["text"], (why, refused["error"]["text"])
        assert device.prices.price() == 1.25
        for peer in peers.values():
            await close_session(peer.client)
    finally:
        billing.publish(billing.spec.tariff())  # back to the fleet's tariff for the other tests


# -- a compromised operator account: the password without the key -------------------------------


async def test_password_without_the_key_cannot_command(env: Env, alice: GridOperator, tmp_path: Path) -> None:
    """The thief has bob's password: without bob's key the commands are unsigned; with a key of
    their own, announced over PEP in bob's name, they meet the key pinned at provisioning."""
    acc = env.grid.connection.operator("bob")
    write_secret(tmp_path / "thief.sec.asc", generate(acc.jid))
    cases = ((PartyKeys(), {RejectReason.UNSIGNED}),
             (PartyKeys(tmp_path / "thief.sec.asc"), {RejectReason.KEY_CHANGED, RejectReason.BAD_SIGNATURE}))
    try:
        for keys, reasons in cases:
            intruder = GridOperator(acc.jid, acc.password, env.grid.endpoint, keys=keys,
                                    resource=f"intruder-{os.urandom(2).hex()}", serials=env.grid.connection.serials)
            await intruder.connect()  # announces the thief's key as bob's, if it has one
            try:
                for name in ("sig-load", "load-b"):
                    outcome = await intruder.command(name, Action.SHED)
                    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason in reasons, outcome
            finally:
                await intruder.close()
        await unchanged(alice, "sig-load")
        await unchanged(alice, "load-b")
    finally:
        real = env.operator("bob", resource="real-bob")
        await real.connect()  # bob logs in: his own key is announced again
        await real.close()


# -- a device run apart: unknown keys, the default chat policy, replays after a restart -----------


@asynccontextmanager
async def device_apart(env: Env, alice: GridOperator, replay_file: Path) -> AsyncIterator[str]:
    """The "sig-apart" device run by the test with its own replay file, as its own process would
    (a second run opens the same file); yields its full JID once the operator sees it."""
    store = ReplayStore(replay_file)
    device = device_agent(env.fleet, "sig-apart", env.grid.endpoint, env.grid.secrets.password("sig-apart"),
                          PartyKeys.in_data_dir(env.data, "sig-apart"), store)
    await device.start()
    try:
        await alice.wait_for(lambda d: d["sig-apart"].present, timeout=5)
        yield alice.devices["sig-apart"].full_jid or ""
    finally:
        await device.stop()
        store.close()


async def test_replay_after_restart_and_unknown_key(env: Env, alice: GridOperator, alice_wire: WirePeer,
                                                    tmp_path: Path) -> None:
    async with device_apart(env, alice, tmp_path / "replay.sqlite3") as to:
        cmd = shed_for(alice, "sig-apart", ttl_s=120)
        signed = sign_payload(command_to_xml(cmd), env.fleet.jid("sig-apart"), key(env, "alice"), now=cmd.issued)
        assert (await alice_wire.send(to, signed, cmd.id)).ok
        assert (await alice.command("sig-apart", Action.RESTORE)).ok
    # The device restarts (a new process would open the same file): the replay is still refused.
    async with device_apart(env, alice, tmp_path / "replay.sqlite3") as to:
        again = await alice_wire.send(to, signed, cmd.id)
        assert again.reason is RejectReason.REPLAYED and again.first is not None and again.first.ok
        await unchanged(alice, "sig-apart")


async def test_a_key_nobody_announced_nor_vouched_is_unknown(env: Env, alice: GridOperator) -> None:
    """A manufacturer that never logged in has announced no key, and here its key was not handed
    over at provisioning either: its signature cannot be checked. (An action its role may issue:
    one it may not is refused on the claim, before any lookup.)"""
    vouched_dir = PartyKeys.in_data_dir(env.data, "sig-load").vouched_dir
    assert vouched_dir is not None
    vouched = vouched_dir / f"{env.fleet.jid('maker-offline')}.pub"
    vouched.rename(vouched.with_name(vouched.name + ".aside"))
    try:
        outcome = await _firmware_from_maker_offline(env, alice)
        assert outcome.reason is RejectReason.UNKNOWN_KEY and "maker-offline@localhost" in outcome.detail
    finally:
        vouched.with_name(vouched.name + ".aside").rename(vouched)
    await unchanged(alice, "sig-load")


async def test_a_vouched_key_is_known_without_its_announcement(env: Env, alice: GridOperator) -> None:
    """The same manufacturer, never logged in, whose key `up` handed to the devices with its pin:
    the signature is checked against that key and the command goes on to the firmware desk,
    which refuses it for what it asks (no such image offered), not for its key."""
    outcome = await _firmware_from_maker_offline(env, alice)
    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.INVALID_ARGUMENTS, outcome
    await unchanged(alice, "sig-load")


async def _firmware_from_maker_offline(env: Env, alice: GridOperator) -> Outcome:
    offline = await wire_peer(env, "maker-offline")  # a plain session: it announces nothing
    try:
        cmd = Command.new(Action.FIRMWARE_UPGRADE, env.fleet.jid("maker-offline"), serial="ACME-0001",
                          args={"firmware-id": "f1", "version": "2.0.0", "sha256": "0" * 64})
        el = sign_payload(command_to_xml(cmd), alice.devices["sig-load"].jid, key(env, "maker-offline"))
        return await offline.send(alice.devices["sig-load"].full_jid or "", el, cmd.id, timeout=10)
    finally:
        await close_session(offline.client)


async def test_unsigned_chat_changes_nothing_by_default(env: Env) -> None:
    """Without the lab setting, a chat line may look but not act; a verified one may act."""
    fleet = env.fleet.model_copy(update={"security": env.fleet.security.model_copy(
        update={"unsigned_chat_actions": ()})})
    device = device_agent(fleet, "sig-apart", env.grid.endpoint, env.grid.secrets.password("sig-apart"), None)
    alice = JID("alice@localhost/chat")
    refused = await device.chat.handle("shed", alice, signed=False)
    assert refused is not None and refused.startswith("Refused shed") and device.sim.state is DeviceState.ON
    assert (await device.chat.handle("status", alice, signed=False) or "").startswith("sig-apart (load) is on")
    done = await device.chat.handle("shed", alice, signed=True)
    assert done is not None and done.startswith("Done") and device.sim.state is DeviceState.OFF


# -- the other paths: BOSH and the relay --------------------------------------------------------


async def test_relay_carries_the_signature_but_cannot_forge_one(env: Env, alice: GridOperator) -> None:
    """The relay's own account may hand devices commands, but only ones their issuer signed."""
    relay_peer = await wire_peer(env, "relay")
    try:
        to = alice.devices["sig-load"].full_jid or ""
        cmd = shed_for(alice, "sig-load")
        forged = sign_payload(command_to_xml(cmd), alice.devices["sig-load"].jid, key(env, "relay"))
        outcome = await relay_peer.send(to, forged, cmd.id)
        assert outcome.reason is RejectReason.BAD_SIGNATURE
        own = Command.new(Action.SHED, "relay@localhost", serial="ACME-0001")
        outcome = await relay_peer.send(to, sign_payload(command_to_xml(own), alice.devices["sig-load"].jid,
                                                         key(env, "relay")), own.id)
        assert outcome.reason is RejectReason.NOT_AUTHORISED
        genuine = shed_for(alice, "sig-load")  # alice's signed command, carried by the relay: acts
        signed = sign_payload(command_to_xml(genuine), alice.devices["sig-load"].jid, key(env, "alice"))
        assert (await relay_peer.send(to, signed, genuine.id)).ok
        assert (await alice.command("sig-load", Action.RESTORE)).ok
    finally:
        await close_session(relay_peer.client)
    await unchanged(alice, "sig-load")


def test_signed_content_is_the_xep_0373_sign_element(env: Env) -> None:
    cmd = Command.new(Action.READ, "alice@localhost", serial="ACME-0001")
    el = sign_payload(command_to_xml(cmd), "sig-load@localhost", key(env, "alice"))
    assert el.tag == "{urn:xmpp:openpgp:0}openpgp"
    message = pgpy.PGPMessage.from_blob(base64.b64decode(el.text or ""))
    sign = ET.fromstring(bytes(message.message))
    assert sign.tag == "{urn:xmpp:openpgp:0}sign"
    assert sign.find("{urn:xmpp:openpgp:0}to").get("jid") == "sig-load@localhost"  # type: ignore[union-attr]
    assert sign.find("{urn:xmpp:openpgp:0}time") is not None
    inner = sign.find("{urn:xmpp:openpgp:0}payload/{urn:gridpresence:0}command")
    assert inner is not None and inner.get("serial") == "ACME-0001" and inner.get("id") == cmd.id


def test_issuers_keys_are_pinned_at_provisioning(env: Env) -> None:
    """Not trust on first use for the parties that command devices or price the grid."""
    device_pins = PinStore(PartyKeys.in_data_dir(env.data, "sig-load").pins_file)
    for name in ("alice", "bob", "billing", "maker", "maker-offline", "console"):
        assert device_pins.pinned(env.fleet.jid(name)) == fingerprint(key(env, name)), name
    assert device_pins.pinned(env.fleet.jid("relay")) is None  # it carries commands, never signs them
    alice_pins = PinStore(PartyKeys.beside(env.grid.keys.secret_path("alice"), "alice").pins_file)
    assert alice_pins.pinned(env.fleet.jid("billing")) == fingerprint(key(env, "billing"))
