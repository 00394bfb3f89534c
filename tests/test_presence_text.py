"""A hosted device's broadcast presence written as text (HostedClient.broadcast_presence, no
stanza object, no run of the outgoing filters, no serialiser) against the stanza's way it
replaces (make_presence, the filters' caps and branch totals, slixmpp's serialiser): seeded
reports of every device kind, with and without restriction, faults and telemetry, each
published both ways by the device's own ``publish``; the text each remote contact is sent and
the element a contact on the link is handed are the same XML, and go to the same contacts."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections.abc import AsyncIterator
from typing import Any
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio

from conftest import Written, agent_of, hosted_fleet, link_of, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.device.branch import BranchAdvisor
from gridpresence.host.grid import Grid
from gridpresence.protocol.models import NS as GRID_NS
from gridpresence.protocol.models import (
    Breaker,
    DeviceState,
    FaultRef,
    PresenceReport,
    Restriction,
    Telemetry,
    utcnow,
)
from gridpresence.xmpp.component import _TO_MARK, NS, HostedClient

pytestmark = pytest.mark.timeout(120)

DEVICES = [
    {"name": "pt-master", "kind": "master", "rated_kw": 1000, "refresh_s": 600.0},
    {"name": "pt-meter", "kind": "meter", "rated_kw": 400, "parent": "pt-master", "refresh_s": 600.0},
    {"name": "pt-load", "kind": "load", "rated_kw": 10, "parent": "pt-meter", "refresh_s": 600.0},
    {"name": "pt-gen", "kind": "generator", "rated_kw": 200, "startup_s": 2.0, "parent": "pt-master",
     "refresh_s": 600.0},
    {"name": "pt-breaker", "kind": "breaker", "rated_kw": 100, "refresh_s": 600.0},
]
NAMES = [d["name"] for d in DEVICES]
CAPS = "{http://jabber.org/protocol/caps}c"
BRANCHES = f"{{{GRID_NS}}}branches"


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    fleet = parse_fleet(hosted_fleet(DEVICES, presence_grace_s=5.0))
    async with running_grid(fleet, tmp_path_factory.mktemp("ptext"), only=[*NAMES, "watchdog"],
                            dashboard=False, tick_s=600) as g:
        yield g


def seeded_report(rng: random.Random, base: PresenceReport) -> PresenceReport:
    """``base`` with a random state, readings, restriction and faults (XML's special characters
    in the texts)."""
    def reading(hi: float) -> float | None:
        return None if rng.random() < 0.3 else round(rng.uniform(0, hi), rng.choice([0, 1, 3, 6]))
    telemetry = Telemetry() if rng.random() < 0.2 else Telemetry(
        load_pct=reading(150), kw=reading(1e4), capacity_kw=reading(1e4), fuel_pct=reading(100),
        temperature_c=reading(300), energy_kwh=reading(1e6),
        breaker=rng.choice([None, *Breaker]))
    state = rng.choice(list(DeviceState))
    restriction = None if state is not DeviceState.RESTRICTED else Restriction(
        note=rng.choice(["busy", "critical <load> & 'hot' \"now\"", "starting: 30 s"]),
        until=rng.choice([None, utcnow() + dt.timedelta(seconds=rng.randrange(1, 3600))]))
    faults = tuple(FaultRef(kind=rng.choice(["overload", "under-voltage", "breaker-trip"]),
                            device=rng.choice([None, "pt-load@devices.localhost"]))
                   for _ in range(rng.choice([0, 0, 1, 3])))
    return PresenceReport.model_validate({
        **dict(base), "state": state, "telemetry": telemetry, "restriction": restriction,
        "faults": faults, "critical": rng.random() < 0.3, "seq": base.seq + rng.randrange(1, 1000),
        "under_fault": rng.choice([None, True])})


def parsed(text: str) -> ET.Element:
    """A broadcast's text (``to`` marked) as the element a contact is sent."""
    return ET.fromstring(f"<w xmlns='{NS}'>{text.replace(_TO_MARK, 'contact@localhost', 1)}</w>")[0]


def canonical(el: ET.Element) -> str:
    return ET.canonicalize(ET.tostring(el))  # attributes in one order, whatever order they were set in


def publish(dev: DeviceAgent, one: HostedClient, report: PresenceReport, force: bool,
            as_text: bool) -> tuple[str, str]:
    """``report`` published by the device, as text or the stanza's way: the text sent to remote
    contacts, and the element handed to a contact on the link (canonical)."""
    dev.current_report = lambda: report  # type: ignore[method-assign]
    taken: list[bool] = []
    real = HostedClient.broadcast_presence

    def broadcast_presence(*args: Any, **kwargs: Any) -> bool:
        taken.append(real(one, *args, **kwargs) if as_text else False)
        return taken[-1]
    one.broadcast_presence = broadcast_presence  # type: ignore[method-assign]
    try:
        dev.publish(force=force)
    finally:
        del one.broadcast_presence
        del dev.current_report
    assert taken == [as_text], "the text path is taken whenever it is asked to be"
    return one._last_text, canonical(one._last_element())


async def test_text_presence_is_the_stanzas_for_every_kind_and_payload(grid: Grid) -> None:
    link = link_of(grid)
    watchdog = grid.fleet.jid("watchdog")
    rng = random.Random(1606)
    # Every device's first presence handed to the master: its totals stay as they are (top-down,
    # a device's seeded presence changes only the totals above it, already compared).
    advisor = agent_of(grid, "pt-master").desk(BranchAdvisor)
    await until(lambda: len(advisor.reports) == len(advisor.specs), 15, "the master's tree reported")
    await asyncio.sleep(0.3)
    for name in NAMES:
        dev, one = agent_of(grid, name), link.clients[grid.fleet.jid(name)]
        await until(lambda: watchdog not in one._offline and dev._broadcast is not None, 10, f"{name} up")
        base = dev.current_report()
        assert base is not None
        for i in range(12):
            report = seeded_report(rng, base)
            force = i % 3 != 2  # a refresh to all, or a change (not to the watchdog)
            before = dev._broadcast  # what the change is from: the same for both ways
            # Both in one turn: nothing handed over in between (a child told of a fault above
            # republishes, and a master's totals would move).
            with Written(link) as seen:
                old_text, old_local = publish(dev, one, report, force, as_text=False)
                dev._broadcast = before
                new_text, new_local = publish(dev, one, report, force, as_text=True)
                await asyncio.sleep(0.05)  # the link's writes of the turn
            old_el, new_el = parsed(old_text), parsed(new_text)
            assert canonical(new_el) == canonical(old_el), (name, report)
            assert new_local == old_local, (name, report)
            copies: dict[str, list[str]] = {}  # each contact's copies, in the order written
            for el in ET.fromstring(f"<w xmlns='{NS}'>{''.join(seen.writes)}</w>"):
                if (el.get("from") or "").split("/")[0] != one.boundjid.bare:
                    continue  # another device's (a child told of a fault above republishes)
                copies.setdefault(el.get("to") or "", []).append(canonical(el))
            assert all(len(c) == 2 and c[0] == c[1] for c in copies.values()), "the same to the same contacts"
            assert watchdog in copies or not force
            gone = report.state is DeviceState.GONE
            assert (new_el.get("type") == "unavailable") == gone
            assert (new_el.find(CAPS) is not None) == (not gone), "caps on available presence only"
            if name == "pt-master":
                assert (new_el.find(BRANCHES) is not None) == (not gone), "branch totals on a master's presence"
        dev.publish(force=True)  # its real state again, for the devices above
