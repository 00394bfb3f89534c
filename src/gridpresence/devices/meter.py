"""A meter: always on, reports power and accumulates energy (the billing input of [0089]).

A branch meter (one with devices below it) measures the sum of their load."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from gridpresence.devices.base import Effect, SimDevice, walk
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, Telemetry


class Meter(SimDevice):
    kind = DeviceKind.METER
    actions: ClassVar[frozenset[Action]] = frozenset({Action.BILLING_RESET})

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = DeviceState.ON
        self.utilisation = self.spec.utilisation
        self.energy_kwh = 0.0

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        assert action is Action.BILLING_RESET, "meters support only billing_reset beyond read and set_time"
        # [0085]: the billing energy register starts again from zero.
        was, self.energy_kwh = self.energy_kwh, 0.0
        return Effect.done(f"billing register reset (was {was:.3f} kWh)")

    @property
    def kw(self) -> float:
        if self.branch_kw:
            return max(0.0, sum(self.branch_kw.values()))
        return self.spec.rated_kw * self.utilisation

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        self.energy_kwh += self.kw * dt_s / 3600.0
        self.utilisation = walk(self.rng, self.utilisation, 0.01 * min(dt_s, 10), 0.05, 1.0)

    def telemetry(self) -> Telemetry:
        kw = self.kw
        return Telemetry(
            load_pct=round(min(150.0, 100 * kw / self.spec.rated_kw), 2),
            kw=round(kw, 3),
            capacity_kw=self.spec.rated_kw,
            energy_kwh=round(self.energy_kwh, 4),
        )
