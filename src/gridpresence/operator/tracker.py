"""What a party knows about the devices it watches: their last rich presence and their health.

The same tracker serves the operator library and the watchdog service. It is the presence
watchdog of [00135]/[00136]: a device whose presence is not refreshed within its interval
plus a grace is pinged, and flagged "presence error" if the ping fails; a device that
disappears without a goodbye is flagged, not dropped.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp import JID, ClientXMPP, Presence
from slixmpp.exceptions import IqError, IqTimeout

from gridpresence.protocol import roster as roles
from gridpresence.protocol.codec import PayloadError, q, report_from_xml
from gridpresence.protocol.models import DeviceKind, DeviceState, Health, HealthStatus, PresenceReport, utcnow
from gridpresence.xmpp.reconnect import SessionChange, SessionEvent, reconnector_of

log = logging.getLogger(__name__)

_DEVICE, _OUTCOME = q("device"), q("outcome")
OWN_OUTAGE = "our own connection to the server was lost"  # why every view is unknown after a loss


@dataclass(frozen=True)
class DeviceView:
    """One device as an operator sees it. Immutable: each change makes a new view."""

    name: str
    jid: str
    kind: DeviceKind | None
    report: PresenceReport | None = None
    health: HealthStatus = HealthStatus.UNKNOWN
    health_reason: str = ""
    since: dt.datetime = field(default_factory=utcnow)
    full_jid: str | None = None  # where commands go while the device is present

    @property
    def state(self) -> DeviceState | None:
        return self.report.state if self.report else None

    @property
    def transport(self) -> str | None:
        """"tcp", "bosh" or "component" (hosted): how the device reaches the server, as it last reported."""
        return self.report.transport if self.report and self.present else None

    @property
    def present(self) -> bool:
        return self.full_jid is not None

    @property
    def label(self) -> str:
        """State as a person should read it: a presence error overrides the last state."""
        if self.health is HealthStatus.PRESENCE_ERROR:
            return "presence-error"
        if self.health is HealthStatus.UNKNOWN:
            return "unknown"
        if self.state is None:  # no report of its own: gone by the watchdog's word, or unknown
            return "gone" if self.health is HealthStatus.GONE else "unknown"
        return self.state.value

    def as_dict(self) -> dict[str, Any]:
        """Everything an operator is shown about the device (`gridpresence status` renders its
        table from this alone, so its JSON carries all the table shows)."""
        t = self.report.telemetry if self.report else None
        r = self.report.restriction if self.report else None
        return {
            "name": self.name,
            "jid": self.jid,
            "kind": self.kind.value if self.kind else None,
            "state": self.label,
            "health": self.health.value,
            "health_reason": self.health_reason,
            "restriction": {**r.model_dump(mode="json"), "text": self.report.status_text()} if r and self.report else None,
            "critical": self.report.critical if self.report else None,
            "telemetry": t.model_dump(mode="json", exclude_none=True) if t else {},
            "since": self.since.isoformat(),
            "transport": self.transport,
        }


@dataclass(frozen=True)
class DeviceChange:
    previous: DeviceView
    current: DeviceView
    cause: str  # "presence", "goodbye", "offline", "watchdog", "recovered", "own-connection"


class PresenceTracker:
    """Keeps a :class:`DeviceView` per device in the client's roster and runs the watchdog."""

    def __init__(self, client: ClientXMPP, grace_s: float = 15.0, ping_timeout_s: float = 5.0) -> None:
        self.client = client
        self.grace_s = grace_s
        self.ping_timeout_s = ping_timeout_s
        self.views: dict[str, DeviceView] = {}  # by bare JID
        self.jid_by_name: dict[str, str] = {}
        # Kept with every change, so "are all present?" costs nothing per presence (a login's
        # burst of N presences would otherwise make N checks over N views).
        self.present_count = 0
        # Devices any presence of came from (a probe's "offline" answer too) since our session
        # began: how a login's burst is seen to be still coming in (GridOperator.connect).
        self._heard: set[str] = set()
        self._last_refresh: dict[str, float] = {}  # loop time of the last valid presence
        # The watchdog's work list, so a pass costs what is due, not a walk over every device
        # (45 ms a second at 10,000, blocking the loop that takes presence): refresh deadlines
        # as (loop time, JID), one pushed per refresh, stale ones skipped when popped; and the
        # devices still unknown.
        self._due: list[tuple[float, str]] = []
        self._unknown: set[str] = set()
        self._pinging: set[str] = set()
        self._listeners: list[Callable[[DeviceChange], None]] = []
        self._watch_task: asyncio.Task[None] | None = None
        self._started_at = 0.0
        self._own_down = False  # our session is lost: silence says nothing of the devices then
        self._outcome_taker: Callable[[str, ET.Element], None] | None = None  # take_outcomes
        client.add_event_handler("presence", self._on_presence)
        dispatch = getattr(client, "shape_dispatch", None)  # xmpp/dispatch.py (make_client installs it)
        if dispatch is not None:
            dispatch.take_presence(self._take, self._on_presence)
        reconnector_of(client).listen(self._on_session)

    # -- set-up -----------------------------------------------------------------------

    def load_roster(self) -> None:
        """Learn the devices from the roster groups (call after get_roster); devices no longer in
        it are forgotten."""
        roster = self.client.client_roster
        listed = set(roster)  # (a roster node has no __contains__: `in` would walk it per view)
        for jid in [j for j in self.views if j not in listed]:  # left the roster (while we were away)
            view = self.views.pop(jid)
            self.present_count -= view.present
            self.jid_by_name.pop(view.name, None)
            self._last_refresh.pop(jid, None)
            self._unknown.discard(jid)
        for jid in roster:
            kind = roles.device_kind(roster[jid]["groups"])
            if kind is not None and jid not in self.views:
                name = jid.split("@", 1)[0]
                self.views[jid] = DeviceView(name=name, jid=jid, kind=kind)
                self.jid_by_name[name] = jid
                self._unknown.add(jid)

    def start_watchdog(self) -> None:
        self._started_at = asyncio.get_running_loop().time()
        if self._watch_task is None or self._watch_task.done():
            self._watch_task = asyncio.ensure_future(self._watch())

    def stop_watchdog(self) -> None:
        if self._watch_task:
            self._watch_task.cancel()

    def listen(self, callback: Callable[[DeviceChange], None]) -> Callable[[], None]:
        """Call `callback` on every change; returns a function that stops it."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def take_outcomes(self, taker: Callable[[str, ET.Element], None]) -> None:
        """``taker(device, element)`` gets each ``<outcome/>`` in an available presence of a
        tracked device (bare JID), before the presence's own change is told (an issuer's answer
        in presence, PROTOCOL.md "Answered in presence": no resend on the change for a command it
        answers); what it is worth is the taker's to judge."""
        self._outcome_taker = taker

    def adopt(self, health: Health) -> None:
        """Take another watcher's verdict (the watchdog service's) for a device we have not seen."""
        view = self.views.get(health.device)
        if view is None or view.health is not HealthStatus.UNKNOWN or health.status is HealthStatus.UNKNOWN:
            return
        self._set(view, replace(view, health=health.status, health_reason=health.reason, since=health.since), "watchdog")

    def _on_session(self, change: SessionChange) -> None:
        """Our own session was lost: what we saw is stale (no one will tell us who left meanwhile).
        Every device is unknown until its presence reaches the new session."""
        if change.event is SessionEvent.BACK:
            self._own_down = False
            self._started_at = asyncio.get_running_loop().time()  # the start-up grace again
            return
        self._own_down = True
        self._heard.clear()
        now = utcnow()
        for view in list(self.views.values()):
            self._last_refresh.pop(view.jid, None)
            if view.present or view.health is not HealthStatus.UNKNOWN:
                self._set(view, replace(view, full_jid=None, health=HealthStatus.UNKNOWN, since=now,
                                        health_reason=OWN_OUTAGE), "own-connection")

    # -- presence ---------------------------------------------------------------------

    def _set(self, old: DeviceView, new: DeviceView, cause: str) -> None:
        self.views[new.jid] = new
        self.present_count += new.present - old.present
        if new.health is HealthStatus.UNKNOWN:
            self._unknown.add(new.jid)
        else:
            self._unknown.discard(new.jid)
        change = DeviceChange(old, new, cause)
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a faulty listener must not stop presence handling
                log.exception("presence listener failed")

    def _on_presence(self, pres: Presence) -> None:
        """slixmpp's way (a presence the fast way did not take: see :meth:`_take`)."""
        # The raw attribute, not pres["type"]: slixmpp's computed type costs more than the rest.
        self._intake(pres.xml, pres["from"].full, pres["from"].bare, pres["from"].resource)

    def _take(self, xml: ET.Element) -> bool:
        """A device's presence straight from the XML (xmpp/dispatch.py's presence takers): at a
        login's burst of thousands, slixmpp's stanza object, roster bookkeeping and events cost
        most of each. Only JIDs tracked here, available or unavailable; the rest goes on."""
        sender = xml.get("from") or ""
        bare, _, resource = sender.partition("/")
        if bare not in self.views or xml.get("type") not in (None, "unavailable"):
            return False
        self._intake(xml, sender, bare, resource)
        return True

    def _intake(self, xml: ET.Element, full: str, bare: str, resource: str) -> None:
        view = self.views.get(bare)
        ptype = xml.get("type")
        if view is None or ptype not in (None, "unavailable"):
            return
        self._heard.add(bare)
        element = xml.find(_DEVICE)
        report: PresenceReport | None = None
        if ptype is None and self._outcome_taker is not None and (answer := xml.find(_OUTCOME)) is not None:
            self._outcome_taker(bare, answer)  # (an outcome is worth its own checks, whatever the report)
        if element is not None:
            try:
                report = report_from_xml(element)
            except PayloadError as exc:
                log.warning("dropped invalid presence from %s: %s", full, exc)
                return
        now = utcnow()
        if ptype == "unavailable":
            if view.full_jid is not None and full != view.full_jid and resource:
                return  # another resource of the device left; the one we command is still here
            self._last_refresh.pop(view.jid, None)
            if view.full_jid is None and view.health is HealthStatus.UNKNOWN and report is None:
                # The server's answer to our probe: offline, but we cannot tell how it left.
                # The watchdog service (see adopt) or the start-up grace decides.
                self._set(view, replace(view, health_reason="offline when the watch began", since=now), "offline")
                return
            if report is not None and report.state is DeviceState.GONE:
                new = replace(view, report=report, health=HealthStatus.GONE, health_reason="said goodbye",
                              since=now, full_jid=None)
                self._set(view, new, "goodbye")
            else:
                ns = xml.tag[1:].partition("}")[0]  # the stream's: jabber:client
                why = xml.findtext(f"{{{ns}}}status") or "connection lost"
                new = replace(view, health=HealthStatus.PRESENCE_ERROR, full_jid=None, since=now,
                              health_reason=f"offline without a goodbye ({why})")
                self._set(view, new, "offline")
            return
        if report is None:
            return  # a device's presence without the extension tells us nothing typed
        healthy = view.health is HealthStatus.OK
        new = replace(view, report=report, health=HealthStatus.OK, health_reason="", full_jid=full,
                      since=view.since if healthy and view.state is report.state else now)
        self._set(view, new, "presence" if healthy else "recovered")
        self._refreshed(new)

    @property
    def heard_count(self) -> int:
        """How many devices have sent any presence (or had it answered for them) this session."""
        return len(self._heard)

    def note_mailed(self, jid: str, report: PresenceReport) -> None:
        """Data a device pushed by mail (through the relay): it has no presence, but it is alive."""
        view = self.views.get(jid)
        if view is None:
            return
        self._set(view, replace(view, report=report, health=HealthStatus.OK, since=utcnow(),
                                health_reason="reported by mail through the relay"), "mail")
        if view.jid in self._last_refresh:  # its refresh period may have changed with the report
            self._refreshed(self.views[view.jid], self._last_refresh[view.jid])

    # -- watchdog ---------------------------------------------------------------------

    def _refreshed(self, view: DeviceView, at: float | None = None) -> None:
        """The device proved alive (at loop time ``at``, now if None): its next deadline."""
        at = asyncio.get_running_loop().time() if at is None else at
        self._last_refresh[view.jid] = at
        deadline = self._deadline(view)
        if deadline is not None:
            heapq.heappush(self._due, (deadline, view.jid))

    def _deadline(self, view: DeviceView) -> float | None:
        last = self._last_refresh.get(view.jid)
        if last is None or view.report is None:
            return None
        return last + view.report.refresh_s + self.grace_s

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(min(1.0, self.grace_s / 4))
            self._watch_pass(loop.time())

    def _watch_pass(self, now: float) -> None:
        """Ping each device whose refresh is overdue; flag those still unknown after the grace.
        Nothing while our own session is down: every device is unknown for that reason alone."""
        if self._own_down:
            return
        due = self._due
        while due and due[0][0] < now:
            _, jid = heapq.heappop(due)
            view = self.views.get(jid)
            deadline = self._deadline(view) if view is not None else None
            # Stale entries: the device refreshed since (a later entry is queued), left, or is pinged.
            if view is None or deadline is None or deadline >= now or jid in self._pinging:
                continue
            self._pinging.add(jid)
            asyncio.ensure_future(self._probe(view))
        if self._unknown and now - self._started_at > 2 * self.grace_s:
            for jid in list(self._unknown):
                view = self.views.get(jid)
                if view is None:
                    self._unknown.discard(jid)
                elif view.health is HealthStatus.UNKNOWN:
                    self._set(view, replace(view, health=HealthStatus.PRESENCE_ERROR, since=utcnow(),
                                            health_reason="no presence since the watch began"), "watchdog")

    async def _probe(self, view: DeviceView) -> None:
        """Refresh overdue: ping the device before flagging it ([00136])."""
        try:
            target = view.full_jid or view.jid
            try:
                await self.client.plugin["xep_0199"].send_ping(JID(target), timeout=self.ping_timeout_s)
                log.info("%s missed its presence refresh but answered a ping", view.name)
                self._refreshed(self.views.get(view.jid, view))
                return
            except (IqError, IqTimeout) as exc:
                why = "ping timed out" if isinstance(exc, IqTimeout) else f"ping failed: {exc.condition}"
            current = self.views[view.jid]
            if self._deadline(current) is None or asyncio.get_running_loop().time() <= (self._deadline(current) or 0):
                return  # presence came back while we were pinging
            refresh = current.report.refresh_s if current.report else 0
            self._set(current, replace(current, health=HealthStatus.PRESENCE_ERROR, since=utcnow(),
                                       health_reason=f"no presence refresh within {refresh:g}+{self.grace_s:g} s; {why}"),
                      "watchdog")
            self._last_refresh.pop(view.jid, None)
        finally:
            self._pinging.discard(view.jid)
            current = self.views.get(view.jid)
            deadline = self._deadline(current) if current is not None else None
            if deadline is not None:  # still watched (the ping failed to go out, say): due again
                heapq.heappush(self._due, (deadline, view.jid))

    def health(self, jids: Iterable[str] | None = None) -> list[Health]:
        """Every device's health, or those of ``jids`` (bare JIDs of devices watched)."""
        views = self.views.values() if jids is None else (self.views[j] for j in jids)
        return [Health(device=v.jid, status=v.health, reason=v.health_reason, since=v.since) for v in views]

    def by_name(self) -> Mapping[str, DeviceView]:
        """A live, read-only view of the devices by name (no copy: `wait_for` predicates and
        scripts read it after every presence change, and a fleet may hold thousands)."""
        return _ViewsByName(self)

    def find(self, name_or_jid: str) -> DeviceView | None:
        jid = self.jid_by_name.get(name_or_jid, name_or_jid)
        return self.views.get(jid)


class _ViewsByName(Mapping[str, DeviceView]):
    def __init__(self, tracker: PresenceTracker) -> None:
        self._tracker = tracker

    def __getitem__(self, name: str) -> DeviceView:
        return self._tracker.views[self._tracker.jid_by_name[name]]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tracker.jid_by_name)

    def __len__(self) -> int:
        return len(self._tracker.jid_by_name)
