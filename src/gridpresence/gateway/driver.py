"""The driver interface: every field protocol reads points, writes points and reports its link.

A third protocol is one new module with a class that satisfies :class:`Driver`. Failures of the
field link never escape as tracebacks: a driver moves to :attr:`LinkState.DOWN` (telling its
listeners why) and raises :class:`LinkDown`; the next call tries the link again, so a device
that comes back is read again without anyone restarting anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from gridpresence.gateway.points import Point

log = logging.getLogger(__name__)

Value = bool | int | float


class LinkState(StrEnum):
    DOWN = "down"  # never connected, or the last exchange failed
    UP = "up"  # the last exchange was answered (an exception response counts: the IED spoke)


class Quality(StrEnum):
    """How far a reading can be trusted; only GOOD values may be published."""

    GOOD = "good"
    OFFLINE = "offline"  # DNP3: the point's ONLINE flag is clear
    COMM_LOST = "comm-lost"  # DNP3: the outstation lost its own source of the value
    RESTART = "restart"  # DNP3: not updated since the outstation restarted
    BAD = "bad"  # over range, reference error, or a value that cannot be decoded
    MISSING = "missing"  # the device has not reported the point (yet)


@dataclass(frozen=True, slots=True)
class Reading:
    """One point's value as read, scaled to engineering units, with its quality."""

    value: Value | None
    quality: Quality = Quality.GOOD
    flags: int = 0  # the protocol's raw quality flags, kept for diagnostics

    @property
    def good(self) -> bool:
        return self.quality is Quality.GOOD and self.value is not None


class DriverError(Exception):
    """A read or write that did not happen as asked."""


class LinkDown(DriverError):
    """The IED did not answer (refused connection, time-out, link lost)."""


class DeviceRefused(DriverError):
    """The IED answered and refused: a Modbus exception response, a DNP3 control status."""

    def __init__(self, code: int, name: str, detail: str = "") -> None:
        self.code = code
        self.name = name
        super().__init__(f"{name} (code {code}){': ' + detail if detail else ''}")


class ModbusExceptionResponse(DeviceRefused):
    """A Modbus exception response; ``name`` is the exception's name (ILLEGAL_ADDRESS...)."""


class ControlRefused(DeviceRefused):
    """A DNP3 control (CROB or analog output) answered with a status other than SUCCESS."""


StateListener = Callable[[LinkState, str], None]


@runtime_checkable
class Driver(Protocol):
    """What the gateway needs of a field protocol."""

    @property
    def state(self) -> LinkState: ...

    def add_listener(self, listener: StateListener) -> None:
        """Call ``listener(state, reason)`` on every change of :attr:`state`."""

    async def connect(self) -> None:
        """Open the link. A refused or timed-out connection leaves the state DOWN and raises
        :class:`LinkDown`."""

    async def close(self) -> None:
        """Close the link; idempotent."""

    async def read(self, points: Sequence[Point]) -> dict[str, Reading]:
        """Read ``points`` (named by :attr:`Point.name`) in as few requests as the protocol
        allows. Raises :class:`LinkDown` or :class:`DeviceRefused`; a point the device
        reports with bad quality is a reading with that quality, not an error."""

    async def write(self, point: Point, value: Value) -> None:
        """Write one value (engineering units: scale and offset are undone here). Raises
        :class:`LinkDown` or :class:`DeviceRefused`."""


class LinkTracker:
    """The link state and its listeners: one place for the rule every driver follows."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._state = LinkState.DOWN
        self._listeners: list[StateListener] = []
        self.reason = "not connected"

    @property
    def state(self) -> LinkState:
        return self._state

    def add_listener(self, listener: StateListener) -> None:
        self._listeners.append(listener)

    def set(self, state: LinkState, reason: str) -> None:
        self.reason = reason
        if state is self._state:
            return
        self._state = state
        log.info("%s: link %s (%s)", self.name, state.value, reason)
        for listener in list(self._listeners):
            try:
                listener(state, reason)
            except Exception:  # a listener's bug must not take the driver down
                log.exception("%s: link-state listener failed", self.name)
