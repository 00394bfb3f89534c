"""Commands an issuer sent and has no outcome for yet, kept on disk beside its key, so the next
process of the same issuer (a new `gridpresence` command after one that died, a restarted
script) still learns how they ended (issue 14: every command ends with its true outcome).

Small JSON files in ``DIR/keys/NAME.pending/`` (a file created or removed is atomic, so two
processes of one operator never lose each other's entries): one command's entry, or a group
``{"entries": [...]}`` of the commands of one fan-out still unanswered at the same moment (a
file per command cost a fan-out of 10,000 seconds of system calls); a group's file goes when its
last command is answered. A group may so still list commands answered just before its process
died: the next process learns their outcome again from the device's replay memory (the first
outcome, never a second effect). An entry names the
process that waits for it; one whose process is gone is an orphan, and the next library instance
(`GridOperator.connect`, `gridpresence pending`) adopts it: the signed command is sent again to
the device's bare JID while it is still valid — a device that had it answers from its replay
memory with the first outcome, so nothing runs twice — and an entry found already expired is
reported as such (what the device did is in the historian: `gridpresence history DEVICE`).

An outcome a later process takes for an orphan is kept too, in the entry (``outcome``), until
`gridpresence pending` shows it (`answer`, `shown`): the process that took it is seldom the one
the person reads outcomes from (a `status` after a Ctrl-C'd `shed`), and a log line on its
stderr is easily lost. Shown, it is removed: `pending` is where a person learns the outcome
once, and the device's history (`gridpresence history DEVICE`) keeps it for good; an answered
entry nobody has shown yet is kept with no time limit (there are only as many as commands
whose process died waiting).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, ValidationError

from gridpresence.protocol.models import Command, Outcome, utcnow
from gridpresence.server.pids import process_alive

log = logging.getLogger(__name__)

PENDING_SUFFIX = ".pending"
# An entry this long past its expiry is an orphan even if its pid is alive (a reused pid): its
# own process stopped waiting seconds after the expiry.
STALE_AFTER = dt.timedelta(minutes=5)
SHARED_WIRE_MIN = 4096  # characters from which a wire shared by entries of a group is written once


class PendingCommand(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    command_id: str
    device: str  # bare JID
    action: str
    issued: AwareDatetime
    expires: AwareDatetime
    route: Literal["direct", "relay"]
    wire: str  # the signed command element as sent, to send again unchanged
    pid: int  # the process waiting for its outcome (answered: the one that took the outcome)
    # Set once a process other than the sender took the outcome: kept until `pending` shows it.
    outcome: Outcome | None = None


class PendingStore:
    """`directory` None: nothing is kept (a party without a key file, e.g. the console)."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._made = False  # the directory exists (made once, not per command)
        self._kept: dict[str, str] = {}  # id this process wrote -> its file's stem (only those need unlinking)
        self._groups: dict[str, set[str]] = {}  # file stem -> ids in it not yet answered
        self._serial = 0
        self._found_in: dict[str, Path] = {}  # id -> the file `entries` read it from (another process's)
        self._answered: set[str] = set()  # ids in `_kept` that are answered (not waiting)

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

    @staticmethod
    def entry(cmd: Command, device: str, wire: str, route: Literal["direct", "relay"]) -> PendingCommand:
        return PendingCommand(command_id=cmd.id, device=device, action=cmd.action.value, issued=cmd.issued,
                              expires=cmd.expires, route=route, wire=wire, pid=os.getpid())

    def add(self, cmd: Command, device: str, wire: str, route: Literal["direct", "relay"]) -> None:
        if self.directory is None:
            return
        self._write([self.entry(cmd, device, wire, route)])

    def add_many(self, entries: list[PendingCommand]) -> None:
        """Keep many at once: one file for all of them."""
        if self.directory is not None and entries:
            self._write(entries)

    def _write(self, entries: list[PendingCommand]) -> None:
        assert self.directory is not None
        if len(entries) == 1:
            stem = self._path(entries[0].command_id).stem
            data = entries[0].model_dump_json()
        else:
            self._serial += 1
            stem = f"group-{os.getpid()}-{self._serial}"
            # A wire that several entries share (a batch's: operator/issuer.py) is written once,
            # in "wires", and named in each entry by its key there.
            refs: dict[int, tuple[str, str]] = {}  # id(wire text) -> (its key, the text)
            items = []
            for e in entries:
                if len(e.wire) >= SHARED_WIRE_MIN:
                    ref = refs.setdefault(id(e.wire), (f"#{len(refs)}", e.wire))[0]
                    e = e.model_copy(update={"wire": ref})
                items.append(e.model_dump_json())
            wires = json.dumps({ref: text for ref, text in refs.values()}) if refs else ""
            data = '{"entries": [' + ", ".join(items) + "]" + (f', "wires": {wires}' if wires else "") + "}"
        try:
            if not self._made:
                self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._made = True
            path = self.directory / f"{stem}.json"
            tmp = f"{path}.{os.getpid()}.tmp"  # renamed into place: a reader never sees half a file
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, data.encode())
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:  # the commands still go out: only a later process would miss them
            log.warning("could not keep %d pending commands in %s: %s", len(entries), self.directory, exc)
            return
        for e in entries:
            if self._kept.get(e.command_id) != stem:  # (the same file rewritten: nothing to forget)
                self._forget_in_group(e.command_id)  # adopted again: its older file need not list it
            self._kept[e.command_id] = stem
            (self._answered.add if e.outcome is not None else self._answered.discard)(e.command_id)
        self._groups[stem] = {e.command_id for e in entries}

    def holds(self, command_id: str) -> bool:
        """This process has `command_id` on disk."""
        return command_id in self._kept

    def waiting_here(self) -> int:
        """Commands this process has on disk still without an outcome (its own and adopted ones):
        what stays pending if it ends now."""
        return len(self._kept.keys() - self._answered)

    def remove(self, command_id: str, found: bool = False) -> None:
        """Forget `command_id`; `found`: an entry another process wrote (an orphan's)."""
        if self.directory is None:
            return
        if command_id in self._kept:
            self._forget_in_group(command_id)
        elif found:
            self._drop_found(command_id)

    def _forget_in_group(self, command_id: str) -> None:
        self._answered.discard(command_id)
        stem = self._kept.pop(command_id, None)
        if stem is None or self.directory is None:
            return
        left = self._groups.get(stem)
        if left is not None:
            left.discard(command_id)
            if left:
                return
            del self._groups[stem]
        with contextlib.suppress(OSError):
            (self.directory / f"{stem}.json").unlink()

    def entries(self) -> list[PendingCommand]:
        """Every kept entry still waiting for its outcome, oldest first (not one also kept
        answered: a group file of a process that died still lists what it had answered)."""
        kept = self._read()
        answered = {e.command_id for e in kept if e.outcome is not None}
        return [e for e in kept if e.outcome is None and e.command_id not in answered]

    def answered(self) -> list[PendingCommand]:
        """Every entry whose outcome a later process took and nobody has shown yet, oldest first."""
        return [e for e in self._read() if e.outcome is not None]

    def _read(self) -> list[PendingCommand]:
        """Every kept entry, oldest first; what cannot be read is logged and set aside."""
        if self.directory is None or not self.directory.is_dir():
            return []
        found = []
        for path in sorted(self.directory.glob("*.json")):
            found += self._read_file(path)
        return sorted(found, key=lambda e: e.issued)

    def _read_file(self, path: Path) -> list[PendingCommand]:
        """One file's entries. A file that is not JSON is set aside whole (``.bad``); in a group,
        only the entries that do not validate are (``.bad``), the others stay where they were."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return []  # removed meanwhile by the process whose it is: answered
        except (OSError, ValueError) as exc:
            self._set_aside(path, str(exc))
            return []
        group = data.get("entries") if isinstance(data, dict) else None
        items = group if isinstance(group, list) else [data]
        wires = data.get("wires") if isinstance(group, list) else None
        if isinstance(wires, dict):  # (_write: a shared wire named by its key)
            items = [{**item, "wire": wires[item["wire"]]}
                     if isinstance(item, dict) and isinstance(item.get("wire"), str) and item["wire"] in wires
                     and isinstance(wires[item["wire"]], str) else item for item in items]
        good: list[PendingCommand] = []
        bad: list[object] = []
        why = ""
        for item in items:
            try:
                good.append(PendingCommand.model_validate(item))
            except (ValidationError, ValueError, TypeError) as exc:
                bad.append(item)
                why = why or str(exc)
        if bad and not good:
            self._set_aside(path, why)
        elif bad:
            log.warning("pending command file %s: %d of %d entries unreadable (%s); those set aside",
                        path, len(bad), len(items), why.splitlines()[0])
            with contextlib.suppress(OSError, TypeError, ValueError):
                path.with_suffix(".bad").write_text(json.dumps({"entries": bad}), encoding="utf-8")
                tmp = f"{path}.{os.getpid()}.tmp"
                Path(tmp).write_text(json.dumps({"entries": [e.model_dump(mode="json") for e in good]}),
                                     encoding="utf-8")
                os.replace(tmp, path)
        for e in good:
            self._found_in[e.command_id] = path
        return good

    @staticmethod
    def _set_aside(path: Path, why: str) -> None:
        log.warning("pending command file %s unreadable (%s); set aside", path, (why.splitlines() or [""])[0])
        with contextlib.suppress(OSError):
            path.replace(path.with_suffix(".bad"))

    def orphans(self) -> list[PendingCommand]:
        """Entries whose waiting process is gone."""
        stale = utcnow() - STALE_AFTER
        return [e for e in self.entries() if e.pid != os.getpid() and (not process_alive(e.pid) or e.expires < stale)]

    def adopt(self, entry: PendingCommand) -> PendingCommand:
        """This process waits for `entry` from now on (its file is then this process's own)."""
        return self.adopt_many([entry])[0]

    def adopt_many(self, entries: list[PendingCommand]) -> list[PendingCommand]:
        """This process waits for `entries` from now on: one file of its own for them all, and
        each file they were found in rewritten once (an entry at a time, the orphans of a
        Ctrl-C'd shed of 10,000 rewrote their group file 10,000 times)."""
        mine = [e.model_copy(update={"pid": os.getpid()}) for e in entries]
        if self.directory is not None and mine:
            self._write(mine)
            self._drop_found_many([e.command_id for e in entries])
        return mine

    def answer(self, entry: PendingCommand, outcome: Outcome) -> None:
        """`entry`, an earlier process's command, has its `outcome` here: kept, answered, until
        `gridpresence pending` shows it (`shown`), whichever process took it."""
        if self.directory is None:
            return
        self._write([entry.model_copy(update={"pid": os.getpid(), "outcome": outcome})])
        self._drop_found(entry.command_id)

    def shown(self, command_ids: list[str]) -> None:
        """The outcomes of these answered entries were shown to the person: no longer kept."""
        for command_id in command_ids:
            self.remove(command_id, found=True)

    def _drop_found(self, command_id: str) -> None:
        self._drop_found_many([command_id])

    def _drop_found_many(self, command_ids: list[str]) -> None:
        """Take these ids out of the other processes' files they were found in (adoption,
        answers): each file read and rewritten (or removed) once."""
        by_path: dict[Path, set[str]] = {}
        for command_id in command_ids:
            path = self._found_in.pop(command_id, None)
            if path is not None and path.stem != self._kept.get(command_id):
                by_path.setdefault(path, set()).add(command_id)
        for path, ids in by_path.items():
            with contextlib.suppress(OSError, ValueError, AttributeError):
                data = json.loads(path.read_text(encoding="utf-8"))
                group = data.get("entries") if isinstance(data, dict) else None
                left = [e for e in group if e.get("command_id") not in ids] if isinstance(group, list) else []
                if not left:
                    path.unlink()
                    continue
                kept: dict[str, Any] = {"entries": left}
                wires = data.get("wires")
                if isinstance(wires, dict):  # (_write's shared wires, those still named)
                    named = {e.get("wire") for e in left if isinstance(e, dict)}
                    kept["wires"] = {ref: text for ref, text in wires.items() if ref in named}
                tmp = f"{path}.{os.getpid()}.tmp"
                Path(tmp).write_text(json.dumps(kept), encoding="utf-8")
                os.replace(tmp, path)
