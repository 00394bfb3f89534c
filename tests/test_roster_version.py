"""An operator's roster kept between logins (XEP-0237 roster versioning, operator/roster_cache.py)
on a real Prosody with hosted devices: a returning operator is sent no roster items yet sees
every device with its state; a roster changed while it was away (a device removed) is right
after the next login; a change pushed while online is kept; an unreadable kept roster costs a
whole roster, never a device; a seeded fuzz of the kept file never breaks reading it."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from conftest import running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.operator.roster_cache import ROSTER_NS, KeptRoster, roster_file_beside
from gridpresence.protocol.roster import device_kind
from gridpresence.xmpp.session import close_session, make_client, open_session

pytestmark = pytest.mark.timeout(120)

N = 40
NAMES = [f"rv-{i:02d}" for i in range(N)]
FLEET = {
    "domain": "localhost",
    "hosting": "component",
    "operators": [{"name": "alice"}, {"name": "bob"}],
    "devices": [{"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 300} for n in NAMES],
}


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("roster-ver"), only=NAMES) as g:
        yield g


class Login:
    """One GridOperator login (``op.roster_items_sent``: the roster items the server sent it)."""

    def __init__(self, grid: Grid, operator: str, resource: str) -> None:
        self.op = GridOperator.from_connection(grid.connection, operator=operator, resource=resource)

    @property
    def items_sent(self) -> int:
        return -1 if self.op.roster_items_sent is None else self.op.roster_items_sent  # -1: "yours is current"

    async def __aenter__(self) -> GridOperator:
        await self.op.connect(settle_s=20, tariff_s=0)
        return self.op

    async def __aexit__(self, *_exc: object) -> None:
        await self.op.close()


def all_seen(op: GridOperator, names: list[str]) -> list[str]:
    """The devices among `names` not seen present with a state (empty: all are)."""
    return [n for n in names if n not in op.devices or not op.devices[n].present or op.devices[n].state is None]


async def roster_set(grid: Grid, operator: str, item: dict[str, str], groups: tuple[str, ...] = ()) -> None:
    """A roster change made on the server by another session of the operator's account."""
    client = make_client(f"{grid.fleet.jid(operator)}/admin", grid.secrets.password(operator), grid.endpoint)
    await open_session(client, grid.endpoint)
    try:
        iq = client.make_iq_set()
        query = ET.SubElement(iq.xml, f"{{{ROSTER_NS}}}query")
        el = ET.SubElement(query, f"{{{ROSTER_NS}}}item", item)
        for g in groups:
            ET.SubElement(el, f"{{{ROSTER_NS}}}group").text = g
        await iq.send(timeout=10)
    finally:
        await close_session(client)


async def test_returning_operator_is_sent_no_roster_yet_sees_every_state(grid: Grid) -> None:
    kept = roster_file_beside(grid.connection.operator("alice").key_file, "alice")
    assert kept is not None
    kept.unlink(missing_ok=True)
    first = Login(grid, "alice", "first")
    async with first as op:
        assert not all_seen(op, NAMES)
        assert first.items_sent >= N  # no version held: the whole roster
        # Most of the burst was taken straight from the XML (xmpp/dispatch.py's presence takers).
        assert op.client.shape_dispatch.taken >= N // 2  # type: ignore[attr-defined]
    data = json.loads(kept.read_text())
    assert data["version"] and len([j for j in data["items"] if device_kind(data["items"][j]["groups"])]) == N

    again = Login(grid, "alice", "again")
    async with again as op:
        assert again.items_sent == -1  # the kept version is the server's: no items sent
        assert sorted(op.devices) == NAMES
        assert not all_seen(op, NAMES), "a returning operator misses a device's state"
        # The state it shows is the device's own, now.
        agent = next(iter(grid.bots.devices.values()))  # type: ignore[union-attr]
        assert op.devices[agent.spec.name].state is agent.sim.state


async def test_roster_changed_while_away_and_while_online(grid: Grid) -> None:
    kept = roster_file_beside(grid.connection.operator("bob").key_file, "bob")
    assert kept is not None
    async with Login(grid, "bob", "one") as op:
        assert not all_seen(op, NAMES)
        groups = tuple(op.client.client_roster[op.device(NAMES[0]).jid]["groups"])
    gone, pushed = NAMES[0], NAMES[1]
    gone_jid, pushed_jid = grid.fleet.jid(gone), grid.fleet.jid(pushed)
    version_before = json.loads(kept.read_text())["version"]

    # Away: a device leaves bob's roster on the server.
    await roster_set(grid, "bob", {"jid": gone_jid, "subscription": "remove"})
    login = Login(grid, "bob", "two")
    async with login as op:
        assert login.items_sent >= N - 1  # the kept version is stale: the whole roster
        assert gone not in op.devices and gone_jid not in op.client.client_roster
        assert not all_seen(op, NAMES[1:])
        # Online: another session renames a device; the push reaches the kept roster.
        await roster_set(grid, "bob", {"jid": pushed_jid, "name": "renamed"}, groups)
        await until(lambda: json.loads(kept.read_text())["items"].get(pushed_jid, {}).get("name") == "renamed",
                    what="the pushed change kept")
    data = json.loads(kept.read_text())
    assert gone_jid not in data["items"] and data["version"] != version_before

    login = Login(grid, "bob", "three")
    async with login as op:
        assert login.items_sent == -1  # the push kept the version current
        assert gone not in op.devices and op.client.client_roster[pushed_jid]["name"] == "renamed"
        assert not all_seen(op, NAMES[1:])


async def test_unreadable_kept_roster_costs_a_whole_roster_not_a_device(grid: Grid) -> None:
    kept = roster_file_beside(grid.connection.operator("alice").key_file, "alice")
    assert kept is not None
    kept.write_text('{"format": 1, "owner": "alice@localhost", "version": "1", "items": {"x": 3}}')
    login = Login(grid, "alice", "garbled")
    async with login as op:
        assert login.items_sent >= N
        assert not all_seen(op, NAMES)
    assert json.loads(kept.read_text())["items"]  # written again, whole


def test_fuzzed_kept_roster_files_are_read_or_ignored(tmp_path: Path) -> None:
    path = tmp_path / "op.roster.json"
    good = {"format": 1, "owner": "op@localhost", "version": "17",
            "items": {"d@devices.localhost": {"name": "", "groups": ["load"], "from": True, "to": True,
                                              "pending_in": False, "pending_out": False, "whitelisted": False}}}
    text = json.dumps(good)
    path.write_text(text)
    assert KeptRoster(path, "op@localhost").version("op@localhost") == "17"
    assert KeptRoster(path, "other@localhost").entries("other@localhost") == []  # not its roster
    rng = random.Random(1606)
    for _ in range(400):
        chars = list(text)
        for _ in range(rng.randint(1, 6)):
            chars[rng.randrange(len(chars))] = rng.choice('{}[]":,0aZ\x00\\ ')
        path.write_text("".join(chars), encoding="utf-8", errors="replace")
        roster = KeptRoster(path, "op@localhost")
        entries = roster.entries("op@localhost")
        assert entries in ([], ["d@devices.localhost"]) or all(isinstance(e, str) for e in entries)
        for jid in entries:
            state = roster.load("op@localhost", jid)
            assert state is not None and isinstance(state["groups"], list) and isinstance(state["to"], bool)
