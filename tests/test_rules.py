"""The rule engine, threshold adjustment, priority and replay, without a server (pure code):
rule files as a user writes them, samples as devices send them, traces as recorded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gridpresence.cli import main
from gridpresence.protocol.models import DeviceKind, DeviceState
from gridpresence.rules.engine import Engine, FaultEvent, Sample
from gridpresence.rules.model import AdjustMode, RuleSet, RuleSetError, default_rules, load_rules
from gridpresence.rules.priority import Prioritiser, Ranked, cost_per_day, fold_under_branches
from gridpresence.rules.thresholds import AdjustError, Adjuster, Change, Proposal, ThresholdBook

ROOT = Path(__file__).resolve().parents[1]

VALVE_RULES = """
[[rules]]
name = "valve_open"
alarm = "high-loading"
applies_to = { kinds = ["load"] }
trigger = { states = ["on"], since_change_s = "settle_s", mode = "cooling" }
# The valve must be fully open: below the threshold (or a closed breaker flag XOR an open one) is a fault.
content = { any = [
  { field = "load_pct", op = "<", param = "open_pct" },
  { xor = [{ field = "breaker", op = "==", value = "open" }, { field = "fuel_pct", op = "<=", value = 0.0 }] },
] }
params = { open_pct = 100.0, settle_s = 60.0 }
adjust = { mode = "auto", method = "error", param = "open_pct", margin = 1.0, lo = 80.0 }

[[rules]]
name = "off_rule"
alarm = "low-fuel"
active = false
content = { field = "load_pct", op = ">=", value = 0.0 }
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def sample(device: str, ts: float, state: DeviceState = DeviceState.ON, kind: DeviceKind = DeviceKind.LOAD,
           mode: str | None = "cooling", **values: object) -> Sample:
    return Sample(device, ts, state, values, kind, mode)  # type: ignore[arg-type]


def test_rule_file_validated_with_field_named(tmp_path: Path) -> None:
    rules = load_rules(write(tmp_path, "ok.toml", VALVE_RULES))
    assert [r.name for r in rules.rules] == ["valve_open", "off_rule"] and not rules.rules[1].active
    bad = VALVE_RULES.replace('op = "<", param', 'op = "<>", param')
    with pytest.raises(RuleSetError, match=r"bad.toml: rule 'valve_open': rules\.0\.content.*op"):
        load_rules(write(tmp_path, "bad.toml", bad))
    with pytest.raises(RuleSetError, match=r"params missing: settle_s"):
        load_rules(write(tmp_path, "p.toml", VALVE_RULES.replace("open_pct = 100.0, settle_s = 60.0", "open_pct = 100.0")))
    with pytest.raises(RuleSetError, match=r"give exactly one of value or param"):
        load_rules(write(tmp_path, "v.toml", VALVE_RULES.replace('value = 0.0 }] },', 'value = 0.0, param = "open_pct" }] },')))
    with pytest.raises(RuleSetError, match=r"rules\.0\.content\.any\.1\.xor\.0\.compare\.field"):
        load_rules(write(tmp_path, "f.toml", VALVE_RULES.replace('field = "breaker"', 'field = "colour"')))
    with pytest.raises(RuleSetError, match="rule names repeated: valve_open"):
        load_rules(write(tmp_path, "d.toml", VALVE_RULES.replace('name = "off_rule"', 'name = "valve_open"')))
    with pytest.raises(RuleSetError, match="t.toml: .*Expected"):
        load_rules(write(tmp_path, "t.toml", "[[rules]\nname="))


def test_trigger_gates_content_and_or_xor_shared_by_devices(tmp_path: Path) -> None:
    engine = Engine(load_rules(write(tmp_path, "r.toml", VALVE_RULES)))
    # Started at t=0: within the 60 s settling time nothing is evaluated.
    assert engine.feed(sample("v1", 0, load_pct=97.0)) == []
    assert engine.feed(sample("v1", 30, load_pct=97.0)) == []
    raised = engine.feed(sample("v1", 60, load_pct=97.0))
    assert [(e.rule, e.raised, e.value, e.threshold) for e in raised] == [("valve_open", True, 97.0, 100.0)]
    # Another device shares the rule (stored once) and has its own state.
    assert engine.feed(sample("v2", 60, load_pct=100.0)) == []
    assert engine.feed(sample("v2", 120, load_pct=100.0)) == []
    # Another mode, another state or another kind: the trigger does not hold, the fault clears.
    cleared = engine.feed(sample("v1", 90, load_pct=97.0, mode="heating"))
    assert [(e.rule, e.raised) for e in cleared] == [("valve_open", False)]
    assert engine.feed(sample("g1", 200, kind=DeviceKind.GENERATOR, load_pct=10.0)) == []
    # XOR: exactly one of "breaker open" and "no fuel" is a fault; both is not.
    assert engine.feed(sample("v2", 180, load_pct=100.0, breaker="open", fuel_pct=0.0)) == []
    assert [e.raised for e in engine.feed(sample("v2", 240, load_pct=100.0, breaker="open", fuel_pct=5.0))] == [True]
    # A state change restarts the settling time.
    engine.feed(sample("v2", 300, state=DeviceState.OFF, load_pct=100.0))
    assert engine.feed(sample("v2", 330, load_pct=50.0)) == []
    assert [e.raised for e in engine.feed(sample("v2", 390, load_pct=50.0))] == [True]


