"""What every simulated device shares: state, restriction, the command rules that do not
depend on the physics (read, set_time, restricted devices refuse), and a random walk."""

from __future__ import annotations

import datetime as dt
import math
import random
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from gridpresence.config import DeviceSpec
from pydantic import BaseModel, ConfigDict

from gridpresence.protocol.models import (
    Action,
    Breaker as Contacts,
    DeviceKind,
    DeviceState,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Restriction,
    Telemetry,
)


class Operated(BaseModel):
    """What an operator's commands set on a device, kept over a restart as a real IED keeps it
    over a controller restart: on/off/restricted, the restriction with its until-time, and a
    breaker's contacts. Readings (load, temperature) are physics, not settings: not kept."""

    model_config = ConfigDict(extra="ignore")

    state: DeviceState
    restriction: Restriction | None = None
    contacts: Contacts | None = None


@dataclass(frozen=True)
class Effect:
    """What a command did to the device; the agent turns it into an Outcome."""

    status: OutcomeStatus
    reason: RejectReason | None = None
    detail: str = ""

    @classmethod
    def done(cls, detail: str = "") -> Effect:
        return cls(OutcomeStatus.EXECUTED, None, detail)

    @classmethod
    def refused(cls, reason: RejectReason, detail: str) -> Effect:
        return cls(OutcomeStatus.REJECTED, reason, detail)


def walk(rng: random.Random, value: float, step: float, lo: float, hi: float) -> float:
    """One bounded random-walk step: readings drift without leaving their physical range."""
    return min(hi, max(lo, value + rng.uniform(-step, step)))


def step_for(rate: float, dt_s: float) -> float:
    """A walk's step over ``dt_s`` seconds: ``rate`` a step of one second, grown with the root
    of the time, as a diffusion's spread is. So how fast readings drift does not depend on how
    often the device is sampled (``sample_s``, up to 10 s): a step in proportion to the time made
    a 4 s sample drift twice as fast as a 1 s one. Past 10 s a step is a 10 s one (a host that
    stalled for minutes does not make its readings jump)."""
    return rate * math.sqrt(min(max(dt_s, 0.0), 10.0))


class SimDevice(ABC):
    kind: ClassVar[DeviceKind]
    actions: ClassVar[frozenset[Action]]  # what this kind supports besides read and set_time

    def __init__(self, spec: DeviceSpec, now: dt.datetime, rng: random.Random | None = None) -> None:
        self.spec = spec
        self.rng = rng or random.Random(spec.name)
        self.state = DeviceState.ON if spec.initial_state != "off" else DeviceState.OFF
        self.restriction: Restriction | None = None
        self.status_note: str | None = None  # why the device is gone, when it goes without saying goodbye
        self.clock_offset = dt.timedelta(0)
        # Load of the devices below this one, from their presence (branch meter, master IED).
        self.branch_kw: dict[str, float] = {}
        # The contacts position the last command asked for ("open"/"closed"; None: never commanded):
        # the alarm rules tell a trip (opened by itself) from a commanded open by it.
        self.commanded: str | None = None
        self._last_tick = now

    # -- commands ---------------------------------------------------------------------

    def execute(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        self.tick(now)
        if action is Action.READ:
            return Effect.done("telemetry attached")
        if action is Action.SET_TIME:
            return self._set_time(args, now)
        if action not in self.actions:
            return Effect.refused(RejectReason.NOT_SUPPORTED, f"a {self.kind.value} cannot {action.value}")
        if self.state is DeviceState.RESTRICTED and self.restriction is not None:
            return Effect.refused(RejectReason.RESTRICTED, self.restriction.note)
        return self._apply(action, args, now)

    async def carry_out(self, action: Action, args: dict[str, str], now: dt.datetime,
                        expires: dt.datetime) -> Effect:
        """The command as the device bot awaits it. A simulation answers at once; a real IED
        behind a gateway (gateway/field_device.py) answers when its read-back confirms, and
        checks ``expires`` (the command's) again right before it writes anything."""
        return self.execute(action, args, now)

    def _set_time(self, args: dict[str, str], now: dt.datetime) -> Effect:
        raw = args.get("time", "")
        try:
            wanted = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        except ValueError:
            return Effect.refused(RejectReason.INVALID_ARGUMENTS, "set_time needs time=<ISO 8601 with zone>")
        if wanted.tzinfo is None:
            return Effect.refused(RejectReason.INVALID_ARGUMENTS, "set_time needs a time zone")
        self.clock_offset = wanted - now
        return Effect.done(f"clock set, offset {self.clock_offset.total_seconds():+.3f} s")

    def operated(self) -> Operated:
        return Operated(state=self.state, restriction=self.restriction)

    def restore(self, kept: Operated, now: dt.datetime) -> None:
        """Take back what was operated before a restart; a restriction whose time ran out
        meanwhile ends at once (as the tick would have ended it)."""
        self.state, self.restriction = kept.state, kept.restriction
        self.tick(now)

    @abstractmethod
    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        """Apply a supported action to an unrestricted device."""

    # -- physics ----------------------------------------------------------------------

    def tick(self, now: dt.datetime) -> None:
        """Advance the physics to `now`; ends a restriction whose time is up."""
        dt_s = max(0.0, (now - self._last_tick).total_seconds())
        self._last_tick = now
        if self.restriction and self.restriction.until and now >= self.restriction.until:
            self._restriction_over(now)
        self._advance(dt_s, now)

    def _restriction_over(self, now: dt.datetime) -> None:
        self.restrict(None, DeviceState.ON)

    def restrict(self, restriction: Restriction | None, otherwise: DeviceState) -> None:
        self.restriction = restriction
        self.state = DeviceState.RESTRICTED if restriction else otherwise

    @abstractmethod
    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        """Drift the readings over dt_s seconds."""

    @abstractmethod
    def telemetry(self) -> Telemetry:
        """Current readings; built through the validating model."""


def branch_contribution(child: PresenceReport) -> float:
    """Net load a child adds to its branch: consumers add, generators subtract, and a breaker
    only carries what the others already count."""
    kw = child.telemetry.kw or 0.0
    if child.kind is DeviceKind.GENERATOR:
        return -kw
    return 0.0 if child.kind is DeviceKind.BREAKER else kw
