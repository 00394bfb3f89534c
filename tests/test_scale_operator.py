"""The operator side at fleet size, on a synthetic fleet (`up --devices N`'s) and a real Prosody:
login sees every device, `status` summary / --filter / streamed --json, shed plans and batched
fan-out with progress, and the presence fan-out cut (health-only services get no telemetry-only
presence; operators get every change their client shows)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import random
import statistics
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio
from slixmpp import Presence

from conftest import run_cli, running_grid, start_up, until
from gridpresence.cli import build_parser
from gridpresence.config import FleetError, fleet_toml, parse_fleet, synthetic_fleet, synthetic_fleet_data
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.operator.selection import DeviceFilter, FilterError, FleetSummary, parse_term
from gridpresence.operator.shedding import shed_to_target
from gridpresence.protocol import Action, DeviceKind, DeviceState, OutcomeStatus
from gridpresence.protocol.codec import q, report_from_xml

DEVICES = 120  # three substations: masters, breakers, branch meters, loads, generators


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    fleet = synthetic_fleet(DEVICES, seed=7, refresh_s=300)  # refreshes out of the way of the counts
    async with running_grid(fleet, tmp_path_factory.mktemp("scale-op"),
                            only=[d.name for d in fleet.devices] + ["watchdog"]) as g:
        yield g


@pytest_asyncio.fixture
async def op(grid: Grid) -> AsyncIterator[GridOperator]:
    o = GridOperator.from_connection(grid.connection, resource=f"scale-{random.randrange(1 << 30)}")
    await o.connect(settle_s=20)
    try:
        yield o
    finally:
        await o.close()


def _conn(grid: Grid) -> list[str]:
    return ["--connection", str(grid.connection_file), "--settle", "20"]


async def test_operator_login_sees_every_device_with_state(op: GridOperator, grid: Grid) -> None:
    assert len(op.devices) == DEVICES
    missing = [v.name for v in op.devices.values() if not v.present or v.state is None]
    assert not missing, f"not seen with state after login: {missing[:5]}"
    assert op.tracker.present_count == DEVICES  # what connect's settling counts on, kept per change


async def test_status_summary_filter_and_streamed_json(grid: Grid) -> None:
    fleet = grid.fleet
    kinds = Counter(d.kind.value for d in fleet.devices)
    code, out, err = await run_cli("status", "--summary", *_conn(grid))
    assert code == 0, err
    line = out.splitlines()[0]
    assert line.startswith(f"{DEVICES} devices ({DEVICES} present): ")
    for kind, n in kinds.items():
        assert f"{n} {kind}" in line, line

    code, out, err = await run_cli("status", "--json", "--filter", "kind=load", "critical=no", *_conn(grid))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == '{"devices": [' and lines[-1].startswith("], ")
    per_line = [json.loads(x.rstrip(",")) for x in lines[1:-1]]  # one device a line: a reader may stream
    data = json.loads(out)  # and still one JSON document, as --json always was
    assert data["devices"] == per_line
    want = sorted(d.name for d in fleet.devices if d.kind is DeviceKind.LOAD and not d.critical)
    assert [d["name"] for d in data["devices"]] == want
    assert data["summary"]["devices"] == len(want) and data["summary"]["by_kind"] == {"load": len(want)}

    # Names as globs, alternatives by comma; the table ends with the summary line.
    code, out, err = await run_cli("status", "--filter", "name=s002-*", "kind=generator,breaker", *_conn(grid))
    assert code == 0, err
    want = sorted(d.name for d in fleet.devices if d.name.startswith("s002-")
                  and d.kind in (DeviceKind.GENERATOR, DeviceKind.BREAKER))
    rows = out.split("\n\n")[0].splitlines()[1:]
    assert [r.split()[0] for r in rows] == want
    assert f"{len(want)} devices ({len(want)} present)" in out and "(filter: name=s002-* kind=breaker,generator)" in out


async def test_bad_filter_is_a_clear_error(grid: Grid) -> None:
    code, out, err = await run_cli("status", "--filter", "kind=lod", *_conn(grid))
    assert code == 2 and out == ""
    assert "argument --filter: filter 'kind=lod': kind 'lod' is not one of load, generator" in err
    code, _, err = await run_cli("status", "--filter", "colour=red", *_conn(grid))
    assert code == 2 and "unknown key 'colour'; keys: name, kind, state" in err
    code, _, err = await run_cli("shed", "--filter", "name=nothing-*", *_conn(grid))
    assert code == 2 and "no device matches the filter name=nothing-*" in err


async def test_batched_fan_out_reports_progress_and_every_outcome(grid: Grid, op: GridOperator) -> None:
    loads = sorted(v.name for v in op.devices.values() if v.kind is DeviceKind.LOAD and not v.report.critical)
    assert len(loads) >= 80
    try:
        code, out, err = await run_cli("shed", "--filter", "kind=load", "critical=no", "--json", *_conn(grid))
        assert code == 0, err
        outcomes = json.loads(out)  # progress went to stderr: stdout is still the JSON
        assert sorted(o["name"] for o in outcomes) == loads
        assert all(o["status"] == "executed" for o in outcomes)
        progress = [line for line in err.splitlines() if line.startswith("shed: ")]
        assert progress[-1] == f"shed: {len(loads)}/{len(loads)} outcomes back"
        assert len(progress) >= 10  # every tenth
        await op.wait_for(lambda d: all(d[n].state is DeviceState.OFF for n in loads), timeout=10)
    finally:
        back = await op.command_many(loads, Action.RESTORE)
    assert all(o.status is OutcomeStatus.EXECUTED for o in back.values())


async def test_shed_plan_over_the_fleet_in_rounds(op: GridOperator) -> None:
    from gridpresence.operator.shedding import net_load_kw

    await op.wait_for(lambda d: all(v.state is DeviceState.ON for v in d.values() if v.kind is DeviceKind.LOAD),
                      timeout=10)
    net = net_load_kw(op.devices)
    seen: list[tuple[int, int]] = []
    target = net / 2
    report = await shed_to_target(op, target, None, progress=lambda done, total: seen.append((done, total)))
    try:
        shed = [a["device"] for a in report["actions"] if a["action"] == "shed"]  # type: ignore[index, union-attr]
        assert report["met"] and report["net_kw_after"] <= target  # type: ignore[operator]
        assert len(shed) > 10 and seen[-1] == (len(shed), len(shed))  # one round: every load obeyed
        critical = {v.name for v in op.devices.values() if v.report and v.report.critical}
        assert not critical & set(shed) and critical <= set(report["skipped"])  # type: ignore[arg-type]
    finally:
        await op.command_many(shed, Action.RESTORE)


async def test_health_only_services_get_no_telemetry_only_presence(grid: Grid, op: GridOperator) -> None:
    assert grid.bots is not None and grid.bots.watchdog is not None
    name = next(d.name for d in grid.fleet.devices if d.kind is DeviceKind.LOAD and d.parent and not d.critical)
    agent = grid.bots.devices[name]
    jid = grid.fleet.jid(name)
    got: dict[str, list[str]] = {"watchdog": [], "operator": []}

    def counter(who: str):  # type: ignore[no-untyped-def]
        def on(pres: Presence) -> None:
            el = pres.xml.find(q("device"))
            if pres["from"].bare == jid and el is not None:
                got[who].append(report_from_xml(el).status_text())
        return on

    wd, oc = counter("watchdog"), counter("operator")
    grid.bots.watchdog.client.add_event_handler("presence", wd)
    op.client.add_event_handler("presence", oc)
    try:
        told: list[str] = []
        for level in (0.25, 0.9, 0.3):  # three readings, each past the deadband, no state change
            agent.sim.utilisation = level
            report = agent.publish(force=False)
            assert report is not None
            told.append(report.status_text())
        await until(lambda: got["operator"][-3:] == told, what="the operator to see every reading")
        await asyncio.sleep(0.3)
        assert got["watchdog"] == []  # the watchdog needs health only
        # The operator's view, as its client shows it, is the last reading.
        assert op.device(name).report.status_text() == told[-1]  # type: ignore[union-attr]
        # A state change is health: everyone gets it.
        out = await op.command(name, Action.SHED)
        assert out.status is OutcomeStatus.EXECUTED
        await until(lambda: any(t.startswith("off") for t in got["watchdog"]), what="the watchdog to see the shed")
        await until(lambda: any(t.startswith("off") for t in got["operator"]), what="the operator to see the shed")
    finally:
        grid.bots.watchdog.client.del_event_handler("presence", wd)
        op.client.del_event_handler("presence", oc)
        await op.command(name, Action.RESTORE)
    # An operator logging in after a telemetry-only change sees the reading, not the older broadcast.
    await op.wait_for(lambda d: d[name].state is DeviceState.ON, timeout=5)
    agent.sim.utilisation = 0.95 if (agent.sim.utilisation < 0.6) else 0.2
    fresh = agent.publish(force=False)
    assert fresh is not None and agent._published is fresh and agent._broadcast is not fresh  # directed only
    late = GridOperator.from_connection(grid.connection, resource="late")
    await late.connect(settle_s=20)
    try:
        await late.wait_for(lambda d: d[name].report is not None
                            and d[name].report.status_text() == fresh.status_text(), timeout=5)
    finally:
        await late.close()


def test_fuzz_filters_and_fleet_arguments() -> None:
    """Seeded and bounded: any filter text is parsed or refused with FilterError; any argument
    list of the new options parses or is an argparse usage error (exit 2), never a traceback."""
    rng = random.Random(16)
    alphabet = "kindstateloadgeneratornamehealthpresentyes=,*-?[]!é \x00"
    keys = ["kind", "state", "name", "health", "transport", "critical", "present", "bad", ""]
    for _ in range(2000):
        if rng.random() < 0.5:
            text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
        else:
            text = f"{rng.choice(keys)}={','.join(rng.choice(['load', 'on', 'off', 'yes', 's0*', '', 'x']) for _ in range(rng.randrange(1, 4)))}"
        try:
            key, values = parse_term(text)
        except FilterError as exc:
            assert str(exc).startswith("filter ") or "at most" in str(exc)
        else:
            assert key in ("name", "kind", "state", "health", "transport", "critical", "present") and values
            DeviceFilter.parse([text])
    parser = build_parser()
    words = ["status", "shed", "watch", "fleet", "generate", "up", "--filter", "--devices", "--seed", "--refresh",
             "--summary", "--json", "kind=load", "state=on", "kind=x", "0", "7", "-1", "1e9", "nan", "abc", "100001"]
    for _ in range(400):
        argv = [rng.choice(words) for _ in range(rng.randrange(1, 6))]
        try:
            parser.parse_args(argv)
        except SystemExit as exc:
            assert exc.code == 2, argv
    for n in (1, 2, 3, 11, 49, 50, 51, rng.randrange(52, 400)):
        data = synthetic_fleet_data(n, seed=n)
        fleet = parse_fleet(__import__("tomllib").loads(fleet_toml(data)))
        assert len(fleet.devices) == n and fleet == synthetic_fleet(n, seed=n)
    for bad in (0, -1, 100_001):
        with pytest.raises(FleetError, match="a synthetic fleet has 1 to"):
            synthetic_fleet(bad)


def test_a_synthetic_fleet_starts_within_its_ratings() -> None:
    """Each branch meter and master is rated for the loads under it: a new fleet starts at about
    START_LOADING of its ratings, below the branch's "near its limit" advice, not in an alarm storm."""
    from gridpresence.config import START_LOADING
    from gridpresence.rules.settings import AlarmSettings

    rng = random.Random(1618)
    for n in (50, 51, 120, rng.randrange(200, 3000)):
        fleet = synthetic_fleet(n, seed=rng.randrange(1000))
        by_name = {d.name: d for d in fleet.devices}
        draw: Counter[str] = Counter()
        for d in fleet.devices:
            if d.kind is DeviceKind.LOAD and d.parent is not None:
                draw[d.parent] += d.rated_kw * d.utilisation
                draw[by_name[d.parent].parent or ""] += d.rated_kw * d.utilisation
        rated = {name: kw / by_name[name].rated_kw for name, kw in draw.items() if name}
        assert rated and max(rated.values()) <= START_LOADING + 1e-9, (n, max(rated.values()))
        assert START_LOADING * 100 < AlarmSettings().high_loading_pct
        assert {by_name[name].kind for name in rated} == {DeviceKind.METER, DeviceKind.MASTER}


