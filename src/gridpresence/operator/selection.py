"""Choosing devices at fleet size: filters (``kind=load state=on``) and the counts a summary shows.

A filter is terms ``KEY=VALUE[,VALUE...]``: values of one key are alternatives, different keys
must all hold (``kind=load,generator state=on``: loads or generators that are on). ``name``
takes shell-style patterns (``name=s001-*``). One pass over the views, no copies: a status of
10,000 devices filters in milliseconds.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol.models import TRANSPORTS, DeviceKind, DeviceState, HealthStatus

# The words `status` shows in its STATE column (DeviceView.label).
STATE_LABELS = (*(s.value for s in DeviceState), "presence-error", "unknown")
_CHOICES: dict[str, tuple[str, ...]] = {
    "kind": tuple(k.value for k in DeviceKind),
    "state": STATE_LABELS,
    "health": tuple(h.value for h in HealthStatus),
    "transport": (*TRANSPORTS, "none"),
    "critical": ("yes", "no"),
    "present": ("yes", "no"),
}
FILTER_KEYS = ("name", *_CHOICES)
# What --filter's help lists: every key with what it takes.
FILTER_SYNTAX = " ".join(("name=GLOB", *(f"{k}={','.join(v)}" for k, v in _CHOICES.items())))
MAX_TERMS = 32
MAX_VALUES = 256  # names alternatives may list per term


class FilterError(ValueError):
    """A filter term that means nothing: the message says which term and what it may be."""


@dataclass(frozen=True)
class DeviceFilter:
    """Terms by key; each key's values are alternatives. An empty filter takes every device."""

    terms: Mapping[str, frozenset[str]] = field(default_factory=dict)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> DeviceFilter:
        terms: dict[str, set[str]] = {}
        for count, text in enumerate(texts, 1):
            if count > MAX_TERMS:
                raise FilterError(f"at most {MAX_TERMS} filter terms")
            key, values = parse_term(text)
            terms.setdefault(key, set()).update(values)
        return cls({k: frozenset(v) for k, v in terms.items()})

    def __bool__(self) -> bool:
        return bool(self.terms)

    def verdict(self, view: DeviceView) -> bool | None:
        """True: the device matches; False: it does not; None: it cannot be told yet, because a
        term asks what the device has not said (its state or criticality before its first
        report). A safety filter such as ``critical=no`` must never take a device for "no"
        merely because nothing was heard from it."""
        told = True
        for key, wanted in self.terms.items():
            if key == "name":
                if not any(fnmatch.fnmatchcase(view.name, p) for p in wanted):
                    return False
                continue
            value = _value(view, key)
            if value is None:
                told = False
            elif value not in wanted:
                if key == "state" and value == "unknown":
                    told = False  # not heard from yet: it may well be in a wanted state
                else:
                    return False
        return True if told else None

    def matches(self, view: DeviceView) -> bool:
        return self.verdict(view) is True

    def select(self, views: Iterable[DeviceView]) -> Iterator[DeviceView]:
        return (v for v in views if self.matches(v))

    def split(self, views: Iterable[DeviceView]) -> tuple[list[DeviceView], list[DeviceView]]:
        """(selected, undetermined): those that match, and those that cannot be told yet."""
        chosen: list[DeviceView] = []
        untold: list[DeviceView] = []
        for v in views:
            verdict = self.verdict(v)
            if verdict:
                chosen.append(v)
            elif verdict is None:
                untold.append(v)
        return chosen, untold

    def __str__(self) -> str:
        return " ".join(f"{k}={','.join(sorted(v))}" for k, v in self.terms.items())


def parse_term(text: str) -> tuple[str, frozenset[str]]:
    """One ``KEY=VALUE[,VALUE...]`` term; FilterError naming what is wrong and what is allowed."""
    key, sep, rest = text.partition("=")
    key = key.strip().lower()
    if not sep:
        raise FilterError(f"filter {text!r}: expected KEY=VALUE, with KEY one of {', '.join(FILTER_KEYS)}")
    if key not in FILTER_KEYS:
        raise FilterError(f"filter {text!r}: unknown key {key!r}; keys: {', '.join(FILTER_KEYS)}")
    values = [v.strip() for v in rest.split(",")]
    if not all(values):
        raise FilterError(f"filter {text!r}: an empty value; give {key}=VALUE[,VALUE...]")
    if len(values) > MAX_VALUES:
        raise FilterError(f"filter {text!r}: at most {MAX_VALUES} values in one term")
    if key != "name":
        values = [v.lower() for v in values]
        bad = [v for v in values if v not in _CHOICES[key]]
        if bad:
            raise FilterError(f"filter {text!r}: {key} {bad[0]!r} is not one of {', '.join(_CHOICES[key])}")
    elif any(len(v) > 100 or not v.isprintable() for v in values):
        raise FilterError(f"filter {text!r}: a name pattern is at most 100 printable characters")
    return key, frozenset(values)


def _value(view: DeviceView, key: str) -> str | None:
    """What `view` has for a filter key; None: not known until the device reports."""
    if key == "kind":
        return view.kind.value if view.kind else None
    if key == "state":
        return view.label
    if key == "health":
        return view.health.value
    if key == "transport":
        return view.transport or "none"
    if key == "critical":
        if view.report is None:
            return None
        return "yes" if view.report.critical else "no"
    if key == "present":
        return "yes" if view.present else "no"
    raise AssertionError(key)


@dataclass(frozen=True)
class FleetSummary:
    """What a summary line says: how many devices, by kind and by state, how many present."""

    total: int
    present: int
    by_kind: Mapping[str, int]
    by_state: Mapping[str, int]

    @classmethod
    def of(cls, views: Iterable[DeviceView]) -> FleetSummary:
        kinds: Counter[str] = Counter()
        states: Counter[str] = Counter()
        total = present = 0
        for v in views:
            total += 1
            present += v.present
            kinds[v.kind.value if v.kind else "?"] += 1
            states[v.label] += 1
        return cls(total, present, dict(kinds.most_common()), dict(states.most_common()))

    def as_dict(self) -> dict[str, object]:
        return {"devices": self.total, "present": self.present, "by_kind": dict(self.by_kind),
                "by_state": dict(self.by_state)}
