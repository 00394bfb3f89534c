"""A field simulator: a site's Modbus IEDs played by pymodbus's own server, laid out by their
point maps, for the demo (``[[sites]] simulate = true``) and for ``gridpresence field-sim``.

The gateway cannot tell it from a real IED: it is a Modbus server on the IED's link (TCP, or
RTU on a serial port), one unit id per IED. Each IED's telemetry drifts as the grid's simulated
devices do; it obeys every command of its map (after the command's writes, the command's
``confirm`` point reads what the map expects, e.g. the load stops running when its shed coil
is set, and stops drawing power), and its state bits follow.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from gridpresence.gateway.driver import DriverError
from gridpresence.gateway.points import Point
from gridpresence.gateway.site import IedSpec, ModbusRtuLink, ModbusTcpLink, PointMap, Site
from gridpresence.physics.base import walk

log = logging.getLogger(__name__)

# Function code -> table, as the server's access hook is told.
_TABLES = {1: "coil", 5: "coil", 15: "coil", 2: "discrete_input", 3: "holding", 6: "holding", 16: "holding",
           4: "input"}
STEP_S = 1.0  # how often the readings drift


class SimulatorError(ValueError):
    """A site the simulator cannot play; the message names the IED."""


@dataclass
class SimulatedIed:
    """One IED's tables (engineering values by point, raw words by address) and its behaviour."""

    ied: IedSpec
    pmap: PointMap
    rng: random.Random
    words: dict[tuple[str, int], int | bool] = field(default_factory=dict)
    load_pct: float = 40.0
    energy_kwh: float = 1000.0
    shed: bool = False  # the last command switched it off (shed, stop, open)

    def __post_init__(self) -> None:
        for name, wanted in self.pmap.expect.items():  # what identifies it (a SunSpec marker, model ids)
            self.set(self.pmap.points[name], wanted[0] if isinstance(wanted, tuple) else wanted)
        self.step(0.0)

    def span(self, table: str) -> tuple[int, int]:
        """The addresses of a table the unit serves: from its map's first point there to its
        last (at least one address; a read outside is an exception, as on a real IED)."""
        points = [p for p in self.pmap.points.values() if p.table == table]
        if not points:
            return 0, 1
        start = min(p.address for p in points)
        return start, max(p.address + p.width for p in points) - start

    def set(self, point: Point, value: float | bool) -> None:
        if point.is_bit:
            self.words[(point.table, point.address)] = bool(value)
            return
        for i, word in enumerate(point.encode_registers(value)):
            self.words[(point.table, point.address + i)] = word

    def value(self, point: Point) -> float | bool:
        if point.is_bit:
            return bool(self.words.get((point.table, point.address), False))
        return point.decode_registers([int(self.words.get((point.table, point.address + i), 0))
                                       for i in range(point.width)])

    def step(self, dt_s: float) -> None:
        """The readings drift; a load that was shed draws nothing."""
        self.load_pct = walk(self.rng, self.load_pct, 2.0, 15.0, 85.0)
        load = 0.0 if self.shed else self.load_pct
        kw = self.ied.rated_kw * load / 100
        self.energy_kwh += kw * dt_s / 3600
        values: dict[str, float] = {"load_pct": load, "kw": kw, "capacity_kw": self.ied.rated_kw,
                                    "temperature_c": 21.5, "fuel_pct": 80.0, "energy_kwh": self.energy_kwh}
        for telemetry, name in self.pmap.telemetry.items():
            point = self.pmap.points[name]
            with contextlib.suppress(DriverError):  # a value the point's type cannot hold: left as it was
                self.set(point, round(values.get(telemetry, 0.0), 1) if not point.is_bit else bool(values.get(telemetry)))
        if self.pmap.state.on is not None:
            self.set(self.pmap.points[self.pmap.state.on], not self.shed)
        if self.pmap.breaker is not None:
            self.set(self.pmap.points[self.pmap.breaker.closed], not self.shed)

    def written(self, table: str, address: int) -> None:
        """After a write: a command whose writes now all hold is obeyed (its confirm point follows)."""
        for command in self.pmap.commands.values():
            writes = [(self.pmap.points[w.point], w.value) for w in command.writes]
            if not any(p.table == table and p.address <= address < p.address + p.width for p, _ in writes):
                continue
            if not all(isinstance(v, str) or self.value(p) == v for p, v in writes):
                continue
            if command.confirm is not None:
                point = self.pmap.points[command.confirm.point]
                if point.name == self.pmap.state.on or (self.pmap.breaker and point.name == self.pmap.breaker.closed):
                    self.shed = not bool(command.confirm.equals)
                if not point.writable:
                    self.set(point, command.confirm.equals)
            self.step(0.0)