def test_default_rules_are_the_alarms_with_hysteresis_and_suppression() -> None:
    engine = Engine(default_rules())
    kinds = lambda evs: [(e.alarm, e.raised) for e in evs]  # noqa: E731
    assert kinds(engine.feed(sample("b", 0, kind=DeviceKind.BREAKER, load_pct=81.0, breaker="closed"))) == [
        ("high-loading", True)]
    assert kinds(engine.feed(sample("b", 1, kind=DeviceKind.BREAKER, load_pct=96.0, breaker="closed"))) == [
        ("trip-point-imminent", True)]
    # Back to 85 %: the trip alarm clears; high loading held all along (told by the urgent one), not raised anew.
    assert kinds(engine.feed(sample("b", 2, kind=DeviceKind.BREAKER, load_pct=85.0, breaker="closed"))) == [
        ("trip-point-imminent", False)]
    assert kinds(engine.feed(sample("b", 3, kind=DeviceKind.BREAKER, load_pct=78.5, breaker="closed"))) == []
    assert kinds(engine.feed(sample("b", 4, kind=DeviceKind.BREAKER, load_pct=77.9, breaker="closed"))) == [
        ("high-loading", False)]
    assert kinds(engine.feed(sample("b", 5, kind=DeviceKind.BREAKER, load_pct=0.0, breaker="tripped"))) == [
        ("breaker-tripped", True)]
    gen = engine.feed(sample("g", 0, kind=DeviceKind.GENERATOR, load_pct=50.0, fuel_pct=5.0, temperature_c=120.0))
    assert {e.alarm for e in gen} == {"low-fuel", "temperature-exceeded"}
    # Running hours counted by the engine: service after 500 h on.
    assert {e.alarm for e in engine.feed(sample("g", 500 * 3600, kind=DeviceKind.GENERATOR, load_pct=50.0,
                                                 fuel_pct=50.0, temperature_c=90.0))} == {
        "service-required", "low-fuel", "temperature-exceeded"}


def _valve(tmp_path: Path, mode: str = "auto") -> tuple[RuleSet, ThresholdBook, Engine, Adjuster]:
    rules = load_rules(write(tmp_path, "r.toml", VALVE_RULES.replace('mode = "auto"', f'mode = "{mode}"')))
    book = ThresholdBook(rules)
    return rules, book, Engine(rules, book), Adjuster(rules, book)


def _false_alarm(engine: Engine, adj: Adjuster, ts: float, reading: float) -> list[Change | Proposal]:
    """The document's valve: fully open, the potentiometer reads short of 100 %; judged not a fault."""
    out: list[Change | Proposal] = []
    for t, v in ((ts, reading), (ts + 10, reading - 1), (ts + 20, 100.0)):
        s = sample("valve", t, load_pct=v)
        for ev in engine.feed(s):
            if (o := adj.event(ev)) is not None:
                out.append(o)
            if ev.raised and (o := adj.verdict("valve", ev.rule, fault=False)) is not None:
                out.append(o)
        adj.observe(s)
    return out


def test_valve_threshold_adjusted_automatically_from_sensor_error_audited_and_reverted(tmp_path: Path) -> None:
    rules, book, engine, adj = _valve(tmp_path)
    engine.feed(sample("valve", 0, load_pct=100.0))
    assert _false_alarm(engine, adj, 100, 97.0) == []  # one "not a fault" is not yet a pattern
    (change,) = _false_alarm(engine, adj, 200, 97.0)
    # Sensor error 4 points (96 at worst) plus the 1-point margin: 100 -> 95, as in the document.
    assert isinstance(change, Change) and (change.old, change.new, change.by) == (100.0, 95.0, "system")
    assert "2 alarms judged not a fault" in change.why and "EWMA" in change.why
    assert book.current("valve", "valve_open", "open_pct") == 95.0
    assert book.current("valve2", "valve_open", "open_pct") == 100.0  # per device: the rule itself is untouched
    assert engine.feed(sample("valve", 300, load_pct=97.0)) == []  # the valve reading 97 % is no longer a fault
    assert [e.raised for e in engine.feed(sample("valve", 310, load_pct=90.0))] == [True]  # a real one still is
    back = book.revert(change.id, "alice")
    assert (back.old, back.new, back.by, back.reverts) == (95.0, 100.0, "alice", change.id)
    assert [c.id for c in book.audit] == [1, 2] and book.current("valve", "valve_open", "open_pct") == 100.0
    with pytest.raises(AdjustError, match="no threshold change 9"):
        book.revert(9, "alice")