def test_a_large_synthetic_fleet_is_sampled_less_often_and_drifts_as_fast() -> None:
    """Past SAMPLES_PER_S devices a synthetic fleet's devices sample every devices / SAMPLES_PER_S
    seconds (10,000: 4 s), so a host runs about as many device passes a second as at 2,500; a
    fleet file may set ``sample_s`` itself, and a bad one is refused. The physics' drift per
    second does not depend on the interval (a walk's step grows with the root of the time)."""
    from gridpresence.config import SAMPLES_PER_S
    from gridpresence.physics import make_device
    from timebase import NOW

    assert {d.sample_s for d in synthetic_fleet(SAMPLES_PER_S).devices} == {None}
    assert {d.sample_s for d in synthetic_fleet(10_000).devices} == {4.0}
    assert {d.sample_s for d in synthetic_fleet(10_000, refresh_s=2.0).devices} == {2.0}  # never past the refresh
    data = synthetic_fleet_data(10_000)
    assert parse_fleet(__import__("tomllib").loads(fleet_toml(data))) == synthetic_fleet(10_000)
    one = {"domain": "localhost", "operators": [{"name": "alice"}],
           "devices": [{"name": "l-1", "kind": "load", "rated_kw": 10}]}
    assert parse_fleet({**one, "devices": [{**one["devices"][0], "sample_s": 2.5}]}).devices[0].sample_s == 2.5
    for bad in (0, -1, 0.01, 4000, float("nan"), "soon", 61):  # (61: longer than its refresh of 60 s)
        with pytest.raises(FleetError, match="sample_s"):
            parse_fleet({**one, "devices": [{**one["devices"][0], "sample_s": bad}]})
    # Past 25,000 devices the interval stays at 10 s, the longest that readings drift as fast at.
    assert {d["sample_s"] for d in synthetic_fleet_data(30_000)["devices"]} == {10.0}
    # Drift: the spread of a load's reading after 40 s, sampled every 1 s and every 4 s, seeded.
    start = NOW
    spread: dict[float, float] = {}
    for every in (1.0, 4.0):
        moves = []
        for seed in range(300):
            spec = parse_fleet({**one, "devices": [{**one["devices"][0], "utilisation": 0.6}]}).devices[0]
            sim = make_device(spec, start, random.Random(seed))
            for k in range(1, int(40 / every) + 1):
                sim.tick(start + dt.timedelta(seconds=k * every))
            moves.append(sim.utilisation - 0.6)  # type: ignore[attr-defined]
        spread[every] = statistics.pstdev(moves)
    assert 0.75 <= spread[4.0] / spread[1.0] <= 1.33, spread  # (linear steps: 2x)


