"""DNP3 over TCP with dnp3py as the master.

Every :meth:`Dnp3Driver.read` is a poll: an integrity poll (class 0/1/2/3) after connecting,
when the outstation says it restarted or lost events, and every ``integrity_s``; an event poll
(class 1/2/3) otherwise. Values are kept between polls, with the quality flags the outstation
sent (ONLINE, RESTART, COMM_LOST, OVER_RANGE...), and dropped when the link goes down.
Controls are CROBs (binary outputs) and analog output blocks, direct operate or
select-before-operate; the status the outstation echoes is checked.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from dnp3.application.parser import ParseError, parse_response
from dnp3.core.enums import CommandStatus, ControlCode
from dnp3.core.flags import IIN
from dnp3.master import (
    CommandBuilder,
    DefaultSOEHandler,
    Master,
    MasterConfig,
    MasterRunnerError,
    MasterTcpRunner,
)
from dnp3.master.handler import ResponseInfo
from dnp3.transport_io.channel import ChannelError

from gridpresence.gateway.driver import (
    ControlRefused,
    DeviceRefused,
    DriverError,
    LinkDown,
    LinkState,
    LinkTracker,
    Quality,
    Reading,
    StateListener,
    Value,
)
from gridpresence.gateway.points import DNP3_TABLES, Point

# Quality flag bits shared by binary, analog and counter objects (IEEE 1815-2012 A.2-A.9).
_ONLINE, _RESTART, _COMM_LOST = 0x01, 0x02, 0x04
_ANALOG_BAD = 0x20 | 0x40  # OVER_RANGE, REFERENCE_ERR (for counters these bits mean rollover)
_IIN_REFUSED = IIN.NO_FUNC_CODE_SUPPORT | IIN.OBJECT_UNKNOWN | IIN.PARAMETER_ERROR
# Control echo objects: group -> {variation: object size}; the status is each object's last byte.
_CONTROL_SIZES = {12: {1: 11}, 41: {1: 5, 2: 3, 3: 5, 4: 9}}


@dataclass(frozen=True)
class Dnp3Tcp:
    host: str
    port: int = 20000
    outstation: int = 10  # the outstation's link address
    master: int = 1  # ours


@dataclass
class _StatusMaster(Master):
    """dnp3py's Master hands polled values to its SOE handler but drops the control echo;
    this keeps the statuses of the last control response."""

    control_statuses: list[int] = field(default_factory=list, init=False)

    def process_response(self, data: bytes) -> ResponseInfo | None:
        info = super().process_response(data)
        if info is not None and not info.is_unsolicited:
            try:
                objects = parse_response(data).objects
            except (ParseError, ValueError, IndexError):
                return info
            for block in objects:
                self.control_statuses.extend(_echo_statuses(block.header, block.data))
        return info


def _echo_statuses(header: object, data: bytes) -> list[int]:
    sizes = _CONTROL_SIZES.get(getattr(header, "group", -1))
    size = sizes.get(getattr(header, "variation", -1)) if sizes else None
    qualifier = getattr(header, "qualifier", -1)
    if size is None or qualifier not in (0x17, 0x28):
        return []
    width = 1 if qualifier == 0x17 else 2  # count and index prefix widths
    if len(data) < width:
        return []
    count = int.from_bytes(data[:width], "little")
    out, pos = [], width
    for _ in range(count):
        end = pos + width + size
        if end > len(data):
            break
        out.append(data[end - 1])
        pos = end
    return out


class Dnp3Driver:
    """One DNP3 association over TCP."""

    def __init__(
        self,
        link: Dnp3Tcp,
        *,
        timeout_s: float = 2.0,
        integrity_s: float = 300.0,
        name: str = "dnp3",
    ) -> None:
        self.link = link
        self.timeout_s = timeout_s
        self.integrity_s = integrity_s
        self.polls: list[str] = []  # "integrity"/"event" per poll, newest last (kept short)
        self._tracker = LinkTracker(name)
        self._handler = DefaultSOEHandler()
        self._master: _StatusMaster | None = None
        self._runner: MasterTcpRunner | None = None
        self._last_integrity = float("-inf")
        self._need_integrity = True
        self._lock = asyncio.Lock()

    # -- the Driver interface -------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._tracker.state

    def add_listener(self, listener: StateListener) -> None:
        self._tracker.add_listener(listener)

    async def connect(self) -> None:
        async with self._lock:
            await self._ensure_open()

    async def close(self) -> None:
        async with self._lock:
            await self._drop("closed")

    async def read(self, points: Sequence[Point]) -> dict[str, Reading]:
        for point in points:
            if point.table not in DNP3_TABLES:
                raise DriverError(f"{point.name}: '{point.table}' is not a DNP3 point type")
        await self.poll()
        return {p.name: self.cached(p) for p in points}

    async def write(self, point: Point, value: Value) -> None:
        if point.table not in ("binary_output", "analog_output"):
            raise DriverError(f"{point.name}: a {point.table} cannot be written")
        builder = CommandBuilder()
        if point.table == "binary_output":
            on = bool(value)
            if point.control == "pulse":
                builder.add_crob(point.address, _pulse_code(on), 1, point.pulse_ms, 0)
            elif on:
                builder.latch_on(point.address)
            else:
                builder.latch_off(point.address)
        else:
            builder.add_analog(point.address, point.to_raw(float(value)))
        async with self._lock:
            master = await self._ensure_open()
            if point.sbo:
                await self._control(master, master.build_select(builder.build_select()), "select")
                await self._control(master, master.build_operate(builder.build_operate()), "operate")
            else:
                request = master.build_direct_operate(builder.build_direct_operate())
                await self._control(master, request, "direct operate")

    # -- polling ---------------------------------------------------------------------------

    async def poll(self, *, integrity: bool | None = None) -> str:
        """One poll; returns which kind ran. ``integrity=None`` decides by the rules above."""
        async with self._lock:
            await self._ensure_open()
            if integrity is None:
                integrity = self._need_integrity or time.monotonic() - self._last_integrity >= self.integrity_s
            runner = self._runner
            assert runner is not None
            kind = "integrity" if integrity else "event"
            infos = await self._exchange(runner.integrity_poll() if integrity else runner.class_poll())
            if integrity:
                self._need_integrity = False
                self._last_integrity = time.monotonic()
            iin = IIN(0)
            for info in infos:
                iin |= info.iin
            # After a restart or an event-buffer overflow the events no longer add up to the
            # state: read everything again on the next poll.
            if iin & (IIN.DEVICE_RESTART | IIN.EVENT_BUFFER_OVERFLOW) and not integrity:
                self._need_integrity = True
            self.polls = [*self.polls[-31:], kind]
            return kind

    def cached(self, point: Point) -> Reading:
        h = self._handler
        stores: dict[str, Mapping[int, Any]] = {  # (each table's own value type; read alike below)
            "binary_input": h.binary_inputs,
            "binary_output": h.binary_outputs,
            "analog_input": h.analog_inputs,
            "analog_output": h.analog_outputs,
            "counter": h.counters,
        }
        store = stores[point.table]
        value = store.get(point.address)
        if value is None:
            return Reading(None, Quality.MISSING)
        flags = int(value.quality)
        if point.is_bit:
            return Reading(bool(value.value), _quality(flags, 0), flags)
        bad = _ANALOG_BAD if point.table.startswith("analog") else 0
        scaled = point.to_engineering(float(value.value))
        return Reading(scaled, _quality(flags, bad), flags)

    # -- the link ---------------------------------------------------------------------------

    async def _ensure_open(self) -> _StatusMaster:
        if self._runner is not None and self._runner.is_open and self._master is not None:
            return self._master
        await self._drop(self._tracker.reason)
        config = MasterConfig(address=self.link.master, outstation_address=self.link.outstation)
        master = _StatusMaster(config=config, handler=self._handler)
        runner = MasterTcpRunner(
            master=master, host=self.link.host, port=self.link.port, response_timeout=self.timeout_s
        )
        try:
            await asyncio.wait_for(runner.open(), self.timeout_s)
        except (TimeoutError, OSError, ChannelError, MasterRunnerError) as exc:
            self._tracker.set(LinkState.DOWN, f"cannot connect to {self._where()}: {exc or type(exc).__name__}")
            raise LinkDown(self._tracker.reason) from None
        self._master, self._runner = master, runner
        self._need_integrity = True
        return master

    async def _drop(self, reason: str) -> None:
        runner, self._runner, self._master = self._runner, None, None
        if runner is not None:
            try:
                await runner.close()
            except (OSError, ChannelError, MasterRunnerError):
                pass  # closing a dead link: nothing more to learn
        self._handler.clear()  # values of a lost association are not current any more
        self._tracker.set(LinkState.DOWN, reason)

    def _where(self) -> str:
        return f"{self.link.host}:{self.link.port} (outstation {self.link.outstation})"

    async def _exchange(self, request: object) -> list[ResponseInfo]:
        try:
            infos = await request  # type: ignore[misc]
        except (MasterRunnerError, ChannelError, OSError) as exc:
            await self._drop(f"no answer from {self._where()}: {exc}")
            raise LinkDown(self._tracker.reason) from None
        self._tracker.set(LinkState.UP, f"answering at {self._where()}")
        return list(infos)

    async def _control(self, master: _StatusMaster, request: object, step: str) -> None:
        runner = self._runner
        assert runner is not None
        master.control_statuses.clear()
        infos = await self._exchange(runner.request(request))  # type: ignore[arg-type]
        iin = IIN(0)
        for info in infos:
            iin |= info.iin
        if iin & _IIN_REFUSED:
            names = ", ".join(f.name or "" for f in IIN if f & iin & _IIN_REFUSED)
            raise DeviceRefused(int(iin & _IIN_REFUSED), names, f"{step} refused by the outstation")
        if not master.control_statuses:
            raise DriverError(f"{step}: the outstation's answer carried no control status")
        for status in master.control_statuses:
            if status != CommandStatus.SUCCESS:
                try:
                    name = CommandStatus(status).name
                except ValueError:
                    name = "UNDEFINED"
                raise ControlRefused(status, name, f"{step} refused by the outstation")


def _pulse_code(on: bool) -> ControlCode:
    return ControlCode.PULSE_ON if on else ControlCode.PULSE_OFF


def _quality(flags: int, bad_bits: int) -> Quality:
    if flags & _COMM_LOST:
        return Quality.COMM_LOST
    if flags & _RESTART:
        return Quality.RESTART
    if not flags & _ONLINE:
        return Quality.OFFLINE
    if flags & bad_bits:
        return Quality.BAD
    return Quality.GOOD
