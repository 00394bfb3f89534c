"""The historian's store and recorder: aggregates, retention, crash safety, PostgreSQL, a live grid."""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openpyxl
import pytest
import pytest_asyncio

from conftest import until as shared_until
from gridpresence.protocol.models import Outcome, OutcomeStatus
from gridpresence.services.historian import Event, Historian, HistoryStore, Retention, Sample, open_store
from gridpresence.services.historian.store import SqliteStore, StoreError
from conftest import run_cli, running_grid
from gridpresence.cli import main
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator import ConnectionInfo, GridOperator
from pgserver import PgServer, pg_bindir
from timebase import NOW

# Instants: a whole hour two days before the suite's NOW (15-minute buckets line up with it).
T0 = float(int(NOW.timestamp()) // 3600 * 3600 - 2 * 86400)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    if pg_bindir() is None:
        pytest.skip("PostgreSQL server binaries not found: apt-get install postgresql")
    server = PgServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[HistoryStore]:
    if request.param == "sqlite":
        s: HistoryStore = open_store(tmp_path / "history.sqlite")
    else:
        server: PgServer = request.getfixturevalue("pg")
        s = open_store(server.url)
        with s._db.transaction():  # type: ignore[attr-defined]
            for table in ("samples", "aggregates", "events"):
                s._db.execute(f"TRUNCATE {table}")  # type: ignore[attr-defined]
    try:
        yield s
    finally:
        s.close()


def two_hours(device: str = "load-1") -> list[Sample]:
    """A sample every 10 s for two hours: kw climbs 0..719 (one step per sample)."""
    return [Sample(device, T0 + 10 * i, "kw", float(i)) for i in range(720)]


def test_raw_and_aggregates_agree(store: HistoryStore) -> None:
    samples = two_hours()
    for start in range(0, len(samples), 97):  # in uneven batches: buckets span batches
        store.write(samples[start:start + 97], [])
    raw = store.series("load-1", "kw", T0, T0 + 7200)
    assert [p.mean for p in raw] == [float(i) for i in range(720)]
    minute = store.series("load-1", "kw", T0, T0 + 7200, every_s=60)
    assert len(minute) == 120
    assert minute[0].ts == T0 and minute[0].count == 6 and minute[0].mean == 2.5  # mean of 0..5
    assert (minute[7].low, minute[7].high) == (42.0, 47.0)
    quarter = store.series("load-1", "kw", T0, T0 + 7200, every_s=900)
    assert [p.count for p in quarter] == [90] * 8 and quarter[1].mean == sum(range(90, 180)) / 90
    # 5 minutes from the 1-minute aggregates, 7 s from the raw samples: the same means as by hand.
    five = store.series("load-1", "kw", T0, T0 + 7200, every_s=300)
    assert len(five) == 24 and five[2].mean == sum(range(60, 90)) / 30
    odd = store.series("load-1", "kw", T0, T0 + 60, every_s=7)
    assert sum(p.count for p in odd) == 6
    assert store.metrics("load-1") == ["kw"] and store.devices() == ["load-1"]


def test_events_round_trip_and_filter(store: HistoryStore) -> None:
    store.write([], [Event("gen-1", T0 + 1, "state", {"state": "on", "was": "off"}),
                     Event("gen-1", T0 + 2, "alarm", {"id": "a1", "kind": "low-fuel", "level": "warning"}),
                     Event("gen-1", T0 + 3, "outcome", {"action": "stop", "status": "executed"}),
                     Event("load-1", T0 + 4, "health", {"health": "presence-error"})])
    events = store.events("gen-1", T0, T0 + 10)
    assert [e.kind for e in events] == ["state", "alarm", "outcome"]
    assert events[1].detail == {"id": "a1", "kind": "low-fuel", "level": "warning"}
    assert [e.kind for e in store.events("gen-1", T0, T0 + 10, kinds=["alarm"])] == ["alarm"]
    assert store.events("gen-1", T0 + 2.5, T0 + 10)[0].kind == "outcome"
    assert store.devices() == ["gen-1", "load-1"]


def test_retention_drops_raw_first_then_minutes(store: HistoryStore) -> None:
    store.write(two_hours(), [Event("load-1", T0, "state", {"state": "on"})])
    keep = Retention(raw_s=3600, minute_s=86400, quarter_s=None, events_s=None)
    removed = store.prune(T0 + 7200, keep)
    assert removed["samples"] == 360 and removed["aggregates_60"] == 0  # the first hour of raw is gone
    assert store.series("load-1", "kw", T0, T0 + 3600) == []
    assert len(store.series("load-1", "kw", T0, T0 + 3600, every_s=60)) == 60  # its minutes remain
    store.prune(T0 + 86400 + 3600, keep)
    assert len(store.series("load-1", "kw", T0, T0 + 7200, every_s=60)) == 60  # the first hour's minutes aged out
    assert len(store.series("load-1", "kw", T0, T0 + 7200, every_s=900)) == 8  # 15-minute ones are kept for ever
    assert len(store.events("load-1", T0, T0 + 1)) == 1


def test_a_failed_batch_is_kept_and_written_with_the_next(tmp_path: Path) -> None:
    store = open_store(tmp_path / "h.sqlite")
    rec = Historian(store, clock=lambda: T0)
    real_write = store.write
    calls = {"n": 0}

    def flaky(samples: list[Sample], events: list[Event]) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise sqlite3.OperationalError("disk I/O error")
        real_write(samples, events)

    store.write = flaky  # type: ignore[method-assign]

    async def go() -> None:
        rec.sample("load-1", T0, "kw", 1.0)
        with pytest.raises(sqlite3.OperationalError):
            await rec.flush()
        rec.sample("load-1", T0 + 1, "kw", 2.0)
        assert await rec.flush() == 2

    asyncio.run(go())
    assert [p.mean for p in store.series("load-1", "kw", T0, T0 + 10)] == [1.0, 2.0]
    store.close()


def test_an_outcome_reaching_the_recorder_twice_is_kept_once(tmp_path: Path) -> None:
    """The dashboard's own command and the device's copy to the recorders are one outcome."""
    store = open_store(tmp_path / "h.sqlite")
    rec = Historian(store, clock=lambda: T0)
    done = Outcome(command_id="c-1", device="load-1@localhost", status=OutcomeStatus.EXECUTED)
    rec.on_outcome("load-1", "shed", done)
    rec.on_outcome("load-1", "shed", done)
    rec.on_outcome("load-1", "restore", done.model_copy(update={"command_id": "c-2"}))
    asyncio.run(rec.flush())
    assert [e.detail["command_id"] for e in store.events("load-1", T0 - 1, T0 + 1)] == ["c-1", "c-2"]
    store.close()


def test_not_a_store_is_a_clear_error(tmp_path: Path) -> None:
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(StoreError, match="not a usable history store"):
        open_store(junk)
    with pytest.raises(StoreError, match="PostgreSQL"):
        open_store("postgresql://nobody@127.0.0.1:1/none?connect_timeout=2")


# -- crash safety -------------------------------------------------------------------------

WRITER = """
import sys, time
from gridpresence.services.historian.store import Sample, Event, open_store
store = open_store(sys.argv[1])
batch = int(sys.argv[2])
n = 0
while True:
    store.write([Sample("dev-%d" % (i % 50), 1e9 + n * batch + i, "kw", 1.0) for i in range(batch)],
                [Event("dev-0", 1e9 + n, "state", {"batch": n})])
    n += 1
    print(n, flush=True)
"""


def test_kill_9_mid_write_loses_at_most_the_batch_and_never_corrupts(tmp_path: Path) -> None:
    path = tmp_path / "crash.sqlite"
    batch = 2000
    for round_ in range(3):  # kill it at a different point of its batch each time
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(batch)], stdout=subprocess.PIPE,
                                text=True)
        assert proc.stdout is not None
        acknowledged = 0
        for line in proc.stdout:
            acknowledged = int(line)
            if acknowledged >= 5 + round_ * 3:
                break
        time.sleep(0.003 * (round_ + 1))  # mid-way through a later batch
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        proc.stdout.close()
        store = SqliteStore(path)  # reopening rolls back the torn transaction from the WAL
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        counts = store.counts()
        batches = counts["events"]
        assert counts["samples"] == batches * batch, "a batch was stored in part"
        aggregated = store._db.execute("SELECT sum(n) FROM aggregates WHERE res = 60").fetchone()[0]
        assert aggregated == counts["samples"], "raw samples and their aggregates disagree"
        store.close()
        assert batches >= acknowledged  # every batch the writer saw committed survived
        # (and the next round appends to the same file: a reopened store takes writes)


