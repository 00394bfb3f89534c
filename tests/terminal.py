"""Profanity, a chat client this project did not write, driven through tmux like a person at a
terminal: start it in a private tmux server, type, read the screen, log in to the grid's server;
and the steps the Profanity tests of c2s device bots and of hosted identities share (chat, /cmd,
/ox), each written once."""

from __future__ import annotations

import asyncio
import re
import shlex
import shutil
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from conftest import GridUnderTest
from gpghome import GnuPG
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState
from gridpresence.security.keys import fingerprint

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


async def chat_shed_and_restore(term: Terminal, env: GridUnderTest, name: str) -> None:
    """A load's `status`, `shed` and `restore` typed to it in a chat window (left open)."""
    rated = f"{env.fleet.device(name).rated_kw:g}"
    await term.type(f"/msg {env.fleet.jid(name)} status")
    await term.wait_for(rf"{name} \(load\) is on, [\d.]+ kW of {rated} kW, load \d+%")
    await term.type("shed")
    await term.wait_for(rf"Done: load shed\. Now: {name} \(load\) is off, 0\.0 kW of {rated} kW")
    await term.type("restore")
    await term.wait_for(r"Done: load restored\.")


async def list_commands(term: Terminal, bare: str) -> str:
    """`/cmd list JID`, once Profanity has read the server's features (it checks them first)."""
    for _ in range(20):
        await term.type("/clear")
        await term.type(f"/cmd list {bare}")
        found = await term.wait_for(r"Ad hoc commands:.*(?:\n\S+ !   \S+.*)+|Server does not support ad hoc commands")
        if found.group(0).startswith("Ad hoc"):
            return found.group(0)
        await asyncio.sleep(0.5)  # the server's disco#info is still on its way
    raise AssertionError("Profanity never saw the server's ad-hoc support")


async def cmd_status_and_run(term: Terminal, bare: str, name: str, off: str, on: str,
                             state: Callable[[], DeviceState]) -> None:
    """/cmd at a device's bare JID, as Gajim's and poezio's menus ask: its commands listed,
    `status` (one step), then `run` (a two-step command: the form, then its submission) with
    the action `off`, which turns it off (`state()` says so), and `on`."""
    listed = await list_commands(term, bare)
    assert {"status", "run", "ack-alarm", "judge-alarm"} <= set(re.findall(r"!   (\S+)", listed))
    await term.type(f"/cmd exec status {bare}")
    await term.wait_for(rf"Form title: {name}(?:.*\n)+?.*\[field1\] State: on")

    async def run(action: str, shows: str = "") -> None:
        await term.type(f"/cmd exec run {bare}")
        await term.wait_for(rf"Form title: Command {name}(?:.*\n)+?.*\[field1\] Action \(required\)")
        await term.type(f"/field1 {action}")
        await term.type("/form submit")
        await term.wait_for(rf"Form title: {name}: {action}(?:.*\n)+?{shows}.*Outcome: executed")

    await run(off, r".*State: off(?:.*\n)+?")
    assert state() is DeviceState.OFF
    await term.type("/form cancel")  # the result form's window
    await run(on)
    assert state() is DeviceState.ON


async def ox_signed_shed_and_restore(env: GridUnderTest, tmp_path: Path, name: str, watcher: GridOperator) -> None:
    """OpenPGP for XMPP from Profanity's /ox (gpgme and GnuPG underneath), as operator alice:
    she announces her key on PEP, discovers and imports the device's from its PEP node,
    certifies it, starts OX and types `shed`; the device acts on the signed command and
    Profanity shows its answer, decrypted. The same words in plain chat change nothing (the
    device must run the production default: no unsigned actions). `watcher` sees each state."""
    device = env.fleet.jid(name)
    device_fpr = fingerprint(env.grid.keys.secret(name))
    rated = f"{env.fleet.device(name).rated_kw:g}"
    async with GnuPG(trust_all=False) as gpg:
        # The operator's setup, once (README): her grid key into GnuPG, trusted as her own,
        # and her public key exported for PEP.
        await gpg.import_key(env.grid.keys.secret_path("alice").read_text())
        await gpg.trust_own_key(fingerprint(env.grid.keys.secret("alice")))
        public, _ = await gpg.run("--export", "--export-options", "export-minimal", f"xmpp:{env.fleet.jid('alice')}")
        (tmp_path / "alice.pub").write_bytes(public)

        async with run_profanity(tmp_path, {"GNUPGHOME": str(gpg.home)}) as term:
            await log_in(term, env, "alice")
            await term.type(f"/ox announce {tmp_path / 'alice.pub'}")
            await term.wait_for("Announce OpenPGP Key for OX")
            # The device's key, from the device's own PEP nodes.
            await term.type(f"/ox discover {device}")
            # Other lines may land between the two lines Profanity prints.
            await term.wait_for(rf"Discovering Public Key for {re.escape(device)}(?:.*\n)+?\S+ - {device_fpr}")
            await term.type(f"/ox request {device} {device_fpr}")
            await term.wait_for("Public Key imported")
            await gpg.run("--quick-lsign-key", device_fpr)  # she checked the fingerprint: valid now

            await term.type(f"/ox start {device}")
            await term.wait_for(rf"{name} \[\w+\] \[OX\]")  # the chat window's title: OX is on
            await term.type("shed")
            await term.wait_for(rf"Done: load shed\. Now: {name} \(load\) is off, 0\.0 kW of {rated} kW")
            await watcher.wait_for(lambda d: d[name].state is DeviceState.OFF, timeout=5)

            # The same words in plain chat (an account password is not the operator's key): refused.
            await term.type("/ox end")
            await term.wait_for("OX encryption disabled.")
            await term.type("restore")
            await term.wait_for(r"Refused restore: an unsigned chat line may not change the device's state")
            await asyncio.sleep(0.5)
            assert watcher.devices[name].state is DeviceState.OFF

            await term.type("/ox start")
            await term.wait_for(rf"{name} \[\w+\] \[OX\]")
            await term.type("restore")
            await term.wait_for(r"Done: load restored\.")
            await watcher.wait_for(lambda d: d[name].state is DeviceState.ON, timeout=5)