def test_hybrid_proposes_operator_confirms_or_enters_another_confirm_mode_only_confirms(tmp_path: Path) -> None:
    _rules, book, engine, adj = _valve(tmp_path, "hybrid")
    engine.feed(sample("valve", 0, load_pct=100.0))
    _false_alarm(engine, adj, 100, 97.0)
    (p,) = _false_alarm(engine, adj, 200, 97.0)
    assert isinstance(p, Proposal) and (p.current, p.proposed) == (100.0, 95.0)
    assert book.current("valve", "valve_open", "open_pct") == 100.0  # nothing applied before the operator answers
    with pytest.raises(AdjustError, match="outside the bounds"):
        adj.confirm(p.id, "alice", 50.0)
    change = adj.confirm(p.id, "alice", 96.0)
    assert (change.new, change.by) == (96.0, "alice") and "operator entered 96" in change.why
    with pytest.raises(AdjustError, match="no threshold proposal"):
        adj.confirm(p.id, "alice")

    _rules, book, engine, adj = _valve(tmp_path, "confirm")
    engine.feed(sample("valve", 0, load_pct=100.0))
    _false_alarm(engine, adj, 100, 97.0)
    (p,) = _false_alarm(engine, adj, 200, 97.0)
    with pytest.raises(AdjustError, match="only be confirmed as proposed"):
        adj.confirm(p.id, "bob", 96.0)
    assert adj.reject(p.id).id == p.id and book.audit == []
    # Rejected: the evidence starts again; the next proposal is confirmed as proposed.
    _false_alarm(engine, adj, 400, 97.0)
    (p2,) = _false_alarm(engine, adj, 500, 97.0)
    change = adj.confirm(p2.id, "bob")
    assert (change.old, change.new, change.by) == (100.0, 95.0, "bob")


def test_real_faults_keep_the_threshold_and_settle_method_uses_start_transients() -> None:
    rules = default_rules()
    book = ThresholdBook(rules)
    engine, adj = Engine(rules, book), Adjuster(rules, book, mode=AdjustMode.AUTO)
    changes: list[Change | Proposal] = []

    def run(ts: float, state: DeviceState, temp: float, verdict: bool | None = None) -> None:
        s = sample("gen", ts, state=state, kind=DeviceKind.GENERATOR, mode=None, temperature_c=temp, fuel_pct=80.0)
        for ev in engine.feed(s):
            if (o := adj.event(ev)) is not None:
                changes.append(o)
            if ev.raised and verdict is not None and (o := adj.verdict("gen", ev.rule, verdict)) is not None:
                changes.append(o)

    t = 0.0
    for start in range(2):  # two starts, each overshooting for 3 minutes: judged not a fault
        run(t, DeviceState.OFF, 30.0)
        for k, temp in enumerate((110.0, 108.0, 106.0, 95.0, 90.0)):
            run(t + 60 * (k + 1), DeviceState.ON, temp, verdict=False)
        t += 3600
    (change,) = changes
    assert isinstance(change, Change) and change.param == "settle_s" and change.old == 0.0
    assert change.new == pytest.approx(180 * 1.5)  # cleared 180 s after the start, plus a half
    # Next start: the transient is not evaluated; a real overheat at steady state is raised at once.
    run(t, DeviceState.OFF, 30.0)
    for k, temp in enumerate((110.0, 108.0, 106.0, 95.0, 90.0)):
        run(t + 60 * (k + 1), DeviceState.ON, temp)
    evs = engine.feed(sample("gen", t + 600, kind=DeviceKind.GENERATOR, mode=None, temperature_c=115.0, fuel_pct=80.0))
    assert [(e.rule, e.raised) for e in evs] == [("temperature_exceeded", True)]
    assert adj.event(evs[0]) is None
    # Judged a real fault: no further adjustment.
    assert adj.verdict("gen", "temperature_exceeded", True) is None


