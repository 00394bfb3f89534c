"""Where a device keeps what its operators set (physics/base.py:Operated) so that a restart of
its host — even kill -9 — does not re-energise a load an operator shed (issue 14).

Kept in the process's replay store (security/replay.py, table ``operated``, a row per device
named for its ``device-state/NAME.json`` path) when the device has one on disk: written by group
commit after every command the device executes, so a shed of thousands costs a few fsyncs, and
awaited before anyone is told. Without a replay store on disk: one small JSON file per device in
the grid's data directory (``device-state/NAME.json``), replaced atomically (a crash leaves the
previous state or the new one, never half a file); that file is also read when the store has no
row (a state kept by an older run).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from gridpresence.physics.base import Operated
from gridpresence.security.replay import REPLAY_FILE, ReplayStore

log = logging.getLogger(__name__)

STATE_DIR = "device-state"


def state_path(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / STATE_DIR / f"{name}.json"


def kept_state(data_dir: Path, name: str) -> Operated | None:
    """What device ``name`` of the grid in ``data_dir`` keeps (its fleet's replay store)."""
    store = ReplayStore(Path(data_dir) / REPLAY_FILE)
    try:
        return OperatedStore(state_path(data_dir, name), store).load()
    finally:
        store.close()


class OperatedStore:
    """The state of one device; ``path`` None keeps nothing (a device run without a data dir).
    ``journal``: the process's replay store, which keeps it if it is on disk."""

    def __init__(self, path: Path | None, journal: ReplayStore | None = None) -> None:
        self.path = path
        self.journal = journal if journal is not None and journal.path is not None and path is not None else None
        self.key = path.stem if path is not None else ""

    def load(self) -> Operated | None:
        """The state kept by the last run, or None (none kept; an unreadable one is logged and
        ignored: the device then starts from its fleet-file state, as a new one would)."""
        if self.path is None:
            return None
        try:
            if self.journal is not None:
                rows = self.journal.execute("SELECT state FROM operated WHERE device = ?", (self.key,))
                if rows:
                    return Operated.model_validate_json(rows[0][0])
            return Operated.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.error("%s: kept device state unreadable (%s); starting from the fleet file", self.path, exc)
            return None

    async def keep(self, state: Operated) -> None:
        """Save, by group commit when in the replay store; returns once it is on disk."""
        written = self.keep_soon(state)
        if written is not None:
            await written

    def keep_soon(self, state: Operated) -> asyncio.Future[None] | None:
        """Save: in the replay store by group commit (done when the returned future is, with the
        other writes asked for in this turn of the loop: a command's replay record too), else
        now (None)."""
        if self.journal is None:
            self.save(state)
            return None
        return self.journal.write("INSERT OR REPLACE INTO operated (device, state) VALUES (?, ?)",
                                  (self.key, state.model_dump_json()))

    def save(self, state: Operated) -> None:
        if self.path is None:
            return
        if self.journal is not None:
            self.journal.execute("INSERT OR REPLACE INTO operated (device, state) VALUES (?, ?)",
                                 (self.key, state.model_dump_json()))
            return
        data = state.model_dump_json().encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
            os.fsync(fd)  # the operator was told "executed": the state must be on disk first
        finally:
            os.close(fd)
        os.replace(tmp, self.path)
