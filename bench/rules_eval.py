#!/usr/bin/env python3
"""Fault detection on scenario families it was not tuned to: held-out evaluation.

Ten independent scenario families (bench/scenarios.py: biased, noisy, drifting and stuck
sensors; start-up inrush; a daily load cycle; breaker trips and commanded opens; generator
starts; communication gaps; true overloads of different lengths), each a labelled trace in the
CSV form of ``gridpresence rules replay``, run through ``rules.replay.replay`` itself.

For every split (each family held out in turn) the adjustment's tunable settings are chosen on
the other nine families (fewest misses, then fewest false alarms) and the held-out family is
reported with them. Three runs of each held-out family, in the same process:

* fixed: 80/95 % thresholds, breaker open = alarm, nothing learned (the baseline);
* hybrid: the rule set's default mode; a simulated operator judges every alarm (the trace's
  verdict column: its label) and accepts every proposal, as on a live grid;
* auto: ``--adjust auto``, the verdict column judging, as a replay does.

The learning period counts: every false alarm of the adaptive runs is in their figures.
Detection delay is in samples from the first sample of a true fault that arrived.

    python bench/rules_eval.py [--devices 6] [--hours 6] [--seed 7] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from common import percentile
from scenarios import DETECTS, FAMILIES, Trace, build

from gridpresence.rules.model import AdjustMode, Compare, RuleSet, default_rules
from gridpresence.rules.replay import ReplayResult, replay


def baseline_rules() -> RuleSet:
    """Fixed 80/95 % thresholds and an open or tripped breaker as an alarm, nothing learned."""
    rules = default_rules()
    out = []
    for r in rules.rules:
        if r.name == "breaker_tripped":
            r = r.model_copy(update={"content": Compare(field="breaker", op="!=", value="closed")})
        out.append(r.model_copy(update={"adjust": None}))
    return RuleSet(rules=out)


def _tuned(error_margin: float, min_false: int, settle_margin: float, settle_min_false: int) -> RuleSet:
    rules = default_rules()
    out = []
    for r in rules.rules:
        upd: dict[str, object] = {"settle": r.settle.model_copy(update={"margin": settle_margin,
                                                                       "min_false": settle_min_false})}
        if r.adjust is not None:
            upd["adjust"] = r.adjust.model_copy(update={"margin": error_margin, "min_false": min_false})
        out.append(r.model_copy(update=upd))
    return RuleSet(rules=out)


# The settings tuning may choose from: the threshold's margin and the "not a fault" verdicts it
# needs; the settling time's margin and the start-up transients it needs.
CANDIDATES: dict[str, tuple[float, int, float, int]] = {
    "shipped 2/2 .5/1": (2.0, 2, 0.5, 1),
    "2/2 .25/2": (2.0, 2, 0.25, 2),
    "tight 1/2 .1/2": (1.0, 2, 0.1, 2),
    "wide 4/2 .5/2": (4.0, 2, 0.5, 2),
    "wide 4/2 .5/1": (4.0, 2, 0.5, 1),
    "eager 2/1 .25/1": (2.0, 1, 0.25, 1),
}


@dataclass
class Score:
    false_alarms: int = 0
    missed: int = 0
    true_faults: int = 0
    delays: list[float] = field(default_factory=list)

    def add(self, o: Score) -> None:
        self.false_alarms += o.false_alarms
        self.missed += o.missed
        self.true_faults += o.true_faults
        self.delays += o.delays

    def figures(self) -> dict[str, object]:
        d = self.delays
        return {"false_alarms": self.false_alarms, "missed": self.missed, "true_faults": self.true_faults,
                "delay_median_samples": statistics.median(d) if d else None,
                "delay_p99_samples": percentile(d, 99) if d else None}


def score(trace: Trace, result: ReplayResult) -> Score:
    s = Score(true_faults=len(trace.episodes))
    first: dict[int, float] = {}
    for a in result.alarms:
        ts = datetime.fromisoformat(str(a["at"])).timestamp()
        k = next((k for k, ep in enumerate(trace.episodes) if ep.device == a["device"]
                  and ep.start <= ts <= ep.end and a["rule"] in DETECTS[ep.kind]), None)
        if k is None:
            s.false_alarms += 1
        else:
            first.setdefault(k, ts)
    arrived: dict[int, float] = {}
    for r in trace.rows:
        for k, ep in enumerate(trace.episodes):
            if ep.device == r.device and ep.start <= r.timestamp <= ep.end:
                arrived[k] = min(arrived.get(k, r.timestamp), r.timestamp)
    s.missed = sum(1 for k in range(len(trace.episodes)) if k not in first)
    s.delays = [(first[k] - arrived[k]) / trace.step_s for k in first]
    return s


Run = Callable[[Trace, RuleSet], ReplayResult]
RUNS: dict[str, Run] = {
    "hybrid": lambda tr, rules: replay(tr.rows, rules, None, operator=lambda _p: True),
    "auto": lambda tr, rules: replay(tr.rows, rules, AdjustMode.AUTO),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=6, help="devices per family")
    parser.add_argument("--hours", type=float, default=6.0, help="trace length (the daily family is always 3 days)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", action="store_true", help="also print the figures as JSON (last line)")
    args = parser.parse_args()
    traces = {f: build(f, args.seed, args.devices, args.hours) for f in FAMILIES}
    print(f"{len(traces)} scenario families, {args.devices} devices each, {args.hours:g} h at 10 s "
          f"(daily: 3 days at 60 s): {sum(len(t.rows) for t in traces.values())} samples, "
          f"{sum(len(t.episodes) for t in traces.values())} labelled true faults")
    fixed = {f: score(tr, replay(tr.rows, baseline_rules(), AdjustMode.OFF)) for f, tr in traces.items()}
    # Every (candidate, family, mode) once; a split only picks among them.
    cand_rules = {c: _tuned(*v) for c, v in CANDIDATES.items()}
    per = {(c, f, m): score(tr, run(tr, cand_rules[c]))
           for c in CANDIDATES for f, tr in traces.items() for m, run in RUNS.items()}
    results: dict[str, object] = {"fixed": {}, "hybrid": {}, "auto": {}}
    totals = {"fixed": Score(), "hybrid": Score(), "auto": Score()}
    for m in RUNS:
        print(f"\n{m} (held out: each family reported with the settings tuned on the other nine)")
        print(f"  {'family':<11} {'tuned':<24} {'false':>6} {'fixed':>6} {'ratio':>6} {'missed':>7} "
              f"{'delay med':>9} {'p99':>5}")
        worst: tuple[float, str] = (-1.0, "")
        for held in FAMILIES:
            train = [f for f in FAMILIES if f != held]
            best = min(CANDIDATES, key=lambda c: (sum(per[(c, f, m)].missed for f in train),
                                                  sum(per[(c, f, m)].false_alarms for f in train)))
            s, base = per[(best, held, m)], fixed[held]
            totals[m].add(s)
            ratio = s.false_alarms / base.false_alarms if base.false_alarms else float(s.false_alarms > 0)
            badness = ratio + 10 * s.missed
            worst = max(worst, (badness, held))
            fig = s.figures()
            results[m][held] = {**fig, "tuned": best, "fixed_false_alarms": base.false_alarms,  # type: ignore[index]
                                "ratio_to_fixed": ratio}
            print(f"  {held:<11} {best:<24} {s.false_alarms:>6} {base.false_alarms:>6} {ratio:>6.2f} "
                  f"{s.missed:>3}/{s.true_faults:<3} {fig['delay_median_samples']!s:>9} "
                  f"{fig['delay_p99_samples']!s:>5}")
        results[m]["worst_family"] = worst[1]  # type: ignore[index]
        print(f"  worst family: {worst[1]}")
    for f, s in fixed.items():
        totals["fixed"].add(s)
        results["fixed"][f] = s.figures()  # type: ignore[index]
    print()
    summary: dict[str, object] = {}
    for m, s in totals.items():
        fig = s.figures()
        summary[m] = fig
        ratio = s.false_alarms / totals["fixed"].false_alarms if totals["fixed"].false_alarms else float("nan")
        fig["ratio_to_fixed"] = ratio
        print(f"  {m:<7} held-out total: false alarms {s.false_alarms:<5} ({(1 - ratio) * 100:5.1f} % fewer than "
              f"fixed; ratio {ratio:.3f}x)  missed {s.missed}/{s.true_faults}  detection delay median "
              f"{fig['delay_median_samples']} p99 {fig['delay_p99_samples']} samples")
    # The rule set as shipped, untuned, over every family (what `rules replay --adjust auto` runs).
    for m in RUNS:
        s = Score()
        for f in FAMILIES:
            s.add(per[(next(iter(CANDIDATES)), f, m)])
        fig = s.figures()
        ratio = s.false_alarms / totals["fixed"].false_alarms if totals["fixed"].false_alarms else float("nan")
        fig["ratio_to_fixed"] = ratio
        summary[f"{m}_as_shipped"] = fig
        print(f"  {m + ' as shipped':<18} (untuned): false alarms {s.false_alarms:<5} ({(1 - ratio) * 100:5.1f} % fewer "
              f"than fixed)  missed {s.missed}/{s.true_faults}  detection delay median {fig['delay_median_samples']}")
    results["summary"] = summary
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