def test_power_method_and_alarm_frequency_need(tmp_path: Path) -> None:
    text = VALVE_RULES.replace('method = "error", param = "open_pct", margin = 1.0, lo = 80.0',
                               'method = "power", param = "open_pct", margin = 3.0, min_false = 99, max_per_day = 3')
    rules = load_rules(write(tmp_path, "p.toml", text))
    book = ThresholdBook(rules)
    engine, adj = Engine(rules, book), Adjuster(rules, book)
    outcomes = []
    ts = 0.0
    for i in range(200):  # normal readings around 98 % build the EWMA index
        s = sample("v", ts, load_pct=100.0 if i % 2 else 99.5)
        adj.observe(s)
        engine.feed(s)
        ts += 60
    for dip in range(3):  # three dips a day, none judged a fault
        for v in (97.0, 100.0):
            s = sample("v", ts, load_pct=v)
            outcomes += [o for ev in engine.feed(s) if (o := adj.event(ev)) is not None]
            adj.observe(s)
            ts += 60
    (change,) = outcomes
    assert isinstance(change, Change) and "3 alarms in a day" in change.why and "power" in change.why
    assert 98.0 < change.new < 100.0  # EWMA mean minus three spreads, from the device's own readings


def test_priority_cost_per_day_batching_and_branch_folding() -> None:
    def ev(device: str, value: float, urgent: bool = False) -> FaultEvent:
        return FaultEvent(device, "high_loading", "high-loading", urgent, True, 0.0, value, 80.0, 0.0)

    assert cost_per_day(5.0, 0.8) == pytest.approx(96.0)  # 5 kW over a day at $0.80/kWh
    price = [0.8]
    pri = Prioritiser(high_cost_per_day=50.0, price=lambda: price[0], capacity=lambda d: 100.0)
    assert [r.cost_per_day for r in pri.submit(ev("big", 90.0))] == [192.0]  # 10 kW over: sent at once
    assert pri.submit(ev("small", 81.0)) == [] and pri.submit(ev("mid", 82.0)) == []
    assert pri.submit(ev("urgent-small", 81.0, urgent=True))  # urgent goes at once whatever it costs
    price[0] = 0.6  # the billing party's price now
    assert pri.rank(ev("small", 81.0)).cost_per_day == pytest.approx(14.4)
    assert [r.event.device for r in pri.flush()] == ["mid", "small"] and pri.flush() == []

    parents = {"load-1": "branch-x", "load-2": "branch-x", "branch-x": "master", "load-9": "branch-y"}
    faults = [Ranked(ev(d, 85.0), 1.0) for d in ("load-1", "branch-x", "load-2", "load-9")]
    folded = fold_under_branches(faults, parents.get)
    assert [(r.event.device, [f.device for f in r.folded]) for r in folded] == [
        ("branch-x", ["load-1", "load-2"]), ("load-9", [])]


TRACE = """timestamp,device,state,load_pct,output_kw,fuel_pct,temperature_c,breaker,verdict
2026-01-01T00:00:00Z,pump,on,70,,,,,
2026-01-01T00:01:00Z,pump,on,84,,,,,not_fault
2026-01-01T00:02:00Z,pump,on,75,,,,,
2026-01-01T00:03:00Z,pump,on,85,,,,,not_fault
2026-01-01T00:04:00Z,pump,on,70,,,,,
2026-01-01T00:05:00Z,pump,on,86,,,,,
2026-01-01T00:06:00Z,pump,on,97,,,,,fault
2026-01-01T00:06:00Z,brk,on,0,,,,tripped,fault
"""


