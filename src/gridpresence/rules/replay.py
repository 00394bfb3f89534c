"""Replay a recorded trace through a rule set: the alarms it raises, the thresholds it changes.

Columns: timestamp (ISO 8601, or seconds), device, state, load_pct, output_kw, fuel_pct,
temperature_c, breaker; optional: kind (else inferred: a breaker column means a breaker, fuel or
temperature a generator, otherwise a load), mode, and verdict (fault | not_fault), the
operator's judgement used when an alarm fires on that row.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gridpresence.protocol.models import Breaker, DeviceKind, DeviceState, Tariff
from gridpresence.rules.engine import Engine, FaultEvent, Sample
from gridpresence.rules.model import AdjustMode, RuleSet
from gridpresence.rules.priority import cost_per_day, excess_kw, faulty_ancestor
from gridpresence.rules.thresholds import Adjuster, Change, Proposal, ThresholdBook

REQUIRED = ("timestamp", "device", "state", "load_pct", "output_kw", "fuel_pct", "temperature_c", "breaker")


def _blank_is_none(v: object) -> object:
    return None if isinstance(v, str) and not v.strip() else v


def _timestamp(v: object) -> object:
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            t = datetime.fromisoformat(v.strip())
            return (t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp()
    return v


class TraceRow(BaseModel):
    model_config = ConfigDict(extra="ignore")

    timestamp: Annotated[float, BeforeValidator(_timestamp), Field(allow_inf_nan=False)]
    device: str = Field(min_length=1, max_length=300)
    state: DeviceState
    load_pct: Annotated[float, Field(ge=0, le=150, allow_inf_nan=False)] | None = None
    output_kw: Annotated[float, Field(ge=0, allow_inf_nan=False)] | None = None
    fuel_pct: Annotated[float, Field(ge=0, le=100, allow_inf_nan=False)] | None = None
    temperature_c: Annotated[float, Field(ge=-60, le=400, allow_inf_nan=False)] | None = None
    breaker: Breaker | None = None
    kind: DeviceKind | None = None
    mode: str | None = None
    verdict: Literal["fault", "not_fault"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _blanks(cls, data: object) -> object:
        """An empty cell is no reading."""
        if isinstance(data, dict):
            return {k: _blank_is_none(v) for k, v in data.items() if k is not None}
        return data

    def sample(self) -> Sample:
        kind = self.kind or (DeviceKind.BREAKER if self.breaker is not None else
                             DeviceKind.GENERATOR if self.fuel_pct is not None or self.temperature_c is not None
                             else DeviceKind.LOAD)
        values = {"load_pct": self.load_pct, "output_kw": self.output_kw, "fuel_pct": self.fuel_pct,
                  "temperature_c": self.temperature_c, "breaker": self.breaker.value if self.breaker else None}
        return Sample(self.device, self.timestamp, self.state, values, kind, self.mode)


class TraceError(ValueError):
    """A trace that cannot be replayed; the message names the line and the column."""


def read_trace(path: Path) -> Iterator[TraceRow]:
    try:
        f = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from exc
    with f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            raise TraceError(f"{path}: missing columns: {', '.join(missing)}")
        try:
            for row in reader:
                try:
                    yield TraceRow.model_validate(row)
                except (ValidationError, ValueError) as exc:
                    col, msg = _first_error(exc)
                    raise TraceError(f"{path}:{reader.line_num}: {col}: {msg}") from exc
        except UnicodeDecodeError as exc:
            raise TraceError(f"{path}: not UTF-8 text") from exc


def _first_error(exc: Exception) -> tuple[str, str]:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return ".".join(str(p) for p in e["loc"]) or "row", e["msg"]
    return "timestamp", str(exc)


@dataclass
class ReplayResult:
    alarms: list[dict[str, object]] = field(default_factory=list)
    cleared: int = 0
    changes: list[Change] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    samples: int = 0

    def as_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "alarms": self.alarms, "cleared": self.cleared,
                "threshold_changes": [c.as_dict() for c in self.changes],
                "proposals": [p.as_dict() for p in self.proposals]}


@dataclass(frozen=True)
class PriorityOptions:
    """Central ranking: the billing party's tariff, a cost that counts as high, the branch tree."""

    tariff: Tariff
    high_cost_per_day: float
    parents: Mapping[str, str | None] = field(default_factory=dict)
    rated_kw: Mapping[str, float] = field(default_factory=dict)


def replay(rows: Iterable[TraceRow], rules: RuleSet, mode: AdjustMode | None = None,
           priority: PriorityOptions | None = None) -> ReplayResult:
    """Run the rules over the rows in order; verdicts feed the threshold adjustment. With
    `priority`, each alarm gets its cost per day at the tariff's price of its time, is marked
    sent at once or batched, and is folded into a branch above it that is itself in fault."""
    book = ThresholdBook(rules)
    engine = Engine(rules, book)
    adjuster = Adjuster(rules, book, mode=mode)
    out = ReplayResult()
    in_fault: dict[str, set[str]] = {}
    for row in rows:
        s = row.sample()
        out.samples += 1
        at = datetime.fromtimestamp(s.ts, UTC)
        for ev in engine.feed(s):
            _record(out, adjuster.event(ev, at))
            faults = in_fault.setdefault(ev.device, set())
            if not ev.raised:
                faults.discard(ev.rule)
                out.cleared += 1
                continue
            faults.add(ev.rule)
            alarm = _alarm(ev, at, row.verdict)
            if priority is not None:
                alarm.update(_rank(ev, at, row, priority, {d for d, f in in_fault.items() if f}))
            out.alarms.append(alarm)
            if row.verdict is not None:
                _record(out, adjuster.verdict(ev.device, ev.rule, row.verdict == "fault", at))
        adjuster.observe(s)  # after the events: readings of an open fault stay out of the indices
    out.proposals = list(adjuster.pending.values())
    return out


def _rank(ev: FaultEvent, at: datetime, row: TraceRow, opts: PriorityOptions,
          in_fault: set[str]) -> dict[str, object]:
    capacity = opts.rated_kw.get(ev.device)
    if capacity is None and row.output_kw is not None and row.load_pct:
        capacity = row.output_kw / (row.load_pct / 100)  # the device's own power tells its rating
    cost = round(cost_per_day(excess_kw(ev, capacity), opts.tariff.price_at(at)), 2)
    return {"cost_per_day": cost, "sent": "at once" if ev.urgent or cost >= opts.high_cost_per_day else "batched",
            "folded_into": faulty_ancestor(ev.device, opts.parents.get, in_fault)}


def _record(out: ReplayResult, outcome: Change | Proposal | None) -> None:
    if isinstance(outcome, Change):
        out.changes.append(outcome)


def _alarm(ev: FaultEvent, at: datetime, verdict: str | None) -> dict[str, object]:
    return {"at": at.isoformat(), "device": ev.device, "rule": ev.rule, "alarm": ev.alarm,
            "level": "urgent" if ev.urgent else "warning", "value": ev.value, "op": ev.op,
            "threshold": ev.threshold, "verdict": verdict}
