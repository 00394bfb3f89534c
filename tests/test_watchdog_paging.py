"""The watchdog's fleet health, paged with XEP-0059, against a real Prosody whose c2s stanza
size limit is lowered so that the fleet's health does not fit in one stanza: an operator logging
in adopts the health of every device (those that left before it came too) while the watchdog
keeps its session; the pages cover every device once, in order; a malformed ``<set/>`` is
answered bad-request, and the watchdog goes on answering."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP, Iq
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.matcher import StanzaPath

from conftest import agent_of, hosted_fleet, plain_client, run_cli, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import WATCHDOG_HEALTH_MARGIN, GridOperator
from gridpresence.protocol.codec import health_to_xml, q
from gridpresence.protocol.models import Health, HealthStatus
from gridpresence.protocol.paging import RSM_NS, PageRequest, PagingError, parse_page_request, select_page
from gridpresence.protocol.stanzas import FLEET_HEALTH_PAGE
from gridpresence.services.watchdog import WatchdogAgent
from gridpresence.xmpp.handlers import stanza_callback
from gridpresence.xmpp.reconnect import SessionChange, reconnector_of
from gridpresence.xmpp.session import close_session

pytestmark = pytest.mark.timeout(120)

LIMIT = 10_000  # bytes: Prosody's least c2s_stanza_size_limit
PAGE = 40  # the watchdog's page here: 40 healths (~5 KB) fit under LIMIT, the fleet's 300 (~40 KB) do not
N = 300
LOADS = [f"p-{i:03d}" for i in range(N)]
GONE = LOADS[7::25]  # leave before the operator comes: only the watchdog saw them go
FLEET = hosted_fleet([{"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in LOADS])


class Paging:
    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        assert grid.bots is not None and grid.bots.watchdog is not None
        self.watchdog: WatchdogAgent = grid.bots.watchdog
        self.changes: list[SessionChange] = []


@pytest_asyncio.fixture(scope="module")
async def paging(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Paging]:
    def lower_limit(grid: Grid) -> None:
        grid.server.c2s_stanza_size_limit = LIMIT

    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("paging"), prepare=lower_limit,
                            only=[*LOADS, "watchdog"], dashboard=False, tick_s=600) as grid:
        p = Paging(grid)
        p.watchdog.page_size = PAGE
        stop = reconnector_of(p.watchdog.client).listen(p.changes.append)
        views = p.watchdog.tracker.views
        await until(lambda: all(v.health is HealthStatus.OK for v in views.values()), 30, "the watchdog to see all")
        for name in GONE:
            await agent_of(grid, name).stop()
        await until(lambda: all(views[grid.fleet.jid(n)].health is HealthStatus.GONE for n in GONE), 10,
                    "the watchdog to see the goodbyes")
        try:
            yield p
        finally:
            stop()


async def ask(client: ClientXMPP, watchdog: WatchdogAgent, rsm: ET.Element | None = None) -> Iq:
    """One fleet-health query, as a stock client writes it (``rsm``: the ``<set/>`` to send)."""
    iq = client.make_iq_get(ito=watchdog.client.boundjid.full)
    query = iq.enable("grid_fleet_health")
    if rsm is not None:
        query.xml.append(rsm)
    return await iq.send(timeout=5)


def rsm_set(**fields: str) -> ET.Element:
    el = ET.Element(f"{{{RSM_NS}}}set")
    for name, text in fields.items():
        ET.SubElement(el, f"{{{RSM_NS}}}{name}").text = text
    return el


def page_of(result: Iq) -> tuple[list[str], dict[str, str]]:
    """The devices of a result, in its order, and its ``<set/>``'s fields."""
    query = result["grid_fleet_health"].xml
    devices = [el.get("device", "") for el in query.findall(q("health"))]
    found = query.find(f"{{{RSM_NS}}}set")
    assert found is not None, "a result without <set/>"
    fields = {child.tag.partition("}")[2]: child.text or "" for child in found}
    first = found.find(f"{{{RSM_NS}}}first")
    if first is not None:
        fields["first_index"] = first.get("index", "")
    return devices, fields


