"""Labelled traces from independent scenario families, seeded, for the held-out evaluation.

Each family exercises one way data goes wrong or one kind of true fault, with its own devices
and its own randomness (a family's trace depends only on the seed and the family's name), so a
rule tuned on some families meets the others as data it was never tuned to:

==============  ==============================================================================
biased          load sensors reading 5..9 points high; true overloads
noisy           load sensors with 3.5 points of noise; true overloads
drifting        load sensors whose error grows from 0 to +10 points over the trace
stuck           load sensors stuck at 82..90 % for a while (nothing wrong with the load)
inrush          loads switched off and on; 1..3 samples at 100..115 % after each start
daily           a daily load cycle (3 days at one sample a minute) peaking at 82..88 % each day
breakers        breakers that trip (open, no command) and breakers opened on command; loads on
                the same trace report their contactor's position too (brk-cbN, brk-loadN)
generators      temperature overshoot for ~5 minutes after each start; true overheats later
gaps            loads whose reports stop for 1..10 minutes (communication gaps); overloads may
                start inside a gap
lengths         honest sensors; true overloads 1, 2, 5, 30 and 120 samples long
==============  ==============================================================================

Rows are ``rules.replay.TraceRow`` (the CSV of ``gridpresence rules replay``) with no kind
column (the replay infers it) and a ``verdict`` column with the label (a true fault or not):
the answers an operator would give.
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from gridpresence.protocol.models import DeviceState
from gridpresence.rules.replay import TraceRow

DETECTS = {"overload": {"high_loading", "trip_imminent"}, "trip": {"breaker_tripped"},
           "overheat": {"temperature_exceeded"}}


@dataclass
class Episode:
    device: str
    kind: str  # overload | trip | overheat
    start: float
    end: float  # inclusive


@dataclass
class Trace:
    family: str
    step_s: float
    rows: list[TraceRow] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)

    def label(self) -> None:
        """The verdict column: "fault" on rows inside a true fault of their device."""
        by_dev: dict[str, list[Episode]] = {}
        for ep in self.episodes:
            by_dev.setdefault(ep.device, []).append(ep)
        for r in self.rows:
            inside = any(ep.start <= r.timestamp <= ep.end for ep in by_dev.get(r.device, []))
            r.verdict = "fault" if inside else "not_fault"
        self.rows.sort(key=lambda r: (r.timestamp, r.device))


def _row(ts: float, device: str, state: DeviceState, **values: object) -> TraceRow:
    return TraceRow(timestamp=ts, device=device, state=state, **values)  # type: ignore[arg-type]


def _spans(rng: random.Random, n: int, count: int, length: tuple[int, int], gap: int = 40,
           avoid: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Non-overlapping [start, end] sample ranges, apart from the first 60 samples and `avoid`."""
    out: list[tuple[int, int]] = []
    taken = list(avoid or [])
    for _ in range(count * 200):
        if len(out) == count:
            break
        ln = rng.randint(*length)
        start = rng.randrange(60, max(61, n - ln - 1))
        end = start + ln - 1
        if all(end + gap < s or start > e + gap for s, e in taken):
            out.append((start, end))
            taken.append((start, end))
    return sorted(out)


def _clip(v: float) -> float:
    return round(min(150.0, max(0.0, v)), 1)


def _load_family(family: str, rng: random.Random, devices: int, n: int, step: float,
                 error_for: Callable[[random.Random], Callable[[int, int], float]], sd: float = 1.0,
                 lengths: tuple[int, int] = (3, 20), overloads: int = 2) -> Trace:
    """Loads at 50..77 % true load with a sensor error; labelled true overloads at 100..115 %."""
    tr = Trace(family, step)
    for d in range(devices):
        name = f"{family}-load{d}"
        dev_rng = random.Random(rng.random())
        spans = _spans(dev_rng, n, overloads, lengths)
        error = error_for(dev_rng)
        true = 65.0
        for i in range(n):
            true = min(77.0, max(50.0, true + dev_rng.gauss(0, 1.0)))
            level = next((dev_rng.uniform(100, 115) for s, e in spans if s <= i <= e), true)
            reading = level + error(i, n) + dev_rng.gauss(0, sd)
            tr.rows.append(_row(i * step, name, DeviceState.ON, load_pct=_clip(reading)))
        tr.episodes += [Episode(name, "overload", s * step, e * step) for s, e in spans]
    return tr


def biased(rng: random.Random, devices: int, n: int) -> Trace:
    def error_for(r: random.Random) -> Callable[[int, int], float]:
        bias = r.uniform(5, 9)
        return lambda i, n_: bias

    return _load_family("biased", rng, devices, n, 10.0, error_for)


def noisy(rng: random.Random, devices: int, n: int) -> Trace:
    return _load_family("noisy", rng, devices, n, 10.0, lambda r: lambda i, n_: 0.0, sd=3.5)


