"""A real IED standing where a device bot has its simulated physics.

:class:`FieldIed` polls one IED through its driver and turns each poll into validated presence
(gateway/report.py: readings that fail validation are never published) or into the reason there
is none: the link is down, the readings are bad. :class:`FieldDevice` is the
:class:`~gridpresence.physics.SimDevice` the device bot drives: its state and telemetry are the
last poll's, and a command is the map's writes, confirmed by reading back. So signatures, roles,
serial binding, replay guard, expiry, chat, ad-hoc commands, alarms and rules are the bot's own.

All field I/O of a gateway runs on one :class:`FieldLoop` thread, apart from the bots' XMPP
loop. A command is awaited end to end: the bot's accept path awaits :meth:`FieldDevice.carry_out`,
which awaits the IED's writes and read-back on the field loop (at most its map's ``timeout_s``),
so while one IED is slow every other identity of the site goes on publishing and answering.
Commands to one IED take turns; a command's expiry is checked when its turn comes, before
anything is written.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gridpresence.config import DeviceSpec
from gridpresence.gateway.dnp3 import Dnp3Driver, Dnp3Tcp
from gridpresence.gateway.driver import DeviceRefused, Driver, DriverError, LinkDown, Reading, Value
from gridpresence.gateway.modbus import ModbusDriver, ModbusSerial, ModbusTcp
from gridpresence.gateway.points import Point
from gridpresence.gateway.report import ReadingError, build_report, extra_readings
from gridpresence.gateway.site import CommandSpec, Confirm, IedSpec, ModbusRtuLink, ModbusTcpLink, PointMap
from gridpresence.physics.base import Effect, SimDevice
from gridpresence.physics.metering import MeterRegisters, PeakHours
from gridpresence.protocol.models import (
    MAX_NOTE,
    METERING_KINDS,
    Action,
    DeviceState,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Restriction,
    Telemetry,
    utcnow,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

# A command waits this long beyond its turn, its map's timeout and its last poll for the field
# thread to hand back its result (the field loop's own bounds end it first; this is the backstop).
HANDOVER_S = 2.0


def make_driver(ied: IedSpec, pmap: PointMap) -> Driver:
    """The driver of an IED's link (one module per protocol: a third is a new branch here)."""
    link = ied.link
    if isinstance(link, ModbusTcpLink):
        return ModbusDriver(ModbusTcp(link.host, link.port), unit=link.unit, timeout_s=link.timeout_s,
                            max_gap=pmap.max_gap, name=ied.name)
    if isinstance(link, ModbusRtuLink):
        serial = ModbusSerial(link.device, link.baudrate, link.bytesize, link.parity, link.stopbits)
        return ModbusDriver(serial, unit=link.unit, timeout_s=link.timeout_s, max_gap=pmap.max_gap, name=ied.name)
    return Dnp3Driver(Dnp3Tcp(link.host, link.port, outstation=link.outstation, master=link.master),
                      timeout_s=link.timeout_s, integrity_s=link.integrity_s, name=ied.name)