async def test_an_operator_adopts_every_device_health_and_the_watchdog_keeps_its_session(paging: Paging) -> None:
    grid, watchdog = paging.grid, paging.watchdog
    want = {h.device: h.status.value for h in watchdog.tracker.health()}
    assert len(want) == N and sum(s == "gone" for s in want.values()) == len(GONE)
    # The defect's size: the fleet's health in one stanza would be over the server's limit.
    assert sum(len(ET.tostring(health_to_xml(h))) for h in watchdog.tracker.health()) > 3 * LIMIT
    session = watchdog.client.boundjid.full

    code, out, err = await run_cli("status", "--json", "--connection", str(grid.connection_file), "--settle", "3")
    assert code == 0, err
    listed = {d["jid"]: d for d in json.loads(out)["devices"]}
    assert {jid: d["health"] for jid, d in listed.items()} == want
    for name in GONE:  # only the watchdog could say so: they left before this login
        assert listed[grid.fleet.jid(name)]["health_reason"] == "said goodbye", listed[grid.fleet.jid(name)]
        assert listed[grid.fleet.jid(name)]["state"] == "gone"  # as STATE says it, not "unknown"

    # The library, the same: every vanished device's health is the watchdog's.
    async with GridOperator.from_connection(grid.connection, operator="bob", resource="paged") as bob:
        assert {v.jid: v.health.value for v in bob.tracker.views.values()} == want
        assert all(bob.devices[n].since == watchdog.tracker.views[grid.fleet.jid(n)].since for n in GONE)
    # The watchdog was never cut off: the same session throughout, no reconnect.
    assert reconnector_of(watchdog.client).reconnects == 0 and paging.changes == []
    assert watchdog.client.boundjid.full == session and watchdog.client.is_connected()


async def test_pages_cover_every_device_once_in_order(paging: Paging) -> None:
    alice = await plain_client(paging.grid, "alice")
    try:
        keys = sorted(paging.watchdog.tracker.views)
        seen: list[str] = []
        after: str | None = None
        for _ in range(N):  # bounded: 7 a page, 43 pages
            got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(max="7", **({"after": after} if after else {}))))
            assert fields["count"] == str(N)
            if not got:
                assert "first" not in fields and "last" not in fields
                break
            assert fields["first"] == got[0] and fields["last"] == got[-1] and fields["first_index"] == str(len(seen))
            assert len(got) <= 7
            seen += got
            after = got[-1]
        assert seen == keys  # each once, in order

        # Without <set/> (an older client): the first page, and a <set/> saying there is more.
        got, fields = page_of(await ask(alice, paging.watchdog))
        assert got == keys[:PAGE] and fields["count"] == str(N) and fields["last"] == keys[PAGE - 1]
        # An absurd max is capped at the page; max 0 asks for the count only (XEP-0059 §2.7).
        got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(max="9" * 40)))
        assert got == keys[:PAGE]
        got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(max="0")))
        assert got == [] and fields == {"count": str(N)}
        # After a key no device has: the page starts at its place in the order, nothing skipped.
        between = keys[10] + "-removed"
        got, _ = page_of(await ask(alice, paging.watchdog, rsm_set(max="3", after=between)))
        assert got == keys[11:14]
        got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(after="zzz@nowhere")))
        assert got == [] and fields == {"count": str(N)}
        got, _ = page_of(await ask(alice, paging.watchdog, rsm_set(max="5", before="")))  # the last page
        assert got == keys[-5:]
        got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(max="4", index="100")))
        assert got == keys[100:104] and fields["first_index"] == "100"
    finally:
        await close_session(alice)


