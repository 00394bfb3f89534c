"""Rules as data: a trigger condition (operating state, time since the last state change, mode)
gates a content condition (comparisons of telemetry with thresholds, combined with AND/OR/XOR).

A rule set is stored once (a TOML file) and shared by every device its selector matches; the
thresholds a rule names live in its ``params`` so they can be adjusted per device.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from gridpresence.rules.settings import AlarmSettings
from gridpresence.protocol.alarm import AlarmKind
from gridpresence.protocol.models import DeviceKind, DeviceState

# `commanded`: the contacts position the last command asked for ("open", "closed"; "none" if no
# command is known), so a rule can tell a breaker that opened by itself from one that was opened.
FIELDS = ("load_pct", "output_kw", "fuel_pct", "temperature_c", "breaker", "commanded", "run_h", "capacity_kw")
Field_ = Literal["load_pct", "output_kw", "fuel_pct", "temperature_c", "breaker", "commanded", "run_h",
                 "capacity_kw"]
NO_COMMAND = "none"
# The per-device learned settling time every rule has (seconds after a state change before its
# content is evaluated); a rule may also name it in its trigger and params.
SETTLE_PARAM = "settle_s"
Op = Literal[">=", ">", "<=", "<", "==", "!="]
_Name = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_]{0,47}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Compare(_Strict):
    """``field op threshold``: the threshold is a literal ``value`` or a rule ``param``."""

    field: Field_
    op: Op
    value: float | str | None = None
    param: _Name | None = None

    @model_validator(mode="after")
    def _one_operand(self) -> Compare:
        if (self.value is None) == (self.param is None):
            raise ValueError("give exactly one of value or param")
        if isinstance(self.value, str) and self.op not in ("==", "!="):
            raise ValueError("a text value can only be compared with == or !=")
        return self


def comparison_text(value: float | str | None, op: str | None, threshold: float | str | None) -> str:
    """A comparison as a person reads it (``80.8 >= 80``): the one place one is rendered as text."""
    def shown(v: float | str | None) -> str:
        return "?" if v is None else f"{v:g}" if isinstance(v, float | int) else str(v)

    return f"{shown(value)} {op or '?'} {shown(threshold)}"


class All(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Strict):
    any: list[Condition] = Field(min_length=1)


class Xor(_Strict):
    """Exactly one of the conditions holds."""

    xor: list[Condition] = Field(min_length=2)


def _condition_tag(v: object) -> str | None:
    """Which kind of condition a table is, by its key: errors then name the right fields."""
    if isinstance(v, dict):
        return next((k for k in ("all", "any", "xor") if k in v), "compare")
    tags: dict[type, str] = {Compare: "compare", All: "all", AnyOf: "any", Xor: "xor"}
    return tags.get(type(v))


Condition = Annotated[Union[Annotated[Compare, Tag("compare")], Annotated[All, Tag("all")],
                            Annotated[AnyOf, Tag("any")], Annotated[Xor, Tag("xor")]],
                      Discriminator(_condition_tag)]
All.model_rebuild()
AnyOf.model_rebuild()
Xor.model_rebuild()


class Trigger(_Strict):
    """When the content condition is evaluated at all: in these states, this long after the last
    state change (a number of seconds or a param, e.g. a generator's settling time), in this mode."""

    states: list[DeviceState] = Field(default_factory=lambda: [DeviceState.ON, DeviceState.OFF, DeviceState.RESTRICTED])
    since_change_s: float | _Name = 0.0
    mode: str | None = None


class Selector(_Strict):
    """Which devices share the rule: by kind and/or by name (empty = all)."""

    kinds: list[DeviceKind] = Field(default_factory=list)
    names: list[str] = Field(default_factory=list)

    def matches(self, device: str, kind: DeviceKind | None) -> bool:
        return (not self.kinds or kind in self.kinds) and (not self.names or device in self.names)


class AdjustMode(StrEnum):
    OFF = "off"
    AUTO = "auto"  # applied at once, audited as by the system
    CONFIRM = "confirm"  # the need is proposed; the operator enters the value
    HYBRID = "hybrid"  # the system proposes a value; the operator confirms it or enters another


class AdjustMethod(StrEnum):
    ERROR = "error"  # move the threshold past the sensor's observed error
    SETTLE = "settle"  # delay evaluation by the observed time to steady state after a start
    POWER = "power"  # control limit from the EWMA of the device's own readings


class Adjust(_Strict):
    mode: AdjustMode = AdjustMode.OFF
    method: AdjustMethod = AdjustMethod.ERROR
    param: _Name
    margin: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    min_false: int = Field(default=2, ge=1)  # "not a fault" verdicts needed before adjusting
    false_ratio: float = Field(default=0.5, gt=0, le=1)  # EWMA share of false alarms that calls for it
    max_per_day: float = Field(default=0, ge=0)  # alarm frequency that calls for it (0 = not used)
    lo: float | None = None
    hi: float | None = None


class Settle(_Strict):
    """Learning a rule's trigger condition (second document: the time a device needs to reach
    steady state): alarms raised within `window_s` of a state change that cleared within it and
    were judged "not a fault" are start-up transients; after `min_false` of them the rule waits
    the longest one (plus `margin`) after each state change, per device. They do not count as
    evidence for moving the rule's threshold."""

    mode: AdjustMode = AdjustMode.HYBRID
    window_s: float = Field(default=900.0, gt=0, allow_inf_nan=False)
    # Defaults as the held-out evaluation chose them in every split (bench/rules_eval.py): one
    # transient judged "not a fault" is evidence enough, as it is always capped by confirmed faults.
    margin: float = Field(default=0.5, ge=0, allow_inf_nan=False)
    min_false: int = Field(default=1, ge=1)
    hi: float = Field(default=1800.0, ge=0, allow_inf_nan=False)


class Rule(_Strict):
    name: _Name
    alarm: AlarmKind  # the alarm it raises, as operators' clients know it
    urgent: bool = False
    active: bool = True
    applies_to: Selector = Selector()
    trigger: Trigger = Trigger()
    content: Condition
    params: dict[_Name, float] = Field(default_factory=dict)
    hysteresis: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    suppressed_by: list[_Name] = Field(default_factory=list)
    adjust: Adjust | None = None
    settle: Settle = Settle()

    def static_settle(self) -> float:
        """The trigger's own delay after a state change (before any learning)."""
        t = self.trigger.since_change_s
        return self.params.get(t, 0.0) if isinstance(t, str) else t

    @model_validator(mode="after")
    def _params_known(self) -> Rule:
        used = set(_params_in(self.content))
        if isinstance(self.trigger.since_change_s, str):
            used.add(self.trigger.since_change_s)
        if self.adjust is not None:
            used.add(self.adjust.param)
        missing = sorted(used - set(self.params))
        if missing:
            raise ValueError(f"params missing: {', '.join(missing)}")
        return self


def compares(cond: Condition) -> list[Compare]:
    """The comparisons of a condition tree, in order."""
    if isinstance(cond, Compare):
        return [cond]
    children = cond.all if isinstance(cond, All) else cond.any if isinstance(cond, AnyOf) else cond.xor
    return [leaf for c in children for leaf in compares(c)]


def _params_in(cond: Condition) -> list[str]:
    return [c.param for c in compares(cond) if c.param]


def first_param_compare(cond: Condition) -> Compare | None:
    """The comparison whose reading and threshold describe the fault (the first with a param)."""
    return next((c for c in compares(cond) if c.param), None)


def compare_of(cond: Condition, param: str) -> Compare | None:
    return next((c for c in compares(cond) if c.param == param), None)


class RuleSet(_Strict):
    rules: list[Rule] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> RuleSet:
        names = [r.name for r in self.rules]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rule names repeated: {', '.join(dupes)}")
        for r in self.rules:
            unknown = set(r.suppressed_by) - set(names)
            if unknown:
                raise ValueError(f"rule {r.name}: suppressed_by names unknown rules: {', '.join(sorted(unknown))}")
        return self

    def get(self, name: str) -> Rule:
        for r in self.rules:
            if r.name == name:
                return r
        raise KeyError(name)


class RuleSetError(ValueError):
    """A rule set file that cannot be used; the message names the file and the field."""


def load_rules(path: Path) -> RuleSet:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise RuleSetError(f"{path}: {exc}") from exc
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(p) for p in first["loc"]]
        # A condition's tag repeats its key ("any.any.1"): say it once.
        where = ".".join(p for i, p in enumerate(loc) if i == 0 or p != loc[i - 1])
        raise RuleSetError(f"{path}: {_rule_named(data, first['loc'])}{where}: {first['msg']}") from exc


