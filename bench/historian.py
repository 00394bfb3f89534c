#!/usr/bin/env python3
"""The historian's store: recorder throughput and the query of a day of 1-minute data.

A fleet of --devices (1,000) reporting kw once a minute for --minutes (a day): each minute of the
fleet is one batch, written as the recorder writes it (raw rows, 1- and 15-minute aggregates and
an event, one transaction). Then each device's day is read back at 1-minute steps.

Baselines measured in the same run on the same store: for writes, the bare INSERT of the same
rows into a table with no index and no aggregates (what storing costs at the least); for reads,
the same 1-minute means computed from the raw samples at query time instead of read from the
aggregates.

    python bench/historian.py [--devices 1000] [--minutes 1440] [--backend sqlite|postgres|both] [--json]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pgserver import PgServer, pg_bindir  # noqa: E402

from gridpresence.services.historian.store import Event, HistoryStore, PostgresStore, Sample, SqliteStore  # noqa: E402

DAY0 = float(int(time.time()) // 86400 * 86400 - 3 * 86400)  # a whole UTC day, some days ago


def fleet_minute(devices: int, minute: int, rng: random.Random) -> list[Sample]:
    ts = DAY0 + 60 * minute + rng.random()
    return [Sample(f"dev-{d:04d}", ts, "kw", 50 + 40 * rng.random()) for d in range(devices)]


def bare_insert(store: HistoryStore, samples: list[Sample]) -> None:
    if isinstance(store, SqliteStore):
        db = store._db
        db.execute("BEGIN")
        db.executemany("INSERT INTO bare VALUES (?, ?, ?, ?)", [(s.device, s.ts, s.metric, s.value) for s in samples])
        db.execute("COMMIT")
    else:
        assert isinstance(store, PostgresStore)
        with store._db.transaction(), store._db.cursor() as cur, \
                cur.copy("COPY bare (device, ts, metric, value) FROM STDIN") as copy:
            for s in samples:
                copy.write_row((s.device, s.ts, s.metric, s.value))


def _raw_group(store: HistoryStore, device: str, start: float, end: float) -> list[Any]:
    if isinstance(store, SqliteStore):
        return store._db.execute("SELECT CAST(ts / 60 AS INTEGER) * 60 AS step, avg(value) FROM samples"
                                 " WHERE device = ? AND metric = 'kw' AND ts >= ? AND ts < ? GROUP BY step",
                                 (device, start, end)).fetchall()
    assert isinstance(store, PostgresStore)
    return store._rows("SELECT floor(ts / 60) * 60 AS step, avg(value) FROM samples WHERE device = %s"
                       " AND metric = 'kw' AND ts >= %s AND ts < %s GROUP BY step", (device, start, end))


def run(name: str, store: HistoryStore, devices: int, minutes: int, queries: int) -> dict[str, Any]:
    print(f"{name}: {devices} devices x {minutes} minutes = {devices * minutes:,} samples", flush=True)
    if isinstance(store, SqliteStore):
        store._db.execute("CREATE TABLE bare (device TEXT, ts REAL, metric TEXT, value REAL)")
    else:
        with store._db.transaction():
            store._db.execute("CREATE TABLE bare (device TEXT, ts DOUBLE PRECISION, metric TEXT,"
                              " value DOUBLE PRECISION)")
    rng = random.Random(7)
    write_s, bare_s = [], []
    t_all = time.perf_counter()
    for minute in range(minutes):
        batch = fleet_minute(devices, minute, rng)
        t = time.perf_counter()
        store.write(batch, [Event("dev-0000", batch[0].ts, "state", {"state": "on"})])
        write_s.append(time.perf_counter() - t)
        if minute % 10 == 0:  # the baseline on every tenth minute: enough samples, a tenth of the time
            t = time.perf_counter()
            bare_insert(store, batch)
            bare_s.append(time.perf_counter() - t)
    total = time.perf_counter() - t_all
    # The planner's statistics, as a running recorder has them (its hourly prune on SQLite,
    # autovacuum on PostgreSQL).
    if isinstance(store, SqliteStore):
        store._db.execute("ANALYZE")
    else:
        with store._db.transaction():
            store._db.execute("ANALYZE")
    w = summary("write one fleet-minute (recorder batch)", write_s)
    b = summary("baseline: bare INSERT of the same rows", bare_s)
    per_s = devices / (w["median_ms"] / 1000)
    print(f"  throughput {per_s:,.0f} samples/s stored (median batch); ratio to bare insert "
          f"{w['median_ms'] / b['median_ms']:.2f}x; loading took {total:.1f} s", flush=True)
    names = [f"dev-{d:04d}" for d in rng.sample(range(devices), min(queries, devices))]
    end = DAY0 + 60 * minutes
    agg_s, raw_s = [], []
    for dev in names:
        t = time.perf_counter()
        points = store.series(dev, "kw", DAY0, end, every_s=60)
        agg_s.append(time.perf_counter() - t)
        assert len(points) == minutes, (dev, len(points))
        t = time.perf_counter()
        rows = _raw_group(store, dev, DAY0, end)
        raw_s.append(time.perf_counter() - t)
        assert len(rows) == minutes
    q = summary("query a device's day at 1 minute (aggregates)", agg_s)
    r = summary("baseline: the same means from raw samples", raw_s)
    print(f"  a day of 1-minute data for all {devices} devices: ~{q['median_ms'] * devices / 1000:.2f} s "
          f"(median x devices); ratio to raw {q['median_ms'] / r['median_ms']:.2f}x", flush=True)
    return {"write": w, "bare_insert": b, "samples_per_s": per_s, "query_day_1m": q, "query_raw_baseline": r,
            "fleet_day_query_s": q["median_ms"] * devices / 1000}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, default=1000)
    ap.add_argument("--minutes", type=int, default=1440)
    ap.add_argument("--queries", type=int, default=200, help="devices whose day is read back")
    ap.add_argument("--backend", choices=["sqlite", "postgres", "both"], default="both")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="gp-bench-hist-") as tmp:
        if args.backend in ("sqlite", "both"):
            store = SqliteStore(Path(tmp) / "history.sqlite")
            try:
                results["sqlite"] = run("SQLite (WAL)", store, args.devices, args.minutes, args.queries)
                print(f"  file size {Path(tmp, 'history.sqlite').stat().st_size / 1e6:.0f} MB (with the baseline table)")
            finally:
                store.close()
    if args.backend in ("postgres", "both"):
        if pg_bindir() is None:
            print("PostgreSQL: skipped (server binaries not found: apt-get install postgresql)")
        else:
            server = PgServer(durable=True).start()
            try:
                pg = PostgresStore(server.url)
                try:
                    results["postgres"] = run("PostgreSQL" + (" + TimescaleDB" if pg.timescale else ""), pg,
                                              args.devices, args.minutes, args.queries)
                finally:
                    pg.close()
            finally:
                server.stop()
    if args.json:
        print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
