"""Ad-hoc commands from a chat client this project did not write: Profanity's /cmd, driven
through tmux. Profanity asks the device's bare JID, as Gajim's and poezio's menus do."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import Env
from terminal import HAVE_PROFANITY, NO_PROFANITY, cmd_status_and_run, log_in, run_profanity

pytestmark = pytest.mark.skipif(not HAVE_PROFANITY, reason=NO_PROFANITY)

DEVICE = "desk-gen"


async def test_profanity_lists_and_runs_a_devices_commands_at_its_bare_jid(env: Env, tmp_path: Path) -> None:
    assert env.grid.bots is not None
    device = env.grid.bots.devices[DEVICE]
    bare = env.fleet.jid(DEVICE)
    async with run_profanity(tmp_path) as term:
        await log_in(term, env, "bob")
        await cmd_status_and_run(term, bare, DEVICE, "stop", "start", lambda: device.sim.state)
