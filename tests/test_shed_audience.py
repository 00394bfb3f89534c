"""Who a hosted device's shed reaches (issue 16, fewer stanzas per command), against a real
Prosody: a change of state goes to every operator (a stock client's roster shows each one) but
not to the watchdog, which still gets every refresh on its rhythm and every change of
availability; the outcome records for the historian go in batches from the component's domain,
each one recorded, and a batch from anyone else, or malformed, changes nothing.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from conftest import Written, agent_of, link_of, plain_client, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import Action
from gridpresence.protocol.codec import JSON_NS, PayloadError, q, record_json, record_to_xml, records_from_xml
from gridpresence.protocol.models import (DeviceState, Outcome, OutcomeRecord, OutcomeStatus,
                                          utcnow)
from gridpresence.services.watchdog import WatchdogAgent
from gridpresence.xmpp.session import close_session

pytestmark = pytest.mark.timeout(120)

LOADS = [f"s-{i}" for i in range(12)]
QUICK = "quick"  # refreshes every 2 s: the watchdog's rhythm is watched on it
FLEET = {
    "domain": "localhost",
    "presence_grace_s": 5.0,
    "hosting": "component",
    "operators": [{"name": "alice"}, {"name": "bob"}],
    "devices": [*({"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in LOADS),
                {"name": QUICK, "kind": "load", "rated_kw": 10, "refresh_s": 2.0}],
}


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("shed-aud"),
                            only=[*LOADS, QUICK, "watchdog", "console"], dashboard=False, tick_s=600) as g:
        yield g


def watchdog(grid: Grid) -> WatchdogAgent:
    assert grid.bots is not None
    found = [b for b in grid.bots.bots if isinstance(b, WatchdogAgent)]
    assert found
    return found[0]


async def test_every_operator_sees_every_change_and_the_watchdog_is_left_out(grid: Grid) -> None:
    name = LOADS[0]
    jid, alice_jid, bob_jid = grid.fleet.jid(name), grid.fleet.jid("alice"), grid.fleet.jid("bob")
    dev = agent_of(grid, name)
    # Left out of a change: the watchdog and the relay only, never an operator or the console.
    assert dev.health_only == {grid.fleet.jid("watchdog"), grid.fleet.jid("relay")}
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="aud") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 15)
        bob = await plain_client(grid, "bob")  # a stock client's roster
        try:
            item = bob.client_roster[jid]
            await until(lambda: item.resources, 10, "bob's probe answered")
            refreshed_at = dev._published_at
            with Written(link_of(grid)) as seen:
                for i in range(4):
                    action, state = (Action.SHED, DeviceState.OFF) if i % 2 == 0 else (Action.RESTORE, DeviceState.ON)
                    outcome = await alice.command(name, action)
                    assert outcome.status is OutcomeStatus.EXECUTED, outcome
                    await alice.wait_for(lambda d, s=state: d[name].state is s, 5)
                    await until(lambda s=state: any((r.get("status") or "").split(",")[0] == s.value
                                                    for r in item.resources.values()), 5, f"bob seeing {state.value}")
            # One presence per change to each operator; none to the watchdog.
            assert seen.presence_to(alice_jid, jid) == 4 and seen.presence_to(bob_jid, jid) == 4
            assert seen.presence_to(grid.fleet.jid("watchdog"), jid) == 0
            assert dev._published_at == refreshed_at  # the refresh is not postponed by what the watchdog missed
            # A refresh reaches everyone, the watchdog too, with the state as it is now.
            tracker = watchdog(grid).tracker
            before = tracker._last_refresh.get(jid)
            with Written(link_of(grid)) as seen:
                dev.publish(force=True)
                await until(lambda: tracker._last_refresh.get(jid) != before, 5, "the watchdog's refresh")
            assert tracker.views[jid].state is DeviceState.ON
            assert seen.presence_to(grid.fleet.jid("watchdog"), jid) == 1
            assert watchdog(grid).tracker.views[jid].health.value == "ok"
        finally:
            await close_session(bob)


async def test_the_watchdog_keeps_its_refresh_rhythm_through_changes(grid: Grid) -> None:
    """Changes every 0.4 s for 5 s: none reach the watchdog, yet a refresh still comes every
    2 s (counted from the last presence it got, not the last change), so it never has to ping."""
    dev, jid = agent_of(grid, QUICK), grid.fleet.jid(QUICK)
    with Written(link_of(grid)) as seen:
        for i in range(12):
            dev.sim.execute(Action.SHED if i % 2 == 0 else Action.RESTORE, {}, utcnow())
            dev.publish(force=False)
            await asyncio.sleep(0.4)
    told = seen.presence_to(grid.fleet.jid("watchdog"), jid)
    assert 2 <= told <= 3, told  # the refreshes of 4.8 s at 2 s, and nothing else
    assert seen.presence_to(grid.fleet.jid("alice"), jid) + seen.presence_to(grid.fleet.jid("console"), jid) >= 12
    assert watchdog(grid).tracker.views[jid].health.value == "ok"


async def test_records_go_in_batches_and_each_is_recorded(grid: Grid) -> None:
    assert grid.bots is not None and grid.bots.console is not None
    recorded: dict[str, str] = {}
    stop = grid.bots.console.grid.listen_outcomes(lambda _n, action, o: recorded.__setitem__(o.command_id, action))
    try:
        async with GridOperator.from_connection(grid.connection, operator="alice", resource="rec") as alice:
            await alice.wait_for(lambda d: all(v.present for v in d.values()), 15)
            with Written(link_of(grid)) as seen:
                outcomes = await alice.command_many(LOADS, Action.SHED)
                await until(lambda: {o.command_id for o in outcomes.values()} <= recorded.keys(), 10, "every record")
                await alice.command_many(LOADS, Action.RESTORE)
        assert all(o.status is OutcomeStatus.EXECUTED for o in outcomes.values())
        assert all(recorded[o.command_id] == "shed" for o in outcomes.values())
        batches = seen.messages_with("outcome-records")
        assert 1 <= len(batches) < len(LOADS), len(batches)  # 12 records in fewer messages
        assert all(re.match(rf"<message [^>]*from=[\"']{re.escape(link_of(grid).domain)}[\"']", m) for m in batches)
        # Each batch is one JSON text for the server to parse: <message><outcome-records><json>, closed.
        assert all(m.count("<") == 6 for m in batches), batches
        texts = [ET.fromstring(m).findtext(f"{q('outcome-records')}/{{{JSON_NS}}}json") for m in batches]
        told = [r["outcome"]["command_id"] for t in texts for r in json.loads(t or "")]
        assert {o.command_id for o in outcomes.values()} <= set(told)
        assert not seen.messages_with("outcome-record ")
    finally:
        stop()


def _record(device: str, command_id: str) -> ET.Element:
    return record_to_xml(_made(device, command_id))


def _made(device: str, command_id: str) -> OutcomeRecord:
    return OutcomeRecord(action=Action.SHED, issuer="alice@localhost", outcome=Outcome(
        command_id=command_id, device=device, status=OutcomeStatus.EXECUTED))


async def test_forged_or_malformed_batches_change_nothing(grid: Grid) -> None:
    """Seeded, bounded: a batch from a user's JID, records for devices of another domain, and
    garbage in batches from the domain itself; the console records none of them and still
    records the next real one."""
    assert grid.bots is not None and grid.bots.console is not None
    link_of(grid).flush_batches()  # earlier tests' records, out before we listen
    await asyncio.sleep(0.5)
    recorded: list[str] = []
    stop = grid.bots.console.grid.listen_outcomes(lambda _n, _a, o: recorded.append(o.command_id))
    rng = random.Random(1616)
    link, console = link_of(grid), grid.fleet.jid("console")
    bob = await plain_client(grid, "bob")
    try:
        # bob, a user, cannot speak for the devices' host.
        msg = bob.make_message(mto=console, mtype="normal")
        box = ET.SubElement(msg.xml, q("outcome-records"))
        box.append(_record(grid.fleet.jid(LOADS[1]), "forged-1"))
        msg.send()
        # The host's domain cannot speak for another domain's device.
        link.send_batched(console, q("outcome-records"), record_json(_made("someone@localhost", "forged-2")))
        link.flush_batches()
        # A batch whose JSON does not parse is refused whole (a host never writes one).
        link.send_batched(console, q("outcome-records"), record_json(_made(grid.fleet.jid(LOADS[2]), "broken"))[:-3])
        link.flush_batches()
        pieces = [lambda: "{}", lambda: "null", lambda: '"junk"', lambda: "[1, 2]", lambda: '{"action": "shed"}',
                  lambda: '{"action": "bogus", "issuer": "", "outcome": {}}',
                  lambda: record_json(_made(grid.fleet.jid(LOADS[2]), "x" * rng.randrange(0, 200))),
                  lambda: '{"action": "shed", "issuer": "a@b", "outcome": {"command_id": "c", "device": "<&>"}}']
        for _ in range(60):
            link.send_batched(console, q("outcome-records"), rng.choice(pieces)())
        link.flush_batches()
        await asyncio.sleep(1.0)
        assert "forged-1" not in recorded and "forged-2" not in recorded and "broken" not in recorded
        assert all(c and set(c) == {"x"} for c in recorded)  # only the valid records of the domain's own devices
        assert recorded, "the valid records among the garbage are recorded"
        async with GridOperator.from_connection(grid.connection, operator="alice", resource="fz") as alice:
            await alice.wait_for(lambda d: all(v.present for v in d.values()), 15)
            outcome = await alice.command(LOADS[3], Action.READ)
        await until(lambda: outcome.command_id in recorded, 10, "the real record after the garbage")
    finally:
        stop()
        await close_session(bob)


def test_records_from_xml_fuzz() -> None:
    """Seeded, bounded: mutated batches give records or PayloadErrors, never another exception."""
    rng = random.Random(16)
    good = ET.tostring(ET.Element(q("outcome-records")), encoding="unicode")
    base = ET.fromstring(good)
    for i in range(5):
        base.append(_record(f"d-{i}@devices.localhost", f"c-{i}"))
    text = ET.tostring(base, encoding="unicode")
    for _ in range(400):
        chars = list(text)
        for _ in range(rng.randrange(1, 6)):
            chars[rng.randrange(len(chars))] = rng.choice('<>"=/ ax0-')
        try:
            el = ET.fromstring("".join(chars))
        except ET.ParseError:
            continue
        try:
            records, bad = records_from_xml(el)
        except PayloadError:
            continue
        assert len(records) + len(bad) == len(el)
    many = ET.Element(q("outcome-records"))
    many.extend(_record("d@devices.localhost", f"c-{i}") for i in range(1005))
    records, bad = records_from_xml(many)
    assert len(records) == 1000 and len(bad) == 1  # bounded: the rest is not read
    # The same in a host's JSON form: mutated texts give records or reasons; the bound holds
    # across elements and JSON alike; a deeply nested array is one reason, not a crash.
    items = [record_json(_made(f"d-{i}@devices.localhost", f"c-{i}")) for i in range(5)]
    text = "[" + ",".join(items) + "]"
    for _ in range(400):
        chars = list(text)
        for _ in range(rng.randrange(1, 6)):
            chars[rng.randrange(len(chars))] = rng.choice('[]{}",:0a\\')
        batch = ET.Element(q("outcome-records"))
        ET.SubElement(batch, f"{{{JSON_NS}}}json").text = "".join(chars)
        records, bad = records_from_xml(batch)
        assert len(records) <= 5 and (records or bad)
    batch = ET.Element(q("outcome-records"))
    batch.extend(_record("d@devices.localhost", f"e-{i}") for i in range(600))
    ET.SubElement(batch, f"{{{JSON_NS}}}json").text = "[" + ",".join([items[0]] * 600) + "]"
    ET.SubElement(batch, f"{{{JSON_NS}}}json").text = "[" * 100_000
    records, bad = records_from_xml(batch)
    assert len(records) == 1000 and len(bad) == 1
    broken = ET.Element(q("outcome-records"))  # thousands of <json/> that hold no record are bounded too
    for i in range(3000):
        ET.SubElement(broken, f"{{{JSON_NS}}}json").text = ("x", "[]", "{}", "")[i % 4]
    records, bad = records_from_xml(broken)
    assert records == [] and len(bad) == 1001
    nested = ET.Element(q("outcome-records"))
    ET.SubElement(nested, f"{{{JSON_NS}}}json").text = "[" * 100_000 + "]" * 100_000
    assert records_from_xml(nested)[0] == [] and len(records_from_xml(nested)[1]) == 1


async def test_commands_pass_every_outgoing_filter_a_party_adds(grid: Grid) -> None:
    """The issuer writes a turn's commands past slixmpp's send queue only while no outgoing
    filter but slixmpp's roster (presence only) would see them: one of the party's own sees
    every command of a fan-out, and each is carried out."""
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="flt") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 15)
        seen: list[str] = []

        def spy(stanza: object) -> object:
            xml = getattr(stanza, "xml", None)
            if xml is not None and xml.tag.endswith("}message") and len(xml):  # a command, signed or not
                seen.append(xml.get("to") or "")
            return stanza

        alice.client.add_filter("out", spy)
        try:
            names = LOADS[4:8]
            outcomes = await asyncio.gather(*(alice.command(n, Action.READ) for n in names))
            assert all(o.status is OutcomeStatus.EXECUTED for o in outcomes), outcomes
            assert sorted(j.split("/")[0] for j in seen) == sorted(grid.fleet.jid(n) for n in names)
        finally:
            alice.client.del_filter("out", spy)
        seen.clear()
        outcome = await alice.command(LOADS[4], Action.READ)  # no filter of ours: the fast way again
        assert outcome.status is OutcomeStatus.EXECUTED and seen == []


async def test_an_outcome_names_the_presence_just_sent_instead_of_carrying_it(grid: Grid) -> None:
    """A shed changes the state: the device broadcasts it, its outcome with ``report-seq`` (that
    presence's seq) and no ``<device/>`` (in alice's copy of that presence: she asks for it);
    the library gives its caller the report all the same, from that presence. A read changes
    nothing that is broadcast: its answer, a message, carries the report. A reader that knows
    no ``report-seq`` (an older party) still reads the outcome."""
    from gridpresence.protocol.codec import outcome_from_xml
    name = LOADS[1]
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="seq") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 15)
        with Written(link_of(grid)) as seen:
            shed = await alice.command(name, Action.SHED)
            read = await alice.command(name, Action.READ)
            restore = await alice.command(name, Action.RESTORE)
        assert shed.ok and shed.report is not None and shed.report.state is DeviceState.OFF, shed
        assert restore.ok and restore.report is not None and restore.report.state is DeviceState.ON, restore
        assert read.ok and read.report is not None and read.report.state is DeviceState.OFF, read
        written = "".join(seen.writes)
        answers = [m for m in [*seen.messages_with("outcome "), *re.findall(r"<presence\b.*?</presence>", written, re.S)]
                   if "<outcome-records" not in m and grid.fleet.jid("alice") in m.split(">", 1)[0]]
        by_id = {o.command_id: m for o in (shed, read, restore) for m in answers if o.command_id in m}
        assert len(by_id) == 3, answers
        for o in (shed, restore):
            wire = by_id[o.command_id].partition("<outcome ")[2]
            assert "<device " not in wire and f'report-seq="{o.report.seq}"' in wire.replace("'", '"'), wire  # type: ignore[union-attr]
        assert "<device " in by_id[read.command_id] and "report-seq" not in by_id[read.command_id]
        # An older reader: the same stanza's outcome, without a report (not an error).
        assert by_id[shed.command_id].startswith("<presence") and by_id[read.command_id].startswith("<message")
        el = ET.fromstring(by_id[shed.command_id].replace("<presence ", f"<presence xmlns='jabber:client' ", 1)
                           ).find(q("outcome"))
        older = outcome_from_xml(el)
        assert older.status is OutcomeStatus.EXECUTED and older.report is None and older.report_seq == shed.report.seq  # type: ignore[union-attr]
        # An issuer that has not seen that presence yet (a seq ahead of its view) gets no report, not a stale one.
        ahead = older.model_copy(update={"report_seq": older.report_seq + 1000})  # type: ignore[operator]
        assert alice.with_state(ahead).report is None
        assert alice.with_state(older).report == alice.devices[name].report