# -- the recorder on a real grid ------------------------------------------------------------

LIVE = {
    "domain": "localhost",
    "operators": [{"name": "olga"}],
    "devices": [
        {"name": "pump", "kind": "load", "rated_kw": 30, "utilisation": 0.92},  # high loading: an alarm
        {"name": "fan", "kind": "load", "rated_kw": 20},
        {"name": "diesel", "kind": "generator", "rated_kw": 60, "startup_s": 1},
    ],
}


@pytest_asyncio.fixture(scope="module")
async def live(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(LIVE), tmp_path_factory.mktemp("history-grid")) as grid:
        yield grid


async def until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """conftest's until, with the historian's batching (a batch a second) allowed for."""
    return await shared_until(check, timeout, what="the historian")


def stored_events(grid: Grid, device: str, kind: str) -> list[Event]:
    reader = open_store(grid.history_url)
    try:
        return reader.events(device, 0, time.time() + 60, kinds=[kind])
    finally:
        reader.close()


async def test_the_grid_records_telemetry_state_alarms_and_outcomes(live: Grid) -> None:
    info = ConnectionInfo.load(live.connection_file)
    assert info.history == str((live.data_dir / "history.sqlite").resolve())

    def pump_kw() -> list[Any]:
        reader = open_store(live.history_url)
        try:
            return reader.series("pump", "kw", 0, time.time() + 60)
        finally:
            reader.close()

    before = await until(pump_kw)
    assert all(p.mean > 20 for p in before), before  # 92 % of 30 kW
    alarms = await until(lambda: stored_events(live, "pump", "alarm"))
    assert alarms[0].detail["kind"] == "high-loading" and alarms[0].detail["status"] == "raised"

    async with GridOperator.from_connection(info) as olga:
        outcome = await olga.command("pump", "shed")
        assert outcome.ok, outcome
    states = await until(lambda: [e for e in stored_events(live, "pump", "state") if e.detail["state"] == "off"])
    assert states[-1].detail["was"] == "on"
    # An operator's own session (as the CLI's) issued it: the device sends the recorder a copy.
    issued = await until(lambda: [e for e in stored_events(live, "pump", "outcome")
                                  if e.detail.get("command_id") == outcome.command_id])
    assert issued[-1].detail["action"] == "shed" and issued[-1].detail["status"] == "executed", issued

    assert live.bots is not None and live.bots.console is not None
    answer = await live.bots.console.answer(live.fleet.jid("olga"), "read diesel")
    assert answer and "1 of 1 executed" in answer, answer
    outcomes = await until(lambda: stored_events(live, "diesel", "outcome"))
    assert outcomes[-1].detail["action"] == "read" and outcomes[-1].detail["status"] == "executed"
    health = stored_events(live, "fan", "health")
    assert health and health[0].detail["health"] == "ok"


