"""Trust on first use: the first key seen for a JID is pinned; a different one later is refused
with a loud warning until someone who knows why re-pins it (``gridpresence keys repin``).

The pins file is shared with the ``keys`` command (and other processes of the same party):
it is re-read when it changed on disk, so a re-pin made elsewhere takes effect without a
restart and a new pin never overwrites one written meanwhile. Refused keys are remembered in
``NAME.changes.json`` beside it, so the warning outlives the process that saw the change.
"""

from __future__ import annotations

import json
import logging
import os
from enum import StrEnum
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class PinVerdict(StrEnum):
    NEW = "new"  # first key seen for this JID: now pinned
    SAME = "same"  # the pinned key
    CHANGED = "changed"  # not the pinned key: refused


def changes_path(pins_path: Path) -> Path:
    """Where the refused keys of a pins file are recorded."""
    return pins_path.with_name(f"{pins_path.stem}.changes.json")


class PinStore:
    """Pinned fingerprints by bare JID in a JSON file (written atomically on every new pin)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._where = os.fspath(path) if path is not None else None  # os.stat of a str: a third of Path.stat
        self._pins: dict[str, str] = {}
        self._changes: dict[str, str] = {}  # JID -> fingerprint offered instead of the pinned one
        self._stamp: tuple[int, int] | None = None
        # Read at first use (every reader refreshes first): a host of thousands of device bots
        # reads none of them to start, and a device that never checks a key never reads its own.

    def pinned(self, jid: str) -> str | None:
        self._refresh()
        return self._pins.get(jid)

    def jids(self) -> list[str]:
        self._refresh()
        return sorted(self._pins)

    @property
    def changes(self) -> dict[str, str]:
        """Refused keys: JID -> the fingerprint offered instead of the pinned one."""
        self._refresh()
        return dict(self._changes)

    def check(self, jid: str, fingerprint: str) -> PinVerdict:
        """Pin ``fingerprint`` for ``jid`` on first use; say whether it matches later."""
        fingerprint = fingerprint.upper()
        self._refresh()
        old = self._pins.get(jid)
        if old is None:
            self._pins[jid] = fingerprint
            self._save()
            log.info("pinned OpenPGP key %s for %s on first use", fingerprint, jid)
            return PinVerdict.NEW
        if old == fingerprint:
            return PinVerdict.SAME
        if self._changes.get(jid) != fingerprint:
            log.warning("OpenPGP key of %s CHANGED: pinned %s, now offered %s; refusing it until re-pinned "
                        "(gridpresence keys repin)", jid, old, fingerprint)
            self._changes[jid] = fingerprint
            self._save()
        return PinVerdict.CHANGED

    def repin(self, jid: str, fingerprint: str) -> None:
        """Accept a new key for ``jid`` deliberately (a rotated key)."""
        self._refresh()
        self._pins[jid] = fingerprint.upper()
        self._changes.pop(jid, None)
        self._save()

    def provision(self, fingerprints: dict[str, str]) -> None:
        """Pin these keys as the provisioning says (one write): the grid that made a party's key
        knows it, so the party is never trusted on first use — a stolen password whose thief
        announces a key of their own meets a pin, not an empty slot."""
        self._refresh()
        wanted = {jid: fpr.upper() for jid, fpr in fingerprints.items()}
        if all(self._pins.get(jid) == fpr for jid, fpr in wanted.items()):
            return
        self._pins.update(wanted)
        for jid in wanted:
            self._changes.pop(jid, None)
        self._save()

    def _refresh(self) -> None:
        """Re-read the files if another process (or the CLI) wrote them since we last did."""
        if self._where is None:
            return
        stamp = _stamp(self._where)
        if stamp == self._stamp:
            return
        self._pins = _read(self.path)
        self._changes = _read(changes_path(self.path))
        self._stamp = stamp

    def _save(self) -> None:
        if self.path is None:
            return
        _write(changes_path(self.path), self._changes)
        _write(self.path, self._pins)  # last: its stamp says both files are what we hold
        self._stamp = _stamp(self._where)


def _stamp(path: str | None) -> tuple[int, int] | None:
    """What changes on every write (each is an ``os.replace``: a new inode), checked before
    every read: a re-pin made elsewhere is never missed."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_ino


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)