def test_summary_counts_a_known_fleet() -> None:
    fleet = synthetic_fleet(1000)
    kinds = Counter(d.kind.value for d in fleet.devices)
    assert kinds == {"load": 820, "generator": 80, "meter": 60, "master": 20, "breaker": 20}
    assert FleetSummary.of([]).as_dict() == {"devices": 0, "present": 0, "by_kind": {}, "by_state": {}}
    assert isinstance(build_parser().parse_args(["up", "--devices", "10"]), argparse.Namespace)


async def test_up_devices_provisions_a_synthetic_fleet(tmp_path: Path) -> None:
    from gridpresence.config import load_fleet
    from gridpresence.host.grid import FLEET_COPY

    code, out, err = await run_cli("up", "--devices", "30", "--seed", "3", "--provision-only", "--data", str(tmp_path))
    assert code == 0, err
    fleet = load_fleet(tmp_path / FLEET_COPY)
    assert fleet == synthetic_fleet(30, seed=3)
    assert [d.name for d in fleet.devices][:3] == ["s001-master", "s001-breaker", "s001-branch-01"]
    code, _, err = await run_cli("up", "--devices", "30", "--fleet", "x.toml", "--provision-only", "--data", str(tmp_path))
    assert code == 2 and "give --fleet FILE or --devices N, not both" in err
    for shape in (["--hosting", "component"], ["--seed", "4"], ["--refresh", "30", "--hosting", "c2s"]):
        code, _, err = await run_cli("up", *shape, "--provision-only", "--data", str(tmp_path / "plain"))
        assert code == 2 and "a synthetic fleet: give" in err and "with --devices N" in err, (shape, err)
        assert not (tmp_path / "plain").exists()  # refused before anything was written
    code, out, err = await run_cli("fleet", "generate", "12", "--out", str(tmp_path / "f.toml"))
    assert code == 0 and parse_fleet(__import__("tomllib").loads((tmp_path / "f.toml").read_text())) == synthetic_fleet(12)


