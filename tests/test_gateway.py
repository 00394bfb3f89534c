"""The field gateway end to end: pymodbus's own Modbus server and dnp3py's outstation hold the
IEDs' points, a real grid (Prosody, accounts from the fleet's ``[[sites]]``) carries their
presence, and operators command them by the library, the CLI and chat.

The IEDs run on a thread and loop of their own, as they would in a box of their own: a slow
IED (``ModbusIeds.delay``) must not slow the test's loop, only the gateway's view of that IED.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_asyncio
from dnp3.database import AnalogInputConfig, BinaryInputConfig, BinaryOutputConfig, CounterConfig, Database
from dnp3.outstation import CommandResult, DefaultCommandHandler, Outstation, OutstationConfig, OutstationTcpRunner
from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusSerialServer, ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from conftest import run_cli, start_up
from nullmodem import NullModem
from gridpresence.config import FleetError, parse_fleet
from gridpresence.gateway.field_device import FieldIed
from gridpresence.gateway.site import load_site, parse_site
from gridpresence.host.gateway import Gateway, GatewayError
from gridpresence.host.grid import SECRETS_FILE, Grid
from gridpresence.operator.library import GridOperator
from gridpresence.protocol.codec import outcome_from_xml
from gridpresence.protocol.models import Breaker, DeviceState, Outcome, OutcomeStatus, RejectReason
from gridpresence.server.accounts import Secrets
from gridpresence.server.ports import free_port
from gridpresence.xmpp.session import ConnectionInfo
from timebase import NOW

pytestmark = pytest.mark.timeout(60)
T = TypeVar("T")

_TABLE = {1: "c", 5: "c", 15: "c", 2: "d", 3: "h", 6: "h", 16: "h", 4: "i"}

LATER = (NOW + dt.timedelta(days=400)).replace(microsecond=0)  # a clock to set the meter to


class ModbusIeds:
    """Units of one pymodbus server. ``values`` is each point's truth, which the server's access
    hook shows in every read; a load controller's logic follows its shed coil (``follow``)."""

    def __init__(self, units: tuple[int, ...], size: int = 300) -> None:
        self.values: dict[tuple[int, str, int], int | bool] = {}
        self.refuse: set[tuple[int, int]] = set()  # (unit, address): writes answered DEVICE_FAILURE
        self.follow = dict.fromkeys(units, True)
        self.delay = dict.fromkeys(units, 0.0)  # seconds each request to the unit waits for its answer
        self.devices = [SimDevice(u, simdata=([SimData(0, count=64, values=False, datatype=DataType.BITS)],
                                              [SimData(0, count=64, values=False, datatype=DataType.BITS)],
                                              [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)],
                                              [SimData(0, count=size, values=0, datatype=DataType.REGISTERS)]),
                                  action=self._hook(u)) for u in units]

    def _hook(self, unit: int) -> Any:
        async def action(fc, start, address, count, registers, values):  # noqa: ANN001, ANN202
            if self.delay[unit]:  # a slow IED: its connection waits, the server's others do not
                await asyncio.sleep(self.delay[unit])
            table = _TABLE[fc]
            if values is not None:
                if (unit, address) in self.refuse:
                    return ExcCodes.DEVICE_FAILURE
                for i, v in enumerate(values):
                    self.values[(unit, table, address + i)] = v
                if table == "c" and address == 0 and self.follow[unit]:
                    self.values[(unit, "d", 0)] = not bool(values[0])  # shed -> not running
                return None
            # For bits the hook is given the count of 16-bit words the read spans: fill them all.
            for i in range(count * 16 if table in "cd" else count):
                key = (unit, table, address + i)
                if table in "cd":  # the simulator's bit layout for a read starting at `address`
                    bit = address % 16 + i
                    r, mask = address - start + bit // 16, 1 << (bit % 16)
                    registers[r] = registers[r] | mask if self.values.get(key) else registers[r] & ~mask
                elif key in self.values:
                    registers[address - start + i] = int(self.values[key])
            return None

        return action

    def set(self, unit: int, table: str, address: int, words: list[int] | bool) -> None:
        if isinstance(words, bool):
            self.values[(unit, table, address)] = words
            return
        for i, w in enumerate(words):
            self.values[(unit, table, address + i)] = w

    def load(self, unit: int, *, kw: float, capacity: float, load_pct: float, running: bool = True,
             local: bool = False) -> None:
        self.set(unit, "h", 0, [round(kw * 10), round(capacity * 10), round(load_pct * 10)])
        self.set(unit, "h", 4, [0, 1234])
        self.set(unit, "c", 0, not running)
        self.set(unit, "d", 0, running)
        self.set(unit, "d", 1, local)

    def meter(self, unit: int, *, kw: float, load_pct: float, energy_kwh: float) -> None:
        self.set(unit, "i", 0, [*f32(kw), *f32(load_pct)])
        self.set(unit, "i", 4, [215])
        raw = round(energy_kwh * 10)
        self.set(unit, "i", 10, [raw >> 16, raw & 0xFFFF])


def f32(value: float) -> list[int]:
    data = struct.pack(">f", value)
    return [int.from_bytes(data[0:2], "big"), int.from_bytes(data[2:4], "big")]


class Recloser(DefaultCommandHandler):
    """A DNP3 breaker: trip (output 0) opens it, close (output 1) closes it; ``blocked`` refuses."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.blocked = False
        self.log: list[tuple[str, int]] = []

    def _act(self, step: str, index: int) -> CommandResult:
        self.log.append((step, index))
        if self.blocked:
            return CommandResult.blocked()
        if step != "select":
            self.db.update_binary_input(0, value=index == 1)
        return CommandResult.success()

    def select_binary_output(self, index, code, count, on_time, off_time):  # noqa: ANN001, ANN201
        return self._act("select", index)

    def operate_binary_output(self, index, code, count, on_time, off_time, select_sequence):  # noqa: ANN001, ANN201
        return self._act("operate", index)

    def direct_operate_binary_output(self, index, code, count, on_time, off_time):  # noqa: ANN001, ANN201
        return self._act("direct", index)


@dataclass
class Outstation3:
    port: int
    db: Database | None = None
    relay: Recloser | None = None
    runner: OutstationTcpRunner | None = None
    task: asyncio.Task[None] | None = None

    async def start(self, kw: float = 50.0, closed: bool = True) -> None:
        db = Database()
        for i in range(3):
            db.add_binary_input(i, BinaryInputConfig())
        for i in range(2):
            db.add_analog_input(i, AnalogInputConfig())
            db.add_binary_output(i, BinaryOutputConfig())
        db.add_counter(0, CounterConfig())
        db.update_binary_input(0, value=closed)
        db.update_binary_input(1, value=False)
        db.update_binary_input(2, value=False)
        db.update_analog_input(0, value=round(kw * 10))
        db.update_analog_input(1, value=400)
        db.update_counter(0, value=7)
        self.db, self.relay = db, Recloser(db)
        self.runner = OutstationTcpRunner(outstation=Outstation(database=db, config=OutstationConfig(address=10),
                                                                handler=self.relay), host="127.0.0.1", port=self.port)
        self.task = asyncio.create_task(self.runner.run())
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.stop()
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.runner = self.task = None


class IedThread:
    """The field side on its own thread and event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="test-ieds")
        self.thread.start()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


