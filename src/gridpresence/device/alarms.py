"""Alarms as instant messages ([00145]), escalated by the operators' presence.

A device watches its own readings against the fleet's thresholds. A warning goes to every
available operator; an urgent alarm goes to the first *available* operator in duty order
(the fleet's operator order): one who is offline, away or dnd is skipped. An alarm stays
open until an operator acknowledges it (chat ``ack ID`` or the ad-hoc command); if nobody
does within ``ack_timeout_s`` it is sent again, to the next available operator on duty.
An operator who is logged out gets, at login, one message per alarm owed, in its newest state.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from slixmpp import JID, Presence

from gridpresence.rules.settings import AlarmSettings
from gridpresence.protocol.alarm import URGENT_KINDS, Alarm, AlarmKind, AlarmLevel, AlarmStatus, alarm_to_xml
from gridpresence.protocol.models import DeviceKind, DeviceState, PresenceReport, Telemetry
from gridpresence.rules.audit_log import AuditJournal
from gridpresence.rules.engine import Engine, FaultEvent
from gridpresence.rules.priority import Prioritiser
from gridpresence.rules.live import reading_sample, report_sample
from gridpresence.rules.model import default_rules
from gridpresence.rules.thresholds import Adjuster, Change, Proposal, ThresholdBook
from gridpresence.device.folding import BranchFold
from gridpresence.xmpp.dispatch import declare_presence
from gridpresence.device.host import DeviceHost
from gridpresence.device.price_feed import PriceFeed
from gridpresence.words import TITLES, describe

log = logging.getLogger(__name__)

# Presence <show> values that mean "can respond now"; away, xa and dnd do not.
AVAILABLE_SHOWS = frozenset({"", "chat"})



KINDS = frozenset(k.value for k in AlarmKind)

# Alarms an operator can still judge ("not a fault") are the device's latest this many.
MAX_JUDGEABLE = 200

# Kinds raised from the device's own readings (a master's branch advice is raised elsewhere).
CHECKED_KINDS = frozenset(AlarmKind) - {AlarmKind.BRANCH_NEAR_LIMIT}


@dataclass
class _Open:
    alarm: Alarm
    base_text: str = ""  # the text before the faults folded into it are named
    duty_pos: int = -1  # index in the duty order of the operator told last (urgent alarms)
    notified: set[str] = field(default_factory=set)
    timer: asyncio.TimerHandle | None = None


def conditions(report: PresenceReport, settings: AlarmSettings, run_h: float,
               active: frozenset[AlarmKind] = frozenset(),
               commanded: str | None = None) -> dict[AlarmKind, tuple[float, float]]:
    """Alarm conditions that hold for a report: kind -> (value, threshold), by the default rule
    set. A condition that is already active holds until the reading is `hysteresis_pct` back on
    the safe side. `commanded`: the contacts position the last command asked for."""
    engine = Engine(default_rules(settings))
    sample = report_sample("", report, 0.0, commanded)
    values = {**sample.values, "run_h": run_h}
    active_rules = {r.name for r in engine.rules.rules if AlarmKind(r.alarm) in active}
    out: dict[AlarmKind, tuple[float, float]] = {}
    for rule in engine.holding(sample, values, math.inf, active_rules).values():
        value, threshold = engine.reading("", rule, values)
        out[AlarmKind(rule.alarm)] = (value or 0.0, threshold or 0.0)
    return out


def _cut(text: str) -> str:
    """An alarm's text fits the payload's 300 characters."""
    return text if len(text) <= 300 else text[:299] + "…"


def _title(kind: str) -> str:
    return TITLES[AlarmKind(kind)] if kind in KINDS else kind





class AlarmDesk:
    """One device's alarms: raising, routing by presence, escalation, acknowledgement."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.duty = agent.setup.duty
        self.settings = agent.setup.alarms
        rules, audit = agent.setup.rules, agent.setup.audit
        self.open: dict[str, _Open] = {}
        self._active: frozenset[AlarmKind] = frozenset()
        self._next_id = 1
        # The rules run here, on the device: only faults leave it. Thresholds adapt per device.
        # The fleet's own rule set (shared by its devices) replaces the built-in alarms.
        rules = rules or default_rules(self.settings)
        # The audit of threshold changes, on disk when the device has a data directory (survives restarts).
        self.thresholds = ThresholdBook(rules, AuditJournal(audit) if audit is not None else None)
        self.engine = Engine(rules, self.thresholds)
        self.adjuster = Adjuster(rules, self.thresholds)
        self.rule_alarms: dict[str, tuple[str, float]] = {}  # alarm id -> (rule, when raised), for verdicts
        self.on_adjustment: Callable[[Change | Proposal], None] | None = None
        # The billing party's price now (the device's PriceFeed); with [alarms] batch_low_priority_s it ranks faults.
        # No billing party: no price, nothing is ranked.
        feed = agent.desk(PriceFeed)
        self.price: Callable[[], float] | None = feed.price if feed.billing else None
        self._prioritiser: Prioritiser | None = None
        self._flush_timer: asyncio.TimerHandle | None = None
        self._capacity_kw: float | None = None
        # Branch folding (device/folding.py): own faults held back while the parent is in fault,
        # and the own alarm that names the faults folded into this device from below.
        self.fold: BranchFold | None = agent.desk(BranchFold)
        self.fold.on_release.append(self.release_folded)
        self.held: dict[str, FaultEvent] = {}  # rule -> its raise, told on its own if the parent's fault clears first
        self.own_faults: list[str] = []  # alarm kinds of the rules holding now (not silently)
        self._branch_alarm: str | None = None
        # What an operator who is offline has not been told: alarm id -> its newest state, sent once
        # when the operator logs in (the server's offline storage would replay every copy).
        self._owed: dict[str, dict[str, Alarm]] = {}
        agent.client.add_event_handler("presence_available", self._on_operator_presence)
        declare_presence(agent.client, self._on_operator_presence)  # operators' only: never taken

    # -- presence of the operators ------------------------------------------------------

    def available(self, operator: str) -> bool:
        """Online and not away, xa or dnd, on at least one resource."""
        resources = self.agent.client.client_roster[operator].resources
        return any((r.get("show") or "") in AVAILABLE_SHOWS for r in resources.values())

    def online(self, operator: str) -> bool:
        """Logged in on at least one resource, whatever its show."""
        return bool(self.agent.client.client_roster[operator].resources)

    def _on_operator_presence(self, pres: Presence) -> None:
        """An operator logged in: one message per alarm owed to them, with its newest state."""
        who = pres["from"].bare
        owed = self._owed.pop(who, None)  # taken at once: a second presence finds nothing to send
        if not owed or self.agent.stopping:
            return
        for aid, alarm in owed.items():
            entry = self.open.get(aid)
            if entry is not None:
                alarm = entry.alarm
                self._restart_timer(entry)  # just heard: the acknowledgement time starts now
            self._transmit(who, alarm)

    def _next_on_duty(self, after: int) -> int | None:
        n = len(self.duty)
        for step in range(1, n + 1):
            pos = (after + step) % n
            if self.available(self.duty[pos]):
                return pos
        return None

    # -- raising ------------------------------------------------------------------------

    def check(self, report: PresenceReport | None) -> None:
        """Run the rules over the latest readings; raise what newly holds."""
        if report is not None:
            self.check_reading(report.state, report.kind, report.telemetry)

    def check_reading(self, state: DeviceState, kind: DeviceKind, telemetry: Telemetry) -> None:
        """The same, from a report's parts: a tick that tells nothing builds no report."""
        sample = reading_sample(self.agent.spec.name, state, kind, telemetry, asyncio.get_running_loop().time(),
                                self.agent.sim.commanded)
        self._capacity_kw = telemetry.capacity_kw
        ranker = self._ranker()
        for ev in self.engine.feed(sample):
            if ev.raised and self.fold is not None and self.fold.parent_in_fault:
                self.held[ev.rule] = ev  # folded: the parent's alarm names it
            elif ev.raised:
                self._offer(ev, ranker)
            elif self.held.pop(ev.rule, None) is None and ranker is not None:
                ranker.withdraw(ev.device, ev.rule)  # passed before the batch went out: nobody is bothered
            outcome = self.adjuster.event(ev)
            if outcome is not None and self.on_adjustment is not None:
                self.on_adjustment(outcome)
        self.adjuster.observe(sample)  # after the events: readings of an open fault stay out of the indices
        # A rule held silently (high loading while the trip point is imminent) counts as told.
        held = self.engine.active(self.agent.spec.name)
        if not held and not self._active and not self.open:  # healthy, as at the last tick: nothing to clear
            self.own_faults = []
            return
        self._active = frozenset(AlarmKind(self.engine.rules.get(name).alarm) for name in held)
        self.own_faults = sorted({self.engine.rules.get(name).alarm.value for name, silent in held.items() if not silent})
        self._clear_warnings(self._active)

    def _offer(self, ev: FaultEvent, ranker: Prioritiser | None) -> None:
        if ranker is None or ranker.submit(ev):
            self._raise_fault(ev)
        else:  # low priority: waits for the batch
            self._schedule_flush()

    # -- branch folding -------------------------------------------------------------------

    def release_folded(self) -> None:
        """The parent's fault has cleared: own faults that still hold are told on their own."""
        held, self.held = self.held, {}
        if self.agent.stopping:
            return
        active = self.engine.active(self.agent.spec.name)
        ranker = self._ranker()
        for rule, ev in held.items():
            if active.get(rule) is False:  # still holding, and not silently
                self._offer(ev, ranker)

    def below_changed(self) -> None:
        """The faults below this device changed: the open branch alarm names them anew."""
        entry = self.open.get(self._branch_alarm or "")
        if entry is None:
            return
        text = self._with_folded(entry.base_text)
        if text == entry.alarm.text:
            return
        entry.alarm = entry.alarm.model_copy(update={"text": text})
        log.info("%s: alarm %s now: %s", self.agent.spec.name, entry.alarm.id, text)
        for op in entry.notified:  # the same alarm (same id), told again with what it folds
            self._send(op, entry.alarm)
        self._record(entry.alarm)

    def _with_folded(self, text: str) -> str:
        below = self.fold.below() if self.fold is not None else ()
        if below:
            text += "; folded: " + ", ".join(f"{JID(f.device or '').user} {_title(f.kind)}" for f in below)
        return _cut(text)

    def _raise_fault(self, ev: FaultEvent, detail: str = "") -> None:
        folds = self._branch_alarm not in self.open  # the first own fault's alarm names what is folded into it
        alarm = self.raise_alarm(AlarmKind(ev.alarm), ev.value, ev.threshold, detail, urgent=ev.urgent, folds=folds)
        if folds:
            self._branch_alarm = alarm.id
        self.rule_alarms[alarm.id] = (ev.rule, ev.ts)
        if len(self.rule_alarms) > MAX_JUDGEABLE:
            del self.rule_alarms[min(self.rule_alarms, key=int)]

    # -- priority: costly faults at once, the rest batched (second document, "cost per day") --

    def _ranker(self) -> Prioritiser | None:
        if self.settings.batch_low_priority_s <= 0 or self.price is None:
            return None
        if self._prioritiser is None:
            self._prioritiser = Prioritiser(self.settings.high_cost_per_day, self.price,
                                            lambda _device: self._capacity_kw)
        self._prioritiser.high_cost_per_day = self.settings.high_cost_per_day
        return self._prioritiser

    def _schedule_flush(self) -> None:
        if self._flush_timer is None:
            loop = asyncio.get_running_loop()
            self._flush_timer = loop.call_later(self.settings.batch_low_priority_s, self._flush)

    def _flush(self) -> None:
        self._flush_timer = None
        if self._prioritiser is None or self.agent.stopping:
            return
        for ranked in self._prioritiser.flush():  # costliest first
            if self.fold is not None and self.fold.parent_in_fault:
                self.held[ranked.event.rule] = ranked.event  # the branch went into fault meanwhile: folded
                continue
            try:
                self._raise_fault(ranked.event, f"low priority, {ranked.cost_per_day:.2f} a day, batched")
            except Exception:  # one failed send must not lose the rest of the batch
                log.exception("%s: sending a batched alarm failed", self.agent.spec.name)

    def _clear_warnings(self, holding: frozenset[AlarmKind]) -> None:
        """A warning whose condition has passed stops being sent again; those told hear it cleared.
        Urgent alarms stay open until acknowledged: someone must know the trip point was near."""
        for aid, entry in list(self.open.items()):
            alarm = entry.alarm
            if alarm.level is AlarmLevel.WARNING and alarm.kind in CHECKED_KINDS and alarm.kind not in holding:
                del self.open[aid]
                if entry.timer is not None:
                    entry.timer.cancel()
                cleared = alarm.model_copy(update={"status": AlarmStatus.CLEARED})
                for op in entry.notified:
                    self._send(op, cleared)
                self._record(cleared)

    def raise_alarm(self, kind: AlarmKind, value: float | None = None, threshold: float | None = None,
                    detail: str = "", urgent: bool | None = None, folds: bool = False) -> Alarm:
        """Raise and deliver an alarm; `detail` (e.g. a master IED's advice) follows the reading.
        A rule says whether it is urgent; otherwise the kind does. A branch alarm (`folds`) also
        names the faults below it that are folded into it."""
        if urgent is None:
            urgent = kind in URGENT_KINDS
        level = AlarmLevel.URGENT if urgent else AlarmLevel.WARNING
        alarm = Alarm(id=str(self._next_id), device=self.agent.jid, kind=kind, level=level,
                      value=None if value is None else round(value, 2), threshold=threshold)
        text = describe(alarm) + (f": {detail}" if detail else "")
        alarm = alarm.model_copy(update={"text": self._with_folded(text) if folds else _cut(text)})
        self._next_id += 1
        entry = _Open(alarm, base_text=text)
        self.open[alarm.id] = entry
        log.info("%s: alarm %s raised: %s", self.agent.spec.name, alarm.id, alarm.text)
        self._deliver(entry)
        return alarm

    def _deliver(self, entry: _Open) -> None:
        alarm = entry.alarm
        if alarm.level is AlarmLevel.URGENT:
            pos = self._next_on_duty(entry.duty_pos)
            if pos is None:  # nobody can respond now: leave it with everyone on duty, offline
                targets = list(self.duty)
            else:
                entry.duty_pos, targets = pos, [self.duty[pos]]
        else:
            targets = [op for op in self.duty if self.available(op)] or list(self.duty)
        for op in targets:
            self._send(op, alarm)
        self._record(alarm)
        entry.notified.update(targets)
        self._restart_timer(entry)

    def _restart_timer(self, entry: _Open) -> None:
        """One escalation timer per alarm: a second one would send the same state twice."""
        if entry.timer is not None:
            entry.timer.cancel()
        loop = asyncio.get_running_loop()
        entry.timer = loop.call_later(self.settings.ack_timeout_s, self._escalate, entry.alarm.id)

    def _escalate(self, alarm_id: str) -> None:
        entry = self.open.get(alarm_id)
        if entry is None or self.agent.stopping:
            return
        entry.alarm = entry.alarm.model_copy(update={"escalation": entry.alarm.escalation + 1})
        log.info("%s: alarm %s not acknowledged; escalating (%d)", self.agent.spec.name, alarm_id,
                 entry.alarm.escalation)
        try:
            self._deliver(entry)
        except Exception:  # a failed send must not end the escalation chain
            log.exception("%s: escalating alarm %s failed", self.agent.spec.name, alarm_id)

    def _send(self, to: str, alarm: Alarm) -> None:
        """Tell an operator now, or, while they are offline, keep only the newest state for
        their login. A closing state of an alarm they were never told is not worth telling."""
        if not self.agent.client.is_connected():
            return
        if self.online(to):
            self._transmit(to, alarm)
            return
        owed = self._owed.setdefault(to, {})
        never_told = alarm.id in owed and owed[alarm.id].status is AlarmStatus.RAISED
        if alarm.status is not AlarmStatus.RAISED and never_told:
            del owed[alarm.id]
        else:
            owed[alarm.id] = alarm

    def _record(self, alarm: Alarm) -> None:
        """Every state of every alarm, as data only (no body: nobody's chat), to the recorders
        (the historian). Not delivery: a recorder is never on duty and never escalated to."""
        if not self.agent.client.is_connected():
            return
        for to in self.agent.setup.recorders:
            msg = self.agent.client.make_message(mto=to, mtype="normal")
            msg.append(alarm_to_xml(alarm))
            msg.send()

    def _transmit(self, to: str, alarm: Alarm) -> None:
        name = self.agent.spec.label
        if alarm.status is AlarmStatus.ACKNOWLEDGED:
            body = f"{name}: alarm {alarm.id} ({TITLES[alarm.kind]}) acknowledged by {alarm.acked_by}"
        elif alarm.status is AlarmStatus.CLEARED:
            body = f"{name}: alarm {alarm.id} ({TITLES[alarm.kind]}) cleared, the reading is back to normal"
        else:
            again = f" — not acknowledged, sent again ({alarm.escalation})" if alarm.escalation else ""
            body = (f"{alarm.level.value.upper()} {name}: {alarm.text}{again}. "
                    f"Reply 'ack {alarm.id}' to acknowledge.")
        msg = self.agent.client.make_message(mto=to, mbody=body, mtype="chat")
        msg.append(alarm_to_xml(alarm))
        msg.send()

    # -- acknowledgement ----------------------------------------------------------------

    def acknowledge(self, alarm_id: str | None, by: str) -> list[Alarm]:
        """Acknowledge one open alarm (or all, if `alarm_id` is None); returns those acknowledged.
        The other operators who were told hear who took it."""
        ids = [alarm_id] if alarm_id is not None else list(self.open)
        done: list[Alarm] = []
        for aid in ids:
            entry = self.open.pop(aid, None)
            if entry is None:
                continue
            if entry.timer is not None:
                entry.timer.cancel()
            alarm = entry.alarm.model_copy(update={"status": AlarmStatus.ACKNOWLEDGED, "acked_by": by})
            for op in entry.notified - {by}:
                self._send(op, alarm)
            self._record(alarm)
            log.info("%s: alarm %s acknowledged by %s", self.agent.spec.name, aid, by)
            done.append(alarm)
        return done

    def close(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
        for entry in self.open.values():
            if entry.timer is not None:
                entry.timer.cancel()
