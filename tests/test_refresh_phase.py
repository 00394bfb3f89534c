"""A device's refreshes are spread over the fleet, not synchronised: the first refresh after a
session start comes early by a fraction of refresh_s fixed per JID, so thousands of identities
whose sessions start within seconds of each other (a link's bring-up, a reconnect) do not all
refresh in the same second of every period. Early only: a watchdog never sees one late."""

from __future__ import annotations

import asyncio

from gridpresence.config import DeviceSpec
from gridpresence.device.agent import REFRESH_PHASE_SPREAD, DeviceAgent
from gridpresence.device.ticker import Ticker
from gridpresence.xmpp.session import Endpoint

REFRESH_S = 60.0


def agent(jid: str) -> DeviceAgent:
    return DeviceAgent(DeviceSpec(name=jid.split("@")[0], kind="load", rated_kw=10, refresh_s=REFRESH_S),
                       jid, "pw", Endpoint(), [])


def test_phases_are_within_the_spread_fixed_per_jid_and_spread_over_jids() -> None:
    phases = [agent(f"l-{i}@devices.localhost").refresh_phase() for i in range(16)]
    assert all(0.0 <= p <= REFRESH_PHASE_SPREAD * REFRESH_S for p in phases)
    assert len(set(phases)) == len(phases)
    assert max(phases) - min(phases) > 0.5 * REFRESH_PHASE_SPREAD * REFRESH_S  # over the range, not bunched
    assert agent("l-3@devices.localhost").refresh_phase() == phases[3]  # the same at every start


async def test_a_session_start_moves_the_first_refresh_earlier_by_the_phase() -> None:
    dev = agent("l-7@devices.localhost")
    before = dev._published_at
    dev._on_session_start(None)  # (no connection: nothing is sent, the refresh clock still moves)
    try:
        assert dev._published_at == before - dev.refresh_phase()
        assert dev.refresh_phase() > 0
    finally:
        assert Ticker.of().ticking(dev)  # its ticks started with the session
        Ticker.of().leave(dev)
