"""The wire format and the device physics, without a server; plus how an ordinary chat
client (a plain XMPP session that knows nothing of the grid namespace) sees device presence."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import math
from xml.etree import ElementTree as ET

import pytest
from slixmpp import Presence

from conftest import Env
from gridpresence.device.agent import DeviceAgent
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.config import DeviceSpec
from gridpresence.physics import make_device
from gridpresence.protocol import (
    NS,
    Action,
    Command,
    DeviceKind,
    DeviceState,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Restriction,
    Telemetry,
)
from gridpresence.protocol.codec import (
    PayloadError,
    command_from_xml,
    command_to_xml,
    outcome_from_xml,
    outcome_to_xml,
    report_from_xml,
    report_to_xml,
)
from timebase import NOW


def _roundtrip(el: ET.Element) -> ET.Element:
    return ET.fromstring(ET.tostring(el))


def test_presence_report_roundtrip() -> None:
    report = PresenceReport(kind=DeviceKind.GENERATOR, state=DeviceState.RESTRICTED, critical=False,
                            telemetry=Telemetry(load_pct=12.5, kw=25.0, capacity_kw=200, fuel_pct=99.5,
                                                temperature_c=31.25),
                            restriction=Restriction(note="starting", until=NOW), refresh_s=30, seq=7, at=NOW)
    assert report_from_xml(_roundtrip(report_to_xml(report))) == report


def test_command_and_outcome_roundtrip() -> None:
    cmd = Command.new(Action.SET_TIME, "alice@localhost", args={"time": (NOW + dt.timedelta(days=400)).isoformat()}, now=NOW)
    assert command_from_xml(_roundtrip(command_to_xml(cmd))) == cmd
    out = Outcome(command_id=cmd.id, device="x@localhost", status=OutcomeStatus.REJECTED,
                  reason=RejectReason.CRITICAL, detail="no",
                  report=PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.ON, at=NOW))
    assert outcome_from_xml(_roundtrip(outcome_to_xml(out))) == out


def test_the_same_presence_read_twice_is_one_report_and_a_changed_one_is_not() -> None:
    """Every party in a process that follows a device reads its presence: one report is kept."""
    report = PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.RESTRICTED, telemetry=Telemetry(kw=4.0),
                            restriction=Restriction(note="shed"), seq=3, at=NOW)
    first, second = (report_from_xml(_roundtrip(report_to_xml(report))) for _ in range(2))
    assert first == report and second is first
    other = report_from_xml(_roundtrip(report_to_xml(report.model_copy(update={"seq": 4}))))
    assert other.seq == 4 and first.seq == 3
    noted = _roundtrip(report_to_xml(report))
    noted.find(f"{{{NS}}}restriction").text = "shed again"  # type: ignore[union-attr]
    assert report_from_xml(noted).restriction.note == "shed again"  # type: ignore[union-attr]
    # Without `at` a report is stamped as it is read: never one kept from before.
    bare = f"<device xmlns='{NS}' kind='load' state='on'/>"
    assert report_from_xml(ET.fromstring(bare)) is not report_from_xml(ET.fromstring(bare))
    with pytest.raises(PayloadError):  # nor is a bad one let through by a good one read before
        report_from_xml(ET.fromstring(f"<device xmlns='{NS}' kind='load' state='restricted' at='{NOW.isoformat()}'/>"))


@pytest.mark.parametrize("attrs", ["load-pct='150.5'", "load-pct='-1'", "kw='nan'", "kw='inf'", "fuel-pct='101'",
                                   "temperature-c='1e9'", "breaker='melted'"])
def test_out_of_range_telemetry_is_rejected(attrs: str) -> None:
    el = ET.fromstring(f"<device xmlns='{NS}' kind='load' state='on'><telemetry {attrs}/></device>")
    with pytest.raises(PayloadError, match="telemetry"):
        report_from_xml(el)


def test_state_and_restriction_must_agree() -> None:
    with pytest.raises(PayloadError, match="restriction"):
        report_from_xml(ET.fromstring(f"<device xmlns='{NS}' kind='load' state='restricted'/>"))
    with pytest.raises(ValueError):
        PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.ON, restriction=Restriction(note="x"))


def test_unknown_attributes_are_ignored_for_forward_compatibility() -> None:
    el = ET.fromstring(f"<device xmlns='{NS}' kind='load' state='on' colour='blue'><telemetry kw='3' volts='230'/>"
                       f"</device>")
    assert report_from_xml(el).telemetry.kw == 3.0


@pytest.mark.parametrize("state, show, status", [
    (DeviceState.ON, None, "on, load 40%, 4.0 kW"),
    (DeviceState.OFF, "away", "off, load 0%, 0.0 kW"),
])
def test_state_maps_onto_show_and_status(state: DeviceState, show: str | None, status: str) -> None:
    kw = 4.0 if state is DeviceState.ON else 0.0
    report = PresenceReport(kind=DeviceKind.LOAD, state=state, telemetry=Telemetry(load_pct=kw * 10, kw=kw))
    assert report.show() == show and report.status_text() == status


def test_restricted_maps_onto_dnd_with_the_note() -> None:
    until = NOW.replace(hour=13, minute=3, second=0)
    report = PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.RESTRICTED,
                            restriction=Restriction(note="critical process online", until=until))
    assert report.show() == "dnd"
    assert report.status_text() == "critical process online (until 13:03:00 UTC)"


# -- physics ------------------------------------------------------------------------------


def test_generator_start_up_sequence() -> None:
    gen = make_device(DeviceSpec(name="g", kind="generator", rated_kw=100, startup_s=5), NOW)
    assert gen.state is DeviceState.OFF and gen.telemetry().kw == 0
    assert gen.execute(Action.START, {}, NOW).status is OutcomeStatus.EXECUTED
    assert gen.state is DeviceState.RESTRICTED
    assert gen.execute(Action.STOP, {}, NOW + dt.timedelta(seconds=1)).reason is RejectReason.RESTRICTED
    gen.tick(NOW + dt.timedelta(seconds=5))
    assert gen.state is DeviceState.ON and gen.telemetry().kw > 0
    gen.tick(NOW + dt.timedelta(hours=1))
    t = gen.telemetry()
    assert t.fuel_pct < 100 and t.temperature_c > 80  # type: ignore[operator]


def test_critical_load_restriction_ends_by_itself() -> None:
    load = make_device(DeviceSpec(name="l", kind="load", rated_kw=10, critical=True, critical_hold_s=60), NOW)
    assert load.execute(Action.SHED, {}, NOW).reason is RejectReason.CRITICAL
    assert load.state is DeviceState.RESTRICTED and load.telemetry().kw > 0
    load.tick(NOW + dt.timedelta(seconds=61))
    assert load.state is DeviceState.ON and load.restriction is None


def test_physics_stays_in_range_over_a_long_run() -> None:
    for kind in ("load", "generator", "meter", "breaker"):
        dev = make_device(DeviceSpec(name="d", kind=kind, rated_kw=50, utilisation=1.2), NOW)
        if kind == "generator":
            dev.execute(Action.START, {}, NOW)
        for i in range(1, 5000):
            dev.tick(NOW + dt.timedelta(seconds=10 * i))
            t = dev.telemetry()  # would raise if a value left its range
            assert t.load_pct is not None and 0 <= t.load_pct <= 150


def test_device_never_publishes_invalid_values(caplog: pytest.LogCaptureFixture) -> None:
    from gridpresence.xmpp.session import Endpoint

    agent = DeviceAgent(DeviceSpec(name="l", kind="load", rated_kw=10), "l@localhost", "pw", Endpoint(), [])
    agent.sim.utilisation = math.nan  # type: ignore[attr-defined]  # a broken sensor model
    caplog.set_level(logging.ERROR)
    assert agent.current_report() is None
    assert "refusing to publish invalid values" in caplog.text


# -- what an ordinary chat client sees ------------------------------------------------------


async def test_plain_client_sees_online_away_and_dnd_with_note(env: Env, alice: GridOperator) -> None:
    """Log in as bob with a bare XMPP session, the way Gajim or Profanity would."""
    client = make_client("bob@localhost/chatclient", env.grid.secrets.password("bob"), env.grid.endpoint)
    seen: dict[str, Presence] = {}
    client.add_event_handler("presence", lambda p: seen.__setitem__(p["from"].bare, p))
    await open_session(client, env.grid.endpoint)
    await client.get_roster()
    client.send_presence()
    try:
        async with asyncio.timeout(5):
            while not {"load-a@localhost", "gen-2@localhost"} <= seen.keys():
                await asyncio.sleep(0.05)
        assert seen["load-a@localhost"]["show"] == "" and seen["load-a@localhost"]["status"].startswith("on")
        assert seen["gen-2@localhost"]["show"] == "away"
        groups = client.client_roster["load-a@localhost"]["groups"]
        assert groups == ["Loads"]
        outcome = await alice.command("load-crit3", Action.SHED)
        assert outcome.reason is RejectReason.CRITICAL
        async with asyncio.timeout(5):
            while seen.get("load-crit3@localhost") is None or seen["load-crit3@localhost"]["show"] != "dnd":
                await asyncio.sleep(0.05)
        assert "critical process" in seen["load-crit3@localhost"]["status"]
    finally:
        await close_session(client)


async def test_watchdog_answers_operators_only(env: Env) -> None:
    from slixmpp.exceptions import IqError

    client = make_client("billing@localhost/probe", env.grid.secrets.password("billing"), env.grid.endpoint)
    await open_session(client, env.grid.endpoint)
    try:
        # To its full JID: an iq to a bare JID is answered by the server itself.
        iq = client.make_iq_get(ito=env.grid.bots.watchdog.client.boundjid.full)  # type: ignore[union-attr]
        iq.enable("grid_fleet_health")
        with pytest.raises(IqError) as err:
            await iq.send(timeout=5)
        assert err.value.condition == "forbidden"
    finally:
        await close_session(client)


async def test_client_trusting_another_ca_cannot_log_in(env: Env, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every session verifies the server against the configured CA only."""
    from gridpresence.xmpp.session import SessionError
    from gridpresence.server import ensure_certificates

    stranger = ensure_certificates(tmp_path, "localhost")
    endpoint = env.grid.endpoint.model_copy(update={"ca_file": stranger.ca})
    client = make_client("bob@localhost/wrong-ca", env.grid.secrets.password("bob"), endpoint)
    with pytest.raises(SessionError, match="no session"):
        await open_session(client, endpoint, timeout=4)


