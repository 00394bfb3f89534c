"""Bad input over the wire: malformed commands, unknown actions, out-of-range values, replays,
late commands and senders who may not command. Each gets a clear answer, no state changes,
and the bot lives on."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio
from slixmpp import JID, ClientXMPP, Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from conftest import Env
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.protocol import NS, Action, Command, DeviceState, OutcomeStatus, RejectReason
from gridpresence.protocol.codec import command_to_xml, outcome_from_xml, q
from gridpresence.security.pgp import pgpy
from gridpresence.security.signed import sign_payload
from timebase import NOW


class RawPeer:
    """A bare XMPP session that sends hand-made stanzas (signed with its party's key, as the
    library would) and collects what comes back."""

    def __init__(self, client: ClientXMPP, key: pgpy.PGPKey | None = None) -> None:
        self.client = client
        self.key = key
        self.inbox: asyncio.Queue[Message] = asyncio.Queue()
        # slixmpp's "message" event only fires for bodies; grid payloads need their own match.
        client.register_handler(Callback("raw outcome", StanzaPath("message/grid_outcome"), self.inbox.put_nowait))
        client.add_event_handler("message_error", self.inbox.put_nowait)

    def send(self, to: str, payload: ET.Element | str, *, sign: bool = True) -> None:
        msg = self.client.make_message(mto=to, mtype="normal")
        el = payload if isinstance(payload, ET.Element) else ET.fromstring(payload)
        if sign and self.key is not None:
            el = sign_payload(el, JID(to).bare, self.key)
        msg.append(el)
        msg.send()

    async def reply(self, timeout: float = 5.0) -> Message:
        return await asyncio.wait_for(self.inbox.get(), timeout)

    async def outcome(self, timeout: float = 5.0):  # type: ignore[no-untyped-def]
        msg = await self.reply(timeout)
        return outcome_from_xml(msg.xml.find(q("outcome")))


async def _peer(env: Env, name: str) -> RawPeer:
    jid = env.fleet.jid(name)
    client = make_client(f"{jid}/raw", env.grid.secrets.password(name), env.grid.endpoint)
    await open_session(client, env.grid.endpoint)
    client.send_presence()
    return RawPeer(client, env.grid.keys.secret(name))


@pytest_asyncio.fixture
async def op_peer(env: Env) -> AsyncIterator[RawPeer]:
    peer = await _peer(env, "bob")
    yield peer
    await close_session(peer.client)


@pytest_asyncio.fixture
async def billing_peer(env: Env) -> AsyncIterator[RawPeer]:
    peer = await _peer(env, "billing")
    yield peer
    await close_session(peer.client)


def _target(alice: GridOperator, name: str) -> str:
    full = alice.devices[name].full_jid
    assert full is not None, f"{name} is not present"
    return full


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


async def _still_works(alice: GridOperator, name: str) -> None:
    read = await alice.command(name, Action.READ)
    assert read.ok, f"{name} stopped answering after bad input: {read}"


async def test_unauthorised_sender_is_rejected_and_nothing_happens(alice: GridOperator, billing_peer: RawPeer) -> None:
    # The billing party, correctly signed: its role may not shed.
    cmd = Command.new(Action.SHED, "billing@localhost", serial=alice.serial_of(alice.devices["load-d"]))
    billing_peer.send(_target(alice, "load-d"), command_to_xml(cmd))
    outcome = await billing_peer.outcome()
    assert outcome.command_id == cmd.id
    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.NOT_AUTHORISED
    await asyncio.sleep(0.3)
    assert alice.devices["load-d"].state is DeviceState.ON


async def test_unknown_action_is_not_supported(alice: GridOperator, op_peer: RawPeer) -> None:
    op_peer.send(_target(alice, "load-d"),
                 f"<command xmlns='{NS}' id='x1' action='explode' issuer='bob@localhost' "
                 f"issued='{_now().isoformat()}' expires='{(_now() + dt.timedelta(seconds=30)).isoformat()}'/>")
    outcome = await op_peer.outcome()
    assert outcome.command_id == "x1"
    assert outcome.reason is RejectReason.NOT_SUPPORTED and "explode" in outcome.detail
    await _still_works(alice, "load-d")


_LATER, _LATER_STILL = ((NOW + dt.timedelta(days=d)).isoformat() for d in (30, 31))


@pytest.mark.parametrize("attrs, field", [
    (f"action='shed' issuer='bob@localhost' expires='{_LATER}'", "issued"),
    (f"action='shed' issuer='bob@localhost' issued='yesterday' expires='{_LATER}'", "issued"),
    (f"action='shed' issuer='bob@localhost' issued='{_LATER_STILL}' expires='{_LATER}'",
     "expires must be after issued"),
])
async def test_malformed_command_is_invalid_arguments(alice: GridOperator, op_peer: RawPeer, attrs: str,
                                                      field: str) -> None:
    op_peer.send(_target(alice, "load-e"), f"<command xmlns='{NS}' id='bad-1' {attrs}/>")
    outcome = await op_peer.outcome()
    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.INVALID_ARGUMENTS
    assert field in outcome.detail
    assert alice.devices["load-e"].state is DeviceState.ON
    await _still_works(alice, "load-e")


async def test_command_without_id_gets_a_stanza_error(alice: GridOperator, op_peer: RawPeer) -> None:
    op_peer.send(_target(alice, "load-e"), f"<command xmlns='{NS}' action='shed'/>", sign=False)
    reply = await op_peer.reply()
    assert reply["type"] == "error" and reply["error"]["condition"] == "bad-request"
    assert "without an id" in reply["error"]["text"]
    await _still_works(alice, "load-e")


async def test_garbage_inside_command_does_not_kill_the_bot(alice: GridOperator, op_peer: RawPeer) -> None:
    huge = "x" * 20000
    op_peer.send(_target(alice, "load-e"),
                 f"<command xmlns='{NS}' id='g1' action='set_time' issuer='bob@localhost' issued='{_now().isoformat()}'"
                 f" expires='{(_now() + dt.timedelta(seconds=30)).isoformat()}'><arg name='time'>{huge}</arg>"
                 f"<arg name='no spaces allowed'>1</arg></command>")
    outcome = await op_peer.outcome()
    assert outcome.reason is RejectReason.INVALID_ARGUMENTS
    await _still_works(alice, "load-e")


async def test_replayed_command_has_no_second_effect(alice: GridOperator) -> None:
    target = _target(alice, "load-f")
    shed = Command.new(Action.SHED, alice.jid)
    first = await alice.send_command(shed, target)
    assert first.ok and alice.devices["load-f"].state is DeviceState.OFF
    assert (await alice.command("load-f", Action.RESTORE)).ok
    replay = await alice.send_command(shed, target)  # the same id again
    assert replay.status is OutcomeStatus.EXECUTED and replay.command_id == shed.id
    await asyncio.sleep(0.3)
    assert alice.devices["load-f"].state is DeviceState.ON, "the replayed shed acted a second time"


async def test_expired_command_is_not_executed(alice: GridOperator) -> None:
    issued = _now() - dt.timedelta(seconds=60)
    late = Command.new(Action.SHED, alice.jid, ttl_s=10, now=issued)
    outcome = await alice.send_command(late, _target(alice, "load-g"))
    assert outcome.status is OutcomeStatus.EXPIRED and "after its expiry" in outcome.detail
    assert alice.devices["load-g"].state is DeviceState.ON


async def test_no_outcome_before_expiry_is_reported_expired(alice: GridOperator) -> None:
    # A full JID with no session: Prosody stores or bounces it; the issuer still gets one outcome.
    cmd = Command.new(Action.SHED, alice.jid, ttl_s=1)
    outcome = await alice.send_command(cmd, "nobody@localhost/gone")
    assert outcome.status in (OutcomeStatus.EXPIRED, OutcomeStatus.UNDELIVERABLE)


async def test_out_of_range_presence_is_dropped_by_receivers(env: Env, alice: GridOperator,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A device account that publishes nonsense: the operator keeps the last good view."""
    rogue = await _peer(env, "load-h")
    try:
        before = alice.devices["load-h"]
        assert before.state is DeviceState.ON
        caplog.set_level(logging.WARNING)
        for telemetry in ("load-pct='500'", "kw='nan'", "temperature-c='inf'", "fuel-pct='-3'"):
            pres = rogue.client.make_presence(pstatus="bogus")
            pres.append(ET.fromstring(f"<device xmlns='{NS}' kind='load' state='on'><telemetry {telemetry}/></device>"))
            pres.send()
        pres = rogue.client.make_presence()
        pres.append(ET.fromstring(f"<device xmlns='{NS}' kind='load' state='restricted'/>"))  # no note
        pres.send()
        await _still_works(alice, "load-h")  # by now the rogue presences have arrived
        assert sum("dropped invalid presence from load-h" in r.getMessage() for r in caplog.records) >= 5
        after = alice.devices["load-h"]
        assert after.report is not None and after.report.telemetry.load_pct is not None
        assert after.report.telemetry.load_pct <= 150
    finally:
        await close_session(rogue.client)
