"""Profanity, a chat client this project did not write, driven through tmux like a person at a
terminal: start it in a private tmux server, type, read the screen, log in to the grid's server."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from conftest import GridUnderTest

HAVE_PROFANITY = shutil.which("profanity") is not None and shutil.which("tmux") is not None
NO_PROFANITY = "profanity or tmux is not installed (Debian packages `profanity`, `tmux`; `make test` installs them)"


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
        await self.tmux("send-keys", "-t", "main", "-l", "--", text)  # "--": text may start with "-"
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


@asynccontextmanager
async def run_profanity(tmp_path: Path, extra_env: Mapping[str, str] | None = None,
                        rows: int = 60) -> AsyncIterator[Terminal]:
    """Profanity with a fresh home under ``tmp_path``, on a terminal 240 columns wide and `rows`
    high (a tall one shows a long roster whole)."""
    home = tmp_path / "home"
    home.mkdir()
    term = Terminal(tmp_path / "tmux.sock")
    env = {"HOME": str(home), "XDG_CONFIG_HOME": f"{home}/.config", "XDG_DATA_HOME": f"{home}/.local/share",
           "TERM": "xterm-256color", **(extra_env or {})}
    command = "env " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " profanity"
    # remain-on-exit: should profanity die, its last screen and exit status stay readable.
    await term.tmux("new-session", "-d", "-s", "main", "-x", "240", "-y", str(rows), command,
                    ";", "set-option", "-t", "main", "remain-on-exit", "on")
    try:
        await term.wait_for("Type '/help'", timeout=10)
        # A roster of hundreds would print a line per presence into the console and scroll the
        # replies a test waits for off the screen; the roster panel still shows every change.
        await term.type("/presence console none")
        await term.wait_for("Presence updates will not appear in the console")
        yield term
    finally:
        try:
            await term.type("/quit")
            await asyncio.sleep(0.3)
        finally:
            await term.tmux("kill-server", check=False)  # gone already if profanity quit


async def log_in(term: Terminal, env: GridUnderTest, name: str) -> None:
    """Connect as operator ``name`` over TLS, trusting the grid's private CA when asked (the one
    place the tests type Profanity's login)."""
    endpoint = env.grid.endpoint
    await term.type(f"/connect {env.fleet.jid(name)} server {endpoint.host} port {endpoint.c2s_port} tls force")
    await term.wait_for("Enter password:")
    await term.type(env.grid.secrets.password(name))
    # Profanity does not know the private CA: it shows the certificate and asks.
    await term.wait_for("gridpresence private CA for localhost")
    await term.wait_for("/tls allow")
    await term.type("/tls allow")
    await term.wait_for(rf"{re.escape(env.fleet.jid(name))}/\S+ logged in successfully")
