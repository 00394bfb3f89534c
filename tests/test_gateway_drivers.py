"""Gateway drivers against the real stacks: pymodbus's own server (TCP, and RTU over a
pseudo-terminal pair) and dnp3py's outstation, started here on loopback."""

from __future__ import annotations

import asyncio
import struct

import pytest
from dnp3.database import AnalogInputConfig, BinaryInputConfig, BinaryOutputConfig, CounterConfig, Database
from dnp3.outstation import CommandResult, DefaultCommandHandler, Outstation, OutstationConfig, OutstationTcpRunner
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from nullmodem import NullModem
from gridpresence.gateway.dnp3 import Dnp3Driver, Dnp3Tcp
from gridpresence.gateway.driver import ControlRefused, Driver, LinkDown, LinkState, ModbusExceptionResponse, Quality
from gridpresence.gateway.modbus import ModbusDriver, ModbusSerial, ModbusTcp, plan_reads
from gridpresence.gateway.points import Point
from gridpresence.server.ports import free_port

pytestmark = pytest.mark.timeout(30)


class ModbusSim:
    """A pymodbus server with four tables per unit; the test sets registers between polls
    (through the server's access hook) and counts the requests the server received."""

    def __init__(self, units: tuple[int, ...] = (1,)) -> None:
        self.pending: dict[tuple[int, str, int], int] = {}  # (unit, "h"/"i", address) -> register
        self.requests: list[tuple[int, int, int, int]] = []  # (unit, function, address, count)
        self.refuse: set[int] = set()  # addresses answered with DEVICE_FAILURE
        self.devices = [self._device(u) for u in units]

    def _device(self, unit: int) -> SimDevice:
        def bits() -> list[SimData]:
            return [SimData(0, count=64, values=False, datatype=DataType.BITS)]

        def regs() -> list[SimData]:
            return [SimData(0, count=300, values=0, datatype=DataType.REGISTERS)]

        async def action(fc, start, address, count, registers, values):  # noqa: ANN001
            table = {1: "c", 5: "c", 15: "c", 2: "d", 3: "h", 6: "h", 16: "h", 4: "i"}[fc]
            for (u, t, a), v in list(self.pending.items()):
                if u == unit and t == table:
                    registers[a - start] = int(v)
                    del self.pending[(u, t, a)]
            if address in self.refuse:
                return ExcCodes.DEVICE_FAILURE
            return None

        return SimDevice(unit, simdata=(bits(), bits(), regs(), regs()), action=action)

    def trace(self, sending: bool, pdu):  # noqa: ANN001, ANN201
        if not sending:
            self.requests.append((pdu.dev_id, pdu.function_code, pdu.address, pdu.count))
        return pdu

    def set_regs(self, unit: int, table: str, address: int, words: list[int]) -> None:
        for i, w in enumerate(words):
            self.pending[(unit, table, address + i)] = w


async def start_tcp(sim: ModbusSim, port: int) -> ModbusTcpServer:
    server = ModbusTcpServer(sim.devices, address=("127.0.0.1", port), trace_pdu=sim.trace)
    await server.serve_forever(background=True)
    return server


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")]


