"""Ad-hoc commands from a chat client this project did not write: Profanity's /cmd, driven
through tmux. Profanity asks the device's bare JID, as Gajim's and poezio's menus do."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from conftest import Env
from gridpresence.protocol import DeviceState
from terminal import HAVE_PROFANITY, NO_PROFANITY, Terminal, log_in, run_profanity

pytestmark = pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)

DEVICE = "desk-gen"


async def _list_commands(term: Terminal, bare: str) -> str:
    """`/cmd list JID`, once Profanity has read the server's features (it checks them first)."""
    for _ in range(20):
        await term.type("/clear")
        await term.type(f"/cmd list {bare}")
        found = await term.wait_for(r"Ad hoc commands:.*(?:\n\S+ !   \S+.*)+|Server does not support ad hoc commands")
        if found.group(0).startswith("Ad hoc"):
            return found.group(0)
        await asyncio.sleep(0.5)  # the server's disco#info is still on its way
    raise AssertionError("Profanity never saw the server's ad-hoc support")


async def test_profanity_lists_and_runs_a_devices_commands_at_its_bare_jid(env: Env, tmp_path: Path) -> None:
    assert env.grid.bots is not None
    device = env.grid.bots.devices[DEVICE]
    bare = env.fleet.jid(DEVICE)
    async with run_profanity(tmp_path) as term:
        await log_in(term, env, "bob")
        listed = await _list_commands(term, bare)
        assert {"status", "run", "ack-alarm", "judge-alarm"} <= set(re.findall(r"!   (\S+)", listed))
        await term.type(f"/cmd exec status {bare}")
        await term.wait_for(r"Form title: desk-gen(?:.*\n)+?.*\[field1\] State: on")
        await term.type(f"/cmd exec run {bare}")  # a two-step command: the form, then its submission
        await term.wait_for(r"Form title: Command desk-gen(?:.*\n)+?.*\[field1\] Action \(required\)")
        await term.type("/field1 stop")
        await term.type("/form submit")
        await term.wait_for(r"Form title: desk-gen: stop(?:.*\n)+?.*State: off(?:.*\n)+?.*Outcome: executed")
        assert device.sim.state is DeviceState.OFF
        await term.type("/form cancel")  # the result form's window
        await term.type(f"/cmd exec run {bare}")
        await term.wait_for(r"Form title: Command desk-gen")
        await term.type("/field1 start")
        await term.type("/form submit")
        await term.wait_for(r"Form title: desk-gen: start(?:.*\n)+?.*Outcome: executed")
