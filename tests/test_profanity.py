"""A chat client this project did not write: Profanity, driven through tmux like a person at a
terminal. The operator logs in, trusts the embedded CA's certificate, sends `status` and `shed`
as plain chat to a device bot, and receives an alarm."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import Env

pytestmark = pytest.mark.skipif(
    shutil.which("profanity") is None or shutil.which("tmux") is None,
    reason="profanity or tmux is not installed (Debian packages `profanity`, `tmux`; `make test` installs them)",
)


class Terminal:
    """One tmux session on a private tmux server, running one program."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket  # a private server: nothing of the user's tmux is touched

    async def tmux(self, *args: str, check: bool = True) -> str:
        proc = await asyncio.create_subprocess_exec(
            "tmux", "-S", str(self.socket), "-f", "/dev/null", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 10)
        if check and proc.returncode:
            raise RuntimeError(f"tmux {args[0]} failed: {err.decode().strip()}")
        return out.decode()

    async def type(self, text: str) -> None:
        await self.tmux("send-keys", "-t", "main", "-l", text)
        await self.tmux("send-keys", "-t", "main", "Enter")

    async def screen(self) -> str:
        return await self.tmux("capture-pane", "-p", "-J", "-t", "main")

    async def wait_for(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Poll the screen until `pattern` (a regex) shows; fail with the screen's contents."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        text = ""
        while loop.time() < deadline:
            text = await self.screen()
            found = re.search(pattern, text)
            if found:
                return found
            await asyncio.sleep(0.2)
        raise AssertionError(f"{pattern!r} did not appear; the screen shows:\n{text}")


@pytest_asyncio.fixture
async def profanity(tmp_path: Path) -> AsyncIterator[Terminal]:
    home = tmp_path / "home"
    home.mkdir()
    term = Terminal(tmp_path / "tmux.sock")
    env = f"HOME={home} XDG_CONFIG_HOME={home}/.config XDG_DATA_HOME={home}/.local/share TERM=xterm-256color"
    # remain-on-exit: should profanity die, its last screen and exit status stay readable.
    await term.tmux("new-session", "-d", "-s", "main", "-x", "240", "-y", "60", f"env {env} profanity",
                    ";", "set-option", "-t", "main", "remain-on-exit", "on")
    try:
        await term.wait_for("Type '/help'", timeout=10)
        yield term
    finally:
        try:
            await term.type("/quit")
            await asyncio.sleep(0.3)
        finally:
            await term.tmux("kill-server", check=False)  # gone already if profanity quit


async def test_operator_in_profanity_chats_with_devices_and_gets_an_alarm(env: Env, profanity: Terminal) -> None:
    endpoint = env.grid.endpoint
    await profanity.type(f"/connect alice@localhost server {endpoint.host} port {endpoint.c2s_port} tls force")
    await profanity.wait_for("Enter password:")
    await profanity.type(env.grid.secrets.password("alice"))
    # Profanity does not know the private CA: it shows the certificate and asks.
    await profanity.wait_for("gridpresence private CA for localhost")
    await profanity.wait_for("/tls allow")
    await profanity.type("/tls allow")
    await profanity.wait_for(r"alice@localhost/\S+ logged in successfully")

    await profanity.type("/msg desk-load@localhost status")
    await profanity.wait_for(r"desk-load \(load\) is on, [\d.]+ kW of 120 kW, load \d+%")
    await profanity.type("shed")
    await profanity.wait_for(r"Done: load shed\. Now: desk-load \(load\) is off, 0\.0 kW of 120 kW")
    await profanity.type("restore")
    await profanity.wait_for(r"Done: load restored\.")
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
