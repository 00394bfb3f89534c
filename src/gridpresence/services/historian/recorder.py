"""The recorder: turns what a watching party sees into rows of the history store.

It rides on a session that already watches every device (the fleet console's GridOperator, see
host/fleet.py): every valid presence gives telemetry samples; a change of state label or
restriction, of health, an alarm the grid sends and a command outcome give events. Rows are kept
in memory and written as one transaction per batch (every `batch_s` or `batch_max` rows) from a
worker thread, so the event loop never waits on the disk and a crash loses at most one batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceChange, DeviceView
from gridpresence.protocol.alarm import Alarm
from gridpresence.protocol.models import Outcome
from gridpresence.services.historian.store import METRIC_UNITS, Event, HistoryStore, Retention, Sample

log = logging.getLogger(__name__)

OUTCOMES_REMEMBERED = 10_000  # command ids, to record each outcome once


def samples_of(view: DeviceView, ts: float) -> list[Sample]:
    t = view.report.telemetry if view.report else None
    if t is None:
        return []
    return [Sample(view.name, ts, m, float(v)) for m in METRIC_UNITS if (v := getattr(t, m, None)) is not None]


def _restriction(view: DeviceView) -> str | None:
    return view.report.status_text() if view.report and view.report.restriction else None


class Historian:
    def __init__(self, store: HistoryStore, *, batch_s: float = 1.0, batch_max: int = 5000,
                 retention: Retention | None = None, prune_every_s: float = 3600.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.batch_s = batch_s
        self.batch_max = batch_max
        self.retention = retention or Retention()
        self.prune_every_s = prune_every_s
        self.clock = clock
        self._samples: list[Sample] = []
        self._events: list[Event] = []
        self._task: asyncio.Task[None] | None = None
        self._full = asyncio.Event()
        self._detach: list[Callable[[], None]] = []
        self.written = 0  # rows stored so far (samples and events)
        # One outcome may reach the recorder twice (the dashboard's own command, and the device's
        # copy to the recorders): each command id is kept once.
        self._outcomes_seen: OrderedDict[str, None] = OrderedDict()

    # -- what is recorded -------------------------------------------------------------

    def attach(self, grid: GridOperator) -> None:
        self._detach += [grid.tracker.listen(self.on_change), grid.listen_alarms(self.on_alarm),
                         grid.listen_outcomes(self.on_outcome)]

    def on_change(self, change: DeviceChange) -> None:
        now = self.clock()
        old, new = change.previous, change.current
        if change.cause in ("presence", "recovered", "mail"):
            self._samples += samples_of(new, now)
        if old.label != new.label or _restriction(old) != _restriction(new):
            self.event(new.name, now, "state", {"state": new.label, "was": old.label, "restriction": _restriction(new),
                                                "cause": change.cause})
        if old.health is not new.health:
            self.event(new.name, now, "health", {"health": new.health.value, "was": old.health.value,
                                                 "reason": new.health_reason})
        self._check_full()

    def on_alarm(self, alarm: Alarm) -> None:
        name = alarm.device.split("@", 1)[0]
        self.event(name, self.clock(), "alarm", alarm.model_dump(mode="json", exclude_none=True))

    def on_outcome(self, name: str, action: str, outcome: Outcome) -> None:
        if outcome.command_id in self._outcomes_seen:
            return
        self._outcomes_seen[outcome.command_id] = None
        while len(self._outcomes_seen) > OUTCOMES_REMEMBERED:
            self._outcomes_seen.popitem(last=False)
        self.event(name, self.clock(), "outcome", {"action": action, **outcome.model_dump(mode="json", exclude_none=True)})

    def event(self, device: str, ts: float, kind: str, detail: dict[str, Any]) -> None:
        self._events.append(Event(device, ts, kind, detail))
        self._check_full()

    def sample(self, device: str, ts: float, metric: str, value: float) -> None:
        self._samples.append(Sample(device, ts, metric, value))
        self._check_full()

    def _check_full(self) -> None:
        if len(self._samples) + len(self._events) >= self.batch_max:
            self._full.set()

    # -- writing ----------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        last_prune = 0.0
        while True:
            try:
                await asyncio.wait_for(self._full.wait(), self.batch_s)
            except asyncio.TimeoutError:
                pass
            self._full.clear()
            try:
                await self.flush()
                if self.clock() - last_prune >= self.prune_every_s:
                    last_prune = self.clock()
                    removed = await asyncio.to_thread(self.store.prune, last_prune, self.retention)
                    log.debug("historian pruned %s", removed)
            except asyncio.CancelledError:
                raise
            except Exception:  # a full disk or a lost database must not end the recorder
                log.exception("historian: writing a batch failed; it is retried with the next one")

    async def flush(self) -> int:
        """Write what is pending as one batch; the rows written. A failed batch is kept for the next."""
        samples, events = self._samples, self._events
        if not samples and not events:
            return 0
        self._samples, self._events = [], []
        try:
            await asyncio.to_thread(self.store.write, samples, events)
        except BaseException:
            self._samples[:0], self._events[:0] = samples, events
            raise
        self.written += len(samples) + len(events)
        return len(samples) + len(events)

    async def stop(self) -> None:
        for detach in self._detach:
            detach()
        self._detach.clear()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        try:
            await self.flush()
        finally:
            self.store.close()
