"""The rule engine, sans I/O: feed samples, get faults raised and cleared.

It runs wherever the samples are: on the device (only faults leave it, which saves traffic) or
centrally over many devices' samples (replay, evaluation). Thresholds come from the rule's
params unless a per-device value overrides them (threshold adjustment).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from gridpresence.protocol.models import DeviceKind, DeviceState
from gridpresence.rules.model import SETTLE_PARAM, All, AnyOf, Compare, Condition, Rule, RuleSet, first_param_compare

Value = float | str | None
# (device, rule, param) -> an adjusted value, or None for the rule's own.
Overrides = Callable[[str, str, str], float | None]


@dataclass(frozen=True)
class Sample:
    device: str
    ts: float  # seconds
    state: DeviceState
    values: Mapping[str, Value]
    kind: DeviceKind | None = None
    mode: str | None = None


@dataclass(frozen=True)
class FaultEvent:
    device: str
    rule: str
    alarm: str
    urgent: bool
    raised: bool  # False: cleared
    ts: float
    value: float | None
    threshold: float | None
    since_change_s: float
    op: str | None = None  # how value is compared with threshold (the rule's first comparison with a param)
    changed: bool = False  # the device has been seen changing state (since_change_s counts from a real change)


@dataclass
class _DeviceTrack:
    state: DeviceState | None = None
    changed_ts: float = 0.0
    changed: bool = False  # a state change was seen (the first sample is not one)
    last_ts: float | None = None
    run_s: float = 0.0
    active: dict[str, bool] = field(default_factory=dict)  # rule -> silent


class Engine:
    def __init__(self, rules: RuleSet, overrides: Overrides | None = None) -> None:
        self.rules = rules
        self.overrides = overrides
        self._devices: dict[str, _DeviceTrack] = {}

    def param(self, device: str, rule: Rule, name: str) -> float:
        if self.overrides is not None:
            v = self.overrides(device, rule.name, name)
            if v is not None:
                return v
        return rule.params[name]

    def active(self, device: str) -> dict[str, bool]:
        """Rules that hold for a device now: rule name -> held silently (a rule it defers to was told)."""
        track = self._devices.get(device)
        return dict(track.active) if track else {}

    def feed(self, s: Sample) -> list[FaultEvent]:
        track = self._devices.setdefault(s.device, _DeviceTrack(state=s.state, changed_ts=s.ts))
        if track.last_ts is not None and track.state is DeviceState.ON and s.kind is DeviceKind.GENERATOR:
            track.run_s += max(0.0, s.ts - track.last_ts)
        if s.state is not track.state:
            track.state, track.changed_ts, track.changed = s.state, s.ts, True
        track.last_ts = s.ts
        since = s.ts - track.changed_ts
        values = {**s.values, "run_h": track.run_s / 3600}

        holding = self.holding(s, values, since, set(track.active))
        events: list[FaultEvent] = []
        for name in list(track.active):
            if name not in holding and not track.active.pop(name):  # a silent one was never told
                events.append(self._event(s, self.rules.get(name), values, since, raised=False))
        for name, rule in holding.items():
            silent = any(o in holding for o in rule.suppressed_by)
            if name not in track.active:
                track.active[name] = silent
                if not silent:
                    events.append(self._event(s, rule, values, since, raised=True))
        return events

    def holding(self, s: Sample, values: Mapping[str, Value], since: float, active: set[str]) -> dict[str, Rule]:
        """The rules whose trigger and content hold for one sample (pure: no state changes).
        `active` rules hold until their reading is `hysteresis` back on the safe side."""
        out: dict[str, Rule] = {}
        for rule in self.rules.rules:
            if not rule.active or not rule.applies_to.matches(s.device, s.kind):
                continue
            if self._triggered(s, rule, since) and self._holds(s.device, rule, rule.content, values,
                                                                rule.name in active):
                out[rule.name] = rule
        return out

    def reading(self, device: str, rule: Rule, values: Mapping[str, Value]) -> tuple[float | None, float | None]:
        """The reading and threshold that describe a rule's fault (its first comparison with a param)."""
        first = first_param_compare(rule.content)
        if first is None:
            return None, None
        v = values.get(first.field)
        return (float(v) if isinstance(v, float | int) else None), self.param(device, rule, first.param or "")

    def _triggered(self, s: Sample, rule: Rule, since: float) -> bool:
        t = rule.trigger
        delay = self.param(s.device, rule, t.since_change_s) if isinstance(t.since_change_s, str) else t.since_change_s
        if self.overrides is not None:
            # The settling time learned for this device and rule (thresholds.Adjuster), or for a rule
            # it defers to: a transient judged under the urgent alarm was the same reading (the
            # deferring rule's alarm was held silently, so nobody could judge it).
            for name in (rule.name, *rule.suppressed_by):
                learned = self.overrides(s.device, name, SETTLE_PARAM)
                if learned is not None:
                    delay = max(delay, learned)
        return s.state in t.states and since >= delay and (t.mode is None or s.mode == t.mode)

    def _holds(self, device: str, rule: Rule, cond: Condition, values: Mapping[str, Value], active: bool) -> bool:
        if isinstance(cond, All):
            return all(self._holds(device, rule, c, values, active) for c in cond.all)
        if isinstance(cond, AnyOf):
            return any(self._holds(device, rule, c, values, active) for c in cond.any)
        if not isinstance(cond, Compare):
            return sum(self._holds(device, rule, c, values, active) for c in cond.xor) == 1
        v = values.get(cond.field)
        if v is None:
            return False
        target = self.param(device, rule, cond.param) if cond.param else cond.value
        if target is None or isinstance(target, str) or isinstance(v, str):
            return (str(v) == str(target)) == (cond.op == "==")
        # An active fault holds until the reading is `hysteresis` back on the safe side.
        slack = rule.hysteresis if active else 0.0
        match cond.op:
            case ">=":
                return v >= target - slack
            case ">":
                return v > target - slack
            case "<=":
                return v <= target + slack
            case "<":
                return v < target + slack
            case "==":
                return v == target
            case _:
                return v != target

    def _event(self, s: Sample, rule: Rule, values: Mapping[str, Value], since: float, raised: bool) -> FaultEvent:
        value, threshold = self.reading(s.device, rule, values)
        first = first_param_compare(rule.content)
        return FaultEvent(device=s.device, rule=rule.name, alarm=rule.alarm, urgent=rule.urgent, raised=raised,
                          ts=s.ts, value=value, threshold=threshold, since_change_s=since,
                          op=first.op if first is not None else None,
                          changed=self._devices[s.device].changed)
