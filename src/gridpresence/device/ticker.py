"""One ticker per event loop for every device bot on it: a timer wheel instead of a sleeping
task per device.

Thousands of hosted identities share a process; each ticks every ``tick_s`` (physics, presence
if it moved, alarms). A task each, with its own ``asyncio.sleep``, costs the loop a timer and a
task switch per device per tick and lets the ticks bunch up as they will. Here one task per
period steps through ``SLOTS`` slots of the period; a device joins the least-filled slot, so a
thousand devices that start together still tick spread over the period, each once per period.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Callable

log = logging.getLogger(__name__)

# Slots per period: the presence a tick sends comes in this many bursts a period at most.
SLOTS = 20

Step = Callable[[], None]


class _Wheel:
    """The devices of one period, stepped slot by slot by one task."""

    def __init__(self, period_s: float, on_empty: Callable[[_Wheel], None]) -> None:
        self.period_s = period_s
        self.slots: list[dict[object, Step]] = [{} for _ in range(SLOTS)]
        self.where: dict[object, int] = {}
        self._on_empty = on_empty
        self._task: asyncio.Task[None] | None = None

    def join(self, key: object, step: Step) -> None:
        self.leave(key)
        slot = min(range(SLOTS), key=lambda i: len(self.slots[i]))
        self.slots[slot][key] = step
        self.where[key] = slot
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    def leave(self, key: object) -> None:
        slot = self.where.pop(key, None)
        if slot is not None:
            del self.slots[slot][key]

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        slot_s = self.period_s / SLOTS
        at, i = loop.time(), 0
        while self.where:
            at += slot_s
            now = loop.time()
            if at < now - self.period_s:  # a whole period behind (a stalled loop): no catching up in a burst
                at = now
            await asyncio.sleep(max(0.0, at - now))
            for key, step in list(self.slots[i].items()):
                if key not in self.where:  # left during this slot's steps
                    continue
                try:
                    step()
                except Exception:  # one device's bad tick must not stop the others'
                    log.exception("tick of %s failed", key)
            i = (i + 1) % SLOTS
        self._on_empty(self)


class Ticker:
    """The wheels of one event loop, by period (``Ticker.of()``: the running loop's)."""

    _of_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Ticker] = weakref.WeakKeyDictionary()

    def __init__(self) -> None:
        self._wheels: dict[float, _Wheel] = {}
        self._period_of: dict[object, float] = {}

    @classmethod
    def of(cls) -> Ticker:
        loop = asyncio.get_running_loop()
        ticker = cls._of_loop.get(loop)
        if ticker is None:
            ticker = cls._of_loop[loop] = cls()
        return ticker

    def join(self, key: object, period_s: float, step: Step) -> None:
        """Call ``step()`` every ``period_s`` from now on (the first within one period), until
        :meth:`leave`. Joining again moves ``key`` (to a new period, say)."""
        self.leave(key)
        wheel = self._wheels.get(period_s)
        if wheel is None:
            wheel = self._wheels[period_s] = _Wheel(period_s, self._empty)
        wheel.join(key, step)
        self._period_of[key] = period_s

    def leave(self, key: object) -> None:
        period = self._period_of.pop(key, None)
        if period is not None:
            self._wheels[period].leave(key)

    def ticking(self, key: object) -> bool:
        return key in self._period_of

    def _empty(self, wheel: _Wheel) -> None:
        if self._wheels.get(wheel.period_s) is wheel and not wheel.where:
            del self._wheels[wheel.period_s]
