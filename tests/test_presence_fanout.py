"""The hosted identities' presence fan-out (xmpp/component.py, "what the server does for a c2s
account"), in one process against a real Prosody: a broadcast goes to the subscribers not known
to be offline, one serialization for all, the link's writes of a turn as one; a contact known
to be offline is told again the moment it logs in (its probe answered with the newest state),
and a stock client then sees every change; malformed presence to a hosted JID changes nothing.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from conftest import Written, agent_of, hosted_fleet, link_of, plain_client, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.host.grid import Grid
from gridpresence.operator.library import UNHEARD_QUIET_S, GridOperator
from gridpresence.protocol import Action
from gridpresence.protocol.codec import report_to_xml
from gridpresence.protocol.models import DeviceState, utcnow
from gridpresence.xmpp.component import NS, HostedClient
from gridpresence.xmpp.session import close_session

pytestmark = pytest.mark.timeout(120)

LOADS = [f"f-{i}" for i in range(3)]
FLEET = hosted_fleet([{"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in LOADS],
                     presence_grace_s=5.0)


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("fanout"), only=[*LOADS, "watchdog"],
                            dashboard=False, tick_s=600) as g:
        yield g


def hosted(grid: Grid, name: str) -> HostedClient:
    return link_of(grid).clients[grid.fleet.jid(name)]


def toggle(dev: DeviceAgent) -> DeviceState:
    """A state change, published as after a command (broadcast); the new state."""
    before = dev.sim.state
    dev.sim.execute(Action.RESTORE if before is DeviceState.OFF else Action.SHED, {}, utcnow())
    report = dev.publish(force=False)
    assert report is not None and report.state is not before
    return report.state


async def test_offline_contacts_are_skipped_and_told_again_at_their_login(grid: Grid) -> None:
    alice_jid, bob_jid = grid.fleet.jid("alice"), grid.fleet.jid("bob")
    one = hosted(grid, LOADS[0])
    # The identity's probes at its session start were answered "unavailable" for everyone but
    # the watchdog: they are known offline.
    await until(lambda: {alice_jid, bob_jid, grid.fleet.jid("relay"), grid.fleet.jid("console")} <= one._offline,
                10, "the probe answers")
    assert grid.fleet.jid("watchdog") not in one._offline
    with Written(link_of(grid)) as seen:
        toggle(agent_of(grid, LOADS[0]))
        await asyncio.sleep(0.3)
    # Nobody is told: the operators are offline, and the watchdog, online, needs no change of state.
    assert seen.to(grid.fleet.jid("watchdog")) == 0 and seen.to(alice_jid) == 0 and seen.to(bob_jid) == 0

    # alice logs in: the server's probes are answered with the newest state, known offline or not.
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="fan") as alice:
        await alice.wait_for(lambda d: all(v.present and v.state is not None for v in d.values()), 15)
        assert alice.devices[LOADS[0]].state is agent_of(grid, LOADS[0]).sim.state
        assert alice_jid not in one._offline
        # ... and then every change, as a stock client of bob's logging in meanwhile sees it too.
        bob = await plain_client(grid, "bob")
        try:
            item = bob.client_roster[one.boundjid.bare]
            await until(lambda: item.resources, 10, "bob's probe answered")
            for i in range(4):
                with Written(link_of(grid)) as seen:
                    state = toggle(agent_of(grid, LOADS[0]))
                    await alice.wait_for(lambda d, s=state: d[LOADS[0]].state is s, 5)
                    await until(lambda s=state: any((r.get("status") or "").split(",")[0] == s.value
                                                    for r in item.resources.values()),
                                5, f"bob's client showing {state.value}")
                if i == 0:  # one copy each to the operators (not the watchdog), all in one write to the server
                    assert [seen.to(j) for j in (alice_jid, bob_jid, grid.fleet.jid("watchdog"))] == [1, 1, 0]
                    assert len(seen.writes) == 1, seen.writes
        finally:
            await close_session(bob)
    # Both gone: known offline again, and no longer sent anything.
    await until(lambda: {alice_jid, bob_jid} <= one._offline, 10, "their goodbyes")
    with Written(link_of(grid)) as seen:
        toggle(agent_of(grid, LOADS[0]))
        await asyncio.sleep(0.3)
    assert seen.to(alice_jid) == 0 and seen.to(bob_jid) == 0 and seen.to(grid.fleet.jid("watchdog")) == 0


async def test_a_probe_counts_as_online_before_the_contacts_presence(grid: Grid) -> None:
    """The server may pass a contact's probe before its presence: from the probe on, it is told."""
    one, bob_jid = hosted(grid, LOADS[1]), grid.fleet.jid("bob")
    await until(lambda: bob_jid in one._offline, 10, "bob known offline")
    probe = ET.Element(f"{{{NS}}}presence", {"type": "probe", "from": f"{bob_jid}/x", "to": one.boundjid.bare})
    heard: list[object] = []
    one.add_event_handler("presence", heard.append)
    with Written(link_of(grid)) as seen:
        one.deliver(probe)
        await asyncio.sleep(0.2)
        assert seen.to(f"{bob_jid}/x") == 1, "the probe is answered"
        assert heard == [], "as for a c2s account, a probe is the server's: the device's handlers never see it"
        one.del_event_handler("presence", heard.append)
        toggle(agent_of(grid, LOADS[1]))
        await asyncio.sleep(0.3)
    assert seen.to(bob_jid) == 2  # the answer, and the change after it
    # The server says bob is offline (its probe answer): skipped again.
    one.deliver(ET.Element(f"{{{NS}}}presence", {"type": "unavailable", "from": bob_jid, "to": one.boundjid.bare}))
    assert bob_jid in one._offline