def test_select_page_walks_any_sorted_keys_each_once() -> None:
    """Seeded: forward by `after` and backward by `before` over random keys, any page size."""
    rng = random.Random(59)
    for _ in range(200):
        keys = sorted({f"{rng.choice('abcxyz')}{rng.randrange(1000)}@h" for _ in range(rng.randrange(0, 60))})
        size = rng.randrange(1, 12)
        forward: list[str] = []
        want = PageRequest(max=size)
        for _ in range(len(keys) + 1):
            start, stop = select_page(keys, want)
            if start == stop:
                break
            forward += keys[start:stop]
            want = PageRequest(max=size, after=keys[stop - 1])
        assert forward == keys
        backward: list[str] = []
        want = PageRequest(max=size, before="")
        for _ in range(len(keys) + 1):
            start, stop = select_page(keys, want)
            if start == stop:
                break
            backward = keys[start:stop] + backward
            want = PageRequest(max=size, before=keys[start])
        assert backward == keys


def _malformed(rng: random.Random) -> ET.Element:
    """A query's content with a <set/> that is wrong in one way (the rest random but fine)."""
    query = ET.Element(q("fleet-health"))
    s = ET.SubElement(query, f"{{{RSM_NS}}}set")
    kind = rng.randrange(9)
    junk = "".join(rng.choice("0123456789-+.xé ٣e") for _ in range(rng.randrange(0, 8)))
    if junk.strip().isascii() and junk.strip().isdigit():
        junk += "x"
    if kind == 0:
        ET.SubElement(s, f"{{{RSM_NS}}}max").text = junk
    elif kind == 1:
        ET.SubElement(s, f"{{{RSM_NS}}}max").text = str(-rng.randrange(1, 10**6))
    elif kind == 2:  # one element twice
        name = rng.choice(["max", "after", "index"])
        for _ in range(2):
            ET.SubElement(s, f"{{{RSM_NS}}}{name}").text = "3" if name != "after" else "a@b"
    elif kind == 3:  # not a request's element, or not of the set's namespace
        ET.SubElement(s, rng.choice([f"{{{RSM_NS}}}count", f"{{{RSM_NS}}}last", f"{{{RSM_NS}}}x",
                                     "{urn:other}max", q("max")])).text = "5"
    elif kind == 4:  # an element inside a number
        m = ET.SubElement(s, f"{{{RSM_NS}}}max")
        ET.SubElement(m, f"{{{RSM_NS}}}b").text = "5"
    elif kind == 5:  # two of after / before / index
        a, b = rng.sample(["after", "before", "index"], 2)
        ET.SubElement(s, f"{{{RSM_NS}}}{a}").text = "1" if a == "index" else "k@h"
        ET.SubElement(s, f"{{{RSM_NS}}}{b}").text = "1" if b == "index" else "k@h"
    elif kind == 6:
        ET.SubElement(s, f"{{{RSM_NS}}}after").text = rng.choice(["", "  "])
    elif kind == 7:
        ET.SubElement(s, f"{{{RSM_NS}}}index").text = junk
    else:
        ET.SubElement(query, f"{{{RSM_NS}}}set")  # two <set/>
    if rng.random() < 0.3 and kind != 3:
        s.text = "stray"  # text in <set/> is wrong too; never makes a bad one good
    return query


def test_fuzz_malformed_sets_are_refused_by_the_parser() -> None:
    rng = random.Random(2059)
    for _ in range(500):
        query = _malformed(rng)
        with pytest.raises(PagingError):
            parse_page_request(query, FLEET_HEALTH_PAGE)


