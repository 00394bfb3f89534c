#!/usr/bin/env python3
"""Fixed thresholds against adaptive ones, on labelled synthetic traces.

Each device gets a trace of one sample a minute: loads with honest, biased (+5..+9 points) or
noisy (sd 3.5) load sensors, overload episodes (true load 100..115 %); breakers that trip;
generators whose temperature overshoots for about five minutes after each start (a transient,
not a fault) and that sometimes really overheat at steady state. Every episode is labelled.

Both runs use the same built-in rule set and engine. The fixed run never changes a threshold;
the adaptive run has an operator judging every alarm ("fault" when it falls in a labelled
episode, "not a fault" otherwise) and accepting every proposed threshold (automatic mode). The
learning period counts: every false alarm of the adaptive run is in its figure.

    python bench/rules_eval.py [--devices 30] [--hours 48] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from dataclasses import dataclass, field

from common import percentile

from gridpresence.protocol.models import DeviceKind, DeviceState
from gridpresence.rules.engine import Engine, FaultEvent, Sample
from gridpresence.rules.model import AdjustMode, default_rules
from gridpresence.rules.thresholds import Adjuster, ThresholdBook

STEP_S = 60.0
DETECTS = {"overload": {"high_loading", "trip_imminent"}, "trip": {"breaker_tripped"},
           "overheat": {"temperature_exceeded"}}


@dataclass
class Episode:
    device: str
    kind: str
    start: float
    end: float  # inclusive


@dataclass
class Trace:
    samples: list[Sample] = field(default_factory=list)
    episodes: list[Episode] = field(default_factory=list)
    scenario: dict[str, str] = field(default_factory=dict)  # device -> what its trace exercises


def _episodes(rng: random.Random, n_samples: int, count: int, length: tuple[int, int]) -> list[tuple[int, int]]:
    """Non-overlapping [start, end] sample ranges, apart from the first hour."""
    out: list[tuple[int, int]] = []
    while len(out) < count:
        start = rng.randrange(60, n_samples - length[1] - 1)
        end = start + rng.randint(*length) - 1
        if all(end + 30 < s or start > e + 30 for s, e in out):
            out.append((start, end))
    return sorted(out)


def load_trace(rng: random.Random, name: str, sensor: str, n: int, overload_pct: float = 100.0) -> Trace:
    bias, sd = {"honest": (0.0, 1.0), "biased": (rng.uniform(5, 9), 1.0), "noisy": (0.0, 3.5)}[sensor]
    tr = Trace()
    overloads = _episodes(rng, n, 2, (5, 20))
    true = 65.0
    for i in range(n):
        true = min(77.0, max(50.0, true + rng.gauss(0, 1.0)))
        level = true
        for s, e in overloads:
            if s <= i <= e:
                level = rng.uniform(overload_pct, overload_pct + 15)
        reading = min(150.0, max(0.0, level + bias + rng.gauss(0, sd)))
        tr.samples.append(Sample(name, i * STEP_S, DeviceState.ON, {"load_pct": round(reading, 1), "output_kw": None},
                                 DeviceKind.LOAD))
    tr.episodes = [Episode(name, "overload", s * STEP_S, e * STEP_S) for s, e in overloads]
    return tr


def breaker_trace(rng: random.Random, name: str, n: int) -> Trace:
    tr = Trace()
    trips = _episodes(rng, n, 2, (3, 10))
    for i in range(n):
        tripped = any(s <= i <= e for s, e in trips)
        load = 0.0 if tripped else round(rng.uniform(40, 70), 1)
        tr.samples.append(Sample(name, i * STEP_S, DeviceState.ON,
                                 {"load_pct": load, "breaker": "tripped" if tripped else "closed"}, DeviceKind.BREAKER))
    tr.episodes = [Episode(name, "trip", s * STEP_S, e * STEP_S) for s, e in trips]
    return tr


OVERSHOOT = (108.0, 112.0, 110.0, 106.0, 101.0, 96.0)  # °C a minute apart after a start


def generator_trace(rng: random.Random, name: str, n: int) -> Trace:
    """Runs of 3-6 hours with 1-2 hour pauses; one run in two really overheats past its first hour."""
    tr = Trace()
    i, temp = 0, 30.0
    while i < n:
        off = rng.randint(60, 120)
        for _ in range(min(off, n - i)):
            temp = max(30.0, temp - 5)
            tr.samples.append(Sample(name, i * STEP_S, DeviceState.OFF,
                                     {"load_pct": 0.0, "fuel_pct": 80.0, "temperature_c": round(temp, 1)},
                                     DeviceKind.GENERATOR))
            i += 1
        run = rng.randint(180, 360)
        hot = (rng.randint(70, run - 30), 0) if rng.random() < 0.5 else None
        if hot is not None:
            hot = (hot[0], hot[0] + rng.randint(5, 15))
            if i + hot[1] < n:
                tr.episodes.append(Episode(name, "overheat", (i + hot[0]) * STEP_S, (i + hot[1]) * STEP_S))
        for k in range(min(run, n - i)):
            if k < len(OVERSHOOT):
                temp = OVERSHOOT[k] + rng.gauss(0, 0.5)
            elif hot is not None and hot[0] <= k <= hot[1]:
                temp = rng.uniform(110, 120)
            else:
                temp = 90.0 + rng.gauss(0, 1.0)
            tr.samples.append(Sample(name, i * STEP_S, DeviceState.ON,
                                     {"load_pct": round(60 + rng.gauss(0, 2), 1), "fuel_pct": 80.0,
                                      "temperature_c": round(temp, 1)}, DeviceKind.GENERATOR))
            i += 1
    return tr


def build(devices: int, hours: float, seed: int, overload_pct: float = 100.0) -> Trace:
    rng = random.Random(seed)
    n = int(hours * 3600 / STEP_S)
    out = Trace()
    sensors = ("honest", "biased", "noisy")
    for d in range(devices):
        role = d % 5
        if role < 3:
            tr = load_trace(rng, f"load{d}", sensors[role], n, overload_pct)
            out.scenario[f"load{d}"] = f"{sensors[role]} load sensor"
        elif role == 3:
            tr = breaker_trace(rng, f"breaker{d}", n)
            out.scenario[f"breaker{d}"] = "breaker trips"
        else:
            tr = generator_trace(rng, f"gen{d}", n)
            out.scenario[f"gen{d}"] = "generator starts"
        out.samples.extend(tr.samples)
        out.episodes.extend(tr.episodes)
    out.samples.sort(key=lambda s: s.ts)
    return out


def episode_of(trace: Trace, ev: FaultEvent) -> Episode | None:
    for ep in trace.episodes:
        if ep.device == ev.device and ep.start <= ev.ts <= ep.end:
            return ep
    return None


def run(trace: Trace, adaptive: bool) -> dict[str, object]:
    rules = default_rules()
    book = ThresholdBook(rules)
    engine = Engine(rules, book)
    adjuster = Adjuster(rules, book, mode=AdjustMode.AUTO) if adaptive else None
    false_alarms = 0
    by_scenario = {sc: 0 for sc in sorted(set(trace.scenario.values()))}
    first: dict[int, float] = {}
    index = {id(ep): k for k, ep in enumerate(trace.episodes)}
    for s in trace.samples:
        for ev in engine.feed(s):
            if adjuster is not None:
                adjuster.event(ev)
            if not ev.raised:
                continue
            ep = episode_of(trace, ev)
            if ep is None or ev.rule not in DETECTS[ep.kind]:
                false_alarms += 1
                by_scenario[trace.scenario[ev.device]] += 1
            else:
                first.setdefault(index[id(ep)], ev.ts)
            if adjuster is not None:
                adjuster.verdict(ev.device, ev.rule, ep is not None)
        if adjuster is not None:
            adjuster.observe(s)
    delays = [(first[k] - ep.start) / STEP_S for k, ep in enumerate(trace.episodes) if k in first]
    return {"false_alarms": false_alarms, "missed": len(trace.episodes) - len(first),
            "true_faults": len(trace.episodes), "delay_samples": delays,
            "changes": len(book.audit), "false_alarms_by_scenario": by_scenario}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=30)
    parser.add_argument("--hours", type=float, default=48.0)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--overload", type=float, default=100.0,
                        help="true load of the labelled overloads, lowest (to +15): 100 %% by default")
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON")
    args = parser.parse_args()
    trace = build(args.devices, args.hours, args.seed, args.overload)
    print(f"{args.devices} devices, {args.hours:g} h at one sample a minute: {len(trace.samples)} samples, "
          f"{len(trace.episodes)} labelled true faults (overloads from {args.overload:g} % true load)")
    results: dict[str, dict[str, object]] = {}
    for name, adaptive in (("fixed thresholds (baseline)", False), ("adaptive thresholds", True)):
        r = run(trace, adaptive)
        d = r.pop("delay_samples")
        assert isinstance(d, list)
        r["delay_median_samples"] = statistics.median(d) if d else None
        r["delay_p99_samples"] = percentile(d, 99) if d else None
        results["adaptive" if adaptive else "fixed"] = r
        print(f"  {name:<30} false alarms {r['false_alarms']:<6} missed {r['missed']}/{r['true_faults']}   "
              f"detection delay median {r['delay_median_samples']} p99 {r['delay_p99_samples']} samples   "
              f"threshold changes {r['changes']}")
        print("    false alarms by scenario: " + ", ".join(f"{k} {v}" for k, v in r["false_alarms_by_scenario"].items()))
    fixed, adaptive = results["fixed"], results["adaptive"]
    ratio = adaptive["false_alarms"] / fixed["false_alarms"] if fixed["false_alarms"] else float("nan")  # type: ignore[operator]
    results["false_alarm_ratio_to_fixed"] = ratio  # type: ignore[assignment]
    print(f"  ratio to fixed: false alarms {ratio:.3f}x ({(1 - ratio) * 100:.1f} % fewer)")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