def _rule_named(data: object, loc: tuple[int | str, ...]) -> str:
    """"rule 'NAME': " for an error inside one rule, so a person finds it without counting."""
    if len(loc) < 2 or loc[0] != "rules" or not isinstance(loc[1], int) or not isinstance(data, dict):
        return ""
    rules = data.get("rules")
    rule = rules[loc[1]] if isinstance(rules, list) and loc[1] < len(rules) else None
    name = rule.get("name") if isinstance(rule, dict) else None
    return f"rule {name!r}: " if isinstance(name, str) else ""


DEFAULT_RULES = Path(__file__).with_name("default.toml")


def default_rules(settings: AlarmSettings | None = None) -> RuleSet:
    """The alarms of [00145] as rules, with the fleet file's ``[alarms]`` levels as params."""
    return _default_rules(settings or AlarmSettings())


@lru_cache(maxsize=32)
def _default_rules(s: AlarmSettings) -> RuleSet:
    levels = {"high_loading": s.high_loading_pct, "trip_imminent": s.trip_imminent_pct,
              "breaker_tripped": s.breaker_tripped_pct, "low_fuel": s.low_fuel_pct,
              "max_temperature": s.max_temperature_c, "service_after": s.service_after_run_h}
    base = load_rules(DEFAULT_RULES)
    rules = []
    for r in base.rules:
        params = {k: levels.get(k, v) for k, v in r.params.items()}
        hyst = s.hysteresis_pct if r.hysteresis else 0.0
        rules.append(r.model_copy(update={"params": params, "hysteresis": hyst}))
    return RuleSet(rules=rules)


def rules_for(rules_file: Path | None, settings: AlarmSettings | None = None) -> RuleSet:
    """The rule set live devices run: the fleet's own file if it names one, else the built-in
    alarms at the fleet's ``[alarms]`` levels. Loaded once and shared by every device."""
    return load_rules(rules_file) if rules_file is not None else default_rules(settings)