def stanzas_in(writes: list[str]) -> list[ET.Element]:
    """The stanzas the link wrote, one element each (several may share a write)."""
    return list(ET.fromstring(f"<w xmlns='{NS}'>{''.join(writes)}</w>"))


def canonical(el: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(el))  # attributes in one order, whatever order they were set in


async def test_a_moved_reading_goes_once_to_each_online_operator_as_one_copy_each_would(grid: Grid) -> None:
    """A reading past the deadband without a change of health: directed presence to the telemetry
    audience online only (not the watchdog), filtered and serialised once (send_each), and each
    recipient's stanza the same as a copy sent on its own through the stream's send."""
    dev, one = agent_of(grid, LOADS[1]), hosted(grid, LOADS[1])
    alice_jid, bob_jid, watchdog = grid.fleet.jid("alice"), grid.fleet.jid("bob"), grid.fleet.jid("watchdog")
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="directed") as alice:
        bob = await plain_client(grid, "bob")
        try:
            await until(lambda: dev._online.get(alice_jid) and dev._online.get(bob_jid), 10, "both seen online")
            if dev.sim.state is not DeviceState.ON:  # a load that is off draws nothing: no reading moves
                toggle(dev)
            await alice.wait_for(lambda d: d[LOADS[1]].state is DeviceState.ON, 10)
            sim = dev.sim
            sim.utilisation = 0.3 if sim.utilisation > 0.6 else 0.9  # type: ignore[attr-defined]
            sim.tick(utcnow())
            with Written(link_of(grid)) as seen:
                report = dev.publish(force=False)
                await asyncio.sleep(0.3)
            assert report is not None and dev._broadcast is not report, "told as a reading, not broadcast"
            assert [seen.to(j) for j in (alice_jid, bob_jid, watchdog)] == [1, 1, 0]
            await alice.wait_for(lambda d: (r := d[LOADS[1]].report) is not None and r.seq == report.seq, 5)
            item = bob.client_roster[one.boundjid.bare]
            await until(lambda: any(f"load {report.telemetry.load_pct:.0f}%" in (r.get("status") or "")
                                    for r in item.resources.values()), 5, "bob's client showing the reading")

            # One presence both ways: send_each, and a copy each through send (the way before).
            pres = one.make_presence(pshow=report.show(), pstatus=report.status_text())
            pres.append(report_to_xml(report))
            with Written(link_of(grid)) as fast:
                one.send_each(pres.__copy__(), [alice_jid, bob_jid])
                await asyncio.sleep(0.2)
            with Written(link_of(grid)) as slow:
                for jid in (alice_jid, bob_jid):
                    piece = pres.__copy__()
                    piece["to"] = jid
                    piece.send()
                await asyncio.sleep(0.2)
            fast_out, slow_out = stanzas_in(fast.writes), stanzas_in(slow.writes)
            assert len(fast_out) == 2 and [canonical(e) for e in fast_out] == [canonical(e) for e in slow_out]
            assert all(e.find("{http://jabber.org/protocol/caps}c") is not None for e in fast_out), "caps on each"
        finally:
            await close_session(bob)


