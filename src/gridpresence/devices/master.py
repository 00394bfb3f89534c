"""A master IED ([00146]): sums the load its branches report in their presence."""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from gridpresence.devices.base import Effect, SimDevice
from gridpresence.protocol.models import Action, DeviceKind, DeviceState, Telemetry


class Master(SimDevice):
    kind = DeviceKind.MASTER
    actions: ClassVar[frozenset[Action]] = frozenset()

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.state = DeviceState.ON

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        raise AssertionError("a master IED supports no actions beyond read and set_time")

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        pass  # its readings come from its branches

    def telemetry(self) -> Telemetry:
        kw = max(0.0, sum(self.branch_kw.values()))
        return Telemetry(
            load_pct=round(min(150.0, 100 * kw / self.spec.rated_kw), 2),
            kw=round(kw, 3),
            capacity_kw=self.spec.rated_kw,
        )