async def test_fuzz_malformed_sets_get_bad_request_and_the_watchdog_goes_on(paging: Paging) -> None:
    """Seeded, bounded: each malformed <set/> sent to the live watchdog is answered bad-request
    saying why; a good query is answered after them, on the same session."""
    rng = random.Random(59)
    alice = await plain_client(paging.grid, "alice")
    try:
        for _ in range(40):
            query = _malformed(rng)
            with pytest.raises(IqError) as err:
                iq = alice.make_iq_get(ito=paging.watchdog.client.boundjid.full)
                iq.append(query)
                await iq.send(timeout=5)
            assert err.value.condition == "bad-request", ET.tostring(query)
            assert err.value.text.startswith("fleet-health paging: ")
        got, fields = page_of(await ask(alice, paging.watchdog, rsm_set(max="2")))
        assert got == sorted(paging.watchdog.tracker.views)[:2] and fields["count"] == str(N)
    finally:
        await close_session(alice)
    assert reconnector_of(paging.watchdog.client).reconnects == 0 and paging.changes == []


async def test_only_operators_are_answered(paging: Paging) -> None:
    """Paging changes nothing of who may ask: a service's account gets forbidden, <set/> or not."""
    client = await plain_client(paging.grid, "console")
    try:
        for rsm in (None, rsm_set(max="2")):
            with pytest.raises(IqError) as err:
                await ask(client, paging.watchdog, rsm)
            assert err.value.condition == "forbidden"
    finally:
        await close_session(client)


async def test_an_operator_stops_asking_a_watchdog_gone_wrong(paging: Paging) -> None:
    """A watchdog that pages on forever (new keys each page), or never moves on (the same page
    again): the operator's login asks a bounded number of pages, and comes up all the same."""
    watchdog = paging.watchdog
    asked: list[str] = []

    def endless(iq: Iq) -> None:  # pages of devices no roster holds, always more to come
        asked.append(iq["grid_fleet_health"]["rsm"]["after"])
        reply = iq.reply()
        query = reply.enable("grid_fleet_health")
        start = len(asked) * PAGE
        for i in range(PAGE):
            query.xml.append(health_to_xml(Health(device=f"ghost-{start + i:06d}@localhost", status=HealthStatus.GONE)))
        query["rsm"]["first"], query["rsm"]["first_index"] = f"ghost-{start:06d}@localhost", str(start)
        query["rsm"]["last"], query["rsm"]["count"] = f"ghost-{start + PAGE - 1:06d}@localhost", str(10**9)
        reply.send()

    def stuck(iq: Iq) -> None:  # the first real page, whatever was asked
        asked.append(iq["grid_fleet_health"]["rsm"]["after"])
        iq["grid_fleet_health"].xml.clear()
        watchdog._on_query(iq)

    for wrong, most in ((endless, (N + WATCHDOG_HEALTH_MARGIN) // PAGE + 1), (stuck, 2)):
        asked.clear()
        watchdog.client.remove_handler("fleet health")
        watchdog.client.register_handler(stanza_callback("fleet health", StanzaPath("iq@type=get/grid_fleet_health"), wrong))
        try:
            async with GridOperator.from_connection(paging.grid.connection, operator="bob", resource="wary") as bob:
                assert 2 <= len(asked) <= most, (wrong.__name__, len(asked))
                assert sum(v.health is HealthStatus.GONE for v in bob.tracker.views.values()) <= len(GONE)
        finally:
            watchdog.client.remove_handler("fleet health")
            watchdog.client.register_handler(
                stanza_callback("fleet health", StanzaPath("iq@type=get/grid_fleet_health"), watchdog._on_query))


async def test_the_limit_is_real_one_answer_for_the_fleet_closes_the_watchdog_stream(paging: Paging) -> None:
    """The control (last: it costs the watchdog its session): the old answer, everything in one
    stanza, is over the server's limit, and the server closes the watchdog's stream."""
    alice = await plain_client(paging.grid, "alice")
    paging.watchdog.page_size = 10 * N
    try:
        with pytest.raises((IqError, IqTimeout)):  # no answer: the stream it went out on was closed
            await ask(alice, paging.watchdog)
        await until(lambda: reconnector_of(paging.watchdog.client).reconnects >= 1, 30, "the watchdog's reconnect")
    finally:
        paging.watchdog.page_size = PAGE
        await close_session(alice)
    assert paging.changes
