"""A hosted device answers a signed command that asks for it (``answer="presence"``) in its
issuer's copy of the presence its change produces (PROTOCOL.md, "Answered in presence"),
against a real Prosody: one stanza fewer per command, every outcome still exactly once; other
operators and a stock client see every change (without the outcome); a refusal, a replay or a
command that changes nothing is answered by message as before; an answer lost with the issuer's
stream is recovered once; forged or malformed outcomes in presence change nothing.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from conftest import Written, agent_of, hosted_fleet, link_of, plain_client, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import Action
from gridpresence.protocol.codec import outcome_to_xml, q
from gridpresence.protocol.models import Command, DeviceState, Outcome, OutcomeStatus, RejectReason
from gridpresence.xmpp.component import _TO_MARK, HostedClient
from gridpresence.xmpp.session import close_session

pytestmark = pytest.mark.timeout(120)

LOADS = [f"p-{i:02d}" for i in range(30)]
CRIT = "p-crit"
FLEET = hosted_fleet([*({"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in LOADS),
                      {"name": CRIT, "kind": "load", "rated_kw": 10, "refresh_s": 600.0, "critical": True,
                       "critical_hold_s": 60}], presence_grace_s=5.0)


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("answer"), only=[*LOADS, CRIT, "watchdog"],
                            dashboard=False, tick_s=600) as g:
        yield g


def hosted(grid: Grid, name: str) -> HostedClient:
    return link_of(grid).clients[grid.fleet.jid(name)]


def answers_to(seen: Written, jid: str) -> tuple[list[str], list[str]]:
    """The presences and the messages written to ``jid`` (bare, any resource) that hold an ``<outcome``."""
    text = "".join(seen.writes)
    mine = re.compile(rf'to=["\']{re.escape(jid)}[/"\']')
    presences = [p for p in re.findall(r"<presence\b.*?</presence>", text, re.S)
                 if "<outcome " in p and mine.search(p.split(">", 1)[0])]
    messages = [m for m in seen.messages_with("outcome ") if "<outcome-records" not in m and mine.search(m.split(">", 1)[0])]
    return presences, messages


async def present(op: GridOperator) -> None:
    await op.wait_for(lambda d: all(v.present and v.state is not None for v in d.values()), 15)


async def test_a_shed_is_answered_in_presence_once_each_and_everyone_sees_every_change(grid: Grid) -> None:
    alice_jid, bob_jid = grid.fleet.jid("alice"), grid.fleet.jid("bob")
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="aip") as alice, \
            GridOperator.from_connection(grid.connection, operator="bob", resource="aip") as bob:
        await present(alice)
        await present(bob)
        stock = await plain_client(grid, "alice")  # a stock client of the issuer's own account
        try:
            items = {n: stock.client_roster[grid.fleet.jid(n)] for n in LOADS}
            await until(lambda: all(i.resources for i in items.values()), 10, "the stock client's probes answered")
            for action, state in ((Action.SHED, DeviceState.OFF), (Action.RESTORE, DeviceState.ON)):
                with Written(link_of(grid)) as seen:
                    outcomes = await alice.command_many(LOADS, action)
                    await bob.wait_for(lambda d, s=state: all(d[n].state is s for n in LOADS), 5)
                    await until(lambda s=state: all(any((r.get("status") or "").split(",")[0] == s.value
                                                        for r in i.resources.values()) for i in items.values()),
                                5, f"the stock client seeing {state.value}")
                assert all(o.status is OutcomeStatus.EXECUTED and o.report is not None and o.report.state is state
                           for o in outcomes.values()), outcomes
                presences, messages = answers_to(seen, alice_jid)
                assert messages == []  # no outcome message: the stanza saved
                for name, o in outcomes.items():  # each outcome once, in that device's presence to alice
                    carrying = [p for p in presences if f'command-id="{o.command_id}"' in p]
                    assert len(carrying) == 1 and f'from="{grid.fleet.jid(name)}/' in carrying[0], carrying
                    assert f'report-seq="{o.report.seq}"' in carrying[0]  # type: ignore[union-attr]
                    assert seen.presence_to(alice_jid, grid.fleet.jid(name)) == 1  # one presence, the outcome in it
                    assert seen.presence_to(bob_jid, grid.fleet.jid(name)) == 1
                # bob's copies are the plain presence: an outcome is told its issuer only.
                assert answers_to(seen, bob_jid) == ([], [])
                assert bob.issuer.pending == {} and alice.issuer.pending == {}
        finally:
            await close_session(stock)


async def test_refusals_replays_and_no_change_are_answered_by_message(grid: Grid) -> None:
    alice_jid = grid.fleet.jid("alice")
    name = LOADS[0]
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="msg") as alice:
        await present(alice)
        if alice.devices[name].state is not DeviceState.ON:
            assert (await alice.command(name, Action.RESTORE)).ok
        with Written(link_of(grid)) as seen:
            refused = await alice.command(CRIT, Action.SHED)  # restricted: a change, but a refusal
            shed = await alice.command(name, Action.SHED)
            again = await alice.command(name, Action.SHED)  # already off: nothing to broadcast
        assert refused.status is OutcomeStatus.REJECTED and refused.reason is RejectReason.CRITICAL, refused
        assert shed.ok and again.ok, (shed, again)
        presences, messages = answers_to(seen, alice_jid)
        assert [p for p in presences if shed.command_id in p] and not [m for m in messages if shed.command_id in m]
        for o in (refused, again):
            assert len([m for m in messages if o.command_id in m]) == 1 and not [p for p in presences if o.command_id in p]

        # A copy of the shed (the same signed stanza again): the replay memory answers, by message.
        sent = alice.devices[name].full_jid
        assert sent is not None
        cmd = Command.new(Action.RESTORE, alice.jid, serial=alice.serial_of(alice.devices[name]), answer="presence")
        wire = alice.issuer.wire(cmd, grid.fleet.jid(name))
        first = await alice.issuer.send(cmd, sent)
        assert first.ok
        with Written(link_of(grid)) as seen:
            fut = alice.issuer.expect(cmd.id)
            alice.issuer._sent[cmd.id] = (wire, grid.fleet.jid(name), sent)
            alice.issuer._post(sent, wire)
            replayed = await asyncio.wait_for(fut, 10)
        presences, messages = answers_to(seen, alice_jid)
        assert presences == [] and len(messages) == 1 and 'reason="replayed"' in messages[0].replace("'", '"')
        assert replayed.ok and "answered again" in replayed.detail  # the first outcome, as the issuer reads it
        alice.issuer.pending.pop(cmd.id, None)
        alice.issuer._sent.pop(cmd.id, None)


async def test_an_answer_lost_with_the_issuers_stream_is_recovered_once(grid: Grid) -> None:
    """alice's stream stops delivering right after the shed goes out and is then cut: the presence
    with the outcome is lost. Back on a new session, alice sends the waiting command again; the
    device answers from its replay memory (a message): the one outcome, and one shed."""
    name = LOADS[1]
    dev = agent_of(grid, name)
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="cut") as alice:
        await present(alice)
        if alice.devices[name].state is not DeviceState.ON:
            assert (await alice.command(name, Action.RESTORE)).ok
        reconnects = alice.reconnects
        client = alice.client
        client.data_received = lambda _data: None  # type: ignore[method-assign]  # deaf from now on
        with Written(link_of(grid)) as seen:
            task = asyncio.ensure_future(alice.command(name, Action.SHED, ttl_s=30))
            await until(lambda: alice.issuer.pending, 5, "the shed sent")
            cmd_id = next(iter(alice.issuer.pending))
            await until(lambda: dev.replay.seen(alice.jid, cmd_id) is not None, 10, "the device carrying it out")
            await until(lambda: answers_to(seen, grid.fleet.jid("alice"))[0], 5, "the answer in presence, lost")
            assert not task.done()
            del client.data_received  # (slixmpp's own again) and the stream cut
            assert client.transport is not None
            client.transport.abort()
            outcome = await asyncio.wait_for(task, 30)
        assert alice.reconnects == reconnects + 1
        assert outcome.ok and outcome.command_id == cmd_id and "answered again" in outcome.detail, outcome
        presences, messages = answers_to(seen, grid.fleet.jid("alice"))
        assert len([p for p in presences if cmd_id in p]) == 1  # the lost one
        assert [m for m in messages if cmd_id in m] and all('reason="replayed"' in m.replace("'", '"')
                                                            for m in messages if cmd_id in m)
        assert dev.sim.state is DeviceState.OFF
        assert alice.issuer.pending == {}
        assert (await alice.command(name, Action.RESTORE)).ok


def _forged(rng: random.Random, own: str, other: str, waiting: str) -> ET.Element:
    """One outcome a device should not be believed with, or a malformed one."""
    status = rng.choice(["executed", "rejected", "bogus", ""])
    attrs = {"command-id": rng.choice([waiting, f"never-{rng.randrange(1000)}", "", "x" * 80, "bad id"]),
             "device": rng.choice([own, other, "", "not a jid", f"{own}/res"]), "status": status}
    if rng.random() < 0.3:
        attrs["reason"] = rng.choice(["critical", "replayed", "nonsense"])
    if rng.random() < 0.3:
        attrs["report-seq"] = rng.choice(["1", "-4", "many", "99999999999999999999"])
    if rng.random() < 0.2:
        attrs.pop(rng.choice(list(attrs)))
    el = ET.Element(q("outcome"), attrs)
    if rng.random() < 0.3:
        ET.SubElement(el, q("detail")).text = rng.choice(["", "x" * 600, "<&>"])
    if rng.random() < 0.2:  # a first outcome inside a first outcome
        inner = outcome_to_xml(Outcome(command_id=waiting, device=own, status=OutcomeStatus.EXECUTED))
        ET.SubElement(ET.SubElement(inner, q("first")), q("outcome"), {"command-id": waiting, "device": own,
                                                                       "status": "executed"})
        ET.SubElement(el, q("first")).append(inner)
    if rng.random() < 0.1:
        el = ET.Element(rng.choice([q("outcome"), "outcome", q("junk")]))
    return el


async def test_forged_or_malformed_outcomes_in_presence_change_nothing(grid: Grid) -> None:
    """Seeded, bounded: a device's presence to alice carrying an outcome for a command she never
    sent, one for a command she sent another device (naming either), malformed ones; none is
    taken, her views stay, and she goes on (the next real shed is answered in presence)."""
    rng = random.Random(1616)
    a, b = LOADS[2], LOADS[3]
    a_jid, b_jid, alice_jid = grid.fleet.jid(a), grid.fleet.jid(b), grid.fleet.jid("alice")
    one = hosted(grid, a)
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="fz") as alice:
        await present(alice)
        # A command alice waits on, sent to b: a's presence may not answer it.
        waiting = Command.new(Action.READ, alice.jid, ttl_s=60)
        fut = alice.issuer.expect(waiting.id)
        alice.issuer._sent[waiting.id] = (alice.issuer.wire(waiting, b_jid), b_jid, b_jid)
        before = alice.devices[a]
        base = one._last_text.replace(_TO_MARK, alice_jid, 1)
        assert base.endswith("</presence>")
        for _ in range(80):
            forged = ET.tostring(_forged(rng, a_jid, b_jid, waiting.id), encoding="unicode")
            one.send_raw(f"{base[:-11]}{forged}</presence>")
        # And a's real presence naming the waiting command as a's own: sent to b, not taken.
        real = ET.tostring(outcome_to_xml(Outcome(command_id=waiting.id, device=a_jid,
                                                  status=OutcomeStatus.EXECUTED)), encoding="unicode")
        one.send_raw(f"{base[:-11]}{real}</presence>")
        await asyncio.sleep(1.0)
        assert not fut.done()
        assert alice.client.is_connected() and alice.reconnects == 0
        view = alice.devices[a]
        assert view.present and view.report == before.report
        alice.issuer.pending.pop(waiting.id, None)
        alice.issuer._sent.pop(waiting.id, None)
        with Written(link_of(grid)) as seen:
            shed = await alice.command(a, Action.SHED if view.state is DeviceState.ON else Action.RESTORE)
        assert shed.ok, shed
        assert [p for p in answers_to(seen, alice_jid)[0] if shed.command_id in p]


async def test_signed_commands_are_taken_from_the_xml_and_mutated_ones_each_get_one_answer(grid: Grid) -> None:
    """A hosted device reads a signed command straight from the message's XML (no stanza
    object: its dispatch's taker counts it). Seeded, bounded: 40 copies of a signed shed with
    their base64 mutated each get exactly one answer (a refusal or a message error; the outcome
    in presence for one left intact), and the device then still carries out a valid shed."""
    rng = random.Random(4216)
    name = LOADS[4]
    jid, dev, one = grid.fleet.jid(name), agent_of(grid, name), hosted(grid, name)
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="sfx") as alice:
        await present(alice)
        taken = one.shape_dispatch.taken_for
        for _ in range(4):  # (a shape's first stanza, and the first after the handlers change, teach the dispatch)
            assert (await alice.command(name, Action.READ)).ok
        assert one.shape_dispatch.taken_for >= taken + 2, (taken, one.shape_dispatch.taken_for)
        full = alice.devices[name].full_jid
        assert full is not None
        me = alice.client.boundjid.full
        with Written(link_of(grid)) as seen:
            for i in range(40):
                wire = alice.issuer.wire(Command.new(Action.SHED, alice.jid, serial=alice.serial_of(alice.devices[name]),
                                                     answer="presence"), jid)
                text = list(wire.text or "")
                for _ in range(rng.randrange(1, 4)):
                    at = rng.randrange(len(text))
                    text[at] = rng.choice([c for c in "A/+=Zz09!" if c != text[at]])
                wire.text = "".join(text)
                alice.issuer._post(full, wire)
            # (a change in bits base64 ignores leaves the command intact: carried out, answered in presence)
            await until(lambda: len(answered(seen, jid, me)) + len(answers_to(seen, alice.jid)[0]) >= 40, 10,
                        "an answer to each")
            await asyncio.sleep(0.3)
        assert len(answered(seen, jid, me)) + len(answers_to(seen, alice.jid)[0]) == 40
        state = dev.sim.state
        assert alice.client.is_connected()
        shed = await alice.command(name, Action.SHED if state is DeviceState.ON else Action.RESTORE)
        assert shed.ok, shed


def answered(seen: Written, device: str, to: str) -> list[str]:
    """The messages from ``device`` to ``to`` (a full JID) with an outcome or an error."""
    text = "".join(seen.writes)
    return [m for m in re.findall(r"<message\b.*?</message>", text, re.S)
            if re.search(rf"""to=["']{re.escape(to)}["']""", m.split(">", 1)[0])
            and re.search(rf"""from=["']{re.escape(device)}""", m.split(">", 1)[0])
            and ("<outcome " in m or re.search(r"""type=["']error["']""", m.split(">", 1)[0]))]