class FieldSimulator:
    """Every Modbus IED of a site, served where its link says; :meth:`start` then :meth:`stop`."""

    def __init__(self, site: Site, seed: int = 15, ieds: Iterable[str] | None = None) -> None:
        wanted = set(ieds) if ieds is not None else None
        rng = random.Random(seed)
        self.ieds: dict[str, SimulatedIed] = {}
        self._servers: dict[tuple[str, str | int], list[SimulatedIed]] = {}
        for ied in site.ieds:
            if wanted is not None and ied.name not in wanted:
                continue
            link = ied.link
            if not isinstance(link, ModbusTcpLink | ModbusRtuLink):
                if wanted is None:
                    continue  # not asked for by name: the site's other IEDs are real, or elsewhere
                raise SimulatorError(f"{ied.name}: the field simulator plays Modbus IEDs, not {link.protocol}")
            sim = SimulatedIed(ied, site.map_for(ied), random.Random(rng.random()))
            key: tuple[str, str | int] = (link.host, link.port) if isinstance(link, ModbusTcpLink) else ("rtu", link.device)
            served = self._servers.get(key, [])  # Modbus IEDs only (checked above as each was added)
            units = {cast(ModbusTcpLink | ModbusRtuLink, s.ied.link).unit for s in served}
            if link.unit in units:
                raise SimulatorError(f"{ied.name}: unit {link.unit} is played twice on the same link")
            self.ieds[ied.name] = sim
            self._servers.setdefault(key, []).append(sim)
        self._running: list[ModbusTcpServer | ModbusSerialServer] = []
        self._drift: asyncio.Task[None] | None = None

    @staticmethod
    def _device(sim: SimulatedIed) -> SimDevice:
        async def access(fc: int, start: int, address: int, count: int, registers: list[int],
                         values: list[int] | list[bool] | None) -> None:
            table = _TABLES[fc]
            bits = table in ("coil", "discrete_input")
            if values is not None:
                for i, v in enumerate(values):
                    sim.words[(table, address + i)] = bool(v) if bits else int(v)
                sim.written(table, address)
                return
            # Reads: the hook fills the words the server answers from. Bits come packed 16 to a
            # word, the first word holding the bit at ``address`` at its own position.
            for i in range(count * 16 if bits else count):
                if bits:
                    bit = address % 16 + i
                    r, mask = address - start + bit // 16, 1 << (bit % 16)
                    on = sim.words.get((table, address + i), False)
                    registers[r] = registers[r] | mask if on else registers[r] & ~mask
                else:
                    registers[address - start + i] = int(sim.words.get((table, address + i), 0))

        unit = sim.ied.link.unit  # type: ignore[union-attr]  # Modbus links only (checked above)
        def block(table: str) -> list[SimData]:
            start, count = sim.span(table)
            bits = table in ("coil", "discrete_input")
            return [SimData(address=start, count=count, values=False if bits else 0,
                            datatype=DataType.BITS if bits else DataType.REGISTERS)]

        blocks = tuple(block(table) for table in ("coil", "discrete_input", "holding", "input"))
        return SimDevice(unit, simdata=blocks, action=access)  # type: ignore[arg-type]

    async def start(self) -> None:
        for key, sims in self._servers.items():
            devices = [self._device(s) for s in sims]
            link = sims[0].ied.link
            server: ModbusTcpServer | ModbusSerialServer
            if isinstance(link, ModbusTcpLink):
                server = ModbusTcpServer(devices, address=(link.host, link.port))
            else:
                assert isinstance(link, ModbusRtuLink)
                server = ModbusSerialServer(devices, port=link.device, baudrate=link.baudrate, bytesize=link.bytesize,
                                            parity=link.parity, stopbits=link.stopbits)
            try:
                await server.serve_forever(background=True)
            except (OSError, RuntimeError) as exc:  # pymodbus: "Could not start listen" (a port in use)
                await self.stop()
                why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
                raise SimulatorError(f"{', '.join(s.ied.name for s in sims)}: cannot serve {key[0]}:{key[1]}: "
                                     f"{why}") from None
            self._running.append(server)
            log.info("field simulator: %s on %s %s", ", ".join(s.ied.name for s in sims), *key)
        self._drift = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(STEP_S)
            for sim in self.ieds.values():
                sim.step(STEP_S)

    async def stop(self) -> None:
        if self._drift is not None:
            self._drift.cancel()
            await asyncio.gather(self._drift, return_exceptions=True)
            self._drift = None
        for server in self._running:
            with contextlib.suppress(Exception):  # a server that is already gone
                await server.shutdown()
        self._running.clear()

    async def __aenter__(self) -> FieldSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
