"""Threshold adjustment (second document, "fault detection strategy that incorporates a
threshold adjustment"): decide the need from the fault history — verdicts of "not a fault",
how often the alarm fires — and EWMA indices; compute the new value from the sensor's error,
the time to steady state after a start, or the device's own readings; apply it at once
(automatic), or propose it to an operator (confirm / hybrid). Every change is audited and can
be reverted.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Protocol

from gridpresence.rules.engine import FaultEvent, Sample
from gridpresence.rules.model import (SETTLE_PARAM, Adjust, AdjustMethod, AdjustMode, Rule, RuleSet, compare_of,
                                      first_param_compare)

log = logging.getLogger(__name__)

SYSTEM = "system"
DAY_S = 86400.0


@dataclass(frozen=True)
class Change:
    id: int
    device: str
    rule: str
    param: str
    old: float
    new: float
    by: str
    at: datetime
    why: str
    reverts: int | None = None  # the change this one undoes

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True)
class Proposal:
    id: int
    device: str
    rule: str
    param: str
    current: float
    proposed: float
    why: str
    mode: AdjustMode

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "mode": self.mode.value}


class AdjustError(ValueError):
    """A confirmation, value or revert that cannot be applied; the message says why."""


class Journal(Protocol):
    """Where the audit is kept (rules.audit_log.AuditJournal: a file per device)."""

    def load(self) -> list[Change]: ...
    def append(self, change: Change) -> None: ...


class ThresholdBook:
    """Per-device threshold values over the shared rules, and the audit of every change. With a
    journal the audit is written before a change takes effect and read back on start."""

    def __init__(self, rules: RuleSet, journal: Journal | None = None) -> None:
        self.rules = rules
        self.journal = journal
        self._values: dict[tuple[str, str, str], float] = {}
        self.audit: list[Change] = []
        for change in journal.load() if journal is not None else []:
            self.audit.append(change)
            if self._known(change.rule, change.param):
                self._values[(change.device, change.rule, change.param)] = change.new
            else:  # the rule set changed since: the entry stays in the audit, the value no longer applies
                log.warning("threshold change %d: %s.%s is not in the rule set; not applied", change.id,
                            change.rule, change.param)

    def __call__(self, device: str, rule: str, param: str) -> float | None:
        return self._values.get((device, rule, param))

    def _known(self, rule: str, param: str) -> bool:
        # Every rule has a learnable settling time, named in its params or not.
        return any(r.name == rule and (param in r.params or param == SETTLE_PARAM) for r in self.rules.rules)

    def current(self, device: str, rule: str, param: str) -> float:
        v = self(device, rule, param)
        if v is not None:
            return v
        r = self.rules.get(rule)
        return r.params[param] if param in r.params else r.static_settle()

    def set(self, device: str, rule: str, param: str, new: float, by: str, why: str,
            at: datetime | None = None, reverts: int | None = None) -> Change:
        if not self._known(rule, param):
            raise AdjustError(f"the rule set has no {rule}.{param}")
        if not math.isfinite(new):
            raise AdjustError(f"{new} is not a usable threshold")
        old = self.current(device, rule, param)
        if new == old:  # a change that changes nothing would only clutter the audit (and read as one)
            raise AdjustError(f"{rule}.{param} of {device} is already {old:g}; nothing changed")
        change = Change(id=max((c.id for c in self.audit), default=0) + 1, device=device, rule=rule, param=param,
                        old=old, new=new, by=by, at=at or datetime.now(UTC), why=why, reverts=reverts)
        if self.journal is not None:
            try:
                self.journal.append(change)  # on disk first: a change nobody can audit does not happen
            except OSError as exc:
                raise AdjustError(f"the audit could not be written ({exc.strerror or exc}); "
                                  f"{rule}.{param} stays {old:g}") from exc
        self._values[(device, rule, param)] = new
        self.audit.append(change)
        return change

    def revert(self, change_id: int, by: str, at: datetime | None = None) -> Change:
        """Put the value back to what it was before a change; the revert is audited too."""
        c = next((c for c in self.audit if c.id == change_id), None)
        if c is None:
            raise AdjustError(f"no threshold change {change_id}")
        undone = next((u for u in self.audit if u.reverts == c.id), None)
        if undone is not None:
            raise AdjustError(f"change {c.id} was already reverted by change {undone.id}; "
                              f"{c.rule}.{c.param} is {self.current(c.device, c.rule, c.param):g}")
        return self.set(c.device, c.rule, c.param, c.old, by, f"revert of change {c.id}", at, reverts=c.id)


_NUMBER = (float, int)  # a numeric reading: the indices and the peaks take these (isinstance on a tuple is the cheaper test)


@dataclass
class _Ewma:
    """Exponentially weighted mean and variance (the document's performance indices)."""

    lam: float
    mean: float | None = None
    var: float = 0.0

    def add(self, x: float) -> None:
        if self.mean is None:
            self.mean = x
            return
        d = x - self.mean
        self.mean += self.lam * d
        self.var = (1 - self.lam) * (self.var + self.lam * d * d)


@dataclass
class _Alarm:
    event: FaultEvent
    peak: float | None
    verdict: bool | None = None  # True: a fault; False: not a fault
    cleared: FaultEvent | None = None


@dataclass
class _History:
    lam: float
    raised: deque[float] = field(default_factory=lambda: deque(maxlen=1000))
    alarms: deque[_Alarm] = field(default_factory=lambda: deque(maxlen=200))  # a bounded history


class Adjuster:
    """Watches alarms, verdicts and readings; adjusts thresholds or proposes adjustments."""

    def __init__(self, rules: RuleSet, book: ThresholdBook, lam: float = 0.3,
                 mode: AdjustMode | None = None) -> None:
        self.rules, self.book, self.lam = rules, book, lam
        self.mode_override = mode
        self.pending: dict[int, Proposal] = {}
        self._next_proposal = 1
        self._hist: dict[tuple[str, str], _History] = {}
        self._indices: dict[tuple[str, str], _Ewma] = {}
        self._open: dict[tuple[str, str], _Alarm] = {}
        # Alarms operators confirmed as faults, kept across adjustments: no new value may pass them.
        self._confirmed: dict[tuple[str, str], list[_Alarm]] = {}

    def mode(self, rule: Rule) -> AdjustMode:
        if rule.adjust is None:
            return AdjustMode.OFF
        return self.mode_override or rule.adjust.mode

    def settle_mode(self, rule: Rule) -> AdjustMode:
        return self.mode_override or rule.settle.mode

    def _history(self, device: str, rule: str) -> _History:
        return self._hist.setdefault((device, rule), _History(self.lam))

    # -- inputs --------------------------------------------------------------------------

    def observe(self, s: Sample) -> None:
        """EWMA indices of readings taken while no fault is open; peaks of open faults. Call it
        after passing the sample's fault events to `event`."""
        if self._open:  # (a device's every sample: most have no fault open)
            in_fault = False
            for (device, rule), alarm in self._open.items():
                if device == s.device:
                    in_fault = True
                    cmp = first_param_compare(self.rules.get(rule).content)
                    v = s.values.get(cmp.field) if cmp else None
                    if isinstance(v, _NUMBER) and alarm.peak is not None:
                        worse = max if cmp and cmp.op in (">=", ">") else min
                        alarm.peak = worse(alarm.peak, float(v))
            if in_fault:
                return
        indices = self._indices
        for name, v in s.values.items():
            if isinstance(v, _NUMBER):
                index = indices.get((s.device, name))
                if index is None:  # (made only when missing: setdefault would make one every sample)
                    index = indices[(s.device, name)] = _Ewma(self.lam / 10)
                index.add(float(v))

    def event(self, ev: FaultEvent, at: datetime | None = None) -> Change | Proposal | None:
        key = (ev.device, ev.rule)
        if ev.raised:
            self._history(*key).raised.append(ev.ts)
            alarm = _Alarm(ev, ev.value)
            self._open[key] = alarm
            self._history(*key).alarms.append(alarm)
            return self._consider(ev.device, ev.rule, at)
        if key in self._open:
            self._open.pop(key).cleared = ev
        return self._consider(ev.device, ev.rule, at)

    def verdict(self, device: str, rule: str, fault: bool, at: datetime | None = None,
                raised_ts: float | None = None) -> Change | Proposal | None:
        """An operator's judgement of an alarm: the one raised at `raised_ts`, else the latest."""
        hist = self._hist.get((device, rule))
        if hist is None or not hist.alarms:
            raise AdjustError(f"{device} has had no {rule} alarm to judge since its threshold last changed")
        judged = next((a for a in reversed(hist.alarms) if a.event.ts == raised_ts), hist.alarms[-1])
        judged.verdict = fault
        if fault:
            self._confirmed.setdefault((device, rule), []).append(judged)
        return self._consider(device, rule, at)

    # -- the operator's answers ---------------------------------------------------------

    def confirm(self, proposal_id: int, by: str, value: float | None = None, at: datetime | None = None) -> Change:
        p = self.pending.get(proposal_id)
        if p is None:
            raise AdjustError(f"no threshold proposal {proposal_id} is pending")
        if value is not None and p.mode is not AdjustMode.HYBRID:
            raise AdjustError(f"proposal {proposal_id} can only be confirmed as proposed ({p.proposed:g})")
        bounds = self._bounds(self.rules.get(p.rule), p.param)
        new = p.proposed if value is None else value
        if bounds is not None and not _within(bounds, new):
            raise AdjustError(f"{new:g} is outside the bounds of {p.rule}.{p.param} ({_bounds(bounds)})")
        why = p.why + ("" if value is None else f"; operator entered {value:g} instead of {p.proposed:g}")
        change = self.book.set(p.device, p.rule, p.param, new, by, why, at)  # may refuse: the proposal stays
        del self.pending[proposal_id]
        self._reset(p.device, p.rule)
        return change

    def reject(self, proposal_id: int) -> Proposal:
        p = self.pending.pop(proposal_id, None)
        if p is None:
            raise AdjustError(f"no threshold proposal {proposal_id} is pending")
        self._reset(p.device, p.rule)
        return p

    # -- need and new value ------------------------------------------------------------

    def _bounds(self, rule: Rule, param: str) -> Adjust | None:
        if rule.adjust is not None and rule.adjust.param == param:
            return rule.adjust
        if param == SETTLE_PARAM:
            return Adjust(param=param, lo=0.0, hi=rule.settle.hi)
        return None

    def _transient(self, rule: Rule, a: _Alarm) -> bool:
        """A start-up transient: raised soon after a real state change, gone on its own within the window."""
        w = rule.settle.window_s
        return (self.settle_mode(rule) is not AdjustMode.OFF and a.event.changed and a.event.since_change_s <= w
                and a.cleared is not None and a.cleared.since_change_s <= w)

    def _consider(self, device: str, rule_name: str, at: datetime | None) -> Change | Proposal | None:
        rule = self.rules.get(rule_name)
        settled = self._consider_settle(device, rule, at)
        if settled is not None:
            return settled
        mode = self.mode(rule)
        if mode is AdjustMode.OFF or rule.adjust is None:
            return None
        need = self._need(device, rule, rule.adjust)
        if need is None:
            return None
        proposed = self._new_value(device, rule, rule.adjust)
        current = self.book.current(device, rule.name, rule.adjust.param)
        if proposed is None or proposed == current:
            return None
        return self._offer(device, rule, rule.adjust.param, current, proposed,
                           f"{need}; new value from {rule.adjust.method.value}", mode, at)

    def _consider_settle(self, device: str, rule: Rule, at: datetime | None) -> Change | Proposal | None:
        """False alarms that cluster right after state changes: wait longer after each change."""
        mode = self.settle_mode(rule)
        if mode is AdjustMode.OFF:
            return None
        hist = self._history(device, rule.name)
        transients = [a for a in hist.alarms if a.verdict is False and self._transient(rule, a)]
        if len(transients) < rule.settle.min_false:
            return None
        longest = max(a.cleared.since_change_s for a in transients if a.cleared is not None)
        new = min(rule.settle.hi, longest * (1 + rule.settle.margin))
        # Never so long that a fault an operator confirmed right after a change would go unseen.
        confirmed = [a.event.since_change_s for a in self._confirmed.get((device, rule.name), []) if a.event.changed]
        if confirmed:
            new = min(new, min(confirmed))
        new = round(new, 3)
        current = self.book.current(device, rule.name, SETTLE_PARAM)
        if new <= current:
            return None
        why = (f"{len(transients)} alarms within {longest:g} s of a state change judged not a fault; "
               f"new settling time from the time to steady state")
        return self._offer(device, rule, SETTLE_PARAM, current, new, why, mode, at)

    def _offer(self, device: str, rule: Rule, param: str, current: float, proposed: float, why: str,
               mode: AdjustMode, at: datetime | None) -> Change | Proposal | None:
        if mode is AdjustMode.AUTO:
            change = self.book.set(device, rule.name, param, proposed, SYSTEM, why, at)
            self._reset(device, rule.name)
            return change
        for pid, p in list(self.pending.items()):  # one open proposal per threshold: the newest evidence wins
            if (p.device, p.rule, p.param) == (device, rule.name, param):
                if p.proposed == proposed:
                    return None  # already with the operator
                del self.pending[pid]
        p = Proposal(self._next_proposal, device, rule.name, param, current, proposed, why, mode)
        self._next_proposal += 1
        self.pending[p.id] = p
        return p

    def _false(self, device: str, rule: Rule) -> list[_Alarm]:
        """False alarms that speak for moving the threshold: cleared, and not start-up transients."""
        hist = self._history(device, rule.name)
        return [a for a in hist.alarms if a.verdict is False and a.cleared is not None and not self._transient(rule, a)]

    def _need(self, device: str, rule: Rule, adjust: Adjust) -> str | None:
        hist = self._history(device, rule.name)
        false = self._false(device, rule)
        # The EWMA false-alarm share over judged alarms, start-up transients left out (they are
        # the settling time's evidence; known only once an alarm has cleared, so taken here).
        share = _Ewma(self.lam, 0.0)
        for a in hist.alarms:
            if a.verdict is not None and not (a.verdict is False and self._transient(rule, a)):
                share.add(0.0 if a.verdict else 1.0)
        if len(false) >= adjust.min_false and (share.mean or 0.0) >= adjust.false_ratio:
            return f"{len(false)} alarms judged not a fault (EWMA false-alarm share {share.mean:.2f})"
        if adjust.max_per_day and hist.raised:
            last = hist.raised[-1]
            n = sum(1 for t in hist.raised if t > last - DAY_S)
            if n >= adjust.max_per_day and not any(a.verdict for a in hist.alarms):
                return f"{n} alarms in a day, none judged a fault"
        return None

    def _new_value(self, device: str, rule: Rule, adjust: Adjust) -> float | None:
        hist = self._history(device, rule.name)
        false = [a for a in hist.alarms if a.verdict is False and a.cleared is not None]
        current = self.book.current(device, rule.name, adjust.param)
        confirmed = [a.event.value for a in self._confirmed.get((device, rule.name), []) if a.event.value is not None]
        new: float | None = None
        if adjust.method is AdjustMethod.SETTLE:
            # Alarms near a state change that went away on their own: wait until that has passed.
            settle = [a.cleared.since_change_s for a in false
                      if a.cleared is not None and a.event.since_change_s <= (adjust.hi or DAY_S)]
            if settle:
                new = max(current, max(settle) * (1 + adjust.margin))
        else:
            cmp = compare_of(rule.content, adjust.param)
            if cmp is None:
                return None
            upward = cmp.op in (">=", ">")
            if adjust.method is AdjustMethod.ERROR:
                # The sensor's error: how far past the threshold it read when nothing was wrong.
                peaks = [a.peak for a in self._false(device, rule) if a.peak is not None]
                if peaks:
                    error = max(abs(p - current) for p in peaks)
                    new = current + error + adjust.margin if upward else current - error - adjust.margin
            else:
                idx = self._indices.get((device, cmp.field))
                if idx is not None and idx.mean is not None:
                    spread = adjust.margin * math.sqrt(idx.var)
                    new = idx.mean + spread if upward else idx.mean - spread
        if new is None:
            return None
        cmp = compare_of(rule.content, adjust.param)
        if confirmed and cmp is not None and adjust.method is not AdjustMethod.SETTLE:
            # Never past a reading an operator confirmed as a fault: that fault would go unseen.
            new = min(new, min(confirmed)) if cmp.op in (">=", ">") else max(new, max(confirmed))
        return round(_clamp(adjust, new), 3)

    def _reset(self, device: str, rule: str) -> None:
        self._hist[(device, rule)] = _History(self.lam)


def _clamp(adjust: Adjust, v: float) -> float:
    if adjust.lo is not None:
        v = max(adjust.lo, v)
    if adjust.hi is not None:
        v = min(adjust.hi, v)
    return v


def _within(adjust: Adjust, v: float) -> bool:
    return math.isfinite(v) and _clamp(adjust, v) == v


def _bounds(adjust: Adjust) -> str:
    return f"{'-inf' if adjust.lo is None else f'{adjust.lo:g}'} to {'inf' if adjust.hi is None else f'{adjust.hi:g}'}"
