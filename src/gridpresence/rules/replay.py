"""Replay a recorded trace through a rule set: the alarms it raises, the thresholds it changes.

Columns: timestamp (ISO 8601, or seconds), device, state, load_pct, output_kw, fuel_pct,
temperature_c, breaker (open | closed | tripped); optional: kind, mode, command (open | close:
a command given to the device on that row; an open breaker no command opened has tripped), and
verdict (fault | not_fault), the operator's judgement used when an alarm fires on that row.

A device's kind comes from the fleet file if one is given, else from its ``kind`` column, else
from its own rows: fuel or temperature readings make a generator; reporting ``tripped`` makes a
breaker, and so do breaker values when they set it apart (not every device in the trace reports
them) or its name says so (breaker, relay, cb); otherwise a load. The replay says which kind it took each device for.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from gridpresence.protocol.models import Breaker, DeviceKind, DeviceState, Tariff
from gridpresence.rules.engine import Engine, FaultEvent, Sample
from gridpresence.rules.model import NO_COMMAND, AdjustMode, RuleSet
from gridpresence.rules.priority import cost_per_day, excess_kw, faulty_ancestor
from gridpresence.rules.thresholds import Adjuster, Change, Proposal, ThresholdBook
from gridpresence.words import replay_unanswered

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


def _command(v: object) -> object:
    """A command as logs spell it: open/opened, close/closed, any case."""
    if isinstance(v, str):
        w = v.strip().lower()
        return {"opened": "open", "closed": "close"}.get(w, w)
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
    command: Annotated[Literal["open", "close"], BeforeValidator(_command)] | None = Field(default=None, validation_alias=AliasChoices("command", "commanded"))
    verdict: Literal["fault", "not_fault"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _blanks(cls, data: object) -> object:
        """An empty cell is no reading."""
        if isinstance(data, dict):
            return {k: _blank_is_none(v) for k, v in data.items() if k is not None}
        return data

    def sample(self, kind: DeviceKind, commanded: str = NO_COMMAND) -> Sample:
        values = {"load_pct": self.load_pct, "output_kw": self.output_kw, "fuel_pct": self.fuel_pct,
                  "temperature_c": self.temperature_c, "breaker": self.breaker.value if self.breaker else None,
                  "commanded": commanded}
        return Sample(self.device, self.timestamp, self.state, values, kind, self.mode)


_BREAKER_NAME = re.compile(r"breaker|relay|(^|[-_.])cb([-_.\d]|$)", re.IGNORECASE)


def device_kinds(rows: list[TraceRow], fleet: Mapping[str, DeviceKind] | None = None) -> dict[str, tuple[DeviceKind, str]]:
    """Each device's kind and where it came from: the fleet, the kind column, or its own rows."""
    seen: dict[str, list[TraceRow]] = {}
    for r in rows:
        seen.setdefault(r.device, []).append(r)
    # A breaker column every device fills (loads reporting their own contactor) tells no breaker apart.
    everyone_breaker = all(any(r.breaker is not None for r in rs) for rs in seen.values())
    out: dict[str, tuple[DeviceKind, str]] = {}
    for device, rs in seen.items():
        column = next((r.kind for r in rs if r.kind is not None), None)
        if fleet is not None and device in fleet:
            out[device] = (fleet[device], "fleet file")
        elif column is not None:
            out[device] = (column, "kind column")
        elif any(r.fuel_pct is not None or r.temperature_c is not None for r in rs):
            out[device] = (DeviceKind.GENERATOR, "inferred: fuel or temperature readings")
        elif any(r.breaker is Breaker.TRIPPED for r in rs):
            out[device] = (DeviceKind.BREAKER, "inferred: it reported tripped")
        elif any(r.breaker is not None for r in rs) and (not everyone_breaker or _BREAKER_NAME.search(device)):
            out[device] = (DeviceKind.BREAKER, "inferred: breaker values" +
                           ("" if not everyone_breaker else " and its name"))
        else:
            out[device] = (DeviceKind.LOAD, "inferred: no generator or breaker readings")
    return out


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
    alarms: list[dict[str, Any]] = field(default_factory=list)
    cleared: int = 0
    changes: list[Change] = field(default_factory=list)
    proposals: list[Proposal] = field(default_factory=list)
    samples: int = 0
    kinds: dict[str, tuple[DeviceKind, str]] = field(default_factory=dict)
    note: str | None = None  # what a person must know to read the result (proposals nobody answered)

    def as_dict(self) -> dict[str, object]:
        return {"samples": self.samples, "alarms": self.alarms, "cleared": self.cleared,
                "kinds": {d: {"kind": k.value, "from": how} for d, (k, how) in self.kinds.items()},
                "threshold_changes": [c.as_dict() for c in self.changes],
                "proposals": [p.as_dict() for p in self.proposals], "note": self.note}


# A simulated operator: answers a proposal with True (accept) or False (reject); None leaves it.
Operator = Callable[[Proposal], bool | None]


def unanswered_note(pending: int, mode: AdjustMode | None) -> str | None:
    if not pending:
        return None
    how = f"--adjust {mode.value}" if mode is not None else "the rule set's own modes: hybrid by default"
    return replay_unanswered(pending, how)


@dataclass(frozen=True)
class PriorityOptions:
    """Central ranking: the billing party's tariff, a cost that counts as high, the branch tree."""

    tariff: Tariff
    high_cost_per_day: float
    parents: Mapping[str, str | None] = field(default_factory=dict)
    rated_kw: Mapping[str, float] = field(default_factory=dict)


def replay(rows: Iterable[TraceRow], rules: RuleSet, mode: AdjustMode | None = None,
           priority: PriorityOptions | None = None, kinds: Mapping[str, DeviceKind] | None = None,
           operator: Operator | None = None) -> ReplayResult:
    """Run the rules over the rows in order; verdicts feed the threshold adjustment. Kinds come
    from `kinds` (the fleet), else the rows (device_kinds). `operator` answers proposals as they
    are made (a simulated operator; without one they stay pending). With `priority`, each alarm
    gets its cost per day at the tariff's price of its time, is marked sent at once or batched,
    and is folded into a branch above it that is itself in fault."""
    rows = list(rows)
    book = ThresholdBook(rules)
    engine = Engine(rules, book)
    adjuster = Adjuster(rules, book, mode=mode)
    out = ReplayResult(kinds=device_kinds(rows, kinds))
    in_fault: dict[str, set[str]] = {}
    commanded: dict[str, str] = {}  # device -> the contacts position its last command asked for

    def outcome(o: Change | Proposal | None, at: datetime) -> None:
        if isinstance(o, Proposal) and operator is not None:
            answer = operator(o)
            if answer is True:
                o = adjuster.confirm(o.id, "operator", at=at)
            elif answer is False:
                adjuster.reject(o.id)
        _record(out, o)

    for row in rows:
        if row.command is not None:
            commanded[row.device] = "open" if row.command == "open" else "closed"
        s = row.sample(out.kinds[row.device][0], commanded.get(row.device, NO_COMMAND))
        out.samples += 1
        at = datetime.fromtimestamp(s.ts, UTC)
        for ev in engine.feed(s):
            outcome(adjuster.event(ev, at), at)
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
                outcome(adjuster.verdict(ev.device, ev.rule, row.verdict == "fault", at), at)
        adjuster.observe(s)  # after the events: readings of an open fault stay out of the indices
    out.proposals = list(adjuster.pending.values())
    out.note = unanswered_note(len(out.proposals), mode)
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
