"""A generator ([00131], [00137]): off -> restricted ("starting") for startup_s -> on.

It refuses stop during start-up; fuel burns and the engine warms while it runs."""

from __future__ import annotations

import datetime as dt

from gridpresence.physics.base import Effect, SimDevice, step_for, walk
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, Restriction, Telemetry

AMBIENT_C = 25.0
RUNNING_C = 85.0
FULL_TANK_HOURS = 8.0  # at rated output


class Generator(SimDevice):
    kind = DeviceKind.GENERATOR
    actions = frozenset({Action.START, Action.STOP})

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if self.spec.initial_state is None:
            self.state = DeviceState.OFF  # generators wait to be started
        self.output_share = self.spec.utilisation
        self.fuel_pct = 100.0
        self.temperature_c = RUNNING_C if self.state is DeviceState.ON else AMBIENT_C

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        if action is Action.START:
            if self.state is DeviceState.ON:
                return Effect.done("already running")
            if self.spec.startup_s == 0:
                self.state = DeviceState.ON
                return Effect.done("started")
            until = now + dt.timedelta(seconds=self.spec.startup_s)
            self.restrict(Restriction(note="starting", until=until), DeviceState.ON)
            return Effect.done(f"starting, on at {until:%H:%M:%S} UTC")
        if self.state is DeviceState.OFF:
            return Effect.done("already stopped")
        self.state = DeviceState.OFF
        return Effect.done("stopped")

    @property
    def running(self) -> bool:
        return self.state is DeviceState.ON

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        if self.running:
            self.output_share = walk(self.rng, self.output_share, step_for(0.01, dt_s), 0.3, 1.0)
            burn = 100.0 * self.output_share * dt_s / (FULL_TANK_HOURS * 3600)
            self.fuel_pct = max(0.0, self.fuel_pct - burn)
            if self.fuel_pct == 0.0:
                self.state = DeviceState.OFF  # ran dry
        target = RUNNING_C if self.state is not DeviceState.OFF else AMBIENT_C
        # First-order approach to the target temperature, time constant ~60 s.
        self.temperature_c += (target - self.temperature_c) * min(1.0, dt_s / 60.0)

    def telemetry(self) -> Telemetry:
        kw = self.spec.rated_kw * self.output_share if self.running else 0.0
        return Telemetry(
            load_pct=round(100 * kw / self.spec.rated_kw, 2),
            kw=round(kw, 3),
            capacity_kw=self.spec.rated_kw,
            fuel_pct=round(self.fuel_pct, 3),
            temperature_c=round(self.temperature_c, 2),
        )
