"""Simulated physics of each device kind; pure Python, no I/O. The device bot drives it; a
field gateway replaces it with a real IED. May import: protocol, words, security, rules, config."""

from __future__ import annotations

import datetime as dt
import random

from gridpresence.config import DeviceSpec
from gridpresence.physics.base import Effect, SimDevice
from gridpresence.physics.breaker import Breaker
from gridpresence.physics.generator import Generator
from gridpresence.physics.load import Load
from gridpresence.physics.master import Master
from gridpresence.physics.meter import Meter
from gridpresence.protocol.models import DeviceKind

KINDS: dict[DeviceKind, type[SimDevice]] = {
    cls.kind: cls for cls in (Load, Generator, Meter, Breaker, Master)
}


def make_device(spec: DeviceSpec, now: dt.datetime, rng: random.Random | None = None) -> SimDevice:
    return KINDS[spec.kind](spec, now, rng)


__all__ = ["Effect", "SimDevice", "Load", "Generator", "Meter", "Breaker", "Master", "KINDS", "make_device"]