def drifting(rng: random.Random, devices: int, n: int) -> Trace:
    return _load_family("drifting", rng, devices, n, 10.0, lambda r: lambda i, n_: 10.0 * i / n_)


def lengths(rng: random.Random, devices: int, n: int) -> Trace:
    tr = Trace("lengths", 10.0)
    for d in range(devices):
        name = f"lengths-load{d}"
        dev_rng = random.Random(rng.random())
        spans: list[tuple[int, int]] = []
        for ln in (1, 2, 5, 30, 120):
            spans += _spans(dev_rng, n, 1, (ln, ln), avoid=spans)
        true = 65.0
        for i in range(n):
            true = min(77.0, max(50.0, true + dev_rng.gauss(0, 1.0)))
            level = next((dev_rng.uniform(100, 115) for s, e in spans if s <= i <= e), true)
            tr.rows.append(_row(i * 10.0, name, DeviceState.ON, load_pct=_clip(level + dev_rng.gauss(0, 1.0))))
        tr.episodes += [Episode(name, "overload", s * 10.0, e * 10.0) for s, e in spans]
    return tr


def stuck(rng: random.Random, devices: int, n: int) -> Trace:
    tr = Trace("stuck", 10.0)
    for d in range(devices):
        name = f"stuck-load{d}"
        dev_rng = random.Random(rng.random())
        frozen = _spans(dev_rng, n, 3, (30, 120))
        spans = _spans(dev_rng, n, 2, (3, 20), avoid=frozen)
        true, held = 65.0, 0.0
        for i in range(n):
            true = min(77.0, max(50.0, true + dev_rng.gauss(0, 1.0)))
            level = next((dev_rng.uniform(100, 115) for s, e in spans if s <= i <= e), true)
            reading = level + dev_rng.gauss(0, 1.0)
            for s, e in frozen:
                if i == s:
                    held = dev_rng.uniform(82, 90)
                if s <= i <= e:
                    reading = held
            tr.rows.append(_row(i * 10.0, name, DeviceState.ON, load_pct=_clip(reading)))
        tr.episodes += [Episode(name, "overload", s * 10.0, e * 10.0) for s, e in spans]
    return tr


def inrush(rng: random.Random, devices: int, n: int) -> Trace:
    tr = Trace("inrush", 10.0)
    for d in range(devices):
        name = f"inrush-load{d}"
        dev_rng = random.Random(rng.random())
        i, spans = 0, []
        true = 65.0
        while i < n:
            off = dev_rng.randint(6, 30)
            for _ in range(min(off, n - i)):
                tr.rows.append(_row(i * 10.0, name, DeviceState.OFF, load_pct=0.0))
                i += 1
            run = dev_rng.randint(120, 360)
            rush = [dev_rng.uniform(100, 115) for _ in range(dev_rng.randint(1, 3))]
            # One run in two has a true overload well after the start.
            fault = (dev_rng.randint(60, run - 30), 0) if dev_rng.random() < 0.5 else None
            if fault is not None:
                fault = (fault[0], fault[0] + dev_rng.randint(3, 20) - 1)
                if i + fault[1] < n:
                    spans.append((i + fault[0], i + fault[1]))
            for k in range(min(run, n - i)):
                true = min(77.0, max(50.0, true + dev_rng.gauss(0, 1.0)))
                level = rush[k] if k < len(rush) else true
                if fault is not None and fault[0] <= k <= fault[1]:
                    level = dev_rng.uniform(100, 115)
                tr.rows.append(_row(i * 10.0, name, DeviceState.ON, load_pct=_clip(level + dev_rng.gauss(0, 1.0))))
                i += 1
        tr.episodes += [Episode(name, "overload", s * 10.0, e * 10.0) for s, e in spans]
    return tr


def daily(rng: random.Random, devices: int, n: int) -> Trace:
    """One sample a minute over three days (n is ignored: the cycle repeats daily)."""
    day = 1440
    step, n = 60.0, 3 * day
    tr = Trace("daily", step)
    for d in range(devices):
        name = f"daily-load{d}"
        dev_rng = random.Random(rng.random())
        peak = dev_rng.uniform(82, 88)
        spans = _spans(dev_rng, n, 3, (3, 15))
        for i in range(n):
            # Low at night, highest at 18:00: peak - 40 .. peak.
            cycle = peak - 20 * (1 - math.cos(2 * math.pi * ((i % day) / day - 0.75)))
            level = next((dev_rng.uniform(100, 115) for s, e in spans if s <= i <= e), cycle)
            tr.rows.append(_row(i * step, name, DeviceState.ON, load_pct=_clip(level + dev_rng.gauss(0, 1.0))))
        tr.episodes += [Episode(name, "overload", s * step, e * step) for s, e in spans]
    return tr


