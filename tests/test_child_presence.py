"""A hosted parent (branch meter, master IED) takes its children's presence straight from the XML
(HostedClient.take_contacts, xmpp/dispatch.py's presence takers): the same seeded sequence of
child presences (available, unavailable, errors, malformed payloads, strangers) gives the same
branch sums, totals, alarms, folding, roster resources, offline contacts and presence sent as
slixmpp's way; and the fast way steps aside the moment another handler listens. No server: the
identities are built on a link that never connects, their output captured."""

from __future__ import annotations

import copy
import random
import re
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from gridpresence.config import parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.device.alarms import AlarmDesk
from gridpresence.device.branch import BranchAdvisor
from gridpresence.host.fleet import FleetBots
from gridpresence.protocol.codec import report_to_xml
from gridpresence.protocol.models import NS as GRID, DeviceKind, DeviceState, FaultRef, PresenceReport, Telemetry
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.component import NS, HostedClient
from gridpresence.xmpp.session import Endpoint

DOMAIN = "devices.localhost"
LOADS = [f"l-{i}" for i in range(6)]
TREE = ["meter", "gen", *LOADS]  # everything below the master
PARENTS = ("master", "meter")


def fleet_data() -> dict[str, Any]:
    devices: list[dict[str, Any]] = [
        {"name": "master", "kind": "master", "rated_kw": 600},
        {"name": "meter", "kind": "meter", "rated_kw": 300, "parent": "master"},
        {"name": "gen", "kind": "generator", "rated_kw": 250, "parent": "master"},
    ]
    devices += [{"name": n, "kind": "load", "rated_kw": 60, "parent": "meter", "critical": n == "l-5"} for n in LOADS]
    return {"domain": "localhost", "hosting": "component", "operators": [{"name": "op"}], "devices": devices}


