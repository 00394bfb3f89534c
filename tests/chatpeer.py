"""A person in a chat client, as far as the grid can tell: a plain XMPP session that sets its
presence, sends chat bodies and reads the replies and alarms that come back; and the alarm and
verdict steps such people take that the tests of c2s device bots (test_alarms.py,
test_verdicts.py) and of hosted identities (test_hosting_parity.py) share, each written once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from slixmpp import ClientXMPP, Message

from conftest import GridUnderTest, until
from gridpresence.device.agent import DeviceAgent
from gridpresence.protocol.alarm import Alarm, AlarmKind, AlarmLevel, AlarmStatus, alarm_from_xml
from gridpresence.protocol.codec import q
from gridpresence.rules.settings import AlarmSettings
from gridpresence.xmpp.session import close_session, make_client, open_session


class ChatPeer:
    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.alarms: asyncio.Queue[Message] = asyncio.Queue()
        client.add_event_handler("message", self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg["type"] != "chat":
            return
        if msg.xml.find("{urn:gridpresence:0}alarm") is not None:
            self.alarms.put_nowait(msg)
        else:
            self.replies.put_nowait(msg)

    def say(self, to: str, text: str, stanza_id: str | None = None) -> None:
        msg = self.client.make_message(mto=to, mbody=text, mtype="chat")
        if stanza_id:
            msg["id"] = stanza_id
        msg.send()

    async def ask(self, to: str, text: str, timeout: float = 5.0, stanza_id: str | None = None) -> str:
        """Send a chat line and return the reply from that device."""
        self.say(to, text, stanza_id)
        return (await self.reply_from(to, timeout))["body"]

    async def reply_from(self, device: str, timeout: float = 5.0) -> Message:
        """The next chat message (not an alarm) from ``device``."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.replies.get()
                if msg["from"].bare == device:
                    return msg

    async def alarm(self, device: str, timeout: float, predicate=lambda m: True) -> Message:  # type: ignore[no-untyped-def]
        """The next alarm message from `device` that satisfies `predicate`."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.alarms.get()
                if msg["from"].bare == device and predicate(msg):
                    return msg

    async def close(self) -> None:
        await close_session(self.client)


async def chat_peer(env: GridUnderTest, name: str, resource: str, show: str | None = None) -> ChatPeer:
    client = make_client(f"{env.fleet.jid(name)}/{resource}", env.grid.secrets.password(name), env.grid.endpoint)
    peer = ChatPeer(client)
    await open_session(client, env.grid.endpoint)
    await client.get_roster()
    client.send_presence(pshow=show) if show else client.send_presence()
    return peer


# -- alarms as chat messages ------------------------------------------------------------------

def alarm_of(msg: Message) -> Alarm:
    return alarm_from_xml(msg.xml.find(q("alarm")))


def urgent(msg: Message) -> bool:
    return "URGENT" in msg["body"]


def queued(peer: ChatPeer, device: str, predicate: Callable[[Message], bool] = urgent) -> list[Message]:
    """Alarm messages from `device` that arrived and were not taken yet."""
    return [m for m in peer.alarms._queue if m["from"].bare == device and predicate(m)]  # type: ignore[attr-defined]


async def high_loading(peer: ChatPeer, device: str, status: AlarmStatus, timeout: float = 6.0) -> str:
    """The id of the next high-loading alarm message in this status."""
    msg = await peer.alarm(device, timeout, lambda m: alarm_of(m).kind is AlarmKind.HIGH_LOADING
                           and alarm_of(m).status is status)
    return alarm_of(msg).id


async def seen_busy_and_available(dev: DeviceAgent, busy: ChatPeer, available: ChatPeer) -> None:
    """The device has learnt both presences: `busy` online but not available, `available` available."""
    busy_jid, available_jid = busy.client.boundjid.bare, available.client.boundjid.bare
    await until(lambda: dev.alarms.online(busy_jid) and not dev.alarms.available(busy_jid)
                and dev.alarms.available(available_jid), 5, "both operators' presence at the device")


async def urgent_alarm_skips_dnd_and_escalates(dev: DeviceAgent, alice: ChatPeer, bob: ChatPeer) -> Alarm:
    """Alice first on duty but dnd, Bob available: the device's trip-point alarm goes to Bob, is
    sent again while nobody acknowledges it, and once Alice is available goes round the duty
    order to her. The alarm (its first message's)."""
    device = dev.jid
    await seen_busy_and_available(dev, alice, bob)
    dev.sim.utilisation = 0.99  # type: ignore[attr-defined]  # the physics crosses the trip point
    first = await bob.alarm(device, timeout=5, predicate=urgent)
    alarm = alarm_of(first)
    assert alarm.kind is AlarmKind.TRIP_IMMINENT and alarm.level is AlarmLevel.URGENT and alarm.escalation == 0
    assert alarm.device == device and f"ack {alarm.id}" in first["body"] and "trip point imminent" in first["body"]
    assert not queued(alice, device)
    # Nobody acknowledges: sent again; Alice is still dnd, so to Bob again.
    again = await bob.alarm(device, timeout=4, predicate=urgent)
    assert "not acknowledged, sent again (1)" in again["body"]
    # Alice becomes available: the next escalation goes round the duty order to her.
    alice.client.send_presence()
    escalated = alarm_of(await alice.alarm(device, timeout=6, predicate=urgent))
    assert escalated.id == alarm.id and escalated.escalation >= 2
    return alarm


async def told_acknowledged_by(dev: DeviceAgent, alarm: Alarm, acker: ChatPeer, told: ChatPeer) -> None:
    """`told` learns that `acker` acknowledged `alarm`, which is closed at the device."""
    said = alarm_of(await told.alarm(dev.jid, timeout=3, predicate=lambda m: "acknowledged by" in m["body"]))
    assert said.status is AlarmStatus.ACKNOWLEDGED and said.acked_by == acker.client.boundjid.bare
    assert alarm.id not in dev.alarms.open


async def no_more_escalation(dev: DeviceAgent, *peers: ChatPeer) -> None:
    """Two acknowledgement time-outs and more pass with no urgent alarm for any of `peers`."""
    await asyncio.sleep(2 * dev.alarms.settings.ack_timeout_s + 0.5)
    assert [queued(p, dev.jid) for p in peers] == [[] for _ in peers]


async def owed_alarms_arrive_once_at_login(env: GridUnderTest, dev: DeviceAgent) -> None:
    """Alarms raised, escalated and changed while every operator was logged out: at login each
    open alarm arrives once, as it stands now, not once per re-send stored while away."""
    desk, device = dev.alarms, dev.jid
    before = desk.settings
    desk.settings = AlarmSettings(ack_timeout_s=0.5)  # several re-sends while nobody is there
    roster = dev.client.client_roster
    # The test before may have ended an operator's session a moment ago: its unavailable presence
    # is on its way. Every operator must be gone before the test starts (bounded wait).
    await until(lambda: not any(roster[op].resources for op in desk.duty), 10, "every operator logged out")
    try:
        first = desk.raise_alarm(AlarmKind.BREAKER_TRIPPED, 0.0, 0.0)
        warning = desk.raise_alarm(AlarmKind.BRANCH_NEAR_LIMIT, 91.0, 80.0, "shed load-x")  # not cleared by readings
        passed = desk.raise_alarm(AlarmKind.TRIP_IMMINENT, 96.0, 95.0)
        await asyncio.sleep(1.8)  # each has been sent again a few times by now
        desk.acknowledge(passed.id, "test")  # closed while away: nothing to tell about it
        desk.settings = AlarmSettings(ack_timeout_s=3.0)  # no further re-send while we count
        assert desk.open[first.id].alarm.escalation >= 2 and desk.open[warning.id].alarm.escalation >= 2
        bob = await chat_peer(env, "bob", "back")
        try:
            await asyncio.sleep(1.5)
            got = [alarm_of(m) for m in queued(bob, device, lambda m: True)]
            latest = {aid: desk.open[aid].alarm for aid in (first.id, warning.id)}
            assert sorted(a.id for a in got) == sorted(latest), got  # one message per open alarm, no copies
            for a in got:
                assert a == latest[a.id]  # its newest state (escalation count included)
        finally:
            await bob.close()
    finally:
        desk.settings = before
        desk.acknowledge(None, "test-cleanup")


# -- verdicts ---------------------------------------------------------------------------------

async def judged_not_a_fault_twice(dev: DeviceAgent, alice: ChatPeer,
                                   second: Callable[[str], Awaitable[str]]) -> tuple[str, str]:
    """Two high-loading alarms raised and cleared, each judged not a fault: the first by Alice
    in chat, the second by ``second(alarm id)`` (its answer). The hybrid rule then proposes a
    limit past the sensor's error: (the proposal's id, the answer that carried it)."""
    device = dev.jid
    readings: list[float] = []
    answer = ""
    for n in range(2):
        dev.sim.utilisation = 0.85  # type: ignore[attr-defined]
        aid = await high_loading(alice, device, AlarmStatus.RAISED)
        readings.append(dev.current_report().telemetry.load_pct or 0.0)  # type: ignore[union-attr]
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        assert await high_loading(alice, device, AlarmStatus.CLEARED) == aid
        answer = await (alice.ask(device, f"not a fault {aid}") if n == 0 else second(aid))
        assert answer.startswith(f"Recorded: alarm {aid} (high_loading) is not a fault."), answer
    assert "threshold proposal" in answer and "high_loading.high_loading 80 ->" in answer
    (pid, proposal), = dev.alarms.adjuster.pending.items()
    assert max(readings) < proposal.proposed <= 94
    assert f"accept {pid}" in answer and f"set {pid} VALUE" in answer
    return pid, answer


async def raises_by_a_limit_of_90(dev: DeviceAgent, alice: ChatPeer) -> None:
    """The device's high-loading limit set to 90: 86 % is quiet, 92 % is an alarm (cleared at 50 %)."""
    device = dev.jid
    dev.sim.utilisation = 0.86  # type: ignore[attr-defined]
    await asyncio.sleep(2.5)
    assert queued(alice, device, lambda m: True) == []
    dev.sim.utilisation = 0.92  # type: ignore[attr-defined]
    aid = await high_loading(alice, device, AlarmStatus.RAISED)
    assert "limit 90" in dev.alarms.open[aid].alarm.text
    dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
    assert await high_loading(alice, device, AlarmStatus.CLEARED) == aid
