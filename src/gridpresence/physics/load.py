"""A controllable load ([00137]): draws power, can be shed and restored; a critical one refuses."""

from __future__ import annotations

import datetime as dt

from gridpresence.physics.base import Effect, SimDevice, step_for, walk
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, RejectReason, Restriction, Telemetry


class Load(SimDevice):
    kind = DeviceKind.LOAD
    actions = frozenset({Action.SHED, Action.RESTORE})

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.utilisation = self.spec.utilisation

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        if action is Action.SHED:
            if self.spec.critical:
                until = now + dt.timedelta(seconds=self.spec.critical_hold_s)
                self.restrict(
                    Restriction(note="critical process running, cannot be shed", until=until),
                    DeviceState.ON,
                )
                return Effect.refused(RejectReason.CRITICAL, "critical load: shed refused, restricted")
            if self.state is DeviceState.OFF:
                return Effect.done("already off")
            self.state = DeviceState.OFF
            return Effect.done("load shed")
        if self.state is DeviceState.ON:
            return Effect.done("already on")
        self.state = DeviceState.ON
        return Effect.done("load restored")

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        self.utilisation = walk(self.rng, self.utilisation, step_for(0.01, dt_s), 0.2, 1.0)

    @property
    def drawing(self) -> bool:
        return self.state is not DeviceState.OFF

    def telemetry(self) -> Telemetry:
        kw = self.spec.rated_kw * self.utilisation if self.drawing else 0.0
        return Telemetry(load_pct=round(100 * kw / self.spec.rated_kw, 2), kw=round(kw, 3), capacity_kw=self.spec.rated_kw)