async def test_modbus_types_orders_scale_and_batching() -> None:
    sim, port = ModbusSim(units=(1, 2)), free_port()
    server = await start_tcp(sim, port)
    driver = ModbusDriver(ModbusTcp("127.0.0.1", port), unit=1, max_gap=2)
    assert isinstance(driver, Driver)
    points = [
        Point(name="f", table="holding", address=0, type="f32"),
        Point(name="fl", table="holding", address=2, type="f32", word_order="little"),
        Point(name="i16", table="holding", address=4, type="i16", scale=0.1, offset=-5),
        Point(name="u32b", table="holding", address=7, type="u32", byte_order="little"),  # gap of 2
        Point(name="i64", table="holding", address=9, type="i64"),
        Point(name="f64", table="input", address=0, type="f64", word_order="little", byte_order="little"),
        Point(name="other", table="holding", address=0, type="u16", unit=2),
        Point(name="coil", table="coil", address=3),
        Point(name="di", table="discrete_input", address=1),
    ]
    try:
        sim.set_regs(1, "h", 0, f32(12.5))
        sim.set_regs(1, "h", 2, list(reversed(f32(-3.25))))
        sim.set_regs(1, "h", 4, [(-123) & 0xFFFF])
        raw = struct.pack(">I", 0x01020304)
        sim.set_regs(1, "h", 7, [0x0201, 0x0403])  # bytes swapped inside each word
        sim.set_regs(1, "h", 9, [int.from_bytes(struct.pack(">q", -2)[i : i + 2], "big") for i in range(0, 8, 2)])
        words = [int.from_bytes(struct.pack(">d", 1e6 + 0.5)[i : i + 2], "big") for i in range(0, 8, 2)]
        sim.set_regs(1, "i", 0, [((w & 0xFF) << 8) | (w >> 8) for w in reversed(words)])
        sim.set_regs(2, "h", 0, [777])
        # pymodbus 3.16's simulator does not show bits set behind its back in a read (its
        # non-shared bit blocks), so the coil is set the way a master would: by writing it.
        await driver.write(points[7], True)
        assert raw  # the big-endian value the swapped words stand for
        sim.requests.clear()
        values = await driver.read(points)
        assert values["f"].value == 12.5 and values["fl"].value == -3.25
        assert values["i16"].value == pytest.approx(-17.3)
        assert values["u32b"].value == 0x01020304
        assert values["i64"].value == -2 and values["f64"].value == 1e6 + 0.5
        assert values["other"].value == 777 and values["coil"].value is True and values["di"].value is False
        assert all(v.quality is Quality.GOOD for v in values.values())
        # One request per (unit, table): holding 0..12 of unit 1 merged across the 2-register gap.
        assert sorted(sim.requests) == sorted([(1, 3, 0, 13), (1, 4, 0, 4), (2, 3, 0, 1), (1, 1, 3, 1), (1, 2, 1, 1)])
        assert driver.state is LinkState.UP
    finally:
        await driver.close()
        await server.shutdown()


def test_batching_respects_the_protocol_limits() -> None:
    regs = [Point(name=f"r{i}", table="holding", address=i * 2, type="u32") for i in range(100)]  # 200 registers
    spans = plan_reads(regs, default_unit=1)
    assert [s.count for s in spans] == [124, 76] and all(s.count <= 125 for s in spans)
    coils = [Point(name=f"c{i}", table="coil", address=i) for i in range(2500)]
    assert [s.count for s in plan_reads(coils, 1)] == [2000, 500]
    far = [Point(name="a", table="input", address=0), Point(name="b", table="input", address=10)]
    assert len(plan_reads(far, 1, max_gap=8)) == 2 and len(plan_reads(far, 1, max_gap=9)) == 1


async def test_modbus_write_read_back_exception_and_recovery() -> None:
    sim, port = ModbusSim(), free_port()
    server = await start_tcp(sim, port)
    states: list[LinkState] = []
    driver = ModbusDriver(ModbusTcp("127.0.0.1", port), timeout_s=0.5)
    driver.add_listener(lambda state, reason: states.append(state))
    setpoint = Point(name="sp", table="holding", address=20, type="i32", word_order="little", scale=0.01)
    coil = Point(name="shed", table="coil", address=5)
    try:
        await driver.write(setpoint, -12.34)
        await driver.write(coil, True)
        back = await driver.read([setpoint, coil])
        assert back["sp"].value == pytest.approx(-12.34) and back["shed"].value is True
        sim.refuse.add(20)
        with pytest.raises(ModbusExceptionResponse) as refused:
            await driver.read([setpoint])
        assert refused.value.code == 4 and refused.value.name == "DEVICE_FAILURE"
        assert driver.state is LinkState.UP  # the IED answered: the link is fine
        sim.refuse.clear()
        await server.shutdown()
        with pytest.raises(LinkDown):
            await driver.read([setpoint])
        assert driver.state is LinkState.DOWN
        server = await start_tcp(sim, port)
        sim.set_regs(1, "h", 20, [0, 0])  # the restarted IED's value: read afresh
        assert (await driver.read([setpoint]))["sp"].value == 0
        assert driver.state is LinkState.UP and states[-2:] == [LinkState.DOWN, LinkState.UP]
    finally:
        await driver.close()
        await server.shutdown()