async def test_fuzzed_presence_to_a_hosted_jid_changes_nothing(grid: Grid) -> None:
    """Seeded, bounded: presence of every kind from contacts, strangers and garbage JIDs; the
    identity keeps serving, knows only its own contacts offline, and still tells the watchdog
    (a refresh: a change of state alone is not for the watchdog)."""
    rng = random.Random(16)
    one = hosted(grid, LOADS[2])
    contacts = set(one.client_roster)
    senders = [*contacts, "stranger@localhost/x", "x@devices.localhost", "", "@@", "a@b/c/d", "localhost", "\u00e9@x"]
    types = [None, "unavailable", "probe", "error", "subscribe", "unsubscribed", "bogus", ""]
    for _ in range(300):
        attrs = {"to": one.boundjid.bare}
        sender, ptype = rng.choice(senders), rng.choice(types)
        if sender:
            attrs["from"] = sender
        if ptype is not None:
            attrs["type"] = ptype
        pres = ET.Element(f"{{{NS}}}presence", attrs)
        if rng.random() < 0.3:
            ET.SubElement(pres, f"{{{NS}}}show").text = rng.choice(["away", "chat", "nonsense", ""])
        one.deliver(pres)
    await asyncio.sleep(0.2)
    assert one.is_connected() and one._offline <= contacts
    one._offline.discard(grid.fleet.jid("watchdog"))  # whatever the fuzz said, the server knows better
    with Written(link_of(grid)) as seen:
        agent_of(grid, LOADS[2]).publish(force=True)
        await asyncio.sleep(0.3)
    assert seen.to(grid.fleet.jid("watchdog")) == 1


async def test_a_change_goes_without_a_presence_id_and_is_still_seen(grid: Grid) -> None:
    """A device's presence carries no id (RFC 6120 asks none and nothing answers a presence by
    id): no uuid4 from os.urandom for each of the presences a change makes across a branch."""
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="noid") as alice:
        await alice.wait_for(lambda d: all(v.present and v.state is not None for v in d.values()), 15)
        with Written(link_of(grid)) as seen:
            state = toggle(agent_of(grid, LOADS[1]))
            await alice.wait_for(lambda d, s=state: d[LOADS[1]].state is s, 5)
        sent = [el for el in stanzas_in(seen.writes) if el.tag == f"{{{NS}}}presence"]
        assert sent and all(el.get("id") is None for el in sent), [ET.tostring(el) for el in sent]


async def test_connect_waits_out_a_slow_login_burst_while_devices_keep_answering(
        grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """At 10,000 hosted devices the answers to an operator's login probes take seconds. With
    `settle_s=1` (the CLI's default) the operator waits while devices keep answering, each
    answer within 1 s of the one before, so `status` shows the whole fleet; a device that never
    answers costs one settle (or UNHEARD_QUIET_S) after the last news, not the whole timeout."""
    loop = asyncio.get_running_loop()
    gap = 0.5  # between answers: each within the settle of the one before, all three past it

    originals = {name: hosted(grid, name)._answer_probe for name in LOADS}

    def slow(client: HostedClient, delay: float | None) -> None:
        answer = originals[client.boundjid.user]
        monkeypatch.setattr(client, "_answer_probe", lambda sender: None if delay is None
                            else loop.call_later(delay, answer, sender))

    for i, name in enumerate(LOADS):
        slow(hosted(grid, name), gap * (i + 1))
    alice = GridOperator.from_connection(grid.connection, operator="alice", resource="slow")
    began = loop.time()
    try:
        await alice.connect(settle_s=1.0, timeout=20)
        took = loop.time() - began
        assert all(alice.devices[n].present for n in LOADS), {n: alice.devices[n].present for n in LOADS}
        assert took < 10, f"connect took {took:.1f} s: it should end once every device is present"
    finally:
        await alice.close()

    # Answers 1.8 s apart, longer than the settle: while devices are unheard, a pause up to
    # UNHEARD_QUIET_S (a busy host) is not taken for the end.
    assert 1.0 < 1.8 < UNHEARD_QUIET_S
    for i, name in enumerate(LOADS):
        slow(hosted(grid, name), 1.8 * (i + 1))
    alice = GridOperator.from_connection(grid.connection, operator="alice", resource="slower")
    try:
        await alice.connect(settle_s=1.0, timeout=20)
        assert all(alice.devices[n].present for n in LOADS), {n: alice.devices[n].present for n in LOADS}
    finally:
        await alice.close()

    # The last device never answers: the wait ends about UNHEARD_QUIET_S after the second's answer.
    slow(hosted(grid, LOADS[0]), gap)
    slow(hosted(grid, LOADS[1]), 2 * gap)
    slow(hosted(grid, LOADS[2]), None)
    monkeypatch.setattr(agent_of(grid, LOADS[2]), "publish", lambda *a, **k: None)  # (nor a reading of its own)
    bob = GridOperator.from_connection(grid.connection, operator="bob", resource="slow")
    began = loop.time()
    try:
        await bob.connect(settle_s=1.0, timeout=20)
        took = loop.time() - began
        assert bob.devices[LOADS[0]].present and bob.devices[LOADS[1]].present
        assert not bob.devices[LOADS[2]].present
        assert took < 8, f"connect took {took:.1f} s: a silent device must not cost the whole timeout"
    finally:
        await bob.close()
