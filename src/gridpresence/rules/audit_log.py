"""The threshold audit on disk: one JSON line per change (who, when, old, new, why), appended and
synced before the change counts, read back when the device starts so a change survives a restart
and can still be reverted.

One file per device (``DATA/thresholds/NAME.jsonl``): the device is its only writer. A line that
cannot be read (a crash mid-write, a hand edit) is skipped with a warning, never fatal.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from gridpresence.rules.thresholds import Change

log = logging.getLogger(__name__)

AUDIT_DIR = "thresholds"


class _Entry(BaseModel):
    """One line, validated: a journal is data from disk, not trusted code."""

    model_config = ConfigDict(extra="ignore")

    id: int = Field(ge=1)
    device: str
    rule: str
    param: str
    old: float = Field(allow_inf_nan=False)
    new: float = Field(allow_inf_nan=False)
    by: str
    at: AwareDatetime
    why: str
    reverts: int | None = None


def audit_path(data_dir: Path, device: str) -> Path:
    return Path(data_dir) / AUDIT_DIR / f"{device}.jsonl"


class AuditJournal:
    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> list[Change]:
        """The changes recorded so far, oldest first."""
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        out: list[Change] = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                out.append(Change(**_Entry.model_validate_json(line).model_dump()))
            except ValidationError as exc:
                log.warning("%s:%d: skipped an unreadable audit entry: %s", self.path, n,
                            exc.errors()[0]["msg"])
        return out

    def append(self, change: Change) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(change.as_dict(), sort_keys=True) + "\n").encode()
        with open(self.path, "a+b") as fh:
            if fh.tell() > 0:
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":  # half a line from a crash: start afresh, don't glue onto it
                    line = b"\n" + line
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())  # an acknowledged change must survive a power cut


def read_audit(data_dir: Path, device: str | None = None) -> list[Change]:
    """Every device's recorded changes (or one device's), by time."""
    folder = Path(data_dir) / AUDIT_DIR
    paths = [audit_path(data_dir, device)] if device else sorted(folder.glob("*.jsonl"))
    changes = [c for p in paths for c in AuditJournal(p).load()]
    return sorted(changes, key=lambda c: (c.at, c.device, c.id))