async def test_modbus_rtu_over_a_pseudo_terminal() -> None:
    cable = NullModem()
    cable.plug()
    sim = ModbusSim(units=(3,))
    server = ModbusSerialServer(sim.devices, port=cable.a, baudrate=115200, trace_pdu=sim.trace)
    await server.serve_forever(background=True)
    driver = ModbusDriver(ModbusSerial(cable.b, baudrate=115200), unit=3, timeout_s=1.0)
    try:
        sim.set_regs(3, "i", 10, f32(230.5))
        point = Point(name="v", table="input", address=10, type="f32")
        assert (await driver.read([point]))["v"].value == 230.5
        await driver.write(Point(name="h", table="holding", address=1), 4321)
        assert (await driver.read([Point(name="h", table="holding", address=1)]))["h"].value == 4321
        assert (3, 4, 10, 2) in sim.requests
    finally:
        await driver.close()
        await server.shutdown()
        cable.unplug()
        cable.close()


class Relay(DefaultCommandHandler):
    """A breaker's outputs: operate changes the status input the test reads back."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.log: list[tuple[str, int, int]] = []
        self.blocked = False

    def _act(self, step: str, index: int, code: object) -> CommandResult:
        self.log.append((step, index, int(code)))  # type: ignore[call-overload]
        if self.blocked:
            return CommandResult.blocked()
        if step != "select":
            self.db.update_binary_input(0, value=int(code) & 0x0F in (1, 3))  # pulse-on / latch-on
        return CommandResult.success()

    def select_binary_output(self, index, code, count, on_time, off_time):  # noqa: ANN001, ANN201
        return self._act("select", index, code)

    def operate_binary_output(self, index, code, count, on_time, off_time, select_sequence):  # noqa: ANN001, ANN201
        return self._act("operate", index, code)

    def direct_operate_binary_output(self, index, code, count, on_time, off_time):  # noqa: ANN001, ANN201
        return self._act("direct", index, code)


async def start_outstation(port: int) -> tuple[Database, Relay, OutstationTcpRunner, asyncio.Task[None]]:
    db = Database()
    db.add_binary_input(0, BinaryInputConfig())
    db.add_analog_input(0, AnalogInputConfig())
    db.add_counter(0, CounterConfig())
    db.add_binary_output(0, BinaryOutputConfig())
    db.update_binary_input(0, value=False)
    db.update_analog_input(0, value=1000)
    relay = Relay(db)
    runner = OutstationTcpRunner(outstation=Outstation(database=db, config=OutstationConfig(address=10), handler=relay),
                                 host="127.0.0.1", port=port)
    task = asyncio.create_task(runner.run())
    for _ in range(50):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            break
        except OSError:
            await asyncio.sleep(0.05)
    return db, relay, runner, task


async def test_dnp3_polls_quality_controls_and_recovery() -> None:
    port = free_port()
    db, relay, runner, task = await start_outstation(port)
    driver = Dnp3Driver(Dnp3Tcp("127.0.0.1", port, outstation=10, master=1), timeout_s=1.0)
    closed = Point(name="closed", table="binary_input", address=0)
    kw = Point(name="kw", table="analog_input", address=0, scale=0.1)
    ops = Point(name="ops", table="counter", address=0)
    try:
        first = await driver.read([closed, kw, ops])
        assert driver.polls == ["integrity"]
        assert first["closed"].value is False and first["kw"].value == 100.0 and first["kw"].good
        assert first["ops"].quality is Quality.RESTART  # never updated since the restart: not good
        db.update_analog_input(0, value=1234)
        second = await driver.read([kw])
        assert driver.polls[-1] == "event" and second["kw"].value == pytest.approx(123.4)
        await driver.write(Point(name="close", table="binary_output", address=0), True)
        assert relay.log[-1] == ("direct", 0, 3)
        assert (await driver.read([closed]))["closed"].value is True
        await driver.write(Point(name="trip", table="binary_output", address=0, control="pulse", sbo=True), False)
        assert [s for s, _, _ in relay.log[-2:]] == ["select", "operate"]
        assert (await driver.read([closed]))["closed"].value is False
        relay.blocked = True
        with pytest.raises(ControlRefused) as refused:
            await driver.write(Point(name="close", table="binary_output", address=0), True)
        assert refused.value.name == "BLOCKED"
        relay.blocked = False
        await runner.stop()
        task.cancel()
        with pytest.raises(LinkDown):
            await driver.read([kw])
        assert driver.state is LinkState.DOWN
        db, relay, runner, task = await start_outstation(port)
        again = await driver.read([kw])
        assert driver.state is LinkState.UP and driver.polls[-1] == "integrity" and again["kw"].value == 100.0
    finally:
        await driver.close()
        await runner.stop()
        task.cancel()
