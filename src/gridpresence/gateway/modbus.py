"""Modbus TCP and Modbus RTU (serial) with pymodbus's async client.

Reads are batched: points of one unit id and one table are sorted and merged into spans while
the gap between them is at most ``max_gap`` and the span stays within the protocol's limit
(125 registers, 2000 bits per request). A span never crosses a unit id or a table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pymodbus import FramerType, ModbusException
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient
from pymodbus.constants import ExcCodes
from pymodbus.exceptions import ConnectionException, ModbusIOException

from gridpresence.gateway.driver import (
    DriverError,
    LinkDown,
    LinkState,
    LinkTracker,
    ModbusExceptionResponse,
    Quality,
    Reading,
    StateListener,
    Value,
)
from gridpresence.gateway.points import MODBUS_TABLES, Point

MAX_REGISTERS = 125  # per read request (Modbus application protocol 1.1b3, 6.3/6.4)
MAX_BITS = 2000  # per read request (6.1/6.2)


@dataclass(frozen=True)
class Span:
    """One read request: a table of one unit from ``start``, ``count`` registers or bits."""

    unit: int
    table: str
    start: int
    count: int
    points: tuple[Point, ...] = field(default=())


def plan_reads(points: Sequence[Point], default_unit: int, max_gap: int = 0) -> list[Span]:
    """The fewest requests that read ``points``: the batching rule, without I/O."""
    groups: dict[tuple[int, str], list[Point]] = {}
    for point in points:
        if point.table not in MODBUS_TABLES:
            raise DriverError(f"{point.name}: '{point.table}' is not a Modbus table")
        unit = default_unit if point.unit is None else point.unit
        groups.setdefault((unit, point.table), []).append(point)
    spans: list[Span] = []
    for (unit, table), members in sorted(groups.items()):
        limit = MAX_BITS if table in ("coil", "discrete_input") else MAX_REGISTERS
        members.sort(key=lambda p: (p.address, p.width))
        start, end, batch = members[0].address, members[0].address + members[0].width, [members[0]]
        for point in members[1:]:
            new_end = max(end, point.address + point.width)
            if point.address - end <= max_gap and new_end - start <= limit:
                end, batch = new_end, [*batch, point]
                continue
            spans.append(Span(unit, table, start, end - start, tuple(batch)))
            start, end, batch = point.address, point.address + point.width, [point]
        spans.append(Span(unit, table, start, end - start, tuple(batch)))
    return spans


@dataclass(frozen=True)
class ModbusTcp:
    host: str
    port: int = 502


@dataclass(frozen=True)
class ModbusSerial:
    device: str
    baudrate: int = 19200
    bytesize: int = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: int = 1


class ModbusDriver:
    """One Modbus connection (a TCP socket or a serial line) to one or more unit ids."""

    def __init__(
        self,
        link: ModbusTcp | ModbusSerial,
        *,
        unit: int = 1,
        timeout_s: float = 1.0,
        max_gap: int = 0,
        name: str = "modbus",
    ) -> None:
        self.link = link
        self.unit = unit
        self.timeout_s = timeout_s
        self.max_gap = max_gap
        self.requests = 0  # requests sent, for benchmarks and diagnostics
        self._tracker = LinkTracker(name)
        self._client: AsyncModbusTcpClient | AsyncModbusSerialClient | None = None
        self._lock = asyncio.Lock()  # one request at a time: RTU is half duplex, TCP ids match
        self._plans: dict[tuple[int, ...], tuple[tuple[Point, ...], list[Span]]] = {}

    # -- the Driver interface -------------------------------------------------------------

    @property
    def state(self) -> LinkState:
        return self._tracker.state

    def add_listener(self, listener: StateListener) -> None:
        self._tracker.add_listener(listener)

    async def connect(self) -> None:
        async with self._lock:
            await self._ensure_connected()

    async def close(self) -> None:
        async with self._lock:
            self._drop("closed")

    async def read(self, points: Sequence[Point]) -> dict[str, Reading]:
        out: dict[str, Reading] = {}
        async with self._lock:
            for span in self._plan(points):
                values = await self._read_span(span)
                for point in span.points:
                    offset = point.address - span.start
                    out[point.name] = _reading(point, values[offset : offset + point.width])
        return out

    def _plan(self, points: Sequence[Point]) -> list[Span]:
        """plan_reads, once per list of points: a gateway polls the same points every time."""
        key = tuple(map(id, points))
        cached = self._plans.get(key)
        if cached is not None and all(a is b for a, b in zip(cached[0], points)):
            return cached[1]
        if len(self._plans) >= 32:
            self._plans.clear()
        spans = plan_reads(points, self.unit, self.max_gap)
        self._plans[key] = (tuple(points), spans)  # the points are kept: their ids stay theirs
        return spans

    async def write(self, point: Point, value: Value) -> None:
        if not point.writable:
            raise DriverError(f"{point.name}: a {point.table} cannot be written")
        unit = self.unit if point.unit is None else point.unit
        async with self._lock:
            if point.table == "coil":
                await self._call("write_coil", point.address, bool(value), device_id=unit)
                return
            registers = point.encode_registers(float(value))
            if len(registers) == 1:
                await self._call("write_register", point.address, registers[0], device_id=unit)
            else:
                await self._call("write_registers", point.address, registers, device_id=unit)

    # -- the link ---------------------------------------------------------------------------

    def _new_client(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        # reconnect_delay=0: pymodbus does not reconnect behind our back; the next call does.
        common: dict[str, Any] = {"timeout": self.timeout_s, "retries": 0, "reconnect_delay": 0}
        if isinstance(self.link, ModbusTcp):
            return AsyncModbusTcpClient(self.link.host, port=self.link.port, **common)
        return AsyncModbusSerialClient(
            self.link.device,
            framer=FramerType.RTU,
            baudrate=self.link.baudrate,
            bytesize=self.link.bytesize,
            parity=self.link.parity,
            stopbits=self.link.stopbits,
            **common,
        )

    async def _ensure_connected(self) -> AsyncModbusTcpClient | AsyncModbusSerialClient:
        if self._client is not None and self._client.connected:
            return self._client
        self._drop(self._tracker.reason)
        client = self._new_client()
        try:
            ok = await asyncio.wait_for(client.connect(), self.timeout_s + 1.0)
        except (TimeoutError, OSError, ModbusException) as exc:
            ok, why = False, str(exc) or type(exc).__name__
        else:
            why = "connection refused or timed out"
        if not ok:
            client.close()
            self._tracker.set(LinkState.DOWN, f"cannot connect to {self._where()}: {why}")
            raise LinkDown(self._tracker.reason)
        self._client = client
        return client

    def _drop(self, reason: str) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._tracker.set(LinkState.DOWN, reason)

    def _where(self) -> str:
        if isinstance(self.link, ModbusTcp):
            return f"{self.link.host}:{self.link.port}"
        return self.link.device

    async def _call(self, method: str, *args: Any, device_id: int, **kwargs: Any) -> Any:
        """One request: link failures become LinkDown, exception responses a typed error."""
        client = await self._ensure_connected()
        self.requests += 1
        try:
            response = await getattr(client, method)(*args, device_id=device_id, **kwargs)
        except (ConnectionException, ModbusIOException, TimeoutError, OSError) as exc:
            self._drop(f"no answer from {self._where()} unit {device_id}: {exc}")
            raise LinkDown(self._tracker.reason) from None
        except ModbusException as exc:  # a malformed or mismatched answer: the link is suspect
            self._drop(f"bad answer from {self._where()} unit {device_id}: {exc}")
            raise LinkDown(self._tracker.reason) from None
        self._tracker.set(LinkState.UP, f"answering at {self._where()}")
        if response.isError():
            code = int(getattr(response, "exception_code", 0))
            try:
                name = ExcCodes(code).name
            except ValueError:
                name = "UNKNOWN_EXCEPTION"
            raise ModbusExceptionResponse(code, name, f"unit {device_id} {method} at {args[0]}")
        return response

    async def _read_span(self, span: Span) -> list[int] | list[bool]:
        method = {
            "coil": "read_coils",
            "discrete_input": "read_discrete_inputs",
            "holding": "read_holding_registers",
            "input": "read_input_registers",
        }[span.table]
        response = await self._call(method, span.start, count=span.count, device_id=span.unit)
        values = list(response.bits if span.table in ("coil", "discrete_input") else response.registers)
        if len(values) < span.count:
            self._drop(f"short answer from unit {span.unit}: {len(values)} of {span.count}")
            raise LinkDown(self._tracker.reason)
        return values[: span.count]


def _reading(point: Point, raw: list[int] | list[bool]) -> Reading:
    if point.is_bit:
        return Reading(bool(raw[0]))
    value = point.decode_registers([int(r) for r in raw])
    # A float register may hold NaN or infinity (a meter's "no value"): not a good reading.
    if value != value or value in (float("inf"), float("-inf")):
        return Reading(None, Quality.BAD)
    return Reading(value)
