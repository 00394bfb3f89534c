"""A breaker/relay: reports its loading and can be opened or closed."""

from __future__ import annotations

import datetime as dt

from gridpresence.physics.base import Effect, Operated, SimDevice, step_for, walk
from gridpresence.protocol.models import Action, Breaker as Contacts, DeviceKind, DeviceState, Telemetry


class Breaker(SimDevice):
    kind = DeviceKind.BREAKER
    actions = frozenset({Action.OPEN, Action.CLOSE})

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.contacts = Contacts.OPEN if self.state is DeviceState.OFF else Contacts.CLOSED
        # Open from the start because the fleet file says so: that is an order, not a trip.
        self.commanded = self.contacts.value
        self.utilisation = self.spec.utilisation

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        wanted = Contacts.OPEN if action is Action.OPEN else Contacts.CLOSED
        self.commanded = wanted.value
        if self.contacts is wanted:
            return Effect.done(f"already {wanted.value}")
        self.contacts = wanted
        self.state = DeviceState.ON if wanted is Contacts.CLOSED else DeviceState.OFF
        return Effect.done(f"breaker {wanted.value}")

    def operated(self) -> Operated:
        return super().operated().model_copy(update={"contacts": self.contacts})

    def restore(self, kept: Operated, now: dt.datetime) -> None:
        super().restore(kept, now)
        if kept.contacts is not None:
            self.contacts = kept.contacts

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        self.utilisation = walk(self.rng, self.utilisation, step_for(0.01, dt_s), 0.05, 1.0)

    def telemetry(self) -> Telemetry:
        kw = self.spec.rated_kw * self.utilisation if self.contacts is Contacts.CLOSED else 0.0
        return Telemetry(
            load_pct=round(100 * kw / self.spec.rated_kw, 2),
            kw=round(kw, 3),
            capacity_kw=self.spec.rated_kw,
            breaker=self.contacts,
        )
