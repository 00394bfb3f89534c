"""Alarms as instant messages ([00145]) on a real Prosody, routed by the operators' real presence:
an urgent alarm skips an operator who is dnd, is sent again until acknowledged, and reaches
the operator library as a typed payload."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from chatpeer import (chat_peer, no_more_escalation, owed_alarms_arrive_once_at_login, told_acknowledged_by,
                      urgent_alarm_skips_dnd_and_escalates)
from conftest import Env
from gridpresence.device.alarms import conditions
from gridpresence.device.agent import DeviceAgent
from gridpresence.operator.library import GridOperator
from gridpresence.rules.settings import AlarmSettings
from gridpresence.config import FleetError, parse_fleet
from gridpresence.protocol import Breaker, DeviceKind, DeviceState, PresenceReport, Telemetry
from gridpresence.protocol.alarm import Alarm, AlarmKind, AlarmLevel, AlarmStatus, alarm_from_xml
from gridpresence.protocol.codec import q

FAST = AlarmSettings(ack_timeout_s=1.5)


def agent(env: Env, name: str) -> DeviceAgent:
    assert env.grid.bots is not None
    return env.grid.bots.devices[name]


@pytest.fixture
def fast_acks(env: Env) -> Iterator[None]:
    """Short acknowledgement time-outs on the alarm test devices, restored afterwards."""
    names = ("hot-load", "hot-load2", "hot-gen", "hot-breaker")
    before = {n: agent(env, n).alarms.settings for n in names}
    for n in names:
        agent(env, n).alarms.settings = FAST
    yield
    for n, settings in before.items():
        agent(env, n).alarms.settings = settings
        agent(env, n).alarms.acknowledge(None, "test-cleanup")


def kinds(held: dict[AlarmKind, tuple[float, float]]) -> set[AlarmKind]:
    return set(held)


def report(kind: DeviceKind, state: DeviceState = DeviceState.ON, **tel: object) -> PresenceReport:
    return PresenceReport(kind=kind, state=state, telemetry=Telemetry(**tel))  # type: ignore[arg-type]


def test_thresholds_from_the_fleet_file() -> None:
    s = AlarmSettings()
    assert kinds(conditions(report(DeviceKind.LOAD, load_pct=79.9), s, 0)) == set()
    assert kinds(conditions(report(DeviceKind.LOAD, load_pct=80), s, 0)) == {AlarmKind.HIGH_LOADING}
    assert kinds(conditions(report(DeviceKind.BREAKER, load_pct=96, breaker=Breaker.CLOSED), s, 0)) == {
        AlarmKind.HIGH_LOADING, AlarmKind.TRIP_IMMINENT}
    assert kinds(conditions(report(DeviceKind.BREAKER, load_pct=0, breaker=Breaker.CLOSED), s, 0)) == {
        AlarmKind.BREAKER_TRIPPED}
    opened = report(DeviceKind.BREAKER, state=DeviceState.OFF, load_pct=0, breaker=Breaker.OPEN)
    assert kinds(conditions(opened, s, 0, commanded="open")) == set()  # opened on purpose is not tripped
    assert kinds(conditions(opened, s, 0)) == {AlarmKind.BREAKER_TRIPPED}  # open, no command opened it: a trip
    assert kinds(conditions(opened, s, 0, commanded="closed")) == {AlarmKind.BREAKER_TRIPPED}
    gen = report(DeviceKind.GENERATOR, load_pct=50, fuel_pct=5, temperature_c=120)
    assert kinds(conditions(gen, s, 600)) == {AlarmKind.LOW_FUEL, AlarmKind.TEMPERATURE_EXCEEDED,
                                              AlarmKind.SERVICE_REQUIRED}
    # Hysteresis: an active alarm holds until the reading is 2 points back on the safe side.
    assert kinds(conditions(report(DeviceKind.LOAD, load_pct=78.5), s, 0, frozenset({AlarmKind.HIGH_LOADING})))
    fleet = parse_fleet({"operators": [{"name": "a"}], "devices": [{"name": "d", "kind": "load", "rated_kw": 1}],
                         "alarms": {"high_loading_pct": 70, "ack_timeout_s": 30}})
    assert fleet.alarms.high_loading_pct == 70 and fleet.alarms.trip_imminent_pct == 95
    with pytest.raises(FleetError, match="alarms: .*trip_imminent_pct must be above high_loading_pct"):
        parse_fleet({"operators": [{"name": "a"}], "devices": [{"name": "d", "kind": "load", "rated_kw": 1}],
                     "alarms": {"high_loading_pct": 96}})
    with pytest.raises(FleetError, match=r"alarms\.ack_timeout_s"):
        parse_fleet({"operators": [{"name": "a"}], "devices": [{"name": "d", "kind": "load", "rated_kw": 1}],
                     "alarms": {"ack_timeout_s": -1}})


async def test_urgent_alarm_skips_dnd_operator_escalates_until_acknowledged(env: Env, fast_acks: None) -> None:
    dev = agent(env, "hot-load")
    alice = await chat_peer(env, "alice", "desk", show="dnd")
    bob = await chat_peer(env, "bob", "desk")
    try:
        alarm = await urgent_alarm_skips_dnd_and_escalates(dev, alice, bob)
        acked = await alice.ask(dev.jid, f"ack {alarm.id}")
        assert acked == f"Acknowledged: alarm {alarm.id} (trip point imminent)."
        await told_acknowledged_by(dev, alarm, alice, bob)
        await no_more_escalation(dev, alice, bob)
        assert "no open alarms" in await bob.ask(dev.jid, "alarms")
    finally:
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await alice.close()
        await bob.close()


async def test_nobody_available_urgent_alarm_waits_offline(env: Env, fast_acks: None) -> None:
    """Everyone away: the alarm is left with every operator on duty (offline storage) and still escalates."""
    device = env.fleet.jid("hot-load2")
    alice = await chat_peer(env, "alice", "desk2", show="away")
    bob = await chat_peer(env, "bob", "desk2", show="xa")
    try:
        await asyncio.sleep(0.3)
        agent(env, "hot-load2").sim.utilisation = 0.99
        got_a = await alice.alarm(device, timeout=5, predicate=lambda m: "URGENT" in m["body"])
        got_b = await bob.alarm(device, timeout=5, predicate=lambda m: "URGENT" in m["body"])
        assert alarm_from_xml(got_a.xml.find(q("alarm"))).id == alarm_from_xml(got_b.xml.find(q("alarm"))).id
        assert "Acknowledged" in await bob.ask(device, "ack")
    finally:
        agent(env, "hot-load2").sim.utilisation = 0.5
        await alice.close()
        await bob.close()


async def test_generator_and_breaker_alarms_reach_operator_library(env: Env, alice: GridOperator,
                                                                   fast_acks: None) -> None:
    gen, brk = agent(env, "hot-gen"), agent(env, "hot-breaker")
    gen.sim.fuel_pct = 4.0  # type: ignore[attr-defined]
    gen.sim.temperature_c = 140.0  # type: ignore[attr-defined]
    brk.sim.contacts = Breaker.TRIPPED  # type: ignore[attr-defined]
    try:
        want = {AlarmKind.LOW_FUEL, AlarmKind.TEMPERATURE_EXCEEDED, AlarmKind.BREAKER_TRIPPED}

        def seen() -> set[AlarmKind]:
            return {a.kind for a in alice.alarms if a.device in (gen.jid, brk.jid)}

        await alice.wait_for(lambda _d: want <= seen(), timeout=6)
        levels = {a.kind: a.level for a in alice.alarms}
        assert levels[AlarmKind.LOW_FUEL] is AlarmLevel.WARNING
        assert levels[AlarmKind.TEMPERATURE_EXCEEDED] is AlarmLevel.URGENT
        assert levels[AlarmKind.BREAKER_TRIPPED] is AlarmLevel.URGENT
        fuel = next(a for a in alice.alarms if a.kind is AlarmKind.LOW_FUEL)
        assert fuel.value is not None and fuel.value <= 4.0 and fuel.threshold == 10.0
        assert fuel.text.startswith("generating with low fuel (4.0 %")
    finally:
        gen.sim.fuel_pct = 100.0  # type: ignore[attr-defined]
        gen.sim.temperature_c = 80.0  # type: ignore[attr-defined]
        brk.sim.contacts = Breaker.CLOSED  # type: ignore[attr-defined]


async def test_breaker_opened_by_command_is_quiet_opened_by_itself_is_tripped(env: Env, alice: GridOperator,
                                                                            fast_acks: None) -> None:
    """Real IEDs report open/closed: an open no command asked for is a trip; a commanded one is not."""
    brk = agent(env, "hot-breaker")

    def trips() -> list[Alarm]:
        return [a for a in alice.alarms if a.device == brk.jid and a.kind is AlarmKind.BREAKER_TRIPPED]

    before = len(trips())
    try:
        outcome = await alice.command("hot-breaker", "open")
        assert outcome.status.value == "executed", outcome
        await asyncio.sleep(2.5)  # several ticks of the device: no alarm for an open it was told to do
        assert len(trips()) == before and brk.sim.commanded == "open"
        assert (await alice.command("hot-breaker", "close")).status.value == "executed"
        brk.sim.contacts = Breaker.OPEN  # type: ignore[attr-defined]  # opens by itself, closed as commanded
        brk.sim.state = DeviceState.OFF
        await alice.wait_for(lambda _d: len(trips()) > before, timeout=6)
        assert trips()[-1].level is AlarmLevel.URGENT
    finally:
        brk.sim.contacts = Breaker.CLOSED  # type: ignore[attr-defined]
        brk.sim.state = DeviceState.ON
        brk.alarms.acknowledge(None, "test-cleanup")


async def test_warning_goes_to_every_available_operator_and_clears(env: Env, fast_acks: None) -> None:
    device = env.fleet.jid("hot-load")
    alice = await chat_peer(env, "alice", "warn")
    bob = await chat_peer(env, "bob", "warn")
    try:
        await asyncio.sleep(0.3)
        agent(env, "hot-load").sim.utilisation = 0.86  # high loading, short of the trip point
        high = lambda m: "WARNING" in m["body"] and "high loading" in m["body"]  # noqa: E731
        to_alice = await alice.alarm(device, timeout=5, predicate=high)
        to_bob = await bob.alarm(device, timeout=5, predicate=high)
        alarm = alarm_from_xml(to_alice.xml.find(q("alarm")))
        assert alarm.level is AlarmLevel.WARNING and alarm_from_xml(to_bob.xml.find(q("alarm"))).id == alarm.id
        agent(env, "hot-load").sim.utilisation = 0.4  # back to normal before anyone acknowledged
        cleared = await bob.alarm(device, timeout=5, predicate=lambda m: "cleared" in m["body"])
        assert alarm_from_xml(cleared.xml.find(q("alarm"))).status is AlarmStatus.CLEARED
        assert alarm.id not in agent(env, "hot-load").alarms.open
    finally:
        agent(env, "hot-load").sim.utilisation = 0.5
        await alice.close()
        await bob.close()


async def test_cli_shows_alarms_as_they_arrive(env: Env, fast_acks: None) -> None:
    import json
    import sys
    from pathlib import Path

    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(
        str(exe), "alarms", "--json", "--as", "bob", "--connection", str(env.grid.connection_file),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await asyncio.sleep(2.5)  # logged in and available
        agent(env, "hot-load2").sim.utilisation = 0.87  # a warning: every available operator gets it
        async with asyncio.timeout(10):
            while True:
                line = json.loads(await proc.stdout.readline())  # type: ignore[union-attr]
                if line["device"] == env.fleet.jid("hot-load2") and line["kind"] == "high-loading":
                    break
        assert line["level"] == "warning" and line["status"] == "raised" and line["threshold"] == 80.0
    finally:
        agent(env, "hot-load2").sim.utilisation = 0.5
        proc.kill()
        await proc.wait()


async def test_operator_logging_in_gets_one_message_per_open_alarm_with_its_latest_state(env: Env) -> None:
    await owed_alarms_arrive_once_at_login(env, agent(env, "hot-breaker"))
