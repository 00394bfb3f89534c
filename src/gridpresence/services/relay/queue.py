"""The relay's durable queue: SQLite in WAL mode, one row per (command id, device).

A command's life: ``queued`` (stored, the mail was answered 250) -> ``delivering`` (sent to the
device over XMPP, no outcome yet) -> ``answered`` (the device's outcome or "expired" is stored)
-> ``closed`` (the outcome went to the issuer). A crash anywhere is safe:

* ``delivering`` goes back to ``queued`` at start-up and is sent again when the device is
  present; the device answers a command id it has seen from memory, without a second effect;
* ``answered`` rows are told to their issuer again at start-up (the issuer ignores an outcome
  for a command it already has).

Inserts are idempotent: the same command mailed twice is stored once.

One case stays uncertain: a command sent before a crash whose expiry passes before the relay is
back is reported "expired" with "no answer from the device"; the device may have executed it,
and it forgets its answers at the expiry, so no one can tell.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from gridpresence.protocol.models import Command


class State(StrEnum):
    QUEUED = "queued"
    DELIVERING = "delivering"
    ANSWERED = "answered"
    CLOSED = "closed"


@dataclass(frozen=True)
class QueuedCommand:
    id: str
    device: str
    issuer: str
    payload: str  # the command's XML, exactly as it will go to the device
    expires: float  # POSIX seconds
    state: State
    outcome: str | None = None  # the outcome's XML once answered


_SCHEMA = """
CREATE TABLE IF NOT EXISTS commands (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL,
    device TEXT NOT NULL,
    issuer TEXT NOT NULL,
    payload TEXT NOT NULL,
    expires REAL NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    stored REAL NOT NULL,
    UNIQUE (id, device)
);
CREATE INDEX IF NOT EXISTS commands_by_device ON commands (device, state, seq);
CREATE INDEX IF NOT EXISTS commands_by_expiry ON commands (state, expires);
CREATE TABLE IF NOT EXISTS inbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    message_id TEXT NOT NULL UNIQUE,
    sender TEXT NOT NULL,
    payload TEXT NOT NULL,
    stored REAL NOT NULL,
    forwarded INTEGER NOT NULL DEFAULT 0
);
"""
_COLUMNS = "id, device, issuer, payload, expires, state, outcome"


def _row(row: tuple[str, str, str, str, float, str, str | None]) -> QueuedCommand:
    return QueuedCommand(row[0], row[1], row[2], row[3], row[4], State(row[5]), row[6])


@dataclass(frozen=True)
class InboxItem:
    """A payload a device pushed by mail (its data or an outcome), to pass on over XMPP."""

    seq: int
    sender: str
    payload: str


class CommandQueue:
    """All the relay's durable state. One connection, used from the relay's event loop thread.

    ``synchronous=NORMAL`` in WAL mode: a committed row survives the relay process being killed
    (the tests kill -9 it); ``durable=True`` (FULL) also survives a power cut, at a cost per mail.
    """

    def __init__(self, path: Path, *, durable: bool = False) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # -- commands ---------------------------------------------------------------------

    def add(self, cmd: Command, devices: Iterable[str], payload: str) -> list[str]:
        """Store `cmd` for each device; returns the devices it was new for (duplicates: none)."""
        now = time.time()
        added: list[str] = []
        with self.db:
            for device in devices:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO commands (id, device, issuer, payload, expires, state, stored)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (cmd.id, device, cmd.issuer, payload, cmd.expires.timestamp(), State.QUEUED.value, now))
                if cur.rowcount:
                    added.append(device)
        return added

    def queued_for(self, device: str) -> list[QueuedCommand]:
        """The device's waiting commands, oldest first."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM commands WHERE device = ? AND state = ? ORDER BY seq",
                               (device, State.QUEUED.value)).fetchall()
        return [_row(r) for r in rows]

    def mark(self, keys: Iterable[tuple[str, str]], state: State, *, only_from: State | None = None) -> None:
        """Set the state of (id, device) rows in one transaction."""
        sql = "UPDATE commands SET state = ? WHERE id = ? AND device = ?"
        if only_from is not None:
            sql += f" AND state = '{only_from.value}'"
        with self.db:
            self.db.executemany(sql, ((state.value, i, d) for i, d in keys))

    def requeue(self, device: str | None = None) -> int:
        """Sent but unanswered commands go back to queued (device gone, or relay restarted)."""
        sql = "UPDATE commands SET state = ? WHERE state = ?"
        args: tuple[str, ...] = (State.QUEUED.value, State.DELIVERING.value)
        if device is not None:
            sql += " AND device = ?"
            args += (device,)
        with self.db:
            return self.db.execute(sql, args).rowcount

    def answer(self, answers: Iterable[tuple[str, str, str]]) -> list[QueuedCommand]:
        """Store outcomes (id, device, outcome XML) for commands still open; returns those rows
        (an outcome for an unknown or already answered command changes nothing)."""
        done: list[QueuedCommand] = []
        with self.db:
            for cmd_id, device, outcome in answers:
                row = self.db.execute(
                    f"UPDATE commands SET state = ?, outcome = ? WHERE id = ? AND device = ? AND state IN (?, ?)"
                    f" RETURNING {_COLUMNS}",
                    (State.ANSWERED.value, outcome, cmd_id, device, State.QUEUED.value, State.DELIVERING.value),
                ).fetchone()
                if row is not None:
                    done.append(_row(row))
        return done

    def due_to_expire(self, now: float, answer_margin_s: float) -> list[QueuedCommand]:
        """Open commands whose expiry has passed. A command sent to the device gets
        `answer_margin_s` more: the device's own verdict (it refuses late commands) may be on
        its way, and it must win over a guessed "expired"."""
        rows = self.db.execute(
            f"SELECT {_COLUMNS} FROM commands WHERE (state = ? AND expires <= ?) OR (state = ? AND expires <= ?)"
            " ORDER BY seq",
            (State.QUEUED.value, now, State.DELIVERING.value, now - answer_margin_s)).fetchall()
        return [_row(r) for r in rows]

    def next_expiry(self, answer_margin_s: float) -> float | None:
        """When :meth:`due_to_expire` will next find something (POSIX seconds), or None."""
        row = self.db.execute(
            "SELECT MIN(CASE state WHEN ? THEN expires ELSE expires + ? END) FROM commands WHERE state IN (?, ?)",
            (State.QUEUED.value, answer_margin_s, State.QUEUED.value, State.DELIVERING.value)).fetchone()
        return row[0] if row else None

    def answered(self) -> list[QueuedCommand]:
        """Outcomes stored but maybe not told to the issuer (a crash in between)."""
        rows = self.db.execute(f"SELECT {_COLUMNS} FROM commands WHERE state = ? ORDER BY seq",
                               (State.ANSWERED.value,)).fetchall()
        return [_row(r) for r in rows]

    def get(self, cmd_id: str, device: str) -> QueuedCommand | None:
        row = self.db.execute(f"SELECT {_COLUMNS} FROM commands WHERE id = ? AND device = ?",
                              (cmd_id, device)).fetchone()
        return _row(row) if row else None

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT state, COUNT(*) FROM commands GROUP BY state").fetchall())

    # -- mailed device data -----------------------------------------------------------

    def add_inbox(self, message_id: str, sender: str, payload: str) -> bool:
        """Store a pushed payload once per Message-ID; False for a duplicate."""
        with self.db:
            cur = self.db.execute("INSERT OR IGNORE INTO inbox (message_id, sender, payload, stored) VALUES (?, ?, ?, ?)",
                                  (message_id, sender, payload, time.time()))
        return bool(cur.rowcount)

    def inbox(self) -> list[InboxItem]:
        rows = self.db.execute("SELECT seq, sender, payload FROM inbox WHERE forwarded = 0 ORDER BY seq").fetchall()
        return [InboxItem(*r) for r in rows]

    def forwarded(self, seqs: Iterable[int]) -> None:
        with self.db:
            self.db.executemany("UPDATE inbox SET forwarded = 1 WHERE seq = ?", ((s,) for s in seqs))