def test_replay_cli_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path, "trace.csv", TRACE)
    assert main(["rules", "replay", str(trace), "--adjust", "auto", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(a["device"], a["rule"], a["verdict"]) for a in out["alarms"]] == [
        ("pump", "high_loading", "not_fault"), ("pump", "high_loading", "not_fault"),
        ("pump", "trip_imminent", "fault"), ("brk", "breaker_tripped", "fault")]
    (change,) = out["threshold_changes"]
    assert (change["device"], change["param"], change["old"], change["new"], change["by"]) == (
        "pump", "high_loading", 80.0, 87.0, "system")
    assert change["at"] == "2026-01-01T00:04:00+00:00"  # calendar: the recorded trace's own time
    # The rule set's own mode (hybrid) leaves a proposal instead, and the 86 % alarm is raised.
    assert main(["rules", "replay", str(trace), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["threshold_changes"] == [] and out["proposals"][0]["proposed"] == 87.0
    assert len(out["alarms"]) == 5
    assert main(["rules", "replay", str(trace)]) == 0
    assert "5 alarms, 0 threshold changes, 1 proposals pending" in capsys.readouterr().out


def test_replay_bad_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "cols.csv": ("timestamp,device,state\n1,a,on\n", "missing columns: load_pct"),
        "value.csv": (TRACE.replace("pump,on,75", "pump,on,lots"), r"value.csv:4: load_pct: "),
        "state.csv": (TRACE.replace("pump,on,75", "pump,melting,75"), r"state.csv:4: state: "),
        "verdict.csv": (TRACE.replace("not_fault\n2026-01-01T00:02", "maybe\n2026-01-01T00:02"), r"verdict.csv:3: verdict"),
        "time.csv": (TRACE.replace("2026-01-01T00:02:00Z", "yesterday"),  # calendar: the recorded trace's own time
                 r"time.csv:4: timestamp"),
    }
    for name, (text, message) in cases.items():
        assert main(["rules", "replay", str(write(tmp_path, name, text))]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message.replace("\\", "") in err.replace("\\", ""), (name, err)
    assert main(["rules", "replay", str(tmp_path / "absent.csv")]) == 2
    assert "No such file" in capsys.readouterr().err
    assert main(["rules", "replay", str(write(tmp_path, "ok.csv", TRACE)),
                 "--rules", str(write(tmp_path, "r.toml", "[[rules]]\nname = 'X'\n"))]) == 2
    assert "r.toml: rule 'X': rules.0.name" in capsys.readouterr().err


def test_rules_eval_holds_out_every_family_and_misses_nothing() -> None:
    """A small run of the held-out evaluation (the full one: `python bench/rules_eval.py`)."""
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "rules_eval.py"), "--devices", "2", "--hours", "2",
                          "--json"], capture_output=True, text=True, timeout=120, check=True,
                         env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT / 'bench'}", "PATH": "/usr/bin:/bin"})
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    families = {"biased", "noisy", "drifting", "stuck", "inrush", "daily", "breakers", "generators", "gaps", "lengths"}
    summary = figures["summary"]
    assert summary["fixed"]["false_alarms"] > 50
    for mode in ("hybrid", "auto"):
        assert families <= set(figures[mode]) and figures[mode]["worst_family"] in families
        assert all(figures[mode][f]["missed"] == 0 for f in families), figures[mode]
        assert summary[mode]["missed"] == 0 and summary[mode]["delay_median_samples"] <= 1
        # Learning costs a few false alarms per device; even on this short run they are far fewer.
        assert summary[mode]["false_alarms"] <= 0.6 * summary["fixed"]["false_alarms"]
    # Commanded opens alarm only in the baseline; trips alarm in both.
    assert figures["auto"]["breakers"]["false_alarms"] == 0 < figures["auto"]["breakers"]["fixed_false_alarms"]
    assert "worst family:" in out.stdout and "fewer than fixed" in out.stdout


FLEET = """
[[operators]]
name = "alice"

[[billing]]
name = "supplier"
peak_price = 0.80
off_peak_price = 0.60

[[devices]]
name = "master"
kind = "master"
rated_kw = 1000

[[devices]]
name = "branch-x"
kind = "meter"
rated_kw = 400
parent = "master"

[[devices]]
name = "load-1"
kind = "load"
rated_kw = 100
parent = "branch-x"

[[devices]]
name = "load-2"
kind = "load"
rated_kw = 10
"""

RANKED = """timestamp,device,state,load_pct,output_kw,fuel_pct,temperature_c,breaker
2026-01-01T12:00:00Z,branch-x,on,90,,,,
2026-01-01T12:01:00Z,load-1,on,90,,,,
2026-01-01T12:02:00Z,branch-x,on,50,,,,
2026-01-01T12:03:00Z,load-1,on,50,,,,
2026-01-01T20:04:00Z,load-1,on,85,,,,
2026-01-01T20:05:00Z,load-2,on,85,,,,
"""


