"""Hosted device bots tick from one timer wheel per event loop (device/ticker.py), against a real
Prosody: each device still ticks once per tick_s and refreshes once per refresh_s, as a stock
client of an operator's sees it; a reading that moves past the deadband is told within a tick;
devices that join together are spread over the wheel's slots, not bunched in one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from slixmpp import Presence

from conftest import agent_of, hosted_fleet, plain_client, running_grid
from gridpresence.config import parse_fleet
from gridpresence.device.agent import LOAD_DEADBAND_PCT
from gridpresence.device.ticker import SLOTS, Ticker
from gridpresence.host.grid import Grid
from gridpresence.protocol.codec import q, report_from_xml
from gridpresence.xmpp.session import close_session

pytestmark = pytest.mark.timeout(120)

TICK_S, REFRESH_S = 0.5, 2.0
# Off loads: their readings never move, so every presence they send is a refresh.
QUIET = [f"q-{i}" for i in range(3)]
MOVING = "m-0"  # on, refreshing rarely: what it sends between is a reading that moved
SAMPLED, SAMPLE_S = "s-0", 1.0  # a device of its own sampling interval, twice the host's tick
FLEET = hosted_fleet([*({"name": n, "kind": "load", "rated_kw": 10, "refresh_s": REFRESH_S, "initial_state": "off"}
                        for n in QUIET),
                      {"name": MOVING, "kind": "load", "rated_kw": 10, "refresh_s": 600.0},
                      {"name": SAMPLED, "kind": "load", "rated_kw": 10, "refresh_s": 600.0, "sample_s": SAMPLE_S}])


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(FLEET), tmp_path_factory.mktemp("ticker"), only=[*QUIET, MOVING, SAMPLED],
                            dashboard=False, tick_s=TICK_S) as g:
        yield g


def count_ticks(grid: Grid, names: list[str], monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Each device's ticks from now on, counted as its physics is stepped (the counts live on)."""
    ticks = dict.fromkeys(names, 0)
    for name in names:
        sim = agent_of(grid, name).sim
        real = sim.tick

        def counting(now: object, name: str = name, real: object = real) -> None:
            ticks[name] += 1
            real(now)  # type: ignore[operator]

        monkeypatch.setattr(sim, "tick", counting)
    return ticks


async def test_each_device_keeps_its_tick_and_its_refresh_period(grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = count_ticks(grid, QUIET, monkeypatch)
    seen: dict[str, list[float]] = {grid.fleet.jid(n): [] for n in QUIET}
    loop = asyncio.get_running_loop()

    def on(pres: Presence) -> None:
        bare = pres["from"].bare
        if bare in seen and pres.xml.get("type") is None:
            seen[bare].append(loop.time())

    alice = await plain_client(grid, "alice")
    alice.add_event_handler("presence", on)
    try:
        await asyncio.sleep(1.0)  # the probes' answers
        for times in seen.values():
            times.clear()
        t0 = loop.time()
        ticks.update(dict.fromkeys(QUIET, 0))
        window = 5 * REFRESH_S
        await asyncio.sleep(window)
        elapsed = loop.time() - t0
    finally:
        await close_session(alice)
    for name in QUIET:
        expected = elapsed / TICK_S
        assert expected - 2 <= ticks[name] <= expected + 1, (name, ticks[name], expected)
        times = seen[grid.fleet.jid(name)]
        assert 4 <= len(times) <= 5, (name, times)  # one refresh per period, no more
        gaps = [b - a for a, b in zip(times, times[1:])]
        # Due at refresh_s, noticed at the next tick at the latest: never early, never a tick late.
        assert all(REFRESH_S - 0.15 <= g <= REFRESH_S + TICK_S + 0.3 for g in gaps), (name, gaps)


async def test_a_device_with_its_own_sample_interval_ticks_at_it(grid: Grid, monkeypatch: pytest.MonkeyPatch) -> None:
    """``sample_s`` (a synthetic fleet past SAMPLES_PER_S devices has it) sets the device's
    tick: here every 1 s beside the host's 0.5 s."""
    counted = count_ticks(grid, [SAMPLED, QUIET[0]], monkeypatch)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await asyncio.sleep(6 * SAMPLE_S)
    elapsed = loop.time() - t0
    assert agent_of(grid, SAMPLED).tick_s == SAMPLE_S
    assert counted[SAMPLED] <= elapsed / SAMPLE_S + 1, counted  # never more often than its interval
    # Half as often as the host's tick (a stalled loop drops ticks of both wheels alike).
    assert counted[SAMPLED] >= 3 and 1.5 <= counted[QUIET[0]] / counted[SAMPLED] <= 2.7, counted


async def test_a_reading_past_the_deadband_is_told_within_a_tick(grid: Grid) -> None:
    dev = agent_of(grid, MOVING)
    jid = grid.fleet.jid(MOVING)
    loop = asyncio.get_running_loop()
    told: asyncio.Queue[tuple[float, float]] = asyncio.Queue()

    def on(pres: Presence) -> None:
        device = pres.xml.find(q("device"))
        if pres["from"].bare == jid and pres.xml.get("type") is None and device is not None:
            told.put_nowait((loop.time(), report_from_xml(device).telemetry.load_pct or 0.0))

    alice = await plain_client(grid, "alice")
    alice.add_event_handler("presence", on)
    try:
        await asyncio.sleep(1.0)
        for _ in range(3):  # up, then down: each jump is told at the next tick
            before = dev.sim.telemetry().load_pct or 0.0
            dev.sim.utilisation = 0.3 if before > 60 else 0.9  # type: ignore[attr-defined]
            jumped = loop.time()
            while not told.empty():
                told.get_nowait()
            at, load = await asyncio.wait_for(told.get(), 5)
            assert abs(load - before) >= LOAD_DEADBAND_PCT
            assert at - jumped <= TICK_S + 0.3, at - jumped
            await asyncio.sleep(TICK_S)
        # Between, a drift within the deadband is not told: nothing came but the jumps.
        drift_start = told.qsize()
        await asyncio.sleep(3 * TICK_S)
        moved = abs((dev.sim.telemetry().load_pct or 0.0) - (dev._published.telemetry.load_pct or 0.0))  # type: ignore[union-attr]
        assert moved < LOAD_DEADBAND_PCT and told.qsize() == drift_start
    finally:
        await close_session(alice)


async def test_devices_that_join_together_are_spread_over_the_slots() -> None:
    ticker = Ticker()
    stepped: list[float] = []
    loop = asyncio.get_running_loop()
    keys = [object() for _ in range(4 * SLOTS)]
    for key in keys:  # all at once, as a link's identities at its bring-up
        ticker.join(key, 1.0, lambda: stepped.append(loop.time()))
    await asyncio.sleep(1.05)
    for key in keys:
        ticker.leave(key)
    assert len(stepped) == len(keys)  # each once in its first period
    # A slot's steps run back to back, slots 1/SLOTS of the period apart: no burst of more than two slots' worth.
    bursts = [sum(1 for u in stepped if t <= u < t + 0.01) for t in stepped]
    assert max(bursts) <= 2 * len(keys) // SLOTS, bursts
    assert max(stepped) - min(stepped) >= 0.8
