"""A master IED ([00146]): sums the load its branches report in their presence, and meters
that sum like a meter does (it reports billing and power quality for its whole tree)."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from gridpresence.physics.base import Effect, SimDevice
from gridpresence.physics.metering import MeterRegisters
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, Telemetry


class Master(SimDevice):
    kind = DeviceKind.MASTER
    actions: ClassVar[frozenset[Action]] = frozenset()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = DeviceState.ON
        self.registers = MeterRegisters(self._last_tick, self.rng)

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        raise AssertionError("a master IED supports no actions beyond read and set_time")

    @property
    def kw(self) -> float:
        return max(0.0, sum(self.branch_kw.values()))

    @property
    def load_pct(self) -> float:
        return min(150.0, 100 * self.kw / self.spec.rated_kw)

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        # Its readings come from its branches; it only integrates them.
        self.registers.sample(self.kw, self.load_pct, dt_s, now + self.clock_offset)

    def telemetry(self) -> Telemetry:
        return Telemetry(load_pct=round(self.load_pct, 2), kw=round(self.kw, 3), capacity_kw=self.spec.rated_kw)
