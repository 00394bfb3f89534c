"""Branch hierarchy ([00146]) on a real Prosody: the master IED publishes its branch totals in its
presence, and when a branch nears its limit it tells the operators what to shed or start."""

from __future__ import annotations

import asyncio
import re
import sys

import pytest

from chatpeer import chat_peer
from conftest import Env, until
from gridpresence.operator.library import GridOperator
from gridpresence.protocol.alarm import AlarmKind, alarm_from_xml
from gridpresence.protocol.branch import branches_from_xml
from gridpresence.protocol.codec import q
from gridpresence.protocol.models import DeviceState
from gridpresence.device.branch import BranchAdvisor


async def test_master_publishes_branch_totals(env: Env, alice: GridOperator) -> None:
    peer = await chat_peer(env, "bob", "branches")
    seen: asyncio.Queue = asyncio.Queue()
    peer.client.add_event_handler("presence_available", lambda p: p["from"].bare == "master@localhost"
                                  and p.xml.find(q("branches")) is not None and seen.put_nowait(p))
    try:
        pres = await asyncio.wait_for(seen.get(), 5)  # the server sends the master's last presence
        totals = {t.device: t for t in branches_from_xml(pres.xml.find(q("branches")))}
        children = {env.fleet.jid(d.name) for d in env.fleet.children("master")}
        assert set(totals) <= children and env.fleet.jid("branch-a") in totals
        branch_a = alice.devices["branch-a"].report
        assert totals[env.fleet.jid("branch-a")].kind.value == "meter"
        assert branch_a is not None and abs(totals[env.fleet.jid("branch-a")].kw - (branch_a.telemetry.kw or 0)) <= 25
        assert all(t.kw <= 0 for t in totals.values() if t.kind.value == "generator")
    finally:
        await peer.close()


async def test_branch_totals_follow_each_change_of_a_childs_reading(env: Env, alice: GridOperator) -> None:
    """The master's <branches/> is made once per change of a child's report and kept between
    them: after branch-x's reading moves, the master's next presence carries the new total."""
    assert env.grid.bots is not None
    bots = env.grid.bots.devices
    names = ("bx-load-1", "bx-load-2", "bx-crit")
    before = {n: bots[n].sim.utilisation for n in names}  # type: ignore[attr-defined]
    x = env.fleet.jid("branch-x")
    peer = await chat_peer(env, "bob", "totals")  # subscribed to the master: its broadcasts reach him
    seen: asyncio.Queue = asyncio.Queue()
    peer.client.add_event_handler("presence_available", lambda p: p["from"].bare == env.fleet.jid("master")
                                  and p.xml.find(q("branches")) is not None and seen.put_nowait(p))
    try:
        for level in (0.2, 0.9, 0.3):
            for name in names:
                bots[name].sim.utilisation = level  # type: ignore[attr-defined]
                bots[name].publish(force=True)
            # branch-x's own sum, as its re-sum tells it (its loads drift a little around the level).
            await alice.wait_for(lambda d, lv=level: (r := d["branch-x"].report) is not None
                                 and abs((r.telemetry.kw or 0) - 115 * lv) <= 0.1 * 115, 8)
            bots["master"].publish(force=True)  # its own re-sum may stay in the deadband: a refresh
            async with asyncio.timeout(8):
                while True:
                    totals = {t.device: t for t in branches_from_xml((await seen.get()).xml.find(q("branches")))}
                    if x in totals and abs(totals[x].kw - 115 * level) <= 0.1 * 115:
                        break
    finally:
        for name, value in before.items():
            bots[name].sim.utilisation = value  # type: ignore[attr-defined]
            bots[name].publish(force=True)
        await peer.close()