async def serve(ieds: ModbusIeds, port: int) -> ModbusTcpServer:
    server = ModbusTcpServer(ieds.devices, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    return server


SITE = """
[[ieds]]
name = "gw-load-1"
kind = "load"
map = "modbus-load-controller"
poll_s = 0.3
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {loads}, unit = 1, timeout_s = 2.0 }}

[[ieds]]
name = "gw-load-2"
kind = "load"
map = "modbus-load-controller"
poll_s = 0.3
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {loads}, unit = 2, timeout_s = 2.0 }}

[[ieds]]
name = "gw-load-3"
kind = "load"
map = "quick-load"
poll_s = 0.3
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {loads}, unit = 3, timeout_s = 2.0 }}

[[ieds]]
name = "gw-meter"
kind = "meter"
map = "generic-modbus-meter"
poll_s = 0.3
gone_after_s = 60
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {meter}, unit = 1, timeout_s = 0.5 }}

[[ieds]]
name = "gw-brk-1"
kind = "breaker"
map = "dnp3-breaker"
poll_s = 0.3
link = {{ protocol = "dnp3-tcp", host = "127.0.0.1", port = {brk1}, outstation = 10, timeout_s = 1.0 }}

[[ieds]]
name = "gw-brk-2"
kind = "breaker"
map = "dnp3-breaker"
poll_s = 0.3
gone_after_s = 4
link = {{ protocol = "dnp3-tcp", host = "127.0.0.1", port = {brk2}, outstation = 10, timeout_s = 1.0 }}

# Modbus RTU: pymodbus's serial server on the far end of a pseudo-terminal "null modem".
[[ieds]]
name = "gw-rtu-load"
kind = "load"
map = "modbus-load-controller"
poll_s = 0.3
link = {{ protocol = "modbus-rtu", device = "{rtu}", baudrate = 115200, unit = 5, timeout_s = 2.0 }}

# The shipped load controller with a short confirmation time (a stubborn IED is found out fast).
# The loads' link time-outs (2 s) are long enough that a loaded 2-core machine is not an IED
# that does not answer; the meter's and breakers' stay short for the unplugging tests.
[maps.quick-load]
protocol = "modbus"
points.shed = {{ table = "coil", address = 0 }}
points.running = {{ table = "discrete_input", address = 0 }}
points.local = {{ table = "discrete_input", address = 1 }}
points.kw = {{ table = "holding", address = 0, scale = 0.1 }}
points.capacity_kw = {{ table = "holding", address = 1, scale = 0.1 }}
points.load_pct = {{ table = "holding", address = 2, scale = 0.1 }}
telemetry = {{ kw = "kw", capacity_kw = "capacity_kw", load_pct = "load_pct" }}
state = {{ on = "running", restricted = "local", note = "in local control at the controller" }}
commands.shed = {{ writes = [{{ point = "shed", value = true }}], confirm = {{ point = "running", equals = false }}, timeout_s = 2 }}
commands.restore = {{ writes = [{{ point = "shed", value = false }}], confirm = {{ point = "running", equals = true }}, timeout_s = 2 }}
"""


# A second site, run by the `gridpresence gateway` command.
CLI_SITE = """
[[ieds]]
name = "gw-cli-load"
kind = "load"
map = "modbus-load-controller"
poll_s = 0.3
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {loads}, unit = 4, timeout_s = 2.0 }}
"""


@dataclass
class Field:
    ieds: IedThread
    loads: ModbusIeds
    rtu: ModbusIeds
    meter: ModbusIeds
    meter_port: int
    meter_server: ModbusTcpServer | None
    brk1: Outstation3
    brk2: Outstation3
    grid: Grid
    gateway: Gateway
    alice: GridOperator
    site_file: Path


@pytest_asyncio.fixture(scope="module")
async def field(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Field]:
    tmp = tmp_path_factory.mktemp("gateway")
    ieds = IedThread()
    loads, meter, rtu = ModbusIeds((1, 2, 3, 4)), ModbusIeds((1,)), ModbusIeds((5,))
    rtu.load(5, kw=12, capacity=40, load_pct=30)
    loads.load(1, kw=40, capacity=100, load_pct=40)
    loads.load(2, kw=50, capacity=100, load_pct=50)
    loads.load(3, kw=30, capacity=100, load_pct=30)
    loads.load(4, kw=20, capacity=100, load_pct=20)
    meter.meter(1, kw=12.5, load_pct=25, energy_kwh=1000.0)
    ports = {k: free_port() for k in ("loads", "meter", "brk1", "brk2")}
    loads_server = await ieds.run(serve(loads, ports["loads"]))
    meter_server = await ieds.run(serve(meter, ports["meter"]))
    brk1, brk2 = Outstation3(ports["brk1"]), Outstation3(ports["brk2"])
    await ieds.run(brk1.start())
    await ieds.run(brk2.start())
    cable = NullModem()

    async def serve_rtu() -> ModbusSerialServer:
        cable.plug()  # on the IEDs' loop: the cable is the field's
        server = ModbusSerialServer(rtu.devices, port=cable.a, baudrate=115200)
        await server.serve_forever(background=True)
        return server

    rtu_server = await ieds.run(serve_rtu())
    site_file = tmp / "site.toml"
    site_file.write_text(SITE.format(**ports, rtu=cable.b))
    (tmp / "cli-site.toml").write_text(CLI_SITE.format(**ports))
    fleet = parse_fleet({"operators": [{"name": "alice"}], "presence_grace_s": 2.0,
                         "devices": [{"name": "sim-load", "kind": "load", "rated_kw": 10}],
                         "security": {"unsigned_chat_actions": ["shed", "restore"]},
                         "sites": [{"file": "site.toml"}, {"file": "cli-site.toml"}]}, "fleet", tmp)
    grid = Grid(fleet, tmp / "grid")
    await grid.start()
    gateway = Gateway(load_site(site_file), grid.fleet, grid.endpoint, Secrets(grid.data_dir / SECRETS_FILE),
                      data_dir=grid.data_dir)
    alice = GridOperator.from_connection(grid.connection, operator="alice", resource="gw-test")
    try:
        await gateway.start()
        await alice.connect()
        yield Field(ieds, loads, rtu, meter, ports["meter"], meter_server, brk1, brk2, grid, gateway, alice, site_file)
    finally:
        await alice.close()
        await gateway.stop()
        await grid.stop()
        await ieds.run(loads_server.shutdown())
        if meter_server is not None:
            await ieds.run(meter_server.shutdown())
        await ieds.run(brk1.stop())
        await ieds.run(brk2.stop())

        async def unplug_rtu() -> None:
            await rtu_server.shutdown()
            cable.unplug()

        await ieds.run(unplug_rtu())
        ieds.stop()
        cable.close()


async def until(alice: GridOperator, name: str, check: Any, timeout: float = 5.0) -> None:
    await alice.wait_for(lambda devs: name in devs and check(devs[name]), timeout)


async def test_the_site_comes_online_with_its_presence(field: Field) -> None:
    alice = field.alice
    await until(alice, "gw-brk-2", lambda v: v.present and v.state is DeviceState.ON)
    for name in ("gw-load-1", "gw-load-2", "gw-load-3", "gw-meter", "gw-brk-1", "gw-brk-2", "gw-rtu-load"):
        view = alice.device(name)
        assert view.present and view.state is DeviceState.ON, (name, view)
        assert view.report is not None and view.report.serial == field.grid.fleet.device(name).serial
    t = alice.device("gw-load-2").report.telemetry  # type: ignore[union-attr]
    assert (t.kw, t.capacity_kw, t.load_pct) == (50.0, 100.0, 50.0)
    m = alice.device("gw-meter").report.telemetry  # type: ignore[union-attr]
    assert m.kw == 12.5 and m.load_pct == 25.0 and m.temperature_c == 21.5 and m.energy_kwh == 1000.0
    b = alice.device("gw-brk-1").report
    assert b is not None and b.kind.value == "breaker" and b.telemetry.breaker is Breaker.CLOSED and b.telemetry.kw == 50
    assert alice.device("sim-load").present  # the simulated bot beside them, from `up`


async def test_a_register_change_reaches_the_operator(field: Field) -> None:
    alice = field.alice
    started = time.monotonic()
    field.loads.set(2, "h", 2, [800])  # load 80 %
    await until(alice, "gw-load-2", lambda v: v.report and v.report.telemetry.load_pct == 80.0, timeout=3)
    latency = time.monotonic() - started
    assert latency < 0.3 + 1.0  # one poll, and the way to the operator
    field.loads.set(2, "d", 1, True)  # switched to local at the controller
    await until(alice, "gw-load-2", lambda v: v.state is DeviceState.RESTRICTED)
    assert alice.device("gw-load-2").report.restriction.note == "in local control at the controller"  # type: ignore[union-attr]
    outcome = await alice.command("gw-load-2", "shed")
    assert outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.RESTRICTED
    assert field.loads.values[(2, "c", 0)] is False  # nothing written
    field.loads.set(2, "d", 1, False)
    field.loads.set(2, "h", 2, [500])
    await until(alice, "gw-load-2", lambda v: v.state is DeviceState.ON and v.report.telemetry.load_pct == 50.0)


async def test_alarm_rules_run_on_the_ieds_readings(field: Field) -> None:
    alice = field.alice
    alarms = alice.new_alarms()
    field.loads.set(2, "h", 2, [970])  # 97 %: past the trip point
    try:
        async with asyncio.timeout(10):
            async for alarm in alarms:
                if alarm.device.startswith("gw-load-2@") and alarm.kind.value == "trip-point-imminent":
                    break
        assert alarm.value == 97.0 and alarm.level.value == "urgent", alarm
    finally:
        await alarms.aclose()
        field.loads.set(2, "h", 2, [500])
    await until(alice, "gw-load-2", lambda v: v.report.telemetry.load_pct == 50.0)


async def test_shed_and_restore_reach_the_coil_and_read_back(field: Field) -> None:
    alice = field.alice
    shed = await alice.command("gw-load-1", "shed")
    assert shed.status is OutcomeStatus.EXECUTED, shed
    assert field.loads.values[(1, "c", 0)] is True  # the coil, on the IED
    assert shed.report is not None and shed.report.state is DeviceState.OFF  # read back, in the outcome
    assert "running read back False" in shed.detail
    await until(alice, "gw-load-1", lambda v: v.state is DeviceState.OFF)
    again = await alice.command("gw-load-1", "restore")
    assert again.status is OutcomeStatus.EXECUTED and again.report.state is DeviceState.ON  # type: ignore[union-attr]
    assert field.loads.values[(1, "c", 0)] is False
    nothing = await alice.command("gw-load-1", "start")
    assert nothing.status is OutcomeStatus.REJECTED and nothing.reason is RejectReason.NOT_SUPPORTED


async def test_a_slow_ied_does_not_hold_up_the_other_identities(field: Field) -> None:
    """While gw-load-1 takes seconds to answer a command, gw-load-2's presence and commands go
    on (the command path is awaited, not run on the XMPP loop); a second command to the slow
    IED waits its turn and, expired by then, writes nothing; each command has one outcome."""
    alice = field.alice
    await until(alice, "gw-load-1", lambda v: v.state is DeviceState.ON)
    await until(alice, "gw-load-2", lambda v: v.state is DeviceState.ON)
    sent: list[Outcome] = []  # every outcome stanza the devices send alice

    def count(msg: Any) -> None:
        sent.append(outcome_from_xml(msg["grid_outcome"].xml))

    alice.client.register_handler(Callback("count outcomes", StanzaPath("message/grid_outcome"), count))
    field.loads.delay[1] = 0.8  # every request: the write, each read-back, the poll after
    try:
        started = time.monotonic()
        slow = asyncio.create_task(alice.command("gw-load-1", "shed"))
        await asyncio.sleep(0.3)  # the shed is at the IED
        late = asyncio.create_task(alice.command("gw-load-1", "restore", ttl_s=1.0))  # behind it, expires first
        field.loads.set(2, "h", 2, [700])
        await until(alice, "gw-load-2", lambda v: v.report.telemetry.load_pct == 70.0, timeout=3)
        other = await alice.command("gw-load-2", "shed")
        assert other.status is OutcomeStatus.EXECUTED, other
        assert not slow.done(), "the other IED's presence and outcome came after the slow IED's outcome"
        shed = await slow
        assert time.monotonic() - started >= 1.6  # the slow IED really was slow: write + read-back
        assert shed.status is OutcomeStatus.EXECUTED and shed.report.state is DeviceState.OFF, shed  # type: ignore[union-attr]
        expired = await late  # alice's own "no outcome before it expired": the IED was busy till then
        assert expired.status is OutcomeStatus.EXPIRED, expired
        await asyncio.sleep(1.5)  # the device's own outcome for it, and any second outcome, come by now
        assert field.loads.values[(1, "c", 0)] is True  # the expired restore wrote nothing
        ids = [o.command_id for o in sent]
        assert sorted(ids) == sorted([shed.command_id, expired.command_id, other.command_id]), sent
        (own,) = [o for o in sent if o.command_id == expired.command_id]
        assert own.status is OutcomeStatus.EXPIRED and "before the IED was free" in own.detail, own
    finally:
        alice.client.remove_handler("count outcomes")
        field.loads.delay[1] = 0.0
    for name in ("gw-load-1", "gw-load-2"):
        back = await alice.command(name, "restore")
        assert back.status is OutcomeStatus.EXECUTED, back
    field.loads.set(2, "h", 2, [500])
    await until(alice, "gw-load-2", lambda v: v.state is DeviceState.ON and v.report.telemetry.load_pct == 50.0)


async def test_shed_and_restore_by_chat(field: Field) -> None:
    alice = field.alice
    reply = await alice.ask("gw-load-1", "shed")
    assert "is off" in reply and field.loads.values[(1, "c", 0)] is True, reply
    await until(alice, "gw-load-1", lambda v: v.state is DeviceState.OFF)
    reply = await alice.ask("gw-load-1", "restore")
    assert field.loads.values[(1, "c", 0)] is False, reply
    await until(alice, "gw-load-1", lambda v: v.state is DeviceState.ON)


async def test_open_and_close_a_dnp3_breaker_by_the_cli(field: Field) -> None:
    conn = str(field.grid.connection_file)
    code, out, err = await run_cli("open", "gw-brk-1", "--connection", conn)
    assert code == 0, (out, err)
    assert field.brk1.relay is not None and field.brk1.relay.log[-2:] == [("select", 0), ("operate", 0)]
    await until(field.alice, "gw-brk-1", lambda v: v.report.telemetry.breaker is Breaker.OPEN)
    code, out, err = await run_cli("close", "gw-brk-1", "--connection", conn)
    assert code == 0, (out, err)
    assert field.brk1.relay.log[-1] == ("operate", 1)
    await until(field.alice, "gw-brk-1", lambda v: v.report.telemetry.breaker is Breaker.CLOSED)


# Timing: "not confirmed" needs every read-back of the 2 s window to be answered; on a loaded
# 2-core machine one read can miss its time-out and the outcome is then a true "no-answer". Seen
# once in ten runs under a full suite: one rerun, so a real regression still fails twice.
@pytest.mark.flaky(reruns=1)
async def test_an_ied_that_refuses_or_does_not_follow_is_rejected_with_the_reason(field: Field) -> None:
    alice = field.alice

    async def on_and_read() -> None:  # a fresh, good reading first: the test is about the command
        await until(alice, "gw-load-3", lambda v: v.state is DeviceState.ON and v.report is not None
                    and v.report.telemetry.kw is not None, timeout=10)

    await on_and_read()
    field.loads.refuse.add((3, 0))
    try:
        refused = await alice.command("gw-load-3", "shed")
    finally:
        field.loads.refuse.clear()
    assert refused.status is OutcomeStatus.REJECTED and refused.reason is RejectReason.DEVICE_REFUSED
    assert "DEVICE_FAILURE" in refused.detail and refused.report.state is DeviceState.ON  # type: ignore[union-attr]
    await on_and_read()
    field.loads.follow[3] = False  # the coil is taken, the load keeps running
    sent: list[str] = []
    alice.client.register_handler(Callback("count not-confirmed", StanzaPath("message/grid_outcome"),
                                            lambda msg: sent.append(outcome_from_xml(msg["grid_outcome"].xml).command_id)))
    try:
        stubborn = await alice.command("gw-load-3", "shed")
        await asyncio.sleep(1.0)  # a second outcome (the backstop's "no-answer") would come by now
    finally:
        alice.client.remove_handler("count not-confirmed")
        field.loads.follow[3] = True
        field.loads.set(3, "c", 0, False)
    assert stubborn.status is OutcomeStatus.REJECTED and stubborn.reason is RejectReason.NOT_CONFIRMED
    assert "running reads True, not False" in stubborn.detail
    assert sent.count(stubborn.command_id) == 1, sent  # ended "not confirmed", once
    assert field.brk1.relay is not None
    field.brk1.relay.blocked = True
    try:
        blocked = await alice.command("gw-brk-1", "open")
    finally:
        field.brk1.relay.blocked = False
    assert blocked.status is OutcomeStatus.REJECTED and blocked.reason is RejectReason.DEVICE_REFUSED
    assert "BLOCKED" in blocked.detail


async def test_an_unplugged_ied_shows_it_refuses_commands_and_comes_back(field: Field) -> None:
    alice = field.alice
    assert field.meter_server is not None
    await field.ieds.run(field.meter_server.shutdown())
    field.meter_server = None
    await field.ieds.run(field.brk2.stop())
    await until(alice, "gw-meter", lambda v: v.state is DeviceState.RESTRICTED)
    view = alice.device("gw-meter")
    assert view.present and view.report.restriction.note.startswith("no answer from the IED since ")  # type: ignore[union-attr]
    assert view.report.telemetry.kw is None  # type: ignore[union-attr]  # the old readings are not shown as good
    refused = await alice.command("gw-meter", "set_time", args={"time": LATER.isoformat()})
    assert refused.status is OutcomeStatus.REJECTED and refused.reason is RejectReason.NO_ANSWER
    assert refused.detail.startswith("no answer from the IED since")
    # gw-brk-2 goes on to be gone (gone_after_s = 4), unavailable with why.
    await until(alice, "gw-brk-2", lambda v: not v.present, timeout=8)
    field.meter_server = await field.ieds.run(serve(field.meter, field.meter_port))
    await field.ieds.run(field.brk2.start())
    await until(alice, "gw-meter", lambda v: v.state is DeviceState.ON and v.report.telemetry.kw == 12.5)
    await until(alice, "gw-brk-2", lambda v: v.present and v.state is DeviceState.ON, timeout=8)
    done = await alice.command("gw-meter", "set_time", args={"time": LATER.isoformat()})
    assert done.status is OutcomeStatus.EXECUTED, done
    stamp = int(LATER.timestamp())  # the meter's clock register: UNIX seconds in two words
    assert field.meter.values[(1, "h", 100)] == stamp >> 16 and field.meter.values[(1, "h", 101)] == stamp & 0xFFFF


async def test_bad_register_values_are_never_published(field: Field) -> None:
    alice = field.alice
    seen: list[float | None] = []
    stop = alice.tracker.listen(lambda change: seen.append(change.current.report.telemetry.kw  # type: ignore[union-attr]
                                                            if change.current.name == "gw-meter" and change.current.report
                                                            else None))
    try:
        field.meter.set(1, "i", 0, f32(math.nan))
        await until(alice, "gw-meter", lambda v: v.state is DeviceState.RESTRICTED)
        note = alice.device("gw-meter").report.restriction.note  # type: ignore[union-attr]
        assert note.startswith("readings not valid: kw:"), note
        field.meter.set(1, "i", 0, f32(12.5))
        field.meter.set(1, "i", 2, f32(1e9))  # load far beyond what the presence model allows
        await until(alice, "gw-meter", lambda v: v.report and v.report.restriction
                    and v.report.restriction.note.startswith("readings not valid: load_pct:"))
    finally:
        stop()
        field.meter.meter(1, kw=12.5, load_pct=25, energy_kwh=1000.0)
    await until(alice, "gw-meter", lambda v: v.state is DeviceState.ON)
    assert all(kw is None or math.isfinite(kw) for kw in seen)


async def test_register_fuzz_never_publishes_invalid_presence(field: Field) -> None:
    """Seeded random register words into a meter and a load: every poll is presence that
    validates, or a reason; nothing raises."""
    rng = random.Random(15)
    site = load_site(field.site_file)
    meter = FieldIed(site.ieds[3], site.map_for(site.ieds[3]))
    load = FieldIed(site.ieds[2], site.map_for(site.ieds[2]))
    fuzz = ModbusIeds((1, 3))
    port = free_port()
    server = await field.ieds.run(serve(fuzz, port))
    meter.driver.link = type(meter.driver.link)("127.0.0.1", port)  # type: ignore[attr-defined]
    load.driver.link = type(load.driver.link)("127.0.0.1", port)  # type: ignore[attr-defined]
    outcomes = {"valid": 0, "refused": 0}
    try:
        for _ in range(60):
            wild = rng.random() < 0.5  # half the polls: any words at all; else plausible values
            words = [rng.getrandbits(16) for _ in range(7)] if wild else [
                *f32(rng.uniform(0, 500)), *f32(rng.uniform(0, 100)), rng.randrange(-400, 1000), 0, rng.getrandbits(16)]
            for a, w in zip((0, 1, 2, 3, 4, 10, 11), words):
                fuzz.set(1, "i", a, [w & 0xFFFF])
            for a in (0, 1, 2):
                fuzz.set(3, "h", a, [rng.getrandbits(16) if wild else rng.randrange(0, 1000)])
            fuzz.set(3, "d", 0, rng.random() < 0.5)
            for ied in (meter, load):
                status = await field.ieds.run(ied.poll())
                assert (status.report is None) != (status.problem is None)
                if status.report is not None:
                    t = status.report.telemetry
                    assert all(v is None or math.isfinite(v) for v in (t.kw, t.load_pct, t.energy_kwh, t.temperature_c))
                    outcomes["valid"] += 1
                else:
                    assert status.problem and not status.link_down
                    outcomes["refused"] += 1
        assert outcomes["valid"] > 0 and outcomes["refused"] > 0, outcomes
    finally:
        await field.ieds.run(meter.driver.close())
        await field.ieds.run(load.driver.close())
        await field.ieds.run(server.shutdown())


async def test_a_gateway_without_accounts_or_with_a_bad_site_says_why(field: Field, tmp_path: Path) -> None:
    site = parse_site({"ieds": [{"name": "nowhere", "kind": "meter", "map": "generic-modbus-meter",
                                 "link": {"protocol": "modbus-tcp", "host": "127.0.0.1"}}]})
    with pytest.raises(GatewayError, match="no account on the grid for nowhere"):
        Gateway(site, field.grid.fleet, field.grid.endpoint, Secrets(field.grid.data_dir / SECRETS_FILE))
    bad = tmp_path / "bad.toml"
    bad.write_text(field.site_file.read_text().replace("poll_s = 0.3", "poll_s = -1", 1))
    code, out, err = await run_cli("gateway", str(bad), "--connection", str(field.grid.connection_file))
    assert code == 2 and "ieds[0] (gw-load-1).poll_s" in err, (out, err)
    code, out, err = await run_cli("field-sim", str(bad))
    assert code == 2 and "ieds[0] (gw-load-1).poll_s" in err, (out, err)
    code, out, err = await run_cli("field-sim", str(field.site_file), "--ied", "gw-brk-1")
    assert code == 2 and "gw-brk-1: the field simulator plays Modbus IEDs, not dnp3-tcp" in err, (out, err)



async def test_the_gateway_command_hosts_a_site_until_stopped(field: Field) -> None:
    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(str(exe), "gateway", str(field.site_file.with_name("cli-site.toml")),
                                                "--connection", str(field.grid.connection_file),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        await until(field.alice, "gw-cli-load", lambda v: v.present and v.state is DeviceState.ON, timeout=30)
        shed = await field.alice.command("gw-cli-load", "shed")
        assert shed.status is OutcomeStatus.EXECUTED and field.loads.values[(4, "c", 0)] is True, shed
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
        assert proc.returncode == 0, err.decode()
        assert "gw-cli-load@localhost: modbus-tcp (modbus-load-controller), answering" in out.decode()
        await until(field.alice, "gw-cli-load", lambda v: not v.present)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_malformed_command_arguments_are_rejected_and_nothing_is_written(field: Field) -> None:
    await until(field.alice, "gw-meter", lambda v: v.state is DeviceState.ON)
    before = field.meter.values.get((1, "h", 100))
    rng = random.Random(1515)
    for _ in range(5):
        junk = "".join(chr(rng.randrange(32, 127)) for _ in range(rng.randrange(1, 30)))
        out = await field.alice.command("gw-meter", "set_time", args={"time": junk})
        assert out.status is OutcomeStatus.REJECTED and out.reason is RejectReason.INVALID_ARGUMENTS, (junk, out)
    naive = await field.alice.command("gw-meter", "set_time", args={"time": LATER.replace(tzinfo=None).isoformat()})
    assert naive.reason is RejectReason.INVALID_ARGUMENTS and "time zone" in naive.detail
    assert field.meter.values.get((1, "h", 100)) == before


def test_a_fleet_naming_a_bad_site_or_a_clashing_ied_stops_before_anything_starts(tmp_path: Path) -> None:
    base = {"operators": [{"name": "alice"}], "devices": [{"name": "feeder", "kind": "load", "rated_kw": 10}]}
    (tmp_path / "bad.toml").write_text('[[ieds]]\nname = "m"\nkind = "meter"\nmap = "no-such-map"\n'
                                       'link = { protocol = "modbus-tcp", host = "10.0.0.1" }\n')
    fleet = parse_fleet({**base, "sites": [{"file": "bad.toml"}]}, "fleet", tmp_path)
    with pytest.raises(FleetError, match=r"sites\[0\]\.file: .*bad\.toml: ieds\[0\] \(m\)\.map: no map named 'no-such-map'"):
        Grid(fleet, tmp_path / "grid")
    (tmp_path / "clash.toml").write_text('[[ieds]]\nname = "feeder"\nkind = "meter"\nmap = "generic-modbus-meter"\n'
                                         'link = { protocol = "modbus-tcp", host = "10.0.0.1" }\n')
    fleet = parse_fleet({**base, "sites": [{"file": "clash.toml"}]}, "fleet", tmp_path)
    with pytest.raises(FleetError, match=r"ieds\[0\] \(feeder\)\.name: the fleet has another device of that name"):
        Grid(fleet, tmp_path / "grid")
    (tmp_path / "ok.toml").write_text(SITE.format(loads=1502, meter=1503, brk1=20001, brk2=20002, rtu="/dev/ttyS9"))
    grid = Grid(parse_fleet({**base, "sites": [{"file": "ok.toml"}]}, "fleet", tmp_path), tmp_path / "grid")
    assert grid.gateway_ieds == ("gw-load-1", "gw-load-2", "gw-load-3", "gw-meter", "gw-brk-1", "gw-brk-2",
                                 "gw-rtu-load")
    assert grid.fleet.device("gw-brk-1").kind.value == "breaker" and grid.fleet.sites[0].path.is_absolute()


def test_a_field_meters_billing_registers_follow_its_energy_register() -> None:
    from gridpresence.gateway.field_device import FieldRegisters
    from gridpresence.physics.metering import PeakHours
    from timebase import NOW

    regs = FieldRegisters(NOW, random.Random(1), PeakHours(0, 24))  # all hours peak
    regs.observe(1000.0, 10.0, 20.0, NOW)
    regs.observe(1000.5, 12.0, 24.0, NOW)
    regs.observe(1001.25, 11.0, 22.0, NOW)
    regs.observe(None, None, None, NOW)  # a poll without a good energy reading changes nothing
    billing, quality = regs.close("r1", "gw-meter@localhost", None, NOW, 22.0)
    assert billing.register_kwh == 1001.25 and billing.period_kwh == 1.25 and billing.peak_kwh == 1.25
    assert billing.max_demand_kw == 12.0 and quality.load_pct == 22.0
    regs.observe(3.0, 5.0, 10.0, NOW)  # reset at the meter: the register starts again, no negative energy
    billing, _ = regs.close("r2", "gw-meter@localhost", None, NOW, 10.0)
    assert billing.register_kwh == 3.0 and billing.period_kwh == 3.0 and billing.peak_kwh == 3.0


async def test_a_modbus_rtu_ied_is_online_and_commanded_through_xmpp(field: Field) -> None:
    """The serial IED of the site, end to end: its presence, a register change, and a shed and
    restore by the operator reaching its coil over RTU and reading back."""
    alice = field.alice
    await until(alice, "gw-rtu-load", lambda v: v.present and v.state is DeviceState.ON, timeout=10)
    t = alice.device("gw-rtu-load").report.telemetry  # type: ignore[union-attr]
    assert (t.kw, t.capacity_kw, t.load_pct) == (12.0, 40.0, 30.0)
    field.rtu.set(5, "h", 2, [650])
    await until(alice, "gw-rtu-load", lambda v: v.report.telemetry.load_pct == 65.0)
    shed = await alice.command("gw-rtu-load", "shed")
    assert shed.status is OutcomeStatus.EXECUTED and "running read back False" in shed.detail, shed
    assert field.rtu.values[(5, "c", 0)] is True and shed.report.state is DeviceState.OFF  # type: ignore[union-attr]
    back = await alice.command("gw-rtu-load", "restore")
    assert back.status is OutcomeStatus.EXECUTED and field.rtu.values[(5, "c", 0)] is False, back
    await until(alice, "gw-rtu-load", lambda v: v.state is DeviceState.ON)


async def test_a_modbus_rtu_ied_over_a_pseudo_terminal_is_polled_and_commanded() -> None:
    """The serial path of the gateway's field side (no grid): pymodbus's RTU server on one end
    of a pseudo-terminal "null modem", a FieldIed on the other, both on this loop."""
    from pymodbus.server import ModbusSerialServer

    from gridpresence.protocol.models import Action

    cable = NullModem()
    cable.plug()
    sim = ModbusIeds((5,))
    sim.load(5, kw=12, capacity=40, load_pct=30)
    server = ModbusSerialServer(sim.devices, port=cable.a, baudrate=115200)
    await server.serve_forever(background=True)
    site = parse_site({"ieds": [{"name": "rtu-load", "kind": "load", "map": "modbus-load-controller",
                                 "link": {"protocol": "modbus-rtu", "device": cable.b, "baudrate": 115200,
                                          "unit": 5}}]})
    field_ied = FieldIed(site.ieds[0], site.map_for(site.ieds[0]))
    try:
        status = await field_ied.poll()
        assert status.report is not None and status.report.telemetry.kw == 12.0, status
        assert status.extra == {"run_hours": 1234.0}
        assert status.report.state is DeviceState.ON
        effect = await field_ied.command(site.map_for(site.ieds[0]).commands[Action.SHED], {})
        assert effect.status is OutcomeStatus.EXECUTED and "running read back False" in effect.detail, effect
        assert sim.values[(5, "c", 0)] is True and field_ied.status.report.state is DeviceState.OFF  # type: ignore[union-attr]
    finally:
        await field_ied.driver.close()
        await server.shutdown()
        cable.unplug()
        cable.close()


def _readme_files(heading: str, tmp_path: Path) -> set[str]:
    """The first two TOML blocks after a README heading, written as the files they name."""
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split(heading)[1]
    blocks = [b.split("```")[0] for b in section.split("```toml\n")[1:3]]
    files = {b.splitlines()[0].removeprefix("# "): b for b in blocks}
    for name, body in files.items():
        (tmp_path / name).write_text(body)
    return set(files)


def test_the_readme_gateway_example_provisions_its_ieds(tmp_path: Path) -> None:
    assert _readme_files("### Running a gateway", tmp_path) == {"fleet.toml", "site.toml"}
    from gridpresence.config import load_fleet

    grid = Grid(load_fleet(tmp_path / "fleet.toml"), tmp_path / "grid")
    assert grid.gateway_ieds == ("feeder-4-load", "recloser-7")
    assert {d.name for d in grid.fleet.devices} == {"sim-load", "feeder-4-load", "recloser-7"}


def test_the_readme_field_simulator_example_is_a_simulated_site(tmp_path: Path) -> None:
    from gridpresence.config import load_fleet
    from gridpresence.gateway.simulator import FieldSimulator

    assert _readme_files("### A field simulator", tmp_path) == {"fleet.toml", "pump-site.toml"}
    fleet = load_fleet(tmp_path / "fleet.toml")
    assert [s.simulate for s in fleet.sites] == [True]
    assert Grid(fleet, tmp_path / "grid").gateway_ieds == ("field-pump-2",)
    assert set(FieldSimulator(load_site(tmp_path / "pump-site.toml")).ieds) == {"field-pump-2"}


async def test_a_dnp3_reading_flagged_bad_is_not_shown_as_good(field: Field) -> None:
    from dnp3.core.flags import AnalogQuality

    alice, db = field.alice, field.brk1.db
    assert db is not None

    async def update(quality: AnalogQuality) -> None:
        db.update_analog_input(0, value=500, quality=quality)

    await until(alice, "gw-brk-1", lambda v: v.state is DeviceState.ON)
    await field.ieds.run(update(AnalogQuality.ONLINE | AnalogQuality.COMM_LOST))
    await until(alice, "gw-brk-1", lambda v: v.state is DeviceState.RESTRICTED)
    report = alice.device("gw-brk-1").report
    assert report is not None and report.restriction is not None
    assert report.restriction.note == "readings not valid: kw: point 'kw' is comm-lost", report.restriction
    assert report.telemetry.kw is None and report.telemetry.breaker is None
    assert field.brk1.relay is not None
    controls = len(field.brk1.relay.log)
    refused = await alice.command("gw-brk-1", "open")
    assert refused.reason is RejectReason.RESTRICTED and len(field.brk1.relay.log) == controls  # nothing operated
    await field.ieds.run(update(AnalogQuality.ONLINE))
    await until(alice, "gw-brk-1", lambda v: v.state is DeviceState.ON and v.report.telemetry.kw == 50.0)


def _pump_site(directory: Path, name: str, port: int, *, rated_kw: float | None = 45,
               timeout_s: float = 2.0) -> None:
    """``directory/site.toml``: one Modbus TCP load controller (the shipped map) on ``port``."""
    rating = f"rated_kw = {rated_kw:g}\n" if rated_kw is not None else ""
    (directory / "site.toml").write_text(
        f'[[ieds]]\nname = "{name}"\nkind = "load"\nmap = "modbus-load-controller"\n{rating}poll_s = 0.3\n'
        f'link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {port}, unit = 1, timeout_s = {timeout_s:g} }}\n')


async def test_a_simulated_site_is_played_and_hosted_by_the_grid(tmp_path: Path) -> None:
    """``[[sites]] simulate = true`` (the demo's): `up`'s grid serves the site's IED from a real
    pymodbus server and hosts its gateway; the operator commands it like any device."""
    port = free_port()
    _pump_site(tmp_path, "sim-pump", port)
    fleet = parse_fleet({"operators": [{"name": "alice"}], "devices": [{"name": "bot-load", "kind": "load",
                                                                         "rated_kw": 10}],
                         "sites": [{"file": "site.toml", "simulate": True}]}, "fleet", tmp_path)
    grid = Grid(fleet, tmp_path / "grid")
    await grid.start()
    alice = GridOperator.from_connection(grid.connection, operator="alice", resource="sim-site")
    try:
        assert grid.simulated_ieds == ("sim-pump",)
        await alice.connect()
        await until(alice, "sim-pump", lambda v: v.present and v.state is DeviceState.ON, timeout=10)
        assert alice.device("sim-pump").report.telemetry.capacity_kw == 45.0  # type: ignore[union-attr]
        assert alice.device("bot-load").present  # the bot beside it
        code, out, err = await run_cli("shed", "sim-pump", "--connection", str(grid.connection_file))
        assert code == 0 and "running read back False" in out, (out, err)
        sim, _ = grid.sites[0]
        assert sim is not None and sim.ieds["sim-pump"].words[("coil", 0)] is True  # the server's own coil
        await until(alice, "sim-pump", lambda v: v.state is DeviceState.OFF and v.report.telemetry.kw == 0.0)
    finally:
        await alice.close()
        await grid.stop()
    assert grid.sites == []


async def test_under_processes_a_simulated_site_is_a_process_of_its_own_and_restarted(tmp_path: Path) -> None:
    """`up --processes`: the simulated site (its Modbus server and its gateway) runs as a
    supervised process of its own; killed, it is started again and the IED is back, while the
    devices process never stopped."""
    import re

    port = free_port()
    _pump_site(tmp_path, "proc-pump", port)
    (tmp_path / "fleet.toml").write_text(
        'domain = "localhost"\n[[operators]]\nname = "alice"\n[[devices]]\nname = "bot-load"\nkind = "load"\n'
        'rated_kw = 10\n[[sites]]\nfile = "site.toml"\nsimulate = true\n')
    data = tmp_path / "grid"
    proc, seen = await start_up(data, tmp_path / "fleet.toml", "--processes", timeout=90)
    try:
        pids = {m[0]: int(m[1]) for m in re.findall(r"([\w-]+): process (\d+), supervised", seen)}
        assert set(pids) >= {"devices", "gateway-site"}, seen
        assert "run `gridpresence gateway" not in seen, "the grid plays this site: nothing for a person to run"
        alice = GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"), operator="alice",
                                           resource="proc-site")
        await alice.connect()
        try:
            await until(alice, "proc-pump", lambda v: v.present and v.state is DeviceState.ON, timeout=30)
            assert (await alice.command("proc-pump", "shed", ttl_s=10)).status is OutcomeStatus.EXECUTED
            os.kill(pids["gateway-site"], signal.SIGKILL)
            await until(alice, "proc-pump", lambda v: not v.present, timeout=30)
            # Back by itself; the simulator starts afresh (its coil off), which the gateway reads.
            await until(alice, "proc-pump", lambda v: v.present and v.report is not None, timeout=60)
            assert (await alice.command("proc-pump", "shed", ttl_s=10)).status is OutcomeStatus.EXECUTED
            os.kill(pids["devices"], 0)  # still the same process
            assert alice.device("bot-load").present
        finally:
            await alice.close()
    finally:
        proc.send_signal(signal.SIGINT)
        await asyncio.wait_for(proc.wait(), 30)


async def test_a_simulated_site_whose_port_is_taken_still_comes_up_saying_why(tmp_path: Path) -> None:
    """The demo's simulator cannot serve (another program holds its port): the grid comes up all
    the same, logs it, and the IED's identity shows that it gets no answer."""
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()  # takes connections, never answers Modbus
    port = holder.getsockname()[1]
    _pump_site(tmp_path, "sim-taken", port, rated_kw=None, timeout_s=0.5)
    fleet = parse_fleet({"operators": [{"name": "alice"}], "devices": [{"name": "bot-load", "kind": "load",
                                                                         "rated_kw": 10}],
                         "sites": [{"file": "site.toml", "simulate": True}]}, "fleet", tmp_path)
    grid = Grid(fleet, tmp_path / "grid")
    alice: GridOperator | None = None
    try:
        await grid.start()
        assert grid.sites[0][0] is None and grid.simulated_ieds == ("sim-taken",)
        alice = GridOperator.from_connection(grid.connection, operator="alice", resource="taken")
        await alice.connect()
        await until(alice, "sim-taken", lambda v: v.present and v.state is DeviceState.RESTRICTED, timeout=10)
        note = alice.device("sim-taken").report.restriction.note  # type: ignore[union-attr]
        assert note.startswith("no answer from the IED"), note
    finally:
        holder.close()
        if alice is not None:
            await alice.close()
        await grid.stop()


def test_the_demo_fleet_has_a_simulated_field_site(tmp_path: Path) -> None:
    from gridpresence.config import load_fleet

    fleet = load_fleet(Path(__file__).resolve().parents[1] / "bots" / "demo-fleet.toml")
    assert [s.simulate for s in fleet.sites] == [True]
    grid = Grid(fleet, tmp_path / "grid")
    assert grid.gateway_ieds == ("field-pump-1",) and grid.fleet.device("field-pump-1").kind.value == "load"


def sunspec_meter(ieds: ModbusIeds, unit: int, *, model: int = 203, w: int, w_sf: int, wh: int, wh_sf: int) -> None:
    """A SunSpec meter's registers as the standard lays them out: 'SunS' at 40000, the common
    model (1, length 66: maker, model, options, version, serial as strings) at 40002, the meter
    model at 40070 (length 105) and the end marker after it."""
    def text(value: str, words: int) -> list[int]:
        data = value.encode().ljust(2 * words, b"\0")
        return [int.from_bytes(data[i:i + 2], "big") for i in range(0, 2 * words, 2)]

    ieds.set(unit, "h", 40000, [0x5375, 0x6E53])
    ieds.set(unit, "h", 40002, [1, 66, *text("Acme", 16), *text("M-3000", 16), *text("", 8), *text("1.2", 8),
                                *text("SN4711", 16), 1, 0x8000])
    body = [0] * 105
    body[0:5] = [153, 51, 51, 51, 0xFFFF]  # A, AphA-C; A_SF -1
    body[5], body[13] = 2301, 0xFFFF  # PhV 230.1 V (V_SF -1)
    body[14], body[15] = 5000, 0xFFFE  # Hz 50.00 (Hz_SF -2)
    body[16], body[20] = w & 0xFFFF, w_sf & 0xFFFF  # W, W_SF
    body[44:46] = [wh >> 16, wh & 0xFFFF]  # TotWhImp (acc32)
    body[52] = wh_sf & 0xFFFF  # TotWh_SF
    ieds.set(unit, "h", 40070, [model, 105, *body])
    ieds.set(unit, "h", 40177, [0xFFFF, 0])  # end of the models


async def test_a_sunspec_meter_is_read_by_the_shipped_map() -> None:
    """The shipped sunspec-meter map against pymodbus's server laid out as SunSpec: scale
    factors applied, a single-phase model (201) too, and a device that is not laid out so (no
    'SunS', another model) or whose scale factor is nonsense is never shown as good."""
    meters = ModbusIeds((1, 2), size=40200)
    sunspec_meter(meters, 1, w=12345, w_sf=-1, wh=5_000_123, wh_sf=0)  # 1234.5 W, 5000.123 kWh
    sunspec_meter(meters, 2, model=201, w=250, w_sf=1, wh=42, wh_sf=3)  # 2500 W, 42 000 Wh
    port = free_port()
    server = ModbusTcpServer(meters.devices, address=("127.0.0.1", port))
    await server.serve_forever(background=True)
    site = parse_site({"ieds": [{"name": f"sunspec-{u}", "kind": "meter", "map": "sunspec-meter",
                                 "link": {"protocol": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": u}}
                                for u in (1, 2)]})
    three, single = (FieldIed(ied, site.map_for(ied)) for ied in site.ieds)
    try:
        status = await three.poll()
        assert status.report is not None, status.problem
        assert status.report.telemetry.kw == pytest.approx(1.2345) and status.report.telemetry.energy_kwh == pytest.approx(5000.123)
        assert status.extra == pytest.approx({"amps": 15.3, "volts": 230.1, "hz": 50.0})
        assert three.driver.requests == 2  # type: ignore[attr-defined]  # the marker's span and the model's
        status = await single.poll()
        assert status.report is not None and status.report.telemetry.kw == pytest.approx(2.5), status.problem
        assert status.report.telemetry.energy_kwh == pytest.approx(42.0)
        meters.set(1, "h", 40070, [120])  # an inverter model where the meter should be
        status = await three.poll()
        assert status.report is None and "expect.meter_id: reads 120, not 201 or 202 or 203 or 204" in (status.problem or "")
        meters.set(1, "h", 40070, [203])
        meters.set(1, "h", 40000, [0, 0])  # no 'SunS'
        status = await three.poll()
        assert status.report is None and "expect.marker: reads 0" in (status.problem or ""), status.problem
        meters.set(1, "h", 40000, [0x5375, 0x6E53])
        meters.set(1, "h", 40092, [0x8000])  # W_SF "not implemented"
        status = await three.poll()
        assert status.report is None and "scale factor 'w_sf' reads -32768" in (status.problem or ""), status.problem
        meters.set(1, "h", 40092, [0xFFFF])
        assert (await three.poll()).report is not None
    finally:
        await three.driver.close()
        await single.driver.close()
        await server.shutdown()


async def test_the_field_simulator_plays_a_sunspec_meter() -> None:
    """The simulator lays a map's expected identity out too: the gateway takes it for a SunSpec meter."""
    from gridpresence.gateway.simulator import FieldSimulator

    port = free_port()
    site = parse_site({"ieds": [{"name": "sim-sunspec", "kind": "meter", "map": "sunspec-meter", "rated_kw": 20,
                                 "link": {"protocol": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": 3}}]})
    field_ied = FieldIed(site.ieds[0], site.map_for(site.ieds[0]))
    async with FieldSimulator(site):
        try:
            status = await field_ied.poll()
            assert status.report is not None and 0 < (status.report.telemetry.kw or 0) <= 20, status.problem
        finally:
            await field_ied.driver.close()



async def test_the_field_simulator_takes_any_modbus_request_and_keeps_serving() -> None:
    """Seeded random requests (any table, address, count and value, in and out of the maps'
    ranges) each get an answer, normal or an exception response; the simulated IEDs then still
    read as valid presence."""
    from pymodbus.client import AsyncModbusTcpClient

    from gridpresence.gateway.simulator import FieldSimulator

    port = free_port()
    site = parse_site({"ieds": [
        {"name": "fz-load", "kind": "load", "map": "modbus-load-controller", "rated_kw": 50,
         "link": {"protocol": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": 1}},
        {"name": "fz-sunspec", "kind": "meter", "map": "sunspec-meter", "rated_kw": 20,
         "link": {"protocol": "modbus-tcp", "host": "127.0.0.1", "port": port, "unit": 2}}]})
    rng = random.Random(1515)
    client = AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0, retries=0)
    answers = {"normal": 0, "exception": 0}
    async with FieldSimulator(site) as sim:
        assert await client.connect()
        try:
            for _ in range(150):
                unit = rng.choice((1, 2, 3))  # 3: no such unit on this line
                address = rng.choice((0, 1, 2, 5, 40000, 40070, 40124, rng.randrange(0, 65000)))
                op = rng.randrange(5)
                if op == 0:
                    r = await client.read_coils(address, count=rng.randrange(1, 40), device_id=unit)
                elif op == 1:
                    r = await client.read_holding_registers(address, count=rng.randrange(1, 60), device_id=unit)
                elif op == 2:
                    r = await client.write_coil(address, rng.random() < 0.5, device_id=unit)
                elif op == 3:
                    r = await client.write_register(address, rng.getrandbits(16), device_id=unit)
                else:
                    r = await client.write_registers(address, [rng.getrandbits(16) for _ in range(rng.randrange(1, 5))],
                                                     device_id=unit)
                answers["exception" if r.isError() else "normal"] += 1
        finally:
            client.close()
        assert sum(answers.values()) == 150 and answers["normal"] > 0 and answers["exception"] > 0, answers
        for name in ("fz-load", "fz-sunspec"):  # what the fuzz wrote is put right, as a field engineer would
            played = sim.ieds[name]
            for wanted_name, wanted in played.pmap.expect.items():
                played.set(played.pmap.points[wanted_name], wanted[0] if isinstance(wanted, tuple) else wanted)
            for point in played.pmap.points.values():
                if point.scale_factor is not None:
                    played.set(played.pmap.points[point.scale_factor], 0)
            played.shed = False
            played.step(0.0)
        for ied in site.ieds:
            field_ied = FieldIed(ied, site.map_for(ied))
            try:
                status = await field_ied.poll()
                assert status.report is not None, (ied.name, status.problem)
            finally:
                await field_ied.driver.close()
