"""Hosted identities (NAME@devices.localhost, xmpp/component.py) do what today's c2s bots do,
checked the way the c2s tests check it: alarms routed by the operators' presence, escalated,
acknowledged (chat, the CLI, the library), judged (thresholds adapt), named in presence and
owed to a logged-out operator once; a stock client's roster (Profanity) with their presence
and its changes; OpenPGP for XMPP chat answered sealed; a hosted meter's billing report.

The hosted devices run in this process over the component link (tests/test_hosting.py runs
them in a child process to stop and freeze it), so a test drives their physics directly, as
tests/test_alarms.py does for c2s bots.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from chatpeer import (alarm_of, chat_peer, judged_not_a_fault_twice, no_more_escalation,
                      owed_alarms_arrive_once_at_login, raises_by_a_limit_of_90, seen_busy_and_available,
                      told_acknowledged_by, urgent, urgent_alarm_skips_dnd_and_escalates)
from conftest import hosted_fleet, run_cli, running_grid, until
from gpghome import HAVE_GPG
from gridpresence.config import Fleet, parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.host.grid import Grid
from gridpresence.operator.firmware import FirmwareCampaign
from gridpresence.operator.library import GridOperator
from gridpresence.operator.reports import ReportInbox
from gridpresence.protocol.alarm import AlarmKind, AlarmLevel, AlarmStatus
from gridpresence.protocol.billing_report import (BillingData, BillingReport, PartName, QualityData,
                                                  billing_report_from_xml)
from gridpresence.protocol.codec import q
from gridpresence.protocol.firmware import FirmwareImage, FirmwareReason, FirmwareStatus
from gridpresence.protocol.models import DeviceState, RejectReason
from gridpresence.protocol.openpgp import ox
from gridpresence.rules.settings import AlarmSettings
from gridpresence.security.parts import NotForYou
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.policy import SecuritySettings
from gridpresence.security.reports import ReportReader
from gridpresence.words import TITLES
from gridpresence.xmpp.session import close_session, make_client, open_session
from terminal import (HAVE_PROFANITY, NO_PROFANITY, Terminal, cmd_status_and_run, log_in, ox_signed_shed_and_restore,
                      run_profanity)
from test_adhoc import COMMANDS, _gajim
from test_ox_chat import opened_reply, sealed, send_ox

pytestmark = pytest.mark.timeout(120)

CAPS = "http://jabber.org/protocol/caps"

N = 100  # hosted loads besides the ones the tests drive
BACKGROUND = [f"p-{i:03d}" for i in range(N)]
FAST = AlarmSettings(ack_timeout_s=1.5)
FLEET = hosted_fleet(
    [
        *({"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 5.0} for n in BACKGROUND),
        {"name": "hp-alarm", "kind": "load", "rated_kw": 100, "utilisation": 0.5},
        # Critical (no test sheds it): its alarms are never start-up transients of a state change.
        {"name": "hp-verdict", "kind": "load", "rated_kw": 100, "critical": True, "utilisation": 0.5},
        {"name": "hp-owed", "kind": "breaker", "rated_kw": 100},
        {"name": "hp-desk", "kind": "load", "rated_kw": 40},
        {"name": "hp-cmd", "kind": "load", "rated_kw": 20},  # Profanity's /cmd
        {"name": "hp-crit", "kind": "load", "rated_kw": 30, "critical": True, "critical_hold_s": 15},
        {"name": "hp-ox", "kind": "load", "rated_kw": 70},
        {"name": "hp-oxp", "kind": "load", "rated_kw": 90},  # OX from Profanity
        {"name": "hp-meter", "kind": "meter", "rated_kw": 80, "customer": "acme"},
        # Firmware targets; the critical one turns restricted (for 3 s) when shed.
        {"name": "hp-fw", "kind": "load", "rated_kw": 10},
        {"name": "hp-fw-crit", "kind": "load", "rated_kw": 10, "critical": True, "critical_hold_s": 3},
    ],
    billing=[{"name": "billing", "peak_price": 0.8, "off_peak_price": 0.6}],
    customers=[{"name": "acme"}],
    manufacturers=[{"name": "maker"}],
    # Lab setting, as conftest's fleet: plain chat lines may act and judge.
    security={"unsigned_chat_actions": ["shed", "restore", "accept", "set", "reject", "revert", "judge"]},
)
DRIVEN = ("hp-alarm", "hp-verdict", "hp-owed")


@dataclass
class Parity:
    grid: Grid
    fleet: Fleet
    data: Path

    def agent(self, name: str) -> DeviceAgent:
        assert self.grid.bots is not None
        return self.grid.bots.devices[name]

    def operator(self, name: str) -> GridOperator:
        return GridOperator.from_connection(self.grid.connection, operator=name, resource=f"p-{os.urandom(3).hex()}")


@pytest_asyncio.fixture(scope="module")
async def parity(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Parity]:
    fleet = parse_fleet(FLEET)
    data = tmp_path_factory.mktemp("parity")
    async with running_grid(fleet, data, only=[*(d.name for d in fleet.devices), "billing", "maker", "watchdog",
                                               "console", "relay"], dashboard=False) as grid:
        yield Parity(grid, fleet, data)


def test_the_driven_devices_are_hosted(parity: Parity) -> None:
    for name in (*DRIVEN, "hp-desk", "hp-ox", "hp-oxp", "hp-meter", "hp-fw"):
        assert parity.fleet.jid(name) == f"{name}@devices.localhost"
        assert parity.agent(name).client.transport_name == "component"


@pytest.fixture
def fast_acks(parity: Parity) -> Iterator[DeviceAgent]:
    """hp-alarm with a short acknowledgement time-out; its reading and alarms reset after."""
    agent = parity.agent("hp-alarm")
    before = agent.alarms.settings
    agent.alarms.settings = FAST
    yield agent
    agent.alarms.settings = before
    agent.sim.utilisation = 0.5  # type: ignore[attr-defined]
    agent.alarms.acknowledge(None, "test-cleanup")


async def test_hosted_urgent_alarm_skips_a_dnd_operator_escalates_and_is_acked_from_the_cli(
        parity: Parity, fast_acks: DeviceAgent) -> None:
    dev = fast_acks
    alice = await chat_peer(parity, "alice", "desk", show="dnd")
    bob = await chat_peer(parity, "bob", "desk")
    try:
        # The hosted identity learns both presences from the server, over the component.
        alarm = await urgent_alarm_skips_dnd_and_escalates(dev, alice, bob)
        # `gridpresence ack`, as an operator runs it (its line is signed with her key).
        code, out, err = await run_cli("ack", "hp-alarm", alarm.id, "--as", "alice",
                                       "--connection", str(parity.grid.connection_file))
        assert code == 0 and out.strip() == f"hp-alarm: Acknowledged: alarm {alarm.id} (trip point imminent).", out + err
        await told_acknowledged_by(dev, alarm, alice, bob)
        # Acknowledged: no more escalation (what was sent while the CLI logged in is drained first).
        for peer in (alice, bob):
            while not peer.alarms.empty():
                peer.alarms.get_nowait()
        await no_more_escalation(dev, alice, bob)
    finally:
        await alice.close()
        await bob.close()


async def test_hosted_warning_reaches_the_library_is_named_in_presence_and_acked(parity: Parity,
                                                                                 fast_acks: DeviceAgent) -> None:
    dev = fast_acks

    def in_fault(d: object) -> bool:
        report = d["hp-alarm"].report  # type: ignore[index]
        return report is not None and any(f.kind == AlarmKind.HIGH_LOADING and f.device is None for f in report.faults)

    def healthy(d: object) -> bool:
        report = d["hp-alarm"].report  # type: ignore[index]
        return report is not None and not report.faults

    async with parity.operator("alice") as alice:
        # No fault at all held (a test before may have left one clearing): a new one is raised afresh.
        await alice.wait_for(healthy, timeout=10)
        dev.sim.utilisation = 0.86  # type: ignore[attr-defined]  # high loading, short of the trip point
        found = await until(lambda: next((a for a in alice.alarms if a.device == dev.jid
                                          and a.kind is AlarmKind.HIGH_LOADING and a.status is AlarmStatus.RAISED),
                                         None), 6, "the warning at the library")
        assert found.level is AlarmLevel.WARNING and found.threshold == 80.0 and found.value is not None
        assert found.value >= 80
        # The fault is in the hosted device's presence, as every subscriber sees it.
        await alice.wait_for(in_fault, timeout=6)
        reply = await alice.ask("hp-alarm", f"ack {found.id}", signed=True)
        assert reply == f"Acknowledged: alarm {found.id} ({TITLES[AlarmKind.HIGH_LOADING]})."
        assert found.id not in dev.alarms.open
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await alice.wait_for(healthy, timeout=8)  # the presence says so too


async def test_after_its_link_returns_a_hosted_device_knows_who_is_on_duty(
        parity: Parity, fast_acks: DeviceAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    """Presence that changed while the component link was down is learnt from the probes each
    identity sends at its new session (a c2s bot's server sends them at its login): an operator
    who logged out meanwhile is not on duty, one who became available is, and the urgent alarm
    goes to her."""
    dev, link = fast_acks, parity.grid.bots.link  # type: ignore[union-attr]
    assert link is not None
    device, alice_jid, bob_jid = dev.jid, parity.fleet.jid("alice"), parity.fleet.jid("bob")
    alice = await chat_peer(parity, "alice", "duty", show="dnd")
    bob = await chat_peer(parity, "bob", "duty")
    try:
        await seen_busy_and_available(dev, alice, bob)
        # The link drops and stays down long enough for both changes to happen meanwhile.
        monkeypatch.setattr("gridpresence.xmpp.reconnect.backoff_delay", lambda *_a, **_k: 2.5)
        link.abort()
        await until(lambda: not dev.client.is_connected(), 5, "the hosted session down with its link")
        await bob.close()
        alice.client.send_presence()  # available now
        await asyncio.sleep(0.3)  # on its way to the component, which is not there
        assert not dev.client.is_connected()
        await until(lambda: dev.client.is_connected(), 10, "the hosted session back with its link")
        await until(lambda: dev.alarms.available(alice_jid) and not dev.alarms.online(bob_jid), 5,
                    "the operators' presence as it is now")
        dev.sim.utilisation = 0.99  # type: ignore[attr-defined]
        got = alarm_of(await alice.alarm(device, timeout=5, predicate=urgent))
        assert got.kind is AlarmKind.TRIP_IMMINENT and got.escalation == 0
    finally:
        await alice.close()
        await bob.close()
    await until(lambda: all(d.client.is_connected() for d in parity.grid.bots.devices.values()),  # type: ignore[union-attr]
                10, "every hosted identity back")


async def test_a_stock_client_sees_hosted_identities_go_when_their_link_drops(
        parity: Parity, monkeypatch: pytest.MonkeyPatch) -> None:
    """A c2s bot whose connection drops is shown unavailable by its server at once. Hosted
    identities have no session there: when the component's connection drops without their
    goodbyes (a crash), the server's mod_gridpresence_hosted_gone.lua tells each subscribed
    session the same, from the full JID each was online as; when the link is back, so are they,
    each on a new resource (the link's next session)."""
    link = parity.grid.bots.link  # type: ignore[union-attr]
    assert link is not None
    jids = [parity.fleet.jid(d.name) for d in parity.fleet.devices]
    bob = await chat_peer(parity, "bob", "gone")
    roster = bob.client.client_roster
    said: dict[str, str] = {}
    bob.client.add_event_handler("presence_unavailable", lambda p: said.__setitem__(p["from"].full, p["status"]))
    try:
        await until(lambda: all(roster[j].resources for j in jids), 10, "every hosted identity online at bob's")
        online = {f"{j}/{r}" for j in jids for r in roster[j].resources}
        assert len(online) == len(jids) and all(r == link.session_resource for j in jids for r in roster[j].resources)
        monkeypatch.setattr("gridpresence.xmpp.reconnect.backoff_delay", lambda *_a, **_k: 3.0)
        link.abort()  # as a crash: the socket closes, no identity says goodbye
        await until(lambda: not any(roster[j].resources for j in jids), 2, "every hosted identity offline at bob's")
        assert set(said) >= online and all(said[j].startswith("Disconnected: ") for j in online), said
        await until(lambda: all(roster[j].resources for j in jids), 15, "every hosted identity back at bob's")
        assert not {f"{j}/{r}" for j in jids for r in roster[j].resources} & online  # a new session of each
    finally:
        await bob.close()


async def test_verdicts_on_a_hosted_devices_alarms_adapt_its_threshold(parity: Parity) -> None:
    """As tests/test_verdicts.py for a c2s bot: two alarms judged not a fault (chat, then the
    library's signed line) propose a higher limit; the operator sets one; the device raises by it."""
    dev = parity.agent("hp-verdict")
    device, name = dev.jid, "hp-verdict"
    alice = await chat_peer(parity, "alice", "verdicts")
    sim = dev.sim
    try:
        async with parity.operator("bob") as bob:
            await until(lambda: dev.alarms.available(parity.fleet.jid("alice")), 5, "alice at the device")
            pid, _ = await judged_not_a_fault_twice(dev, alice, lambda aid: bob.ask(name, f"not a fault {aid}",
                                                                                    signed=True))
            changed = await alice.ask(device, f"set {pid} 90")
            assert "changed 80 -> 90 by " + parity.fleet.jid("alice") in changed, changed
            assert dev.alarms.thresholds.current(name, "high_loading", "high_loading") == 90.0
            await raises_by_a_limit_of_90(dev, alice)
            change = dev.alarms.thresholds.audit[-1]
            assert "changed 90 -> 80" in await alice.ask(device, f"revert {change.id}")
    finally:
        sim.utilisation = 0.5  # type: ignore[attr-defined]
        dev.alarms.acknowledge(None, "test-cleanup")
        await alice.close()


async def test_alarms_owed_to_a_logged_out_operator_arrive_at_login_once(parity: Parity) -> None:
    """As tests/test_alarms.py's: raised, escalated and changed while every operator was away; at
    login each open alarm arrives once, in its newest state."""
    await owed_alarms_arrive_once_at_login(parity, parity.agent("hp-owed"))


async def test_ox_chat_to_a_hosted_identity_is_answered_sealed(parity: Parity) -> None:
    """As tests/test_ox_chat.py: a signed, encrypted `shed` acts and its answer comes back
    encrypted to the operator, signed by the hosted identity's key; a replayed copy acts not
    again; a line signed by someone else is refused in plain text."""
    name = "hp-ox"
    device = parity.fleet.jid(name)
    async with parity.operator("alice") as alice:  # her key announced on PEP, as an OX client's is
        peer = await chat_peer(parity, "alice", "ox-script")
        try:
            shed = sealed(parity, "shed", name=name)
            send_ox(peer, device, shed)
            answer = await opened_reply(parity, await peer.reply_from(device), name=name)
            assert answer.startswith(f"Done: load shed. Now: {name} (load) is off"), answer
            await alice.wait_for(lambda d: d[name].state is DeviceState.OFF, timeout=5)
            send_ox(peer, device, sealed(parity, "restore", name=name))
            assert (await opened_reply(parity, await peer.reply_from(device), name=name)).startswith(
                "Done: load restored.")
            await alice.wait_for(lambda d: d[name].state is DeviceState.ON, timeout=5)
            send_ox(peer, device, shed)  # the first one again: answered from memory, no second shed
            assert (await opened_reply(parity, await peer.reply_from(device), name=name)).startswith(
                "Done: load shed.")
            assert (await peer.ask(device, "status")).startswith(f"{name} (load) is on")
            send_ox(peer, device, sealed(parity, "shed", signer="bob", name=name))
            refused = await peer.reply_from(device)
            assert refused.xml.find(ox("openpgp")) is None
            assert refused["body"].startswith("Your encrypted message was not accepted: ")
            assert "not alice@localhost's" in refused["body"], refused["body"]
            assert alice.devices[name].state is DeviceState.ON
        finally:
            await peer.close()


async def test_a_hosted_meter_reports_to_billing_its_customer_and_operators(parity: Parity) -> None:
    """As tests/test_billing_report.py: one report, two encrypted parts, each read by its parties only."""
    bots = parity.grid.bots
    assert bots is not None
    billing = bots.billing["billing"]
    assert billing.inbox is not None
    acme_jid = parity.fleet.jid("acme")
    acme = make_client(f"{acme_jid}/t", parity.grid.secrets.password("acme"), parity.grid.endpoint,
                       plugins=("xep_0060",))
    keyring = PepKeyring(acme, PartyKeys.in_data_dir(parity.data, "acme"))
    acme_inbox = ReportInbox(acme, ReportReader(acme_jid, parity.grid.keys.secret("acme"), keyring, PartName.BILLING))
    wire: list[BillingReport] = []
    acme.add_event_handler("message", lambda m: m.xml.find(q("billing-report")) is not None
                           and wire.append(billing_report_from_xml(m["grid_billing_report"].xml)))
    await open_session(acme, parity.grid.endpoint)
    assert await keyring.announced()
    acme.send_presence()
    try:
        async with parity.operator("alice") as alice:
            assert alice.reports is not None
            meter = parity.fleet.jid("hp-meter")
            await alice.wait_for(lambda d: d["hp-meter"].present, timeout=10)
            alice.request_report("hp-meter")
            bill = await billing.inbox.wait(lambda d: d.device == meter, timeout=10)
            quality = await alice.reports.wait(lambda d: d.device == meter, timeout=10)
            mine = await acme_inbox.wait(lambda d: d.device == meter, timeout=10)
            assert isinstance(bill, BillingData) and isinstance(quality, QualityData)
            assert mine == bill and bill.customer == acme_jid and bill.report == quality.report
            assert bill.register_kwh > 0 and 200 < quality.voltage_v < 240
            report = wire[-1]
            assert report.device == meter and {p.name for p in report.parts} == set(PartName)
            with pytest.raises(NotForYou):
                await ReportReader(alice.jid, parity.grid.keys.secret("alice"), keyring, PartName.BILLING).read(report)
            with pytest.raises(NotForYou):
                await ReportReader(acme_jid, parity.grid.keys.secret("acme"), keyring,
                                   PartName.POWER_QUALITY).read(report)
    finally:
        await close_session(acme)


async def test_disco_caps_version_ping_and_alarm_forms_at_a_hosted_jid(parity: Parity) -> None:
    """As tests/test_adhoc.py, the way Gajim drives a device: features, commands, version, ping,
    caps in presence that check out against the features they hash, and an alarm acknowledged
    through its form."""
    dev = parity.agent("hp-owed")
    to = dev.jid  # a hosted identity answers at its bare JID
    gajim = await _gajim(parity, "bob")
    try:
        disco = gajim.client.plugin["xep_0030"]
        info = await disco.get_info(jid=to, timeout=5)
        features = set(info["disco_info"]["features"])
        assert {COMMANDS, "jabber:iq:version", "urn:xmpp:ping", CAPS} <= features
        items = await disco.get_items(jid=to, node=COMMANDS, timeout=5)
        assert {node for _jid, node, _name in items["disco_items"]["items"]} == {"status", "run", "ack-alarm",
                                                                                "judge-alarm"}
        version = await gajim.client.plugin["xep_0092"].get_version(to, timeout=5)
        assert version["software_version"]["name"] == "gridpresence device"
        assert await gajim.client.plugin["xep_0199"].ping(to, timeout=5) >= 0
        await until(lambda: to in gajim.caps, 5, "the hosted identity's caps in its presence")
        assert gajim.caps[to] == "urn:gridpresence:caps"
        # What a client does with caps it has not cached: ask node#ver, check the hash.
        seen: list[ET.Element] = []
        gajim.client.add_event_handler("presence_available", lambda p: p["from"].bare == to and seen.extend(
            p.xml.findall(f"{{{CAPS}}}c")))
        dev.publish(force=True)
        await until(lambda: seen, 5, "a fresh presence with caps")
        caps = seen[-1]
        node, ver = caps.get("node"), caps.get("ver")
        answer = await disco.get_info(jid=to, node=f"{node}#{ver}", timeout=5)
        gajim.client.register_plugin("xep_0115")
        assert gajim.client.plugin["xep_0115"].generate_verstring(answer["disco_info"], caps.get("hash")) == ver

        alarm = dev.alarms.raise_alarm(AlarmKind.BREAKER_TRIPPED, 0.0, 0.0)
        form = await gajim.execute(to, "ack-alarm")
        assert alarm.id in {o["value"] for o in form["command"]["form"].get_fields()["alarm"]["options"]}
        done = await gajim.submit(to, form, {"alarm": alarm.id})
        assert done["command"]["notes"][0][1] == f"Acknowledged: alarm {alarm.id} (breaker tripped)."
        assert alarm.id not in dev.alarms.open
    finally:
        dev.alarms.acknowledge(None, "test-cleanup")
        await close_session(gajim.client)


async def test_firmware_campaign_upgrades_hosted_devices(parity: Parity) -> None:
    """As tests/test_firmware.py: a manufacturer's signed offer, carried by the operator; a
    restricted hosted device refuses and gets it once its presence says it is available."""
    assert parity.grid.bots is not None
    maker = parity.grid.bots.manufacturers["maker"]
    names = ["hp-fw", "hp-fw-crit"]
    async with parity.operator("alice") as alice:
        await alice.wait_for(lambda d: all(d[n].present for n in names), timeout=10)
        refused = await alice.command("hp-fw-crit", "shed")
        assert refused.reason is RejectReason.CRITICAL and alice.devices["hp-fw-crit"].state is DeviceState.RESTRICTED
        image = FirmwareImage.new(os.urandom(20_000), "2.0.0")
        offers = {n: maker.offer(image, alice.devices[n].jid, alice.serial_of(alice.devices[n]) or "") for n in names}
        campaign = FirmwareCampaign(alice, names, image, offers)
        results = await campaign.run(timeout_s=15)
        assert {n: r.status for n, r in results.items()} == dict.fromkeys(names, FirmwareStatus.APPLIED)
        assert results["hp-fw"].detail == "firmware 1.0.0 -> 2.0.0"
        first = [r for r in campaign.history if r.device == parity.fleet.jid("hp-fw-crit")]
        assert first[0].status is FirmwareStatus.REJECTED and first[0].reason is FirmwareReason.RESTRICTED
        asker = await chat_peer(parity, "bob", "fw-version")
        try:
            asker.client.register_plugin("xep_0092")
            version = await asker.client.plugin["xep_0092"].get_version(parity.fleet.jid("hp-fw"), timeout=5)
            assert version["software_version"]["version"] == "2.0.0"  # what any client's "version" shows
        finally:
            await asker.close()
    assert parity.agent("hp-fw-crit").firmware.version == "2.0.0"


# -- a stock client's roster ----------------------------------------------------------------

ROWS = 2 * (len(FLEET["devices"]) + 12) + 10  # type: ignore[arg-type]  # the roster whole: a name and a status line each


def roster_panel(screen: str) -> dict[str, tuple[str, str]]:
    """Profanity's roster panel (right of the console, grouped by presence, with `/roster show
    status`): contact -> (its presence group, its status text); empty while another window shows."""
    lines = screen.splitlines()
    col = next((line.find("Available for chat") for line in lines if "Available for chat" in line), -1)
    if col <= 0:
        return {}
    out: dict[str, tuple[str, str]] = {}
    group, last = "", ""
    for line in lines:
        seg = line[col:].rstrip()
        if not seg.strip():
            continue
        if not seg.startswith(" "):
            group = re.sub(r" \(\d+\)$", "", seg)
        elif seg.strip().startswith('"'):
            out[last] = (group, seg.strip().strip('"'))
        else:
            last = seg.strip()
            out[last] = (group, "")
    return out


async def roster_until(term: Terminal, check: Callable[[dict[str, tuple[str, str]]], bool],
                       timeout: float = 10.0) -> dict[str, tuple[str, str]]:
    """Read the roster panel until `check` holds; fail with the last screen."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        screen = await term.screen()
        panel = roster_panel(screen)
        if check(panel):
            return panel
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the roster never showed it; it shows {panel}\n{screen}")
        await asyncio.sleep(0.3)


LOAD_STATUS = re.compile(r"^on, load \d+%, [\d.]+ kW$")


@pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)
@pytest.mark.flaky(reruns=1)  # Profanity through tmux on a loaded machine (as test_hosting's)
async def test_profanity_roster_shows_hosted_identities_and_their_state_changes(parity: Parity,
                                                                                tmp_path: Path) -> None:
    hosted = [d.name for d in parity.fleet.devices]
    desk = parity.agent("hp-desk")
    # A rerun starts as the first run did: hp-crit's restriction lapsed, hp-desk on.
    await until(lambda: parity.agent("hp-crit").sim.state is DeviceState.ON, 20, "hp-crit no longer restricted")
    if desk.sim.state is not DeviceState.ON:
        desk.sim.state = DeviceState.ON
        desk.publish(force=True)
    async with run_profanity(tmp_path, rows=ROWS) as term:
        await log_in(term, parity, "alice")
        await term.type("/roster show status")
        await term.wait_for("Roster status enabled")
        # Every hosted identity (named as provisioned) is online, its status text the device's state.
        panel = await roster_until(term, lambda p: all(p.get(n, ("", ""))[0] == "Online" for n in hosted))
        assert all(LOAD_STATUS.match(panel[n][1]) for n in BACKGROUND), {n: panel[n] for n in BACKGROUND[:5]}
        assert re.match(r"^on, load \d+%, [\d.]+ kW, breaker closed$", panel["hp-owed"][1]), panel["hp-owed"]
        # A shed load turns away, with its new status; a critical one refuses and turns dnd.
        await term.type("/msg hp-desk@devices.localhost shed")
        await term.wait_for(r"Done: load shed\. Now: hp-desk \(load\) is off")
        await term.type("/msg hp-crit@devices.localhost shed")
        await term.wait_for(r"hp-crit: Refused shed: it is a critical load")
        await term.type("/win 1")
        panel = await roster_until(term, lambda p: p.get("hp-desk", ("",))[0] == "Away"
                                   and p.get("hp-crit", ("",))[0] == "Do not disturb")
        assert panel["hp-desk"][1] == "off, load 0%, 0.0 kW"
        # The panel cuts a status at its width; /status get below shows it whole.
        assert panel["hp-crit"][1].startswith("critical process running, cannot be shed (until ")
        await term.type("/status get hp-desk@devices.localhost")
        await term.wait_for(r'hp-desk is away, "off, load 0%, 0\.0 kW"')
        await term.type("/status get hp-crit@devices.localhost")
        await term.wait_for(r'hp-crit is dnd, "critical process running, cannot be shed \(until \d\d:\d\d:\d\d UTC\)"')
        # Restored: back online in the roster.
        await term.type("/msg hp-desk@devices.localhost restore")
        await term.wait_for(r"Done: load restored\.")
        await term.type("/win 1")
        panel = await roster_until(term, lambda p: p.get("hp-desk", ("",))[0] == "Online")
        assert LOAD_STATUS.match(panel["hp-desk"][1]), panel["hp-desk"]


@pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)
@pytest.mark.skipif(not HAVE_GPG, reason="gpg is not installed (Debian package `gnupg`)")
@pytest.mark.flaky(reruns=1)  # Profanity through tmux on a loaded machine
async def test_profanity_discovers_a_hosted_key_and_sends_it_a_signed_encrypted_shed(
        parity: Parity, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As tests/test_ox_profanity.py: Profanity's /ox (GnuPG) finds the hosted identity's key on
    its own PEP nodes (XEP-0373, served by the component), and the device acts on the signed
    command and answers sealed; the same word in plain chat is refused (production policy)."""
    name = "hp-oxp"
    monkeypatch.setattr(parity.agent(name), "security", SecuritySettings())
    async with parity.operator("bob") as watcher:
        await ox_signed_shed_and_restore(parity, tmp_path, name, watcher)


@pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)
@pytest.mark.flaky(reruns=1)  # Profanity through tmux on a loaded machine
async def test_profanity_lists_and_runs_a_hosted_devices_commands(parity: Parity, tmp_path: Path) -> None:
    """As tests/test_adhoc_profanity.py: /cmd at the hosted identity's bare JID, a two-step form."""
    name = "hp-cmd"
    dev = parity.agent(name)
    async with run_profanity(tmp_path) as term:
        await log_in(term, parity, "bob")
        await cmd_status_and_run(term, parity.fleet.jid(name), name, "shed", "restore", lambda: dev.sim.state)