async def test_history_exports_read_back(live: Grid, tmp_path: Path) -> None:
    await until(lambda: stored_events(live, "pump", "state"))
    conn = ["--connection", str(live.connection_file), "--from=-1h", "--to", "now"]
    code, out, err = await run_cli("history", "pump", "fan", "--every", "raw", "--csv", *conn)
    assert code == 0, err
    rows = list(csv.reader(io.StringIO(out)))
    assert rows[0][:3] == ["device", "time (UTC, ISO 8601)", "kw (kW)"] and "load_pct (%)" in rows[0]
    assert {r[0] for r in rows[1:]} == {"pump", "fan"}
    kw = rows[0].index("kw (kW)")
    pump = [r for r in rows[1:] if r[0] == "pump"]
    assert float(pump[0][kw]) > 20 and dt.datetime.fromisoformat(pump[0][1]).tzinfo is not None

    book_path = tmp_path / "h.xlsx"
    code, out, err = await run_cli("history", "pump", "fan", "diesel", "--every", "1m", "--xlsx", "--out",
                                   str(book_path), *conn)
    assert code == 0, err
    book = openpyxl.load_workbook(book_path)
    assert book.sheetnames == ["pump", "fan", "diesel"]
    sheet = book["pump"]
    assert sheet["A1"].value == "time (UTC)" and sheet["B1"].value == "kw (kW)"
    assert isinstance(sheet["A2"].value, dt.datetime) and sheet["B2"].value > 0
    assert len(sheet._charts) == 1  # the load profile

    code, out, err = await run_cli("history", "pump", "--json", "--every", "1m", *conn)
    assert code == 0, err
    data = json.loads(out)
    assert data["units"]["kw"] == "kW" and data["every_s"] == 60
    pump_json = data["devices"]["pump"]
    assert pump_json["columns"][:2] == ["time", "kw"] and pump_json["rows"]
    assert {"state", "alarm"} <= {e["event"] for e in pump_json["events"]}
    assert any(e["detail"].get("kind") == "high-loading" for e in pump_json["events"])


BAD_ARGS = [["--from", "yesterday"], ["--every", "0m"], ["--every", "1y"], ["--from", NOW.replace(tzinfo=None).isoformat()],
            ["--from", "now", "--to=-1h"], ["--xlsx"], ["nosuch-device"], ["--history", "/nonexistent/h.sqlite"]]


def test_history_refuses_bad_input_clearly(live: Grid, capsys: pytest.CaptureFixture[str]) -> None:
    rng = random.Random(18)
    cases = [*BAD_ARGS]
    for _ in range(40):  # seeded junk values in every option
        opt = rng.choice(["--from", "--to", "--every"])
        cases.append([f"{opt}=" + "".join(rng.choice("0123456789-:TZmhdx+ ") for _ in range(rng.randint(1, 12)))])
    for extra in cases:
        devices = [] if "nosuch-device" in extra else ["pump"]
        capsys.readouterr()
        try:
            code = main(["history", *devices, *extra, "--connection", str(live.connection_file)])
        except SystemExit as exc:  # argparse's own errors
            code = exc.code  # type: ignore[assignment]
        out, err = capsys.readouterr()
        if code == 0:  # a junk value that happens to be valid ("-3m", "12h"): still a good answer
            assert out.startswith("device,"), (extra, out)
            continue
        assert code == 2 and "Traceback" not in err and "error:" in err, (extra, err)
