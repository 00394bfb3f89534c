"""Real firewalls: network namespaces and nftables rules, built and torn down here.

Topology (addresses exist only inside this test's namespaces and veth pairs)::

    [secure-1 ns] 10.213.77.2 --veth-- 10.213.77.1 [root ns: Prosody, operator alice]
    [secure-2 ns] 10.213.77.6 --veth-- 10.213.77.5 --(local delivery)--^

Prosody listens on 10.213.77.1 with HTTP on 80 and HTTPS on 443. A secure namespace's rules
allow outbound HTTP(S) only: unsolicited inbound traffic and the XMPP port are dropped.
Device bots run in a namespace as separate processes (``ip netns exec NS gridpresence bots``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio

from gridpresence.operator.library import GridOperator
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.protocol.models import Action, DeviceState, HealthStatus, OutcomeStatus
from gridpresence.server import ServerPorts, free_port
import netlab
from netlab import BLOCK_ALL, PUBLIC, Lab, stop_bot

FW_FLEET = {
    "domain": "grid.test",
    "presence_grace_s": 2.0,
    "operators": [{"name": "alice"}, {"name": "bob"}],
    "devices": [{"name": f"fw-{i}", "kind": "load", "rated_kw": 40, "refresh_s": 1.0} for i in (1, 2, 3)],
}


@pytest.fixture(scope="module")
def namespaces() -> Iterator[dict[str, str]]:
    try:
        with netlab.namespaces() as names:
            yield names
    except netlab.NetlabUnavailable as exc:
        pytest.skip(f"firewall tests cannot run here: {exc}")


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def lab(namespaces: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Lab]:
    fleet = parse_fleet(FW_FLEET)
    data = tmp_path_factory.mktemp("fwgrid")
    ports = ServerPorts(c2s=free_port(PUBLIC), http=80, https=443, component=free_port(PUBLIC))
    grid = Grid(fleet, data, bind=PUBLIC, ports=ports, bots=False)
    await grid.start()
    lab = Lab(namespaces, grid, fleet, data)
    try:
        yield lab
    finally:
        for role in namespaces:
            lab.firewall(role, None)
        await grid.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def alice(lab: Lab) -> AsyncIterator[GridOperator]:
    op = lab.operator("alice")
    await op.connect()
    try:
        yield op
    finally:
        await op.close()


async def test_one_firewall_device_online_over_bosh_obeys_unsolicited_shed(lab: Lab, alice: GridOperator) -> None:
    """[0006]: a device behind a firewall that lets only web traffic out is online, shows rich
    presence, and executes an unsolicited command from the operator; the outcome comes back."""
    lab.web_only("sec1")
    ports = lab.grid.server.ports
    assert not await lab.can_reach("sec1", ports.c2s), "the firewall must block the XMPP port"
    assert await lab.can_reach("sec1", ports.https)
    bot = await lab.start_bot("sec1", "fw-1")
    try:
        await alice.wait_for(lambda d: d["fw-1"].present and d["fw-1"].transport == "bosh", timeout=20)
        view = alice.devices["fw-1"]
        assert view.state is DeviceState.ON and view.report is not None
        assert view.report.telemetry.kw is not None and view.report.telemetry.load_pct is not None
        outcome = await alice.command("fw-1", Action.SHED)
        assert outcome.status is OutcomeStatus.EXECUTED
        assert outcome.report is not None and outcome.report.state is DeviceState.OFF
        await alice.wait_for(lambda d: d["fw-1"].state is DeviceState.OFF, timeout=5)
    finally:
        await stop_bot(bot)


async def test_two_firewalls_device_and_operator_meet_through_the_server(lab: Lab) -> None:
    """[00166]: operator and device each behind their own web-only firewall."""
    lab.web_only("sec1")
    lab.web_only("sec2")
    assert not await lab.can_reach("sec2", lab.grid.server.ports.c2s)
    bot = await lab.start_bot("sec1", "fw-2")
    try:
        for _ in range(40):  # the bot needs a few seconds to fall back to BOSH
            code, out, err = await lab.cli("sec2", "status", "--json", "--as", "bob", "--settle", "2")
            assert code == 0, err
            devices = {d["name"]: d for d in json.loads(out)["devices"]}
            if devices["fw-2"]["transport"] == "bosh":
                break
            await asyncio.sleep(0.5)
        assert devices["fw-2"]["state"] == "on" and devices["fw-2"]["telemetry"]["kw"] > 0
        code, out, err = await lab.cli("sec2", "shed", "fw-2", "--json", "--as", "bob")
        assert code == 0, err
        (outcome,) = json.loads(out)
        assert outcome["status"] == "executed" and outcome["report"]["state"] == "off"
    finally:
        await stop_bot(bot)


async def test_everything_blocked_is_presence_error_then_comes_back(lab: Lab, alice: GridOperator) -> None:
    lab.web_only("sec1")
    bot = await lab.start_bot("sec1", "fw-3")
    try:
        await alice.wait_for(lambda d: d["fw-3"].present and d["fw-3"].health is HealthStatus.OK, timeout=20)
        lab.firewall("sec1", BLOCK_ALL)
        await alice.wait_for(lambda d: d["fw-3"].health is HealthStatus.PRESENCE_ERROR, timeout=30)
        assert alice.devices["fw-3"].label == "presence-error"
        lab.firewall("sec1", None)  # the firewall opens: nobody restarts the bot
        await alice.wait_for(lambda d: d["fw-3"].present and d["fw-3"].health is HealthStatus.OK, timeout=60)
        assert (await alice.command("fw-3", Action.READ)).status is OutcomeStatus.EXECUTED
    finally:
        await stop_bot(bot)
