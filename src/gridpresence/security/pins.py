"""Trust on first use: the first key seen for a JID is pinned; a different one later is refused
with a loud warning until someone who knows why re-pins it (``gridpresence keys repin``)."""

from __future__ import annotations

import json
import logging
import os
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)


class PinVerdict(StrEnum):
    NEW = "new"  # first key seen for this JID: now pinned
    SAME = "same"  # the pinned key
    CHANGED = "changed"  # not the pinned key: refused


class PinStore:
    """Pinned fingerprints by bare JID in a JSON file (written atomically on every new pin)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._pins: dict[str, str] = {}
        if path is not None and path.exists():
            self._pins = json.loads(path.read_text(encoding="utf-8"))

    def pinned(self, jid: str) -> str | None:
        return self._pins.get(jid)

    def check(self, jid: str, fingerprint: str) -> PinVerdict:
        """Pin ``fingerprint`` for ``jid`` on first use; say whether it matches later."""
        fingerprint = fingerprint.upper()
        old = self._pins.get(jid)
        if old is None:
            self._pins[jid] = fingerprint
            self._save()
            log.info("pinned OpenPGP key %s for %s on first use", fingerprint, jid)
            return PinVerdict.NEW
        if old == fingerprint:
            return PinVerdict.SAME
        log.warning("OpenPGP key of %s CHANGED: pinned %s, now offered %s; refusing it until re-pinned",
                    jid, old, fingerprint)
        return PinVerdict.CHANGED

    def repin(self, jid: str, fingerprint: str) -> None:
        """Accept a new key for ``jid`` deliberately (a rotated key)."""
        self._pins[jid] = fingerprint.upper()
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self._pins, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)