def breakers(rng: random.Random, devices: int, n: int) -> Trace:
    """Half the devices are breakers (cb-N), half loads reporting their contactor (also switched
    off now and then); every row has a breaker value, as real IEDs report them."""
    tr = Trace("breakers", 10.0)
    for d in range(devices):
        dev_rng = random.Random(rng.random())
        if d % 2:
            name = f"brk-load{d}"
            offs = _spans(dev_rng, n, 3, (10, 60))
            for i in range(n):
                off = any(s <= i <= e for s, e in offs)
                tr.rows.append(_row(i * 10.0, name, DeviceState.OFF if off else DeviceState.ON,
                                    load_pct=0.0 if off else _clip(dev_rng.uniform(40, 70)), breaker="closed"))
            continue
        name = f"brk-cb{d}"
        trips = _spans(dev_rng, n, 2, (3, 30))
        opened = _spans(dev_rng, n, 3, (10, 60), avoid=trips)  # opened and closed again on command
        for i in range(n):
            tripped = any(s <= i <= e for s, e in trips)
            commanded = any(s <= i <= e for s, e in opened)
            is_open = tripped or commanded
            command = ("open" if any(i == s for s, _ in opened) else
                       "close" if any(i == e + 1 for _, e in opened + trips) else None)
            tr.rows.append(_row(i * 10.0, name, DeviceState.OFF if is_open else DeviceState.ON,
                                load_pct=0.0 if is_open else _clip(dev_rng.uniform(40, 70)),
                                breaker="open" if is_open else "closed", command=command))
        tr.episodes += [Episode(name, "trip", s * 10.0, e * 10.0) for s, e in trips]
    return tr


OVERSHOOT = (108.0, 112.0, 110.0, 106.0, 101.0, 96.0)  # °C a minute apart after a start


def generators(rng: random.Random, devices: int, n: int) -> Trace:
    tr = Trace("generators", 10.0)
    for d in range(devices):
        name = f"generators-gen{d}"
        dev_rng = random.Random(rng.random())
        i, temp = 0, 30.0
        while i < n:
            for _ in range(min(dev_rng.randint(60, 240), n - i)):
                temp = max(30.0, temp - 1)
                tr.rows.append(_row(i * 10.0, name, DeviceState.OFF, load_pct=0.0, fuel_pct=80.0,
                                    temperature_c=round(temp, 1)))
                i += 1
            run = dev_rng.randint(600, 1200)
            hot = None
            if dev_rng.random() < 0.6:
                h0 = dev_rng.randint(200, run - 60)
                hot = (h0, h0 + dev_rng.randint(3, 30) - 1)
                if i + hot[1] < n:
                    tr.episodes.append(Episode(name, "overheat", (i + hot[0]) * 10.0, (i + hot[1]) * 10.0))
            for k in range(min(run, n - i)):
                if k < 6 * len(OVERSHOOT):
                    temp = OVERSHOOT[k // 6] + dev_rng.gauss(0, 0.5)
                elif hot is not None and hot[0] <= k <= hot[1]:
                    temp = dev_rng.uniform(110, 120)
                else:
                    temp = 90.0 + dev_rng.gauss(0, 1.0)
                tr.rows.append(_row(i * 10.0, name, DeviceState.ON, load_pct=_clip(60 + dev_rng.gauss(0, 2)),
                                    fuel_pct=80.0, temperature_c=round(temp, 1)))
                i += 1
    return tr


def gaps(rng: random.Random, devices: int, n: int) -> Trace:
    tr = _load_family("gaps", rng, devices, n, 10.0, lambda r: lambda i, n_: 0.0, overloads=3)
    keep = []
    for d in range(devices):
        name = f"gaps-load{d}"
        dev_rng = random.Random(rng.random())
        mine = [e for e in tr.episodes if e.device == name]
        # Some gaps start inside an overload (its first samples never arrive), the rest anywhere.
        holes = [(int(e.start / 10) - dev_rng.randint(0, 3), int(e.start / 10) + 1) for e in mine[:1]]
        holes += _spans(dev_rng, n, 6, (6, 60), gap=10, avoid=[(int(e.start / 10), int(e.end / 10)) for e in mine])
        keep += [r for r in tr.rows if r.device == name and not any(s <= r.timestamp / 10 <= e for s, e in holes)]
    tr.rows = keep
    return tr


FAMILIES: dict[str, Callable[[random.Random, int, int], Trace]] = {
    f.__name__: f for f in (biased, noisy, drifting, stuck, inrush, daily, breakers, generators, gaps, lengths)}


def build(family: str, seed: int, devices: int = 6, hours: float = 6.0) -> Trace:
    """One family's labelled trace; its randomness depends only on (seed, family)."""
    rng = random.Random(seed * 1_000_003 + zlib.crc32(family.encode()))
    tr = FAMILIES[family](rng, devices, int(hours * 3600 / 10.0))
    tr.label()
    return tr
