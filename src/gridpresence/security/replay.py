"""The replay guard: a device acts on each (issuer, command id) once, also across restarts.

Each command a device took is remembered with the outcome it gave until the command's expiry
plus the clock skew; after that a copy is refused as expired anyway, so the row is pruned.
Rows live in SQLite (WAL, one shared file for the devices of a process, keyed by device), in
memory too for the hot path. A command is recorded *before* its outcome leaves the device, so
a crash can lose an outcome but never make a second effect.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

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
"""


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
        self.db = sqlite3.connect(str(path) if path is not None else ":memory:", isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL: a commit survives the process being killed (not a power cut), at no fsync.
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
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
        rows = store.db.execute("SELECT issuer, id, forget_at, first_at, outcome FROM seen WHERE device = ? AND "
                                "forget_at > ?", (device, time.time())).fetchall()
        for issuer, cmd_id, forget_at, first_at, outcome in rows:
            self._seen[(issuer, cmd_id)] = (forget_at, first_at, outcome)

    def seen(self, issuer: str, cmd_id: str) -> Seen | None:
        self._prune()
        entry = self._seen.get((issuer, cmd_id))
        return Seen(entry[1], entry[2]) if entry is not None and entry[0] > time.time() else None

    def record(self, issuer: str, cmd_id: str, forget_at: float, outcome: Outcome) -> None:
        now = time.time()
        stored = outcome.model_dump_json(exclude={"report", "first"})
        self._seen[(issuer, cmd_id)] = (forget_at, now, stored)
        self.store.db.execute("INSERT OR REPLACE INTO seen (device, issuer, id, forget_at, first_at, outcome)"
                              " VALUES (?, ?, ?, ?, ?, ?)", (self.device, issuer, cmd_id, forget_at, now, stored))

    def _prune(self) -> None:
        now = time.time()
        if now < self._next_prune:
            return
        self._next_prune = now + 10.0  # a sweep every few seconds is plenty
        for key in [k for k, (forget_at, _, _) in self._seen.items() if forget_at <= now]:
            del self._seen[key]
        self.store.db.execute("DELETE FROM seen WHERE device = ? AND forget_at <= ?", (self.device, now))
