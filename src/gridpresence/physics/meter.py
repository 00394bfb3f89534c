"""A meter: always on, reports power and accumulates energy (the billing input of [0089]).

A branch meter (one with devices below it) measures the sum of their load."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from gridpresence.physics.base import Effect, SimDevice, step_for, walk
from gridpresence.physics.metering import MeterRegisters
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, Telemetry


class Meter(SimDevice):
    kind = DeviceKind.METER
    actions: ClassVar[frozenset[Action]] = frozenset({Action.BILLING_RESET})

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = DeviceState.ON
        self.utilisation = self.spec.utilisation
        self.registers = MeterRegisters(self._last_tick, self.rng)

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        assert action is Action.BILLING_RESET, "meters support only billing_reset beyond read and set_time"
        # [0085]: the billing energy register starts again from zero.
        was = self.registers.reset_register()
        return Effect.done(f"billing register reset (was {was:.3f} kWh)")

    @property
    def kw(self) -> float:
        if self.branch_kw:
            return max(0.0, sum(self.branch_kw.values()))
        return self.spec.rated_kw * self.utilisation

    @property
    def load_pct(self) -> float:
        return min(150.0, 100 * self.kw / self.spec.rated_kw)

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        self.registers.sample(self.kw, self.load_pct, dt_s, now + self.clock_offset)
        self.utilisation = walk(self.rng, self.utilisation, step_for(0.01, dt_s), 0.05, 1.0)

    def telemetry(self) -> Telemetry:
        return Telemetry(
            load_pct=round(self.load_pct, 2),
            kw=round(self.kw, 3),
            capacity_kw=self.spec.rated_kw,
            energy_kwh=round(self.registers.register_kwh, 4),
        )