async def test_a_childs_presence_that_moves_no_sum_builds_no_report(env: Env, alice: GridOperator,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A child's refresh that leaves the meter's sum within the deadband costs the meter no
    report (and sends nothing); one that moves the sum past it is told at once."""
    assert env.grid.bots is not None
    bots = env.grid.bots.devices
    meter, child = bots["branch-x"], bots["bx-load-2"]
    watched = env.fleet.jid("bx-load-2")
    intakes: list[str] = []
    built: list[int] = []
    report = meter._report

    class Sums(dict):  # type: ignore[type-arg]  # the meter's branch sums: set at each intake of a child's presence
        def __setitem__(self, key: str, value: float) -> None:
            super().__setitem__(key, value)
            intakes.append(key)

    def counted_report(*a: object, **k: object) -> object:
        frame, depth = sys._getframe(1), 0
        while frame is not None and depth < 4:  # built for a child's presence (not the meter's own tick)
            if frame.f_code.co_name == "_child_intake":
                if frame.f_locals.get("sender") == watched:  # (another child's news may still be coming in)
                    built.append(1)
                break
            frame, depth = frame.f_back, depth + 1
        return report(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(meter.sim, "branch_kw", Sums(meter.sim.branch_kw))  # type: ignore[attr-defined]
    monkeypatch.setattr(meter, "_report", counted_report)
    before = child.sim.utilisation  # type: ignore[attr-defined]
    try:
        child.publish(force=True)  # its refresh: the same reading
        await until(lambda: watched in intakes, 8, "the meter's intake of the refresh")
        assert built == [], "a re-sum within the deadband built a report"
        told = meter._published
        child.sim.utilisation = 0.05 if before > 0.5 else 0.95  # type: ignore[attr-defined]
        intakes.clear()
        child.publish(force=True)
        await until(lambda: watched in intakes, 8, "the meter's intake of the change")
        assert built, "a re-sum past the deadband builds the meter's report"
        assert meter._published is not told, "and tells it"
    finally:
        child.sim.utilisation = before  # type: ignore[attr-defined]
        child.publish(force=True)


async def test_branch_near_limit_advice_names_loads_and_generator(env: Env, alice: GridOperator) -> None:
    assert env.grid.bots is not None
    bots = env.grid.bots.devices
    before = {n: bots[n].sim.utilisation for n in ("bx-load-1", "bx-load-2", "bx-crit")}  # type: ignore[attr-defined]
    # Other tests start generators; the advice can only name one that is off.
    await alice.wait_for(lambda d: d["gen-2"].state in (DeviceState.ON, DeviceState.OFF), timeout=10)
    if alice.devices["gen-2"].state is DeviceState.ON:
        assert (await alice.command("gen-2", "stop")).ok
    peer = await chat_peer(env, "alice", "branch-advice")
    try:
        advisor = env.grid.bots.devices["master"].desk(BranchAdvisor)
        for name in before:  # start well under the limit, so crossing it is news
            bots[name].sim.utilisation = 0.2  # type: ignore[attr-defined]
        async with asyncio.timeout(8):
            while env.fleet.jid("branch-x") in advisor.near:
                await asyncio.sleep(0.1)
        for name in before:  # the physics: every load on branch-x at full power, 115 kW on a 100 kW branch
            bots[name].sim.utilisation = 1.0  # type: ignore[attr-defined]
        for name in before:  # each device tells at once (largest first), as on its next tick
            bots[name].publish(force=True)
        msg = await peer.alarm(env.fleet.jid("master"), timeout=8,
                               predicate=lambda m: "branch near its limit" in m["body"]
                               and "branch-x carries" in m["body"])  # branch-b may near its own at any time
        alarm = alarm_from_xml(msg.xml.find(q("alarm")))
        assert alarm.kind is AlarmKind.BRANCH_NEAR_LIMIT and alarm.threshold == 80.0
        assert "branch-x carries" in alarm.text and "of 100 kW" in alarm.text
        # Largest sheddable load first, at what it draws now (the physics drifts a little below full power).
        shed = re.search(r"shed bx-load-1 \((\d+) kW\)", alarm.text)
        assert shed is not None and 55 <= int(shed.group(1)) <= 60, alarm.text
        assert "bx-crit" not in alarm.text.split("shed", 1)[1].split("start")[0]
        assert "start gen-" in alarm.text
        assert (await peer.ask(env.fleet.jid("master"), f"ack {alarm.id}")).startswith("Acknowledged")
    finally:
        for name, value in before.items():
            bots[name].sim.utilisation = value  # type: ignore[attr-defined]
        await peer.close()
