"""The component link probes each contact once, not once per hosted identity
(xmpp/shared_probes.py), and every hosted identity still knows each contact's presence as
the server would tell it: at the fleet's start, and after the link comes back with an operator
who logged in (two resources, one busy) while it was down."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import until
from gridpresence.config import Fleet, parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.host.grid import Grid
from gridpresence.xmpp.component import ComponentLink
from gridpresence.xmpp.session import close_session, make_client, open_session

pytestmark = pytest.mark.timeout(120)

N = 40
FLEET = {
    "domain": "localhost",
    "presence_grace_s": 2.0,
    "hosting": "component",
    "operators": [{"name": "alice"}, {"name": "bob"}],
    "devices": [{"name": f"sp-{i:02d}", "kind": "load", "rated_kw": 10, "refresh_s": 5.0} for i in range(N)],
}


@dataclass
class Env:
    grid: Grid
    fleet: Fleet

    @property
    def link(self) -> ComponentLink:
        assert self.grid.bots is not None and self.grid.bots.link is not None
        return self.grid.bots.link

    @property
    def devices(self) -> list[DeviceAgent]:
        assert self.grid.bots is not None
        return list(self.grid.bots.devices.values())

    def contacts(self) -> set[str]:
        """The contacts outside the link's domain that hosted identities are subscribed to."""
        return {jid for d in self.devices for jid in d.client.client_roster
                if d.client.client_roster[jid]["to"] and not jid.endswith("@" + self.link.domain)}


@pytest_asyncio.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    fleet = parse_fleet(FLEET)
    grid = Grid(fleet, tmp_path_factory.mktemp("probes"),
                only=[*(d.name for d in fleet.devices), "watchdog", "console", "relay"], dashboard=False)
    await grid.start()
    try:
        yield Env(grid, fleet)
    finally:
        await grid.stop()


def _knows(dev: DeviceAgent, contact: str, shows: dict[str, str] | None) -> bool:
    """The device's roster has `contact` with exactly these resources and shows (None: offline)."""
    resources = dev.client.client_roster[contact].resources
    if shows is None:
        return not resources
    return {r: (p.get("show") or "") for r, p in resources.items()} == shows


async def test_at_start_one_probe_per_contact_and_every_identity_knows_each(env: Env) -> None:
    contacts = env.contacts()
    services = {env.fleet.jid(n) for n in ("watchdog", "console", "relay")}
    assert services <= contacts and {env.fleet.jid("alice"), env.fleet.jid("bob")} <= contacts
    assert env.link.probes.sent == len(contacts)  # not N x len(contacts)
    for dev in env.devices:
        for svc in services:
            await until(lambda: bool(dev.client.client_roster[svc].resources), 5, f"{svc} at {dev.jid}")
        assert _knows(dev, env.fleet.jid("alice"), None)


async def test_after_the_link_returns_one_probe_per_contact_and_each_knows_the_presence_now(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    link, alice_jid = env.link, env.fleet.jid("alice")
    monkeypatch.setattr("gridpresence.xmpp.reconnect.backoff_delay", lambda *_a, **_k: 1.5)
    before = link.probes.sent
    link.abort()
    await until(lambda: not any(d.client.is_connected() for d in env.devices), 5, "hosted sessions down")
    clients = []
    try:
        for resource, show in (("desk", None), ("phone", "dnd")):  # two resources: two answer stanzas
            c = make_client(f"{alice_jid}/{resource}-{os.urandom(2).hex()}", env.grid.secrets.password("alice"),
                            env.grid.endpoint)
            await open_session(c, env.grid.endpoint)
            c.send_presence(pshow=show) if show else c.send_presence()
            clients.append(c)
        await until(lambda: all(d.client.is_connected() for d in env.devices), 10, "hosted sessions back")
        want = {str(c.boundjid.resource): ("dnd" if i else "") for i, c in enumerate(clients)}
        for dev in env.devices:
            await until(lambda: _knows(dev, alice_jid, want), 5, f"alice's two resources at {dev.jid}")
            assert _knows(dev, env.fleet.jid("bob"), None)
        assert link.probes.sent - before == len(env.contacts())
        # Later changes still come from the server to each identity: alice's desk goes away.
        await close_session(clients.pop(0))
        want.pop(next(iter(want)))
        for dev in env.devices:
            await until(lambda: _knows(dev, alice_jid, want), 5, f"alice's desk gone at {dev.jid}")
        assert link.probes.sent - before == len(env.contacts())
        # An identity whose session starts after the answers is told from what the link knows.
        late = env.devices[-1]
        late.client.abort()
        await until(lambda: not late.client.is_connected(), 5, "one session down")
        assert _knows(late, alice_jid, None)  # what it knew went with its session
        late.client.connect()
        await until(lambda: late.client.is_connected(), 5, "that session back")
        await until(lambda: _knows(late, alice_jid, want), 5, "alice's phone at the late identity")
        assert link.probes.sent - before == len(env.contacts())
    finally:
        for c in clients:
            await close_session(c)
        await asyncio.sleep(0)