class FieldLoop:
    """One thread with its own event loop for every field exchange of a gateway."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="gateway-field-io", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Stopped: cancel what is left (polls close their links on the way out), then close.
        tasks = asyncio.all_tasks(self.loop)
        for task in tasks:
            task.cancel()
        pending: set[asyncio.Task[Any]] = set()
        if tasks:
            _, pending = self.loop.run_until_complete(asyncio.wait(tasks, timeout=15))
        self.loop.run_until_complete(asyncio.sleep(0.05))  # transports' last callbacks
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        if pending:  # a link that will not close: leave the loop to the process's exit
            log.warning("%d field links did not close in time", len(pending))
            return
        self.loop.close()

    def start(self) -> None:
        self._thread.start()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def stop(self) -> None:
        """Cancel every poll, close every link, end the thread (blocking: call it off the bots' loop)."""
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(15)


@dataclass(frozen=True)
class FieldStatus:
    """What the last poll left: replaced whole (never mutated), so the bot's thread reads it safely."""

    report: PresenceReport | None = None  # the last poll's validated presence; None: nothing valid
    extra: dict[str, float] = field(default_factory=dict)  # the map's [readings] (run hours...)
    answered_at: dt.datetime | None = None  # the IED's last answer
    problem: str | None = "waiting for the first answer from the IED"  # why there is no report
    link_down: bool = False


def _matches(reading: Reading, confirm: Confirm) -> bool:
    if not reading.good:
        return False
    if isinstance(confirm.equals, bool):
        return bool(reading.value) is confirm.equals
    return abs(float(reading.value) - float(confirm.equals)) <= confirm.tolerance  # type: ignore[arg-type]


class FieldIed:
    """One IED's polls and commands, on the field loop; ``on_poll`` is told after every poll
    (from the field thread)."""

    def __init__(self, ied: IedSpec, pmap: PointMap, driver: Driver | None = None) -> None:
        self.ied = ied
        self.pmap = pmap
        self.driver = driver or make_driver(ied, pmap)
        self.status = FieldStatus()
        self.on_poll: Callable[[], object] | None = None
        self.polls = 0
        self._seq = 0
        self._polling = asyncio.Lock()
        self._commanding = asyncio.Lock()  # one command at a time: two commands' writes never interleave
        # The last readings that made a valid report, with it: the same readings, the same presence.
        self._last_good: tuple[dict[str, Reading], PresenceReport, dict[str, float]] | None = None
        self.points: list[Point] = [pmap.points[n] for n in pmap.polled()]

    @property
    def stale_after_s(self) -> float:
        """An answer older than this is no longer shown as the IED's state."""
        return max(3 * self.ied.poll_s, self.ied.poll_s + self.ied.link.timeout_s + 1.0)

    async def poll(self) -> FieldStatus:
        """One poll of every bound point; never raises for the field's reasons. One at a time:
        a poll begun before a command's writes must not land after the command's own."""
        async with self._polling:
            return await self._poll()

    async def _poll(self) -> FieldStatus:
        now = utcnow()
        old = self.status
        try:
            readings = await self.driver.read(self.points)
        except LinkDown as exc:
            self.status = FieldStatus(extra=old.extra, answered_at=old.answered_at, problem=str(exc), link_down=True)
        except DeviceRefused as exc:
            self.status = FieldStatus(answered_at=now, problem=f"the IED refused the poll: {exc}")
        except DriverError as exc:
            self.status = FieldStatus(answered_at=now, problem=f"the IED's answer is unusable: {exc}")
        else:
            last = self._last_good
            if last is not None and readings == last[0]:
                # Unchanged readings are the same presence: validated once, not at every poll.
                self.status = FieldStatus(report=last[1], extra=last[2], answered_at=now, problem=None)
                return self._polled()
            self._seq += 1
            try:
                report = build_report(self.ied, self.pmap, readings, seq=self._seq, at=now)
            except ReadingError as exc:
                problem = f"readings not valid: {'; '.join(exc.problems)}"
                if old.problem != problem:  # once per new problem, not at every poll
                    log.warning("%s: not published: %s", self.ied.name, problem)
                self.status = FieldStatus(answered_at=now, problem=problem)
            else:
                extra = extra_readings(self.pmap, readings)
                self._last_good = (readings, report, extra)
                self.status = FieldStatus(report=report, extra=extra, answered_at=now, problem=None)
        return self._polled()

    def _polled(self) -> FieldStatus:
        self.polls += 1
        if self.on_poll is not None:
            self.on_poll()
        return self.status

    async def run(self) -> None:
        """Poll every ``poll_s`` until cancelled (a slow poll delays the next, never doubles it)."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                started = loop.time()
                try:
                    await self.poll()
                except Exception:  # one bad poll must not end the IED's presence
                    log.exception("%s: poll failed", self.ied.name)
                await asyncio.sleep(max(0.0, self.ied.poll_s - (loop.time() - started)))
        finally:
            try:
                async with asyncio.timeout(2):
                    await self.driver.close()
            except (TimeoutError, DriverError) as exc:
                log.warning("%s: link not closed cleanly: %s", self.ied.name, exc)

    async def command(self, spec: CommandSpec, args: dict[str, str], expires: dt.datetime | None = None) -> Effect:
        """When this IED's last command is done: the command's expiry (nothing is written for a
        command that expired waiting), its writes, then its read-back until it confirms or
        ``timeout_s`` is up; then one poll, so the outcome carries the state read back."""
        async with self._commanding:
            now = utcnow()
            if expires is not None and now >= expires:
                late = (now - expires).total_seconds()
                return Effect(OutcomeStatus.EXPIRED, None, f"expired {late:.1f} s before the IED was free to take it")
            effect = await self._carry_out(spec, args)
            await self.poll()
        return effect

    async def _carry_out(self, spec: CommandSpec, args: dict[str, str]) -> Effect:
        confirm = spec.confirm
        last: Reading | None = None
        written = False
        try:
            async with asyncio.timeout(spec.timeout_s):
                for write in spec.writes:
                    await self.driver.write(self.pmap.points[write.point], self._value(write.value, args))
                written = True
                if confirm is None:
                    return Effect.done("written")
                point = self.pmap.points[confirm.point]
                while True:
                    last = (await self.driver.read([point]))[point.name]
                    if _matches(last, confirm):
                        return Effect.done(f"{confirm.point} read back {last.value}")
                    await asyncio.sleep(min(0.1, self.ied.poll_s / 4))
        except TimeoutError:
            if written and confirm is not None:
                seen = "no good reading" if last is None or not last.good else f"{last.value!r}"
                return Effect.refused(RejectReason.NOT_CONFIRMED, f"after {spec.timeout_s:g} s {confirm.point} reads "
                                      f"{seen}, not {confirm.equals!r}")
            return Effect.refused(RejectReason.NO_ANSWER, f"the IED did not answer within {spec.timeout_s:g} s")
        except LinkDown as exc:
            return Effect.refused(RejectReason.NO_ANSWER, f"the IED did not answer: {exc}")
        except DeviceRefused as exc:
            return Effect.refused(RejectReason.DEVICE_REFUSED, f"the IED refused: {exc}")
        except DriverError as exc:
            return Effect.refused(RejectReason.INVALID_ARGUMENTS, str(exc))

    @staticmethod
    def _value(value: bool | float | str, args: dict[str, str]) -> Value:
        if value != "now":
            return value  # type: ignore[return-value]
        # set_time: the time asked for (time=ISO 8601), else the gateway's clock; UNIX seconds.
        raw = args.get("time")
        if raw:
            try:
                wanted = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
            except ValueError:
                raise DriverError("set_time needs time=<ISO 8601 with zone>") from None
            if wanted.tzinfo is None:
                raise DriverError("set_time needs a time zone")
            return int(wanted.timestamp())
        return int(time.time())


class FieldRegisters(MeterRegisters):
    """A meter's billing registers from its own energy register: each poll adds the energy the
    IED counted since the last (a register that went backwards was reset at the meter)."""

    def __init__(self, now: dt.datetime, rng: random.Random, peak: PeakHours = PeakHours()) -> None:
        super().__init__(now, rng, peak)
        self._seen = False  # until the first reading, the register's value is unknown

    def observe(self, energy_kwh: float | None, kw: float | None, load_pct: float | None, now: dt.datetime) -> None:
        if energy_kwh is None:
            return
        if not self._seen:
            self.start_kwh = self.register_kwh = energy_kwh  # the first reading: the period starts here
            self._seen = True
        delta = energy_kwh - self.register_kwh
        if delta < 0:  # reset at the meter: it counted from zero since (as reset_register does)
            self.start_kwh -= self.register_kwh
            delta = energy_kwh
        self.register_kwh = energy_kwh
        if self.peak.contains(now):
            self.peak_kwh += delta
        else:
            self.off_peak_kwh += delta
        self.max_kw = max(self.max_kw, kw or 0.0)
        self.v_sum += self.voltage_v
        self.load_sum += load_pct or 0.0
        self.samples += 1


class FieldDevice(SimDevice):
    """The device bot's view of a real IED: the last poll's presence, and commands by the map."""

    def __init__(self, spec: DeviceSpec, field_ied: FieldIed, loop: FieldLoop, now: dt.datetime) -> None:
        super().__init__(spec, now)
        self.field = field_ied
        self.loop = loop
        self.kind = field_ied.ied.kind  # type: ignore[misc]  # per instance: the site file says
        self.actions = frozenset(field_ied.pmap.commands) - {Action.READ}  # type: ignore[misc]
        self._telemetry = Telemetry()
        self._observed: PresenceReport | None = None
        if self.kind in METERING_KINDS:
            self.registers = FieldRegisters(now, self.rng)
        self.tick(now)

    @property
    def readings(self) -> dict[str, float]:
        """The map's extra readings (run hours, operation counts) of the last good poll."""
        return dict(self.field.status.extra)

    def offline_note(self, status: FieldStatus, now: dt.datetime) -> str | None:
        """Why the IED's last answer is not its state now (no answer, or too old), or None."""
        since = status.answered_at
        if since is not None and not status.link_down and (now - since).total_seconds() <= self.field.stale_after_s:
            return None
        return (f"no answer from the IED since {since:%H:%M:%S} UTC" if since is not None
                else "no answer from the IED yet")

    def tick(self, now: dt.datetime) -> None:
        status = self.field.status
        self._last_tick = now
        offline = self.offline_note(status, now)
        self.status_note = offline
        if offline is not None:
            silent_s = (now - status.answered_at).total_seconds() if status.answered_at else None
            if silent_s is not None and silent_s >= self.field.ied.gone_after_s:
                self.restrict(None, DeviceState.GONE)
            else:
                self.restrict(Restriction(note=offline[:MAX_NOTE]), DeviceState.RESTRICTED)
            self._telemetry = Telemetry()  # stale readings are not shown as the IED's
        elif status.report is None:
            self.restrict(Restriction(note=(status.problem or "no valid readings")[:MAX_NOTE]), DeviceState.RESTRICTED)
            self._telemetry = Telemetry()
        else:
            report = status.report
            self.restrict(report.restriction, report.state)
            self._telemetry = report.telemetry
            if report is not self._observed and isinstance(getattr(self, "registers", None), FieldRegisters):
                t = report.telemetry
                self.registers.observe(t.energy_kwh, t.kw, t.load_pct, now + self.clock_offset)
            self._observed = report

    def telemetry(self) -> Telemetry:
        return self._telemetry

    @property
    def load_pct(self) -> float:
        return self._telemetry.load_pct or 0.0

    def execute(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        raise TypeError("a field device's commands are awaited: carry_out()")

    async def carry_out(self, action: Action, args: dict[str, str], now: dt.datetime,
                        expires: dt.datetime) -> Effect:
        """The map's command, carried out on the field loop while the bot's loop goes on."""
        self.tick(now)
        if action is Action.READ:
            return Effect.done("telemetry attached")
        command = self.field.pmap.commands.get(action)
        if command is None:
            return Effect.refused(RejectReason.NOT_SUPPORTED, f"the IED's point map has no {action.value} command")
        if self.status_note is not None:  # known dead: refuse now rather than wait for a time-out
            return Effect.refused(RejectReason.NO_ANSWER, self.status_note)
        if self.state is DeviceState.RESTRICTED and self.restriction is not None:
            return Effect.refused(RejectReason.RESTRICTED, self.restriction.note)
        # Bounded by the command's turn (until its expiry), its own time-out and the poll after.
        bound = (max(0.0, (expires - utcnow()).total_seconds()) + command.timeout_s + self.field.ied.link.timeout_s
                 + HANDOVER_S)
        try:  # a time-out cancels the field side too (run_coroutine_threadsafe passes it on)
            effect = await asyncio.wait_for(asyncio.wrap_future(self.loop.submit(self.field.command(
                command, args, expires))), bound)
        except TimeoutError:
            effect = Effect.refused(RejectReason.NO_ANSWER, f"the IED did not answer within {command.timeout_s:g} s")
        self.tick(utcnow())
        return effect

    def _apply(self, action: Action, args: dict[str, str], now: dt.datetime) -> Effect:
        raise AssertionError("a field device carries commands out in execute()")

    def _advance(self, dt_s: float, now: dt.datetime) -> None:
        """No physics: the IED's own readings are the state (see :meth:`tick`)."""
