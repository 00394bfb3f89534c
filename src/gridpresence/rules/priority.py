"""Fault priority and suppression (second document, "cost per day", hierarchy suppression).

A fault's cost per day is the energy it wastes or puts at risk — the kW beyond its threshold,
over a day — times the billing party's current price. Faults at or above a cost, and urgent
ones, go out at once; the rest wait for the next batch. A fault of a device under a branch that
is itself in fault is folded into the branch's alarm.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from gridpresence.rules.engine import FaultEvent


def excess_kw(ev: FaultEvent, capacity_kw: float | None) -> float:
    """kW beyond the threshold: the reading past it, as a share of the rated kW for a percentage."""
    if ev.value is None or ev.threshold is None:
        return 0.0
    over = abs(ev.value - ev.threshold)
    if ev.rule in ("high_loading", "trip_imminent") and capacity_kw:
        return over / 100.0 * capacity_kw
    return over if capacity_kw is None else min(over, capacity_kw)


def cost_per_day(excess: float, price_per_kwh: float) -> float:
    return excess * 24.0 * price_per_kwh


@dataclass(frozen=True)
class Ranked:
    event: FaultEvent
    cost_per_day: float
    folded: tuple[FaultEvent, ...] = ()  # faults under this one's branch, told with it


@dataclass
class Prioritiser:
    """Sends costly and urgent faults at once, batches the rest."""

    high_cost_per_day: float
    price: Callable[[], float]  # the billing party's current price per kWh
    capacity: Callable[[str], float | None] = lambda device: None
    batch: list[Ranked] = field(default_factory=list)

    def rank(self, ev: FaultEvent) -> Ranked:
        return Ranked(ev, round(cost_per_day(excess_kw(ev, self.capacity(ev.device)), self.price()), 2))

    def submit(self, ev: FaultEvent) -> list[Ranked]:
        """The faults to send now (the fault itself, if urgent or costly); the rest are kept."""
        r = self.rank(ev)
        if ev.urgent or r.cost_per_day >= self.high_cost_per_day:
            return [r]
        self.batch.append(r)
        return []

    def withdraw(self, device: str, rule: str) -> None:
        """A batched fault that has passed before the batch went out is dropped."""
        self.batch = [r for r in self.batch if (r.event.device, r.event.rule) != (device, rule)]

    def flush(self) -> list[Ranked]:
        """The batch, costliest first."""
        out, self.batch = sorted(self.batch, key=lambda r: -r.cost_per_day), []
        return out


def faulty_ancestor(device: str, parent: Callable[[str], str | None], in_fault: Collection[str]) -> str | None:
    """The highest branch above `device` that is itself in fault, if any."""
    top, node, seen = None, parent(device), {device}
    while node is not None and node not in seen:
        seen.add(node)
        if node in in_fault:
            top = node
        node = parent(node)
    return top


def fold_under_branches(faults: Iterable[Ranked], parent: Callable[[str], str | None]) -> list[Ranked]:
    """Faults whose device has an ancestor in fault are folded into the highest such ancestor's."""
    faults = list(faults)
    in_fault = {r.event.device for r in faults}

    def top_faulty_ancestor(device: str) -> str | None:
        return faulty_ancestor(device, parent, in_fault)

    folded: dict[str, list[FaultEvent]] = {}
    kept: list[Ranked] = []
    for r in faults:
        top = top_faulty_ancestor(r.event.device)
        if top is None:
            kept.append(r)
        else:
            folded.setdefault(top, []).append(r.event)
    out = []
    for r in kept:
        extra = folded.pop(r.event.device, [])
        if extra:
            # The first fault of the branch carries the folded ones; its own other faults stay as they are.
            out.append(Ranked(r.event, r.cost_per_day, r.folded + tuple(extra)))
        else:
            out.append(r)
    return out