def test_outcome_record_round_trips_and_refuses_a_broken_one() -> None:
    """A device's copy of an outcome for the recorders: its action and issuer travel with it."""
    from gridpresence.protocol.codec import record_from_xml, record_to_xml
    from gridpresence.protocol.models import OutcomeRecord

    out = Outcome(command_id="c1", device="x@localhost", status=OutcomeStatus.EXECUTED, detail="done")
    record = OutcomeRecord(action=Action.SHED, issuer="alice@localhost", outcome=out)
    assert record_from_xml(_roundtrip(record_to_xml(record))) == record
    for bad in (f"<outcome-record xmlns='{NS}' action='shed' issuer='a@b'/>",  # no outcome
                f"<outcome-record xmlns='{NS}' action='explode' issuer='a@b'><outcome command-id='c' "
                f"device='x@localhost' status='executed'/></outcome-record>",
                f"<outcome-record xmlns='{NS}' action='shed'><outcome command-id='c' device='x@localhost' "
                f"status='executed'/></outcome-record>"):
        with pytest.raises(PayloadError):
            record_from_xml(ET.fromstring(bad))


def test_outcome_text_reads_back_as_its_element_does() -> None:
    """codec.outcome_wire writes a plain outcome's text itself: seeded, it reads back as the
    serialiser's text of the same element (namespace, quotes and escapes alike), and its record
    in a host's JSON batch reads back as the record's element does."""
    import random
    from slixmpp.xmlstream import tostring
    from gridpresence.protocol.codec import (JSON_NS, outcome_from_xml, outcome_to_xml, outcome_wire, q,
                                             record_from_xml, record_json, record_to_xml, records_from_xml)
    from gridpresence.protocol.models import Action, Outcome, OutcomeRecord, OutcomeStatus, RejectReason
    rng = random.Random(5)
    chars = "aZ09 <>&'\"\t=/é\u2028\\"
    for i in range(200):
        status = list(OutcomeStatus)[i % len(OutcomeStatus)]
        report = PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.OFF, at=NOW, seq=i) if i % 3 else None
        out = Outcome(command_id=f"c-{i}", device="load-1@localhost", status=status,
                      reason=RejectReason.STALE if status is OutcomeStatus.REJECTED else None,
                      detail="".join(rng.choice(chars) for _ in range(rng.randrange(12))), report=report)
        by_seq = bool(i % 2)
        made, text = outcome_wire(out, by_seq=by_seq)
        el = outcome_to_xml(out, by_seq=by_seq)
        assert made is None or ET.tostring(made) == ET.tostring(el)
        assert outcome_from_xml(ET.fromstring(text)) == outcome_from_xml(ET.fromstring(tostring(el))) \
            == outcome_from_xml(el), text
        assert ET.canonicalize(text) == ET.canonicalize(tostring(el)), text  # the same element, as written
        if by_seq and report is not None:
            assert "<device" not in text and outcome_from_xml(el).report_seq == i
        record = OutcomeRecord(action=Action.SHED, issuer="a'l&ice@localhost", outcome=out)
        # A record as a host batches it (JSON) reads back as the record's element does.
        batch = ET.Element(q("outcome-records"))
        ET.SubElement(batch, f"{{{JSON_NS}}}json").text = f"[{record_json(record, by_seq=by_seq)}]"
        as_element = record_to_xml(record, outcome_to_xml(out, by_seq=by_seq))
        assert records_from_xml(_roundtrip(batch)) == ([record_from_xml(as_element)], [])
        assert record_json(record, by_seq=by_seq).isascii()
        # Written field by field for a plain outcome: the same JSON as pydantic's dump of the record.
        told = out.model_copy(update={"report": None, "report_seq": report.seq}) if by_seq and report else out
        reference = record.model_copy(update={"outcome": told}).model_dump_json(exclude_defaults=True)
        assert json.loads(record_json(record, by_seq=by_seq)) == json.loads(reference), reference
