"""The replay guard: a device acts on each (issuer, command id) once, also across restarts.

Each command a device took is remembered with the outcome it gave until the command's expiry
plus the clock skew; after that a copy is refused as expired anyway, so the row is pruned.
Rows live in SQLite (WAL, one shared file for the devices of a process, keyed by device), in
memory too for the hot path. A command is recorded *before* its outcome leaves the device, so
a crash can lose an outcome but never make a second effect.

The same file keeps what operators set on each device (device/operated.py), and the command path
writes both by group commit (:meth:`ReplayStore.write`): every write asked for in one turn of the
event loop goes into one transaction, committed with one fsync in a writer thread while the loop
goes on; each waiter resumes once its write is on disk. A shed of 10,000 devices is then a few
fsyncs, not 10,000 (2 ms each on this disk, on the loop).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gridpresence.protocol.models import Outcome

REPLAY_FILE = "replay.sqlite3"  # in a grid's data directory

_SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (
    device TEXT NOT NULL,
    issuer TEXT NOT NULL,
    id TEXT NOT NULL,
    forget_at REAL NOT NULL,
    first_at REAL NOT NULL,
    outcome TEXT NOT NULL,
    PRIMARY KEY (device, issuer, id)
);
CREATE INDEX IF NOT EXISTS seen_by_age ON seen (device, forget_at);
CREATE TABLE IF NOT EXISTS operated (
    device TEXT PRIMARY KEY,
    state TEXT NOT NULL
);
"""

_RECORD = "INSERT OR REPLACE INTO seen (device, issuer, id, forget_at, first_at, outcome) VALUES (?, ?, ?, ?, ?, ?)"


@dataclass(frozen=True)
class Seen:
    """A command the device already had: when, and the outcome it gave (without the state
    report: the device's state now is what a repeat is answered with)."""

    first_at: float  # POSIX seconds
    stored: str  # the outcome as compact JSON: a tenth of the cost of its XML, on every command

    @property
    def outcome(self) -> Outcome:
        return Outcome.model_validate_json(self.stored)


class ReplayStore:
    """The SQLite file shared by the devices of one process (``None``: memory only)."""

    def __init__(self, path: Path | None) -> None:
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(str(path) if path is not None else ":memory:", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL in WAL: each commit is fsync'd, so it survives a power cut too; group commit
        # (`write`) makes that one fsync per batch.
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(_SCHEMA)
        self._lock = threading.Lock()  # one transaction at a time on the shared connection
        self._queue: list[tuple[str, Sequence[Any]]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._flushing = False
        self._writer: ThreadPoolExecutor | None = None

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """One statement now, in its own transaction (start-up reads, the rare synchronous write)."""
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def write(self, sql: str, params: Sequence[Any]) -> asyncio.Future[None]:
        """A write by group commit: done once it is on disk with the others of its batch."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((sql, params))
        self._waiters.append(done)
        if not self._flushing:
            self._flushing = True
            loop.call_soon(self._flush)  # after the rest of this turn's writes
        return done

    def _flush(self) -> None:
        batch, waiters = self._queue, self._waiters
        self._queue, self._waiters = [], []
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="replay-store")
        committed = asyncio.get_running_loop().run_in_executor(self._writer, self._commit, batch)
        committed.add_done_callback(lambda f: self._committed(f, waiters))

    def _committed(self, result: asyncio.Future[None], waiters: list[asyncio.Future[None]]) -> None:
        exc = result.exception() if not result.cancelled() else ConnectionError("replay store closed")
        for waiter in waiters:
            if waiter.done():
                continue
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)
        if self._queue:  # written meanwhile: the next batch
            self._flush()
        else:
            self._flushing = False

    def _commit(self, batch: list[tuple[str, Sequence[Any]]]) -> None:
        with self._lock:
            self.db.execute("BEGIN")
            try:
                for sql, params in batch:
                    self.db.execute(sql, params)
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)  # the batch under way is committed
        if self._queue:  # asked for and not yet flushed (the loop is ending): written now
            self._commit(self._queue)
            self._queue = []
        self.db.close()


class ReplayGuard:
    """One device's memory of the commands it had."""

    def __init__(self, store: ReplayStore, device: str) -> None:
        self.store = store
        self.device = device
        # (issuer, id) -> (forget_at, first_at, outcome JSON): tuples of plain values only, which
        # the cyclic GC stops tracking, so a thousand commands a second do not make each full
        # collection (tens of ms in a process of a thousand bots) come sooner.
        self._seen: dict[tuple[str, str], tuple[float, float, str]] = {}
        self._next_prune = 0.0
        rows = store.execute("SELECT issuer, id, forget_at, first_at, outcome FROM seen WHERE device = ? AND "
                             "forget_at > ?", (device, time.time()))
        for issuer, cmd_id, forget_at, first_at, outcome in rows:
            self._seen[(issuer, cmd_id)] = (forget_at, first_at, outcome)

    def seen(self, issuer: str, cmd_id: str) -> Seen | None:
        self._prune()
        entry = self._seen.get((issuer, cmd_id))
        return Seen(entry[1], entry[2]) if entry is not None and entry[0] > time.time() else None

    def record(self, issuer: str, cmd_id: str, forget_at: float, outcome: Outcome) -> None:
        """Remember a command now (synchronously on disk)."""
        self.store.execute(_RECORD, self._remember(issuer, cmd_id, forget_at, outcome))

    def record_soon(self, issuer: str, cmd_id: str, forget_at: float, outcome: Outcome) -> asyncio.Future[None]:
        """Remember a command: at once in memory (a copy arriving now is a replay), on disk by
        group commit; await the result before telling anyone the outcome."""
        return self.store.write(_RECORD, self._remember(issuer, cmd_id, forget_at, outcome))

    def _remember(self, issuer: str, cmd_id: str, forget_at: float, outcome: Outcome) -> tuple[Any, ...]:
        now = time.time()
        stored = outcome.model_dump_json(exclude={"report", "first"})
        self._seen[(issuer, cmd_id)] = (forget_at, now, stored)
        return (self.device, issuer, cmd_id, forget_at, now, stored)

    def _prune(self) -> None:
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + 10.0  # a sweep every few seconds is plenty
        for key in [k for k, (forget_at, _, _) in self._seen.items() if forget_at <= now]:
            del self._seen[key]
        prune = ("DELETE FROM seen WHERE device = ? AND forget_at <= ?", (self.device, now))
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.store.execute(*prune)
        else:  # with the next batch: nobody waits for it (a row past its expiry refuses nothing)
            self.store.write(*prune)
