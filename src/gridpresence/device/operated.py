"""Where a device keeps what its operators set (physics/base.py:Operated) so that a restart of
its host — even kill -9 — does not re-energise a load an operator shed (issue 14).

One small JSON file per device in the grid's data directory (``device-state/NAME.json``, beside
the replay store), replaced atomically after every command the device executes: a crash leaves
the previous state or the new one, never half a file.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from pydantic import ValidationError

from gridpresence.physics.base import Operated

log = logging.getLogger(__name__)

STATE_DIR = "device-state"


def state_path(data_dir: Path, name: str) -> Path:
    return Path(data_dir) / STATE_DIR / f"{name}.json"


class OperatedStore:
    """The file of one device; ``path`` None keeps nothing (a device run without a data dir)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> Operated | None:
        """The state kept by the last run, or None (none kept; an unreadable file is logged and
        ignored: the device then starts from its fleet-file state, as a new one would)."""
        if self.path is None:
            return None
        try:
            return Operated.model_validate_json(self.path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValidationError) as exc:
            log.error("%s: kept device state unreadable (%s); starting from the fleet file", self.path, exc)
            return None

    def save(self, state: Operated) -> None:
        if self.path is None:
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
