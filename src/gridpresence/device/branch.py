"""A master IED over its branches ([00146]): it follows the presence of every device in its tree,
publishes the branch totals in its own presence, and when a branch nears its limit tells the
operators which loads can be shed and which generator can be started."""

from __future__ import annotations

import logging
from xml.etree import ElementTree as ET

from slixmpp import Presence
from slixmpp.xmlstream import StanzaBase, tostring

from gridpresence.physics.base import branch_contribution
from gridpresence.config import DeviceSpec, Fleet
from gridpresence.protocol.alarm import AlarmKind
from gridpresence.protocol.branch import BranchTotal, branches_to_xml
from gridpresence.xmpp.outgoing import presence_stamp
from gridpresence.protocol.codec import PayloadError, q, report_from_xml
from gridpresence.protocol.models import DeviceKind, DeviceState, PresenceReport, Telemetry
from gridpresence.device.host import DeviceHost
from gridpresence.device.alarms import AlarmDesk


log = logging.getLogger(__name__)
_DEVICE = q("device")


def tree_members(fleet: Fleet, master: str) -> tuple[DeviceSpec, ...]:
    """Everything below a master IED, at any depth."""
    return fleet.descendants(master)


class BranchAdvisor:
    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.master = agent.spec
        self.specs: dict[str, DeviceSpec] = {}
        self.children: list[str] = []
        self._children: frozenset[str] = frozenset()  # the same, to look up
        self.branches: dict[str, list[str]] = {}  # each branch head -> the devices under it
        fleet = agent.setup.fleet
        if fleet is not None:  # without one (a device run on its own) there is no tree to watch
            self.specs = {fleet.jid(d.name): d for d in tree_members(fleet, self.master.name)}
            self.children = [fleet.jid(d.name) for d in fleet.children(self.master.name)]
            self._children = frozenset(self.children)
            # Each branch (the master and every device with devices below it) and the loads under it.
            heads = [self.master, *(d for d in self.specs.values() if fleet.children(d.name))]
            self.branches = {fleet.jid(h.name): [fleet.jid(d.name) for d in fleet.descendants(h.name)] for h in heads}
        self.generators = [j for j, d in self.specs.items() if d.kind is DeviceKind.GENERATOR]
        self.reports: dict[str, PresenceReport] = {}
        # <branches/> as last made: every presence out carries it (a re-sum's go to several
        # recipients), and it changes only when a child's report does. Replaced, never changed.
        self._totals_xml: ET.Element | None = None
        self._totals_text_of: tuple[ET.Element, str] | None = None  # self._totals_xml, and its text
        self.near: set[str] = set()  # branches already advised about, until they fall back
        agent.client.add_event_handler("presence", self._on_presence)
        agent.take_presence_of(self.specs, self._intake, self._on_presence)
        agent.client.add_filter("out", self._add_totals)

    def close(self) -> None:
        pass

    # -- presence in and out --------------------------------------------------------------

    def _on_presence(self, pres: Presence) -> None:
        self._intake(pres["from"].bare, pres.xml)

    def _intake(self, sender: str, xml: ET.Element) -> None:
        """A presence from the tree (either way: DeviceHost.take_presence_of)."""
        if sender not in self.specs:
            return
        device = xml.find(q("device"))
        if xml.get("type") == "unavailable" or device is None:
            self.reports.pop(sender, None)
        else:
            try:
                self.reports[sender] = report_from_xml(device)
            except PayloadError as exc:
                log.warning("%s: ignored invalid presence from %s: %s", self.master.name, sender, exc)
                return
        if sender in self._children:
            self._totals_xml = None
        try:
            self.evaluate()
        except Exception:  # advice is a help; a failure must not end the master
            log.exception("%s: branch evaluation failed", self.master.name)

    def totals(self) -> list[BranchTotal]:
        out = []
        for jid in self.children:
            report = self.reports.get(jid)
            if report is not None:
                t = report.telemetry
                out.append(BranchTotal(device=jid, kind=report.kind, kw=round(branch_contribution(report), 3),
                                       load_pct=t.load_pct, capacity_kw=t.capacity_kw))
        return out

    def _totals(self) -> ET.Element:
        if self._totals_xml is None:
            self._totals_xml = branches_to_xml(self.totals())
        return self._totals_xml

    @presence_stamp("_totals_text")
    def _add_totals(self, stanza: StanzaBase) -> StanzaBase:
        if (isinstance(stanza, Presence) and stanza.xml.get("type") != "unavailable"
                and stanza.xml.find(q("device")) is not None):
            stanza.xml.append(self._totals())  # shared: only ever serialised (a local recipient gets a copy)
        return stanza

    def _totals_text(self, ptype: str | None, payload: str | None) -> str:
        """_add_totals's element as text, for a presence written without a stanza object."""
        if ptype == "unavailable" or payload != _DEVICE:
            return ""
        totals = self._totals()
        if self._totals_text_of is None or self._totals_text_of[0] is not totals:
            self._totals_text_of = (totals, tostring(totals))
        return self._totals_text_of[1]

    # -- advice ---------------------------------------------------------------------------

    def _branch_telemetry(self, jid: str) -> Telemetry | None:
        if jid == self.agent.jid:
            return self.agent.sim.telemetry()  # the master's own sum, without spending a presence seq
        report = self.reports.get(jid)
        return report.telemetry if report else None

    def evaluate(self) -> None:
        settings = self.agent.desk(AlarmDesk).settings
        for head in self.branches:
            t = self._branch_telemetry(head)
            if t is None or t.load_pct is None:
                continue
            if t.load_pct < settings.high_loading_pct - settings.hysteresis_pct:
                self.near.discard(head)
            elif t.load_pct >= settings.high_loading_pct and head not in self.near:
                self.near.add(head)
                self.agent.desk(AlarmDesk).raise_alarm(AlarmKind.BRANCH_NEAR_LIMIT, t.load_pct, settings.high_loading_pct,
                                              self.advice(head, t, settings.high_loading_pct))

    def advice(self, head: str, t: Telemetry, limit_pct: float) -> str:
        """What would bring a branch back under its limit: loads to shed (largest first, never
        critical or restricted ones) and a generator that is off."""
        capacity = t.capacity_kw or 0.0
        excess = (t.kw or 0.0) - capacity * limit_pct / 100
        loads = sorted(((j, r) for j in self.branches[head] if (r := self.reports.get(j)) is not None
                        and r.kind is DeviceKind.LOAD and r.state is DeviceState.ON and not r.critical),
                       key=lambda jr: jr[1].telemetry.kw or 0.0, reverse=True)
        chosen, freed = [], 0.0
        for jid, r in loads:
            if freed > excess:
                break
            chosen.append(f"{self.specs[jid].name} ({r.telemetry.kw or 0:.0f} kW)")
            freed += r.telemetry.kw or 0.0
        gens = sorted(((j, r) for j in self.generators if (r := self.reports.get(j)) is not None
                       and r.state is DeviceState.OFF),
                      key=lambda jr: jr[1].telemetry.capacity_kw or 0.0, reverse=True)
        name = self.specs[head].name if head in self.specs else self.master.name
        where = f"{name} carries {t.kw or 0:.0f} of {capacity:.0f} kW"
        options = []
        if chosen:
            options.append("shed " + ", ".join(chosen))
        if gens:
            options.append("start " + " or ".join(f"{self.specs[j].name} ({r.telemetry.capacity_kw or 0:.0f} kW)"
                                                  for j, r in gens[:2]))
        return f"{where}; " + (" or ".join(options) if options else "nothing can be shed and no generator is off")
