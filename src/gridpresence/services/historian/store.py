"""Where the historian keeps the grid's past: one interface, two backends.

Samples (a device's numeric telemetry at an instant) are kept raw for days and folded, in the
same transaction that stores them, into 1-minute and 15-minute aggregates (count, sum, min, max,
last) kept for months and years: a crash loses the batch being written, never leaves raw and
aggregates disagreeing. Events (state and health changes, alarms, command outcomes) are kept as
JSON with their instant. Instants are Unix seconds (UTC) in the store, datetimes at the API.

``open_store("path/history.sqlite")`` is the embedded default (SQLite, WAL);
``open_store("postgresql://…")`` is the same recorder on PostgreSQL (psycopg).
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Telemetry fields the historian keeps, with their unit (the export's headers name them).
METRIC_UNITS: dict[str, str] = {
    "kw": "kW",
    "load_pct": "%",
    "capacity_kw": "kW",
    "fuel_pct": "%",
    "temperature_c": "°C",
    "energy_kwh": "kWh",
}
RESOLUTIONS = (60, 900)  # seconds: the 1-minute and 15-minute aggregates
EVENT_KINDS = ("state", "health", "alarm", "outcome")


class StoreError(Exception):
    """The history store cannot be opened or read (a message for the person at the terminal)."""


@dataclass(frozen=True)
class Retention:
    """How long each resolution is kept, in seconds (None: for ever)."""

    raw_s: float = 7 * 86400
    minute_s: float = 90 * 86400
    quarter_s: float | None = 5 * 365 * 86400
    events_s: float | None = 365 * 86400


@dataclass(frozen=True)
class Sample:
    device: str
    ts: float  # Unix seconds
    metric: str
    value: float


@dataclass(frozen=True)
class Event:
    device: str
    ts: float
    kind: str  # one of EVENT_KINDS
    detail: dict[str, Any]


@dataclass(frozen=True)
class Point:
    """One step of a series: the mean over the step (the sample itself when raw), its extremes."""

    ts: float
    mean: float
    low: float
    high: float
    count: int


def epoch(when: dt.datetime) -> float:
    if when.tzinfo is None:
        raise ValueError("instants must carry a time zone")
    return when.timestamp()


def instant(ts: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.timezone.utc)


def _buckets(samples: Sequence[Sample], res: int) -> list[tuple[Any, ...]]:
    """Fold a batch into (res, device, metric, bucket) rows: n, sum, min, max, last and its instant."""
    acc: dict[tuple[str, str, int], list[float]] = {}
    for s in samples:
        key = (s.device, s.metric, int(s.ts // res) * res)
        row = acc.get(key)
        if row is None:
            acc[key] = [1, s.value, s.value, s.value, s.value, s.ts]
        else:
            row[0] += 1
            row[1] += s.value
            row[2] = min(row[2], s.value)
            row[3] = max(row[3], s.value)
            if s.ts >= row[5]:
                row[4], row[5] = s.value, s.ts
    return [(res, d, m, b, int(r[0]), r[1], r[2], r[3], r[4], r[5]) for (d, m, b), r in acc.items()]


class HistoryStore(ABC):
    """The historian's storage. Thread-safe: the recorder writes from a worker thread."""

    url: str

    @abstractmethod
    def write(self, samples: Sequence[Sample], events: Sequence[Event]) -> None:
        """Store one batch atomically (raw, aggregates and events in one transaction)."""

    @abstractmethod
    def prune(self, now: float, retention: Retention) -> dict[str, int]:
        """Drop what is past its retention; rows removed per table."""

    @abstractmethod
    def series(self, device: str, metric: str, start: float, end: float, every_s: int = 0) -> list[Point]:
        """`metric` of `device` in [start, end): raw samples (every_s=0) or means over steps of every_s."""

    @abstractmethod
    def events(self, device: str, start: float, end: float, kinds: Iterable[str] = EVENT_KINDS) -> list[Event]:
        """The device's events in [start, end), oldest first."""

    @abstractmethod
    def devices(self) -> list[str]:
        """Every device with anything stored."""

    @abstractmethod
    def metrics(self, device: str) -> list[str]:
        """The metrics stored for `device` (at any resolution)."""

    @abstractmethod
    def close(self) -> None: ...

    @staticmethod
    def source_for(every_s: int) -> int:
        """The coarsest stored resolution that divides the step: 0 (raw), 60 or 900."""
        for res in reversed(RESOLUTIONS):
            if every_s >= res and every_s % res == 0:
                return res
        return 0