def test_replay_ranks_by_cost_per_day_at_the_tariff_and_folds_under_faulty_branch(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fleet, trace = write(tmp_path, "fleet.toml", FLEET), write(tmp_path, "ranked.csv", RANKED)
    assert main(["rules", "replay", str(trace), "--fleet", str(fleet), "--high-cost", "50", "--json"]) == 0
    alarms = json.loads(capsys.readouterr().out)["alarms"]
    got = [(a["device"], a["cost_per_day"], a["sent"], a["folded_into"]) for a in alarms]
    assert got == [
        ("branch-x", 768.0, "at once", None),  # 10 % of 400 kW over, 24 h at the $0.80 peak price
        ("load-1", 192.0, "at once", "branch-x"),  # its branch is in fault: told with the branch alarm
        ("load-1", 72.0, "at once", None),  # 5 kW over at the $0.60 off-peak price; branch back to normal
        ("load-2", 7.2, "batched", None),  # 0.5 kW over: low priority, batched
    ]
    assert main(["rules", "replay", str(trace), "--fleet", str(tmp_path / "none.toml")]) == 2
    assert "none.toml" in capsys.readouterr().err


def test_replay_prints_the_operator_of_the_comparison(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = write(tmp_path, "trace.csv", TRACE)
    assert main(["rules", "replay", str(trace), "--adjust", "auto"]) == 0
    out = capsys.readouterr().out
    assert "pump: high_loading (warning) 84 >= 80 [not_fault]" in out, out
    assert "brk: breaker_tripped (urgent) 0 <= 0 [fault]" in out and "><" not in out
    assert main(["rules", "replay", str(trace), "--json"]) == 0
    assert {a["op"] for a in json.loads(capsys.readouterr().out)["alarms"]} == {">=", "<="}


def test_audit_of_a_missing_or_wrong_data_directory_is_an_error(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["rules", "audit", "--data", str(tmp_path / "absent")]) == 2
    assert "absent: not a grid data directory" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    assert main(["rules", "audit", "--data", str(tmp_path / "notes")]) == 2
    assert "not a grid data directory" in capsys.readouterr().err
    grid = tmp_path / "grid"
    grid.mkdir()
    (grid / "fleet.json").write_text(json.dumps({"operators": [{"name": "olga"}],
                                                 "devices": [{"name": "pump", "kind": "load", "rated_kw": 30}]}))
    assert main(["rules", "audit", "--data", str(grid)]) == 0  # a grid without changes: that is the answer
    assert "no threshold changes recorded" in capsys.readouterr().out
    assert main(["rules", "audit", "--data", str(grid), "--device", "pmup"]) == 2
    assert "no device named 'pmup'" in capsys.readouterr().err


def test_a_change_already_reverted_or_changing_nothing_is_refused(tmp_path: Path) -> None:
    _rules, book, _engine, _adj = _valve(tmp_path)
    first = book.set("valve", "valve_open", "open_pct", 95.0, "alice", "by hand")
    back = book.revert(first.id, "alice")
    with pytest.raises(AdjustError, match=f"change {first.id} was already reverted by change {back.id}; "
                                          "valve_open.open_pct is 100"):
        book.revert(first.id, "bob")
    with pytest.raises(AdjustError, match="already 100; nothing changed"):
        book.set("valve", "valve_open", "open_pct", 100.0, "bob", "again")
    assert [c.id for c in book.audit] == [first.id, back.id]  # nothing recorded by the refusals
    assert book.revert(back.id, "alice").new == 95.0  # the revert itself can be undone


def test_readme_sample_trace_replays_as_written() -> None:
    readme = (ROOT / "README.md").read_text()
    (line,) = [ln for ln in readme.splitlines() if ln.startswith("gridpresence rules replay bots/")]
    argv = line.split("#", 1)[0].split()
    done = subprocess.run([str(Path(sys.executable).with_name("gridpresence")), *argv[1:]], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "load-2: high_loading (warning) 84 >= 80 [not_fault]" in done.stdout
    assert "load-2 high_loading.high_loading 80 -> 87 by system" in done.stdout
    assert "5 alarms, 1 threshold changes" in done.stdout


# -- issue 17: kinds, breaker trips, start-up transients, replay modes ------------------------

def _csv(rows: list[str], extra: str = "") -> str:
    head = "timestamp,device,state,load_pct,output_kw,fuel_pct,temperature_c,breaker" + extra
    return "\n".join([head, *rows]) + "\n"




def test_kinds_from_the_fleet_the_kind_column_or_the_devices_own_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Every row has a breaker value (loads report their contactor): that tells no breaker apart.
    rows = []
    for i in range(6):
        off = i in (2, 3)
        rows += [f"{i},pump,{'off' if off else 'on'},{0 if off else 60},,,,closed",
                 f"{i},fan,{'off' if off else 'on'},{0 if off else 50},,,,closed",
                 f"{i},main-breaker,on,{0 if i == 4 else 40},,,,{'tripped' if i == 4 else 'closed'}",
                 f"{i},gen,on,50,,80,90,closed"]
    trace = write(tmp_path, "t.csv", _csv(rows))
    assert main(["rules", "replay", str(trace), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert {d: k["kind"] for d, k in out["kinds"].items()} == {
        "pump": "load", "fan": "load", "main-breaker": "breaker", "gen": "generator"}
    assert [(a["device"], a["rule"]) for a in out["alarms"]] == [("main-breaker", "breaker_tripped")]
    # Where only one device reports breaker values, it is the breaker, whatever its name.
    lone = _csv(["0,pump,on,60,,,,", "0,feeder-7,on,0,,,,open"])
    assert main(["rules", "replay", str(write(tmp_path, "l.csv", lone)), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["kinds"]["feeder-7"]["kind"] == "breaker"
    # Every device reports breaker values, but one reported tripped: that one is a breaker.
    tripped = _csv(["0,pump,on,60,,,,closed", "0,feeder-7,on,40,,,,closed", "1,feeder-7,off,0,,,,tripped"])
    assert main(["rules", "replay", str(write(tmp_path, "t2.csv", tripped)), "--json"]) == 0
    kinds = json.loads(capsys.readouterr().out)["kinds"]
    assert (kinds["pump"]["kind"], kinds["feeder-7"]["kind"]) == ("load", "breaker")
    # A kind column wins over inference; a fleet file wins over both; the text output says which.
    col = _csv(["0,pump,on,60,,,,closed,breaker", "1,pump,off,0,,,,closed,breaker"], ",kind")
    assert main(["rules", "replay", str(write(tmp_path, "c.csv", col))]) == 0
    text = capsys.readouterr().out
    assert "pump: taken for a breaker (kind column)" in text and "breaker_tripped" in text
    fleet = write(tmp_path, "fleet.toml", '[[operators]]\nname = "a"\n[[devices]]\nname = "pump"\n'
                                          'kind = "load"\nrated_kw = 10\n')
    assert main(["rules", "replay", str(write(tmp_path, "c.csv", col)), "--fleet", str(fleet)]) == 0
    text = capsys.readouterr().out
    assert "pump: taken for a load (fleet file)" in text and "breaker_tripped" not in text


def test_a_breaker_that_opened_by_itself_is_a_trip_a_commanded_open_is_not(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["0,cb-1,on,40,,,,closed,", "1,cb-1,off,0,,,,open,",  # opened, nobody commanded it: a trip
            "2,cb-1,on,40,,,,closed,close", "3,cb-1,off,0,,,,open,open",  # commanded open: no alarm
            "4,cb-1,off,0,,,,open,", "5,cb-1,on,40,,,,closed,Closed", "6,cb-1,off,0,,,,open,"]  # a trip again
    trace = write(tmp_path, "t.csv", _csv(rows, ",command"))
    assert main(["rules", "replay", str(trace), "--json", "--adjust", "off"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(a["at"][-14:-6], a["rule"]) for a in out["alarms"]] == [
        ("00:00:01", "breaker_tripped"), ("00:00:06", "breaker_tripped")]
    # The column may also be called `commanded`; a bad value is a clear error naming it.
    assert main(["rules", "replay", str(write(tmp_path, "c.csv", _csv(rows, ",commanded"))), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["alarms"]) == 2
    assert main(["rules", "replay", str(write(tmp_path, "b.csv", _csv(["0,cb,on,1,,,,closed,shut"], ",command")))]) == 2
    assert "command" in capsys.readouterr().err


def _restart(ts: float, device: str, inrush: tuple[float, ...] = (104.0, 99.0)) -> list[Sample]:
    """Off for a minute, then on: the first samples read over the trip point, then it settles."""
    out = [sample(device, ts, DeviceState.OFF, load_pct=0.0)]
    out += [sample(device, ts + 10 * (k + 1), load_pct=v) for k, v in enumerate(inrush)]
    out += [sample(device, ts + 10 * (len(inrush) + 1 + k), load_pct=60.0) for k in range(3)]
    return out


def _drive(engine: Engine, adj: Adjuster, samples: list[Sample], verdict: bool | None,
           answer: bool = False) -> list[FaultEvent]:
    raised = []
    for s in samples:
        for ev in engine.feed(s):
            o = adj.event(ev)
            if ev.raised:
                raised.append(ev)
                if verdict is not None:
                    o = adj.verdict(ev.device, ev.rule, verdict) or o
            if answer and isinstance(o, Proposal):
                adj.confirm(o.id, "alice")
        adj.observe(s)
    return raised


def test_any_rule_learns_a_settling_time_from_start_up_transients_per_device() -> None:
    rules = default_rules()
    for mode, answer in ((AdjustMode.AUTO, False), (None, True)):  # auto, and hybrid with an operator accepting
        book = ThresholdBook(rules)
        engine, adj = Engine(rules, book), Adjuster(rules, book, mode=mode)
        for device in ("pump", "fan"):
            _drive(engine, adj, [sample(device, 0.0, load_pct=60.0)], None)
        t = 100.0
        # A restart whose inrush the operator judges "not a fault" (one is enough: Settle.min_false).
        assert [e.rule for e in _drive(engine, adj, _restart(t, "pump"), False, answer)] == ["trip_imminent"]
        t += 100
        learned = book("pump", "trip_imminent", "settle_s")
        assert learned == pytest.approx(20 * 1.5)  # cleared 20 s after the start, plus a half
        assert book("pump", "trip_imminent", "trip_imminent") is None  # transients do not move the threshold
        assert book("fan", "trip_imminent", "settle_s") is None  # its neighbour learned nothing
        # Next restart: no alarm; the neighbour's inrush still alarms; a real overload at steady state at once.
        assert _drive(engine, adj, _restart(t, "pump"), None) == []
        assert [e.rule for e in _drive(engine, adj, _restart(t, "fan"), None)] == ["trip_imminent"]
        (ev,) = _drive(engine, adj, [sample("pump", t + 200, load_pct=101.0)], None)
        assert ev.rule == "trip_imminent"


def test_settling_time_never_hides_a_fault_confirmed_after_a_start() -> None:
    rules = default_rules()
    book = ThresholdBook(rules)
    engine, adj = Engine(rules, book), Adjuster(rules, book, mode=AdjustMode.AUTO)
    _drive(engine, adj, [sample("pump", 0.0, load_pct=60.0)], None)
    # A real fault 20 s after a start, confirmed by the operator, then long transients judged not a fault.
    _drive(engine, adj, _restart(100.0, "pump", (60.0, 100.0, 60.0)), True)
    for t in (200.0, 300.0):
        _drive(engine, adj, _restart(t, "pump", (104.0, 104.0, 104.0, 104.0)), False)
    assert book("pump", "trip_imminent", "settle_s") == 10.0  # not 30 x 1.25: the fault confirmed 10 s in stays seen
    assert [e.rule for e in _drive(engine, adj, _restart(400.0, "pump", (60.0, 100.0, 60.0)), None)] == [
        "trip_imminent"]


def test_threshold_learning_is_per_device_and_never_passes_a_confirmed_fault() -> None:
    rules = default_rules()
    book = ThresholdBook(rules)
    engine, adj = Engine(rules, book), Adjuster(rules, book, mode=AdjustMode.AUTO)
    t = 0.0
    _drive(engine, adj, [sample("fan", t, load_pct=60.0)], None)
    _drive(engine, adj, [sample("biased", t, load_pct=89.0), sample("biased", t + 10, load_pct=70.0)], True)
    for v in (90.0, 91.0, 92.0):  # a biased sensor: judged not a fault each time
        t += 100
        _drive(engine, adj, [sample("biased", t, load_pct=v), sample("biased", t + 10, load_pct=70.0)], False)
    new = book("biased", "high_loading", "high_loading")
    assert new == 89.0  # the sensor's error says 80 + 11 + 2 = 93, but 89 % was a confirmed fault
    assert book("fan", "high_loading", "high_loading") is None  # the neighbour's threshold did not move
    assert [e.rule for e in _drive(engine, adj, [sample("fan", t + 200, load_pct=85.0)], None)] == ["high_loading"]


def test_hybrid_replay_says_proposals_wait_and_auto_reaches_every_rule(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = ["0,pump,on,60,,,,,"]
    t = 10
    for _ in range(4):  # restarts with inrush judged not a fault
        rows += [f"{t},pump,off,0,,,,,", f"{t + 10},pump,on,104,,,,,not_fault", f"{t + 20},pump,on,60,,,,,"]
        t += 100
    trace = write(tmp_path, "t.csv", _csv(rows, ",verdict"))
    assert main(["rules", "replay", str(trace)]) == 0
    text = capsys.readouterr().out
    assert "4 alarms" in text and "note: " in text and "nobody answers" in text and "--adjust auto" in text
    assert main(["rules", "replay", str(trace), "--adjust", "auto", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["alarms"]) == 1 and out["note"] is None  # the trip rule learned its settling time
    assert [(c["rule"], c["param"]) for c in out["threshold_changes"]] == [("trip_imminent", "settle_s")]


def test_replay_fuzz_malformed_traces_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Seeded, bounded: mutated traces (cells, columns, commands, kinds) end in a result or a clear error."""
    import random

    rng = random.Random(17)
    base = _csv(["0,cb-1,on,40,,,,closed,,", "1,cb-1,off,0,,,,open,open,breaker", "2,pump,on,96,,,,,,",
                 "3,gen,on,50,,10,110,,,"], ",command,kind").splitlines()
    junk = ["", "x", "-1", "1e999", "nan", "open", "close", "tripped", "breaker", "on", "\x00", "é" * 400, ",", '"']
    for _ in range(150):
        lines = list(base)
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            cells = lines[i].split(",")
            cells[rng.randrange(len(cells))] = rng.choice(junk)
            lines[i] = ",".join(cells)
        trace = write(tmp_path, "f.csv", "\n".join(lines) + "\n")
        code = main(["rules", "replay", str(trace), "--json"])
        captured = capsys.readouterr()
        assert code in (0, 2), captured
        if code == 2:
            assert captured.err.startswith("error: ") and "Traceback" not in captured.err
        else:
            json.loads(captured.out)
