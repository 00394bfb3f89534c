"""A chat client this project did not write: Profanity, driven through tmux like a person at a
terminal. The operator logs in, trusts the embedded CA's certificate, sends `status` and `shed`
as plain chat to a device bot, and receives an alarm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import Env
from terminal import HAVE_PROFANITY, NO_PROFANITY, Terminal, chat_shed_and_restore, log_in, run_profanity

pytestmark = pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)


@pytest_asyncio.fixture(name="profanity")
async def profanity_fixture(tmp_path: Path) -> AsyncIterator[Terminal]:
    async with run_profanity(tmp_path) as term:
        yield term


async def test_operator_in_profanity_chats_with_devices_and_gets_an_alarm(env: Env, profanity: Terminal) -> None:
    await log_in(profanity, env, "alice")

    await chat_shed_and_restore(profanity, env, "desk-load")
    await profanity.type("launch rockets")
    await profanity.wait_for(r"I do not understand 'launch rockets'\. desk-load understands: status, restore, shed")

    # An urgent alarm: Alice is the only operator online, first on duty, so it comes to her.
    await profanity.type("/msg desk-gen@localhost")
    gen = env.grid.bots.devices["desk-gen"]  # type: ignore[union-attr]
    gen.sim.temperature_c = 150.0  # type: ignore[attr-defined]
    try:
        found = await profanity.wait_for(r"URGENT desk-gen: generator temperature exceeded \([\d.]+ °C, limit 105 °C\)"
                                         r"\. Reply 'ack (\d+)' to acknowledge\.")
        await profanity.type(f"ack {found.group(1)}")
        await profanity.wait_for(rf"Acknowledged: alarm {found.group(1)} \(generator temperature exceeded\)\.")
    finally:
        gen.sim.temperature_c = 80.0  # type: ignore[attr-defined]
        gen.alarms.acknowledge(None, "test-cleanup")
