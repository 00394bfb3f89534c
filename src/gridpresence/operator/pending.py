"""Commands an issuer sent and has no outcome for yet, kept on disk beside its key, so the next
process of the same issuer (a new `gridpresence` command after one that died, a restarted
script) still learns how they ended (issue 14: every command ends with its true outcome).

One small JSON file per command in ``DIR/keys/NAME.pending/`` (a file created or removed is
atomic, so two processes of one operator never lose each other's entries). An entry names the
process that waits for it; one whose process is gone is an orphan, and the next library instance
(`GridOperator.connect`, `gridpresence pending`) adopts it: the signed command is sent again to
the device's bare JID while it is still valid — a device that had it answers from its replay
memory with the first outcome, so nothing runs twice — and an entry found already expired is
reported as such (what the device did is in the historian: `gridpresence history DEVICE`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from gridpresence.protocol.models import Command, utcnow
from gridpresence.server.pids import process_alive

log = logging.getLogger(__name__)

PENDING_SUFFIX = ".pending"
# An entry this long past its expiry is an orphan even if its pid is alive (a reused pid): its
# own process stopped waiting seconds after the expiry.
STALE_AFTER = dt.timedelta(minutes=5)


class PendingCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    command_id: str
    device: str  # bare JID
    action: str
    issued: AwareDatetime
    expires: AwareDatetime
    route: Literal["direct", "relay"]
    wire: str  # the signed command element as sent, to send again unchanged
    pid: int  # the process waiting for its outcome


class PendingStore:
    """`directory` None: nothing is kept (a party without a key file, e.g. the console)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._made = False  # the directory exists (made once, not per command)
        self._kept: set[str] = set()  # ids this process wrote (only those need unlinking)

    @classmethod
    def beside(cls, key_file: str | Path | None) -> PendingStore:
        """``keys/NAME.sec.asc`` -> ``keys/NAME.pending/``; no key file, nothing kept."""
        if not key_file:
            return cls(None)
        path = Path(key_file)
        return cls(path.with_name(path.name.split(".", 1)[0] + PENDING_SUFFIX))

    def _path(self, command_id: str) -> Path:
        assert self.directory is not None
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in command_id)
        return self.directory / f"{safe}.json"

    def add(self, cmd: Command, device: str, wire: str, route: Literal["direct", "relay"]) -> None:
        if self.directory is None:
            return
        entry = PendingCommand(command_id=cmd.id, device=device, action=cmd.action.value, issued=cmd.issued,
                               expires=cmd.expires, route=route, wire=wire, pid=os.getpid())
        self._write(entry)

    def _write(self, entry: PendingCommand) -> None:
        assert self.directory is not None
        try:
            if not self._made:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._made = True
            path = self._path(entry.command_id)
            tmp = f"{path}.{os.getpid()}.tmp"  # renamed into place: a reader never sees half a file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, entry.model_dump_json().encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
            self._kept.add(entry.command_id)
        except OSError as exc:  # the command still goes out: only a later process would miss it
            log.warning("could not keep pending command %s in %s: %s", entry.command_id, self.directory, exc)

    def holds(self, command_id: str) -> bool:
        """This process has `command_id` on disk."""
        return command_id in self._kept

    def remove(self, command_id: str, found: bool = False) -> None:
        """Forget `command_id`; `found`: an entry another process wrote (an orphan's)."""
        if self.directory is not None and (found or command_id in self._kept):
            self._kept.discard(command_id)
            with contextlib.suppress(OSError):
                self._path(command_id).unlink()

    def entries(self) -> list[PendingCommand]:
        """Every kept entry, oldest first; an unreadable file is logged and set aside."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(PendingCommand.model_validate(json.loads(path.read_text(encoding="utf-8"))))
            except (OSError, ValueError, ValidationError) as exc:
                log.warning("pending command file %s unreadable (%s); set aside", path, str(exc).splitlines()[0])
                with contextlib.suppress(OSError):
                    path.replace(path.with_suffix(".bad"))
        return sorted(found, key=lambda e: e.issued)

    def orphans(self) -> list[PendingCommand]:
        """Entries whose waiting process is gone."""
        stale = utcnow() - STALE_AFTER
        return [e for e in self.entries() if e.pid != os.getpid() and (not process_alive(e.pid) or e.expires < stale)]

    def adopt(self, entry: PendingCommand) -> PendingCommand:
        """This process waits for `entry` from now on (its file is then this process's own)."""
        mine = entry.model_copy(update={"pid": os.getpid()})
        self._write(mine)
        return mine