async def test_up_devices_hosted_on_the_component_are_seen_by_an_operator(tmp_path: Path) -> None:
    """`up --devices N --hosting component`: the synthetic fleet's devices are hosted on the
    server's component (NAME@devices.localhost, no account of their own) and an operator logging
    in sees every one of them present, over the component, and commands one."""
    import signal

    from gridpresence.config import load_fleet
    from gridpresence.host.grid import FLEET_COPY
    from gridpresence.xmpp.session import ConnectionInfo

    n, data = 40, tmp_path / "grid"
    proc, _ = await start_up(data, None, "--devices", str(n), "--hosting", "component", timeout=120,
                             stderr=asyncio.subprocess.DEVNULL)
    try:
        fleet = load_fleet(data / FLEET_COPY)
        assert fleet.hosting == "component" and fleet.jid("s001-load-001") == "s001-load-001@devices.localhost"
        async with GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"),
                                                resource="hosted-synthetic") as op:
            await op.wait_for(lambda d: len(d) == n and all(v.present for v in d.values()), timeout=60)
            assert {v.transport for v in op.devices.values()} == {"component"}
            conn = ["--connection", str(data / "connection.json")]
            code, out, err = await run_cli("status", *conn, "--json", "--filter", "transport=component")
            assert code == 0, err
            assert len(json.loads(out)["devices"]) == n  # the hosted devices, selected by how they connect
            code, out, err = await run_cli("status", *conn, "--json", "--filter", "transport=tcp,bosh")
            assert code == 0 and json.loads(out)["devices"] == [], err
            load = next(v for name, v in op.devices.items()
                        if "-load-" in name and v.report is not None and not v.report.critical)
            outcome = await op.command(load.name, Action.SHED, ttl_s=15)
            assert outcome.status is OutcomeStatus.EXECUTED, outcome
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


def test_up_devices_past_a_thousand_on_c2s_says_what_hosting_component_is_for(capsys: pytest.CaptureFixture[str]) -> None:
    from gridpresence.cli.up import C2S_ADVICE_ABOVE, _fleet_of

    parser = build_parser()
    for argv, noted in ((["--devices", str(C2S_ADVICE_ABOVE + 1)], True),
                        (["--devices", str(C2S_ADVICE_ABOVE + 1), "--hosting", "component"], False),
                        (["--devices", str(C2S_ADVICE_ABOVE + 1), "--hosting", "c2s"], False),  # asked for
                        (["--devices", str(C2S_ADVICE_ABOVE)], False)):
        fleet = _fleet_of(parser.parse_args(["up", *argv]))
        assert len(fleet.devices) == int(argv[1])
        err = capsys.readouterr().err
        assert ("--hosting component hosts them all on one connection" in err) is noted, (argv, err)