class World:
    """One fleet's hosted parents, connected to nothing, every byte they write kept."""

    def __init__(self, tmp: Path, fast: bool) -> None:
        self.bots = FleetBots(parse_fleet(fleet_data()), Endpoint(component_port=1), Secrets(tmp / "secrets.json"),
                              with_services=False)
        self.sent: list[str] = []
        self.parents: dict[str, DeviceAgent] = {n: self.bots.devices[n] for n in PARENTS}  # type: ignore[misc]
        for agent in self.parents.values():
            client = agent.client
            assert isinstance(client, HostedClient)
            client.init_plugins()
            client.send_raw = lambda data, sent=self.sent: sent.append(  # type: ignore[method-assign]
                data if isinstance(data, str) else data.decode())
            client.transport = object()  # type: ignore[assignment]
            client._session_started = True
            client.link.deliver_local = lambda _xml: True  # type: ignore[method-assign]  # (children are not up)
            for other in ("master", *TREE):  # subscribed both ways, as provisioning makes parent and child
                if f"{other}@{DOMAIN}" != client.boundjid.bare:
                    item = client.client_roster[f"{other}@{DOMAIN}"]
                    item["from"] = item["to"] = True
            if not fast:
                client.shape_dispatch._takers.clear()  # slixmpp's way, always

    def deliver(self, parent: str, xml: ET.Element) -> None:
        piece = copy.deepcopy(xml)
        piece.set("to", f"{parent}@{DOMAIN}")
        self.parents[parent].client.deliver(piece)  # type: ignore[attr-defined]

    def taken(self) -> int:
        return sum(a.client.shape_dispatch.taken for a in self.parents.values())  # type: ignore[attr-defined]

    def state(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, agent in self.parents.items():
            client = agent.client
            assert isinstance(client, HostedClient)
            alarms = agent.desk(AlarmDesk)
            out[name] = {
                "branch_kw": dict(agent.sim.branch_kw),
                "telemetry": agent.sim.telemetry(),
                "below": agent.fold.below(),
                "offline": set(client._offline),
                "resources": {j: copy.deepcopy(dict(client.client_roster[j].resources))
                              for j in client.client_roster if j.startswith(tuple(TREE))},
                "alarms": {aid: (e.alarm.kind, e.alarm.text) for aid, e in alarms.open.items()},
                "owed": {who: {a: (al.kind, al.text) for a, al in owed.items()} for who, owed in alarms._owed.items()},
            }
            if agent.has_desk(BranchAdvisor):
                advisor = agent.desk(BranchAdvisor)
                out[name]["reports"] = {j: r.model_dump(exclude={"at"}) for j, r in advisor.reports.items()}
                out[name]["totals"] = advisor.totals()
                out[name]["near"] = set(advisor.near)
        return out

    def output(self) -> list[str]:
        """What went out, with what differs from run to run by the clock left out."""
        return [re.sub(r' (at|since|id|raised|changed|until)="[^"]*"', "", s) for s in self.sent]


def child_presence(rng: random.Random) -> ET.Element:
    """A presence from one of the tree (now and then an operator or a stranger): available or
    not, with or without a valid <device/>, now and then an error or something malformed."""
    who = rng.choice([*TREE, *TREE, "op@localhost", f"stranger@{DOMAIN}"])
    jid = who if "@" in who else f"{who}@{DOMAIN}"
    sender = jid + rng.choice(["", "", "", "/field", "/r2"])
    kind = {"meter": DeviceKind.METER, "gen": DeviceKind.GENERATOR}.get(who, DeviceKind.LOAD)
    ptype = rng.choice([None, None, None, None, "unavailable", "error"])
    pres = ET.Element(f"{{{NS}}}presence", {"from": sender})
    if ptype:
        pres.set("type", ptype)
    if rng.random() < 0.3:
        ET.SubElement(pres, f"{{{NS}}}show").text = rng.choice(["away", "dnd", "xa", "bogus"])
    if rng.random() < 0.7:
        ET.SubElement(pres, f"{{{NS}}}status").text = rng.choice(["on", "shed", "gone: cut", ""])
    if rng.random() < 0.2:
        ET.SubElement(pres, f"{{{NS}}}priority").text = rng.choice(["5", "-1", "x"])
    what = rng.random()
    if what < 0.65:
        rated = 300.0 if kind is DeviceKind.METER else 60.0
        load = rng.uniform(0, 120)
        report = PresenceReport(
            kind=kind, state=rng.choice([DeviceState.ON, DeviceState.ON, DeviceState.OFF, DeviceState.GONE]),
            critical=who == "l-5", seq=rng.randrange(1000),
            telemetry=Telemetry(load_pct=round(load, 1), kw=round(rated * load / 100, 1), capacity_kw=rated),
            faults=tuple(FaultRef(kind=k) for k in rng.sample(["overload", "low-voltage"], rng.randint(0, 2))))
        pres.append(report_to_xml(report))
    elif what < 0.85:  # malformed: a value out of range, a kind that does not exist
        bad = rng.choice(["<telemetry load_pct='999'/>", "<telemetry kw='lots'/>", ""])
        state = rng.choice(["on", "exploded"])
        pres.append(ET.fromstring(f"<device xmlns='{GRID}' kind='load' state='{state}'>{bad}</device>"))
    # (else: no <device/> at all)
    return pres


def run(worlds: list[World], rng: random.Random, n: int) -> list[dict[str, Any]]:
    """``n`` presences to every world's parents; each world's state the same after each (returned)."""
    seen = []
    for _ in range(n):
        xml = child_presence(rng)
        sender = xml.get("from") or ""
        for parent in PARENTS:
            if sender.startswith(parent + "@"):
                continue
            for world in worlds:
                world.deliver(parent, xml)
        states = [w.state() for w in worlds]
        assert all(s == states[0] for s in states[1:]), ET.tostring(xml)
        seen.append(states[0])
    outputs = [w.output() for w in worlds]
    assert all(o == outputs[0] for o in outputs[1:])
    return seen


async def test_children_taken_from_the_xml_give_what_slixmpps_way_gives(tmp_path: Path) -> None:
    fast, slow = World(tmp_path / "fast", fast=True), World(tmp_path / "slow", fast=False)
    states = run([fast, slow], random.Random(1616), 600)
    assert slow.taken() == 0
    assert fast.taken() > 400, "most of the children's presence taken from the XML"
    state = fast.state()
    # The sequence did what it is there for: sums, folded faults, an advice, contacts offline.
    assert state["meter"]["branch_kw"] and state["master"]["near"] | set(state["master"]["alarms"])
    assert any(kind.value == "branch-near-limit" for kind, _ in state["master"]["alarms"].values())
    assert any(st[p]["offline"] for st in states for p in PARENTS), "children known offline, then back"
    assert any(not st["meter"]["offline"] for st in states[300:])
    assert any(s.startswith("<presence") for s in fast.sent) and any(s.startswith("<message") for s in fast.sent)


async def test_the_fast_way_steps_aside_while_another_handler_listens(tmp_path: Path) -> None:
    fast, slow = World(tmp_path / "fast", fast=True), World(tmp_path / "slow", fast=False)
    rng = random.Random(1617)
    run([fast, slow], rng, 100)
    before = fast.taken()
    assert before > 50
    meter = fast.parents["meter"].client
    meter_taken = meter.shape_dispatch.taken  # type: ignore[attr-defined]
    seen: list[str] = []
    listener = lambda pres: seen.append(pres["from"].bare)  # noqa: E731
    meter.add_event_handler("presence", listener)
    run([fast, slow], rng, 200)  # (the same results still: run compares them)
    assert meter.shape_dispatch.taken == meter_taken, "none taken while another handler listens"  # type: ignore[attr-defined]
    assert len([j for j in seen if j.startswith("l-")]) >= 40, "the listener saw the children's presence"
    meter.del_event_handler("presence", listener)
    run([fast, slow], rng, 100)
    assert meter.shape_dispatch.taken > meter_taken, "taken from the XML again once no one else listens"
    assert fast.taken() > before
