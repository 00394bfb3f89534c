"""A field gateway behind a real firewall ([00143]): the gateway and its IED in a network
namespace whose nftables rules let only web traffic out, the grid's server outside.

    [gp15sec1 ns: IED (pymodbus, 127.0.0.1), gateway] 10.215.15.2 --veth-- 10.215.15.1 [Prosody, alice]

The IED is ``gridpresence field-sim`` (pymodbus's own server, laid out by the shipped load
controller map), the gateway ``gridpresence gateway``: both separate processes in the
namespace. The XMPP port is dropped, so the gateway's identity reaches the server over BOSH, and
an operator's unsolicited shed and restore reach the IED's coil through it.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

import netlab
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.protocol.models import Action, DeviceState, OutcomeStatus
from gridpresence.server import ServerPorts, free_port
from netlab import EXE, ROOT, Lab

pytestmark = pytest.mark.timeout(120)

# This file's own prefix and addresses: it may run beside test_firewall.py's lab.
PREFIX = "gp15"
PUBLIC = "10.215.15.1"
SECURE = {"sec1": (PUBLIC, "10.215.15.2")}
IED_PORT = 15502  # inside the namespace's own loopback: no one else's

SITE = f"""
[[ieds]]
name = "gw15-load"
kind = "load"
map = "modbus-load-controller"
rated_kw = 60
poll_s = 0.5
link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {IED_PORT}, unit = 7, timeout_s = 2.0 }}
"""


@pytest.fixture(scope="module")
def names() -> Iterator[dict[str, str]]:
    try:
        with netlab.namespaces(PREFIX, SECURE) as created:
            yield created
    except netlab.NetlabUnavailable as exc:
        pytest.skip(f"firewall tests cannot run here: {exc}")


@pytest_asyncio.fixture(scope="module")
async def lab(names: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    tmp = tmp_path_factory.mktemp("gwfw")
    (tmp / "site.toml").write_text(SITE)
    fleet = parse_fleet({"operators": [{"name": "alice"}], "presence_grace_s": 2.0,
                         "devices": [{"name": "fw15-sim", "kind": "load", "rated_kw": 10}],
                         "sites": [{"file": "site.toml"}]}, "fleet", tmp)
    ports = ServerPorts(c2s=free_port(PUBLIC), http=free_port(PUBLIC), https=free_port(PUBLIC),
                        component=free_port(PUBLIC))
    grid = Grid(fleet, tmp / "grid", bind=PUBLIC, ports=ports, bots=False)
    await grid.start()
    lab = Lab(names, grid, fleet, tmp / "grid", public=PUBLIC)
    try:
        yield lab
    finally:
        lab.firewall("sec1", None)
        await grid.stop()


async def _in_namespace(lab: Lab, *args: str, ready: str) -> asyncio.subprocess.Process:
    """A gridpresence sub-command in the secure namespace, once it printed ``ready``."""
    proc = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", lab.names["sec1"], EXE, *args, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        while ready not in (line := (await proc.stdout.readline()).decode()):
            if not line:
                raise AssertionError(f"{args[0]} ended before it was ready (status {await proc.wait()})")
    return proc


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 15)
        except TimeoutError:
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def test_a_gateway_behind_a_web_only_firewall_reaches_the_grid_over_bosh(lab: Lab, tmp_path: Path) -> None:
    site = lab.data.parent / "site.toml"
    lab.web_only("sec1")
    assert not await lab.can_reach("sec1", lab.grid.server.ports.c2s), "the firewall must block the XMPP port"
    assert await lab.can_reach("sec1", lab.grid.server.ports.https)
    alice = GridOperator.from_connection(lab.grid.connection, operator="alice", resource="gw15")
    ied = await _in_namespace(lab, "field-sim", str(site), ready="field simulator up")
    gateway = None
    try:
        await alice.connect()
        gateway = await _in_namespace(lab, "gateway", str(site), "--connection", str(lab.grid.connection_file),
                                      ready="gateway up")
        try:  # online over BOSH, with the IED's readings (its first presence may still say "waiting")
            await alice.wait_for(lambda d: d["gw15-load"].present and d["gw15-load"].transport == "bosh"
                                 and d["gw15-load"].state is DeviceState.ON, timeout=30)
        except TimeoutError:
            raise AssertionError(f"not online over BOSH with readings: {alice.devices['gw15-load']}") from None
        view = alice.devices["gw15-load"]
        assert view.report is not None and view.report.telemetry.kw
        assert view.report.telemetry.capacity_kw == 60.0  # the IED's own register, read inside the firewall
        shed = await alice.command("gw15-load", Action.SHED)  # unsolicited: nothing inbound is let through
        assert shed.status is OutcomeStatus.EXECUTED, shed
        assert shed.report is not None and shed.report.state is DeviceState.OFF and shed.report.transport == "bosh"
        assert "running read back False" in shed.detail and shed.report.telemetry.kw == 0.0
        await alice.wait_for(lambda d: d["gw15-load"].state is DeviceState.OFF, timeout=5)
        back = await alice.command("gw15-load", Action.RESTORE)
        assert back.status is OutcomeStatus.EXECUTED and back.report.state is DeviceState.ON, back  # type: ignore[union-attr]
    finally:
        await alice.close()
        if gateway is not None:
            await _stop(gateway)
        await _stop(ied)
    assert gateway.returncode == 0 and ied.returncode == 0  # both stopped in order on Ctrl-C