def _points(rows: Iterable[Sequence[Any]]) -> list[Point]:
    return [Point(ts=float(r[0]), mean=float(r[1]) / int(r[4]), low=float(r[2]), high=float(r[3]), count=int(r[4]))
            for r in rows]


class SqliteStore(HistoryStore):
    """The embedded default: one SQLite file in WAL mode (readers never block the recorder, and a
    crash mid-transaction is rolled back on the next open)."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS samples (device TEXT NOT NULL, ts REAL NOT NULL, metric TEXT NOT NULL,
                                        value REAL NOT NULL);
    CREATE INDEX IF NOT EXISTS samples_by_series ON samples (device, metric, ts);
    CREATE INDEX IF NOT EXISTS samples_by_ts ON samples (ts);
    CREATE TABLE IF NOT EXISTS aggregates (res INTEGER NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
                                           bucket INTEGER NOT NULL, n INTEGER NOT NULL, total REAL NOT NULL,
                                           low REAL NOT NULL, high REAL NOT NULL, last REAL NOT NULL,
                                           last_ts REAL NOT NULL, PRIMARY KEY (res, device, metric, bucket))
                                           WITHOUT ROWID;
    CREATE TABLE IF NOT EXISTS events (device TEXT NOT NULL, ts REAL NOT NULL, kind TEXT NOT NULL,
                                       detail TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS events_by_device ON events (device, ts);
    """
    UPSERT = """
    INSERT INTO aggregates VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT (res, device, metric, bucket) DO UPDATE SET
        n = n + excluded.n, total = total + excluded.total, low = min(low, excluded.low),
        high = max(high, excluded.high),
        last = CASE WHEN excluded.last_ts >= last_ts THEN excluded.last ELSE last END,
        last_ts = max(last_ts, excluded.last_ts)
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.url = str(self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL: a power cut may lose the last commits, never consistency; kill -9 loses nothing committed.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=5000")
            # 64 MiB of page cache (the default is 2 MiB): the series indexes of a thousand devices
            # are written all over at every batch, and page misses made a batch 30x a bare insert.
            self._db.execute("PRAGMA cache_size=-65536")
            self._db.executescript(self.SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{self.path}: not a usable history store: {exc}") from None
        self._lock = threading.Lock()

    def write(self, samples: Sequence[Sample], events: Sequence[Event]) -> None:
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                db.executemany("INSERT INTO samples VALUES (?, ?, ?, ?)",
                               [(s.device, s.ts, s.metric, s.value) for s in samples])
                for res in RESOLUTIONS:
                    db.executemany(self.UPSERT, _buckets(samples, res))
                db.executemany("INSERT INTO events VALUES (?, ?, ?, ?)",
                               [(e.device, e.ts, e.kind, json.dumps(e.detail, sort_keys=True)) for e in events])
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

    def prune(self, now: float, retention: Retention) -> dict[str, int]:
        removed: dict[str, int] = {}
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                removed["samples"] = db.execute("DELETE FROM samples WHERE ts < ?", (now - retention.raw_s,)).rowcount
                removed["aggregates_60"] = db.execute("DELETE FROM aggregates WHERE res = 60 AND bucket < ?",
                                                      (now - retention.minute_s,)).rowcount
                removed["aggregates_900"] = (db.execute("DELETE FROM aggregates WHERE res = 900 AND bucket < ?",
                                                        (now - retention.quarter_s,)).rowcount
                                             if retention.quarter_s is not None else 0)
                removed["events"] = (db.execute("DELETE FROM events WHERE ts < ?", (now - retention.events_s,)).rowcount
                                     if retention.events_s is not None else 0)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            # Refresh the planner's statistics now and then, as SQLite advises (PostgreSQL's
            # autovacuum does the same there): without them a series query may not use its index.
            db.execute("PRAGMA optimize")
        return removed

    def series(self, device: str, metric: str, start: float, end: float, every_s: int = 0) -> list[Point]:
        with self._lock:
            if every_s <= 0:
                rows = self._db.execute("SELECT ts, value, value, value, 1 FROM samples WHERE device = ? AND metric = ?"
                                        " AND ts >= ? AND ts < ? ORDER BY ts", (device, metric, start, end))
                return _points(rows)
            source = self.source_for(every_s)
            if source == 0:
                rows = self._db.execute(
                    "SELECT CAST(ts / ?1 AS INTEGER) * ?1 AS step, sum(value), min(value), max(value), count(*)"
                    " FROM samples WHERE device = ?2 AND metric = ?3 AND ts >= ?4 AND ts < ?5"
                    " GROUP BY step ORDER BY step", (every_s, device, metric, start, end))
            else:
                rows = self._db.execute(
                    "SELECT (bucket / ?1) * ?1 AS step, sum(total), min(low), max(high), sum(n) FROM aggregates"
                    " WHERE res = ?2 AND device = ?3 AND metric = ?4 AND bucket >= ?5 AND bucket < ?6"
                    " GROUP BY step ORDER BY step", (every_s, source, device, metric, start, end))
            return _points(rows)

    def events(self, device: str, start: float, end: float, kinds: Iterable[str] = EVENT_KINDS) -> list[Event]:
        wanted = list(kinds)
        marks = ",".join("?" * len(wanted))
        with self._lock:
            rows = self._db.execute(f"SELECT device, ts, kind, detail FROM events WHERE device = ? AND ts >= ? AND ts < ?"
                                    f" AND kind IN ({marks}) ORDER BY ts", (device, start, end, *wanted)).fetchall()
        return [Event(r[0], r[1], r[2], json.loads(r[3])) for r in rows]

    def devices(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT device FROM aggregates UNION SELECT DISTINCT device FROM events"
                                    " ORDER BY 1").fetchall()
        return [r[0] for r in rows]

    def metrics(self, device: str) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT metric FROM aggregates WHERE device = ? ORDER BY 1",
                                    (device,)).fetchall()
        return [r[0] for r in rows]

    def counts(self) -> dict[str, int]:
        """Rows per table (tests and the benchmark read it)."""
        with self._lock:
            return {t: self._db.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                    for t in ("samples", "aggregates", "events")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


class PostgresStore(HistoryStore):
    """The same store on PostgreSQL (for fleets that outgrow one file). Uses TimescaleDB's
    hypertables for the raw samples where that extension is installed."""

    SCHEMA = """
    CREATE TABLE IF NOT EXISTS samples (device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, metric TEXT NOT NULL,
                                        value DOUBLE PRECISION NOT NULL);
    CREATE INDEX IF NOT EXISTS samples_by_series ON samples (device, metric, ts);
    CREATE INDEX IF NOT EXISTS samples_by_ts ON samples (ts);
    CREATE TABLE IF NOT EXISTS aggregates (res INTEGER NOT NULL, device TEXT NOT NULL, metric TEXT NOT NULL,
                                           bucket BIGINT NOT NULL, n BIGINT NOT NULL, total DOUBLE PRECISION NOT NULL,
                                           low DOUBLE PRECISION NOT NULL, high DOUBLE PRECISION NOT NULL,
                                           last DOUBLE PRECISION NOT NULL, last_ts DOUBLE PRECISION NOT NULL,
                                           PRIMARY KEY (res, device, metric, bucket));
    CREATE TABLE IF NOT EXISTS events (device TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL,
                                       detail JSONB NOT NULL);
    CREATE INDEX IF NOT EXISTS events_by_device ON events (device, ts);
    """
    # A batch's aggregate rows are copied into a temporary table and merged in one statement:
    # one round trip, where an INSERT per row costs one each.
    STAGE = """
    CREATE TEMP TABLE IF NOT EXISTS aggregates_in (res INTEGER, device TEXT, metric TEXT, bucket BIGINT, n BIGINT,
        total DOUBLE PRECISION, low DOUBLE PRECISION, high DOUBLE PRECISION, last DOUBLE PRECISION,
        last_ts DOUBLE PRECISION) ON COMMIT DELETE ROWS
    """
    MERGE = """
    INSERT INTO aggregates AS a SELECT * FROM aggregates_in
    ON CONFLICT (res, device, metric, bucket) DO UPDATE SET
        n = a.n + excluded.n, total = a.total + excluded.total, low = LEAST(a.low, excluded.low),
        high = GREATEST(a.high, excluded.high),
        last = CASE WHEN excluded.last_ts >= a.last_ts THEN excluded.last ELSE a.last END,
        last_ts = GREATEST(a.last_ts, excluded.last_ts)
    """

    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError:
            raise StoreError("a PostgreSQL history store needs psycopg: pip install 'gridpresence[postgres]'") from None
        self.url = url
        try:
            self._db = psycopg.connect(url, autocommit=False)
            with self._db.transaction():
                self._db.execute(self.SCHEMA)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            raise StoreError(f"PostgreSQL history store: {exc}") from None
        self._lock = threading.Lock()
        self.timescale = self._try_timescale()

    def _try_timescale(self) -> bool:
        import psycopg

        try:
            with self._db.transaction():
                self._db.execute("CREATE EXTENSION IF NOT EXISTS timescaledb")
                self._db.execute("SELECT create_hypertable('samples', 'ts', chunk_time_interval => 86400.0,"
                                 " if_not_exists => TRUE, migrate_data => TRUE)")
            return True
        except psycopg.Error:
            return False  # plain PostgreSQL: the same tables, without chunking

    def write(self, samples: Sequence[Sample], events: Sequence[Event]) -> None:
        from psycopg.types.json import Jsonb

        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            if samples:
                with cur.copy("COPY samples (device, ts, metric, value) FROM STDIN") as copy:
                    for s in samples:
                        copy.write_row((s.device, s.ts, s.metric, s.value))
            if samples:
                cur.execute(self.STAGE)
                with cur.copy("COPY aggregates_in FROM STDIN") as copy:
                    for res in RESOLUTIONS:
                        for row in _buckets(samples, res):
                            copy.write_row(row)
                cur.execute(self.MERGE)
            if events:
                cur.executemany("INSERT INTO events VALUES (%s, %s, %s, %s)",
                                [(e.device, e.ts, e.kind, Jsonb(e.detail)) for e in events])

    def prune(self, now: float, retention: Retention) -> dict[str, int]:
        removed: dict[str, int] = {}
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            removed["samples"] = cur.execute("DELETE FROM samples WHERE ts < %s", (now - retention.raw_s,)).rowcount
            removed["aggregates_60"] = cur.execute("DELETE FROM aggregates WHERE res = 60 AND bucket < %s",
                                                   (now - retention.minute_s,)).rowcount
            removed["aggregates_900"] = (cur.execute("DELETE FROM aggregates WHERE res = 900 AND bucket < %s",
                                                     (now - retention.quarter_s,)).rowcount
                                         if retention.quarter_s is not None else 0)
            removed["events"] = (cur.execute("DELETE FROM events WHERE ts < %s", (now - retention.events_s,)).rowcount
                                 if retention.events_s is not None else 0)
        return removed

    def _rows(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            return list(cur.execute(sql, params).fetchall())  # type: ignore[arg-type]

    def series(self, device: str, metric: str, start: float, end: float, every_s: int = 0) -> list[Point]:
        if every_s <= 0:
            return _points(self._rows("SELECT ts, value, value, value, 1 FROM samples WHERE device = %s AND metric = %s"
                                      " AND ts >= %s AND ts < %s ORDER BY ts", (device, metric, start, end)))
        source = self.source_for(every_s)
        if source == 0:
            return _points(self._rows(
                "SELECT floor(ts / %s) * %s AS step, sum(value), min(value), max(value), count(*) FROM samples"
                " WHERE device = %s AND metric = %s AND ts >= %s AND ts < %s GROUP BY step ORDER BY step",
                (every_s, every_s, device, metric, start, end)))
        return _points(self._rows(
            "SELECT (bucket / %s) * %s AS step, sum(total), min(low), max(high), sum(n) FROM aggregates"
            " WHERE res = %s AND device = %s AND metric = %s AND bucket >= %s AND bucket < %s"
            " GROUP BY step ORDER BY step", (every_s, every_s, source, device, metric, start, end)))

    def events(self, device: str, start: float, end: float, kinds: Iterable[str] = EVENT_KINDS) -> list[Event]:
        rows = self._rows("SELECT device, ts, kind, detail FROM events WHERE device = %s AND ts >= %s AND ts < %s"
                          " AND kind = ANY(%s) ORDER BY ts", (device, start, end, list(kinds)))
        return [Event(r[0], r[1], r[2], r[3]) for r in rows]

    def devices(self) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT device FROM aggregates UNION SELECT DISTINCT device"
                                         " FROM events ORDER BY 1", ())]

    def metrics(self, device: str) -> list[str]:
        return [r[0] for r in self._rows("SELECT DISTINCT metric FROM aggregates WHERE device = %s ORDER BY 1",
                                         (device,))]

    def counts(self) -> dict[str, int]:
        return {t: self._rows(f"SELECT count(*) FROM {t}", ())[0][0] for t in ("samples", "aggregates", "events")}

    def close(self) -> None:
        with self._lock:
            self._db.close()


HISTORY_FILE = "history.sqlite"


def open_store(url: str | Path) -> HistoryStore:
    """A PostgreSQL URL (postgresql://… or postgres://…) or a SQLite file path."""
    text = str(url)
    if text.startswith(("postgresql://", "postgres://")):
        return PostgresStore(text)
    return SqliteStore(Path(text))
