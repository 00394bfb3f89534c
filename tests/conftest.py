"""Shared fixtures: one real Prosody with a small test fleet for the whole session.

Everything runs in one event loop (the session loop), so subprocesses must be awaited with
asyncio, never run blocking: the device bots live in this same loop.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP

from gridpresence.operator.library import GridOperator
from gridpresence.config import Fleet, parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.host.grid import Grid
from gridpresence.xmpp.component import ComponentLink
from gridpresence.xmpp.session import make_client, open_session

ROOT = Path(__file__).resolve().parents[1]

TEST_FLEET = {
    "domain": "localhost",
    "presence_grace_s": 2.0,
    "operators": [{"name": "alice"}, {"name": "bob"}],
    "billing": [{"name": "billing", "peak_price": 0.8, "off_peak_price": 0.6}],
    # maker-offline never logs in, so it never announces its key: its signatures meet "unknown key".
    "manufacturers": [{"name": "maker"}, {"name": "maker-offline"}],
    # Lab setting: the chat, console, ad-hoc and verdict tests drive devices with plain (unsigned)
    # lines; guard-load runs apart without it (test_verdicts: unsigned lines may only look).
    "security": {"unsigned_chat_actions": ["shed", "restore", "start", "stop", "open", "close",
                                           "accept", "set", "reject", "revert", "judge"]},
    "customers": [{"name": "acme"}],  # reads meter-1's billing part
    "devices": [
        {"name": "master", "kind": "master", "rated_kw": 1000},
        {"name": "branch-a", "kind": "meter", "rated_kw": 400, "parent": "master"},
        {"name": "branch-b", "kind": "meter", "rated_kw": 400, "parent": "master"},
        *({"name": f"load-{c}", "kind": "load", "rated_kw": 50 + 10 * i, "parent": "branch-a" if i < 5 else "branch-b"}
          for i, c in enumerate("abcdefghij")),
        # One critical load per test that sheds one: a refused shed restricts it for a while.
        *({"name": name, "kind": "load", "rated_kw": 150, "critical": True, "parent": "branch-b",
           "critical_hold_s": 60} for name in ("load-crit", "load-crit2", "load-crit3", "load-crit4", "load-crit5")),
        {"name": "gen-1", "kind": "generator", "rated_kw": 200, "startup_s": 2.0, "parent": "master"},
        {"name": "gen-2", "kind": "generator", "rated_kw": 300, "startup_s": 2.0, "parent": "master"},
        {"name": "meter-1", "kind": "meter", "rated_kw": 80, "customer": "acme"},
        {"name": "pulse-meter", "kind": "meter", "rated_kw": 10, "refresh_s": 1.0},
        {"name": "breaker-1", "kind": "breaker", "rated_kw": 500, "parent": "master"},
        # Driven past their alarm thresholds by the alarm tests.
        {"name": "hot-load", "kind": "load", "rated_kw": 100},
        {"name": "hot-load2", "kind": "load", "rated_kw": 100},
        # The verdict test's load: critical, so no other test's shedding changes its state (a real
        # state change would make its alarms start-up transients, and teach a settling time instead).
        {"name": "verdict-load", "kind": "load", "rated_kw": 100, "critical": True},
        {"name": "hot-gen", "kind": "generator", "rated_kw": 100, "startup_s": 0, "initial_state": "on"},
        {"name": "hot-breaker", "kind": "breaker", "rated_kw": 100},
        # A small branch the branch-hierarchy test drives near its limit.
        {"name": "branch-x", "kind": "meter", "rated_kw": 100, "parent": "master"},
        {"name": "bx-load-1", "kind": "load", "rated_kw": 60, "parent": "branch-x"},
        {"name": "bx-load-2", "kind": "load", "rated_kw": 25, "parent": "branch-x"},
        {"name": "bx-crit", "kind": "load", "rated_kw": 30, "critical": True, "parent": "branch-x"},
        # Firmware upgrade targets; the critical ones turn restricted when shed.
        {"name": "fw-1", "kind": "load", "rated_kw": 10},
        {"name": "fw-2", "kind": "load", "rated_kw": 10},
        {"name": "fw-crit", "kind": "load", "rated_kw": 10, "critical": True, "critical_hold_s": 3},
        {"name": "fw-stuck", "kind": "load", "rated_kw": 10, "critical": True, "critical_hold_s": 120},
        # Talked to from a third-party chat client.
        {"name": "desk-load", "kind": "load", "rated_kw": 120},
        {"name": "desk-gen", "kind": "generator", "rated_kw": 100, "startup_s": 0, "initial_state": "on"},
        # Sent signed, encrypted chat (OpenPGP for XMPP): from Profanity, a script, go-sendxmpp.
        {"name": "ox-load", "kind": "load", "rated_kw": 90},
        {"name": "ox-wire", "kind": "load", "rated_kw": 70},
        {"name": "ox-send", "kind": "load", "rated_kw": 60},
        # Run apart by tests that kill or freeze a device process.
        {"name": "victim-1", "kind": "load", "rated_kw": 20, "refresh_s": 1.0},
        {"name": "victim-2", "kind": "load", "rated_kw": 20, "refresh_s": 1.0},
        # Absent at first: the store-and-forward relay's tests bring them up themselves.
        *({"name": f"far-{i}", "kind": "load", "rated_kw": 30} for i in range(1, 5)),
        {"name": "mailer-1", "kind": "meter", "rated_kw": 40},
        {"name": "mailer-2", "kind": "meter", "rated_kw": 40},  # never commissioned: the README's order
        {"name": "relay-crit", "kind": "load", "rated_kw": 150, "critical": True, "critical_hold_s": 60},
        # Run apart by the BOSH tests, over a transport of their choosing.
        {"name": "remote-1", "kind": "load", "rated_kw": 20, "refresh_s": 1.0},
        # Signed-command targets: one on the shared grid, one run apart (restarts, its own keys).
        {"name": "sig-load", "kind": "load", "rated_kw": 40, "serial": "ACME-0001"},
        {"name": "sig-meter", "kind": "meter", "rated_kw": 40},
        {"name": "sig-apart", "kind": "load", "rated_kw": 20},
        # Live rules (test_rules_live): ranked at billing's price; a branch whose children's faults
        # fold into its alarm (the base loads put it in fault, the small one faults on its own).
        {"name": "price-load", "kind": "load", "rated_kw": 100, "utilisation": 0.4},  # far from faults until driven
        {"name": "fold-meter", "kind": "meter", "rated_kw": 100},
        *({"name": f"fold-base-{i}", "kind": "load", "rated_kw": 60, "parent": "fold-meter", "utilisation": 0.5}
          for i in (1, 2)),
        {"name": "fold-small", "kind": "load", "rated_kw": 10, "parent": "fold-meter", "utilisation": 0.5},
        # A branch under the branch, not in fault itself: the fault of the load under it folds all the way up.
        {"name": "fold-sub", "kind": "meter", "rated_kw": 50, "parent": "fold-meter"},
        {"name": "fold-leaf", "kind": "load", "rated_kw": 5, "parent": "fold-sub", "utilisation": 0.5},
        # Run apart: with the fleet's own rule file, and restarted to show the threshold audit survives.
        {"name": "rules-load", "kind": "load", "rated_kw": 100, "initial_state": "off"},
        {"name": "audit-load", "kind": "load", "rated_kw": 100},
        # Run apart with the default [security] (no unsigned actions): unsigned chat may only look.
        {"name": "guard-load", "kind": "load", "rated_kw": 100, "utilisation": 0.5},
    ],
}
APART = ("victim-1", "victim-2", "far-1", "far-2", "far-3", "far-4", "mailer-1", "mailer-2", "remote-1", "rules-load",
         "audit-load", "sig-apart", "guard-load")


@dataclass
class Env:
    grid: Grid
    fleet: Fleet
    data: Path

    def operator(self, name: str = "alice", resource: str | None = None) -> GridOperator:
        return GridOperator.from_connection(self.grid.connection, operator=name, resource=resource)


class GridUnderTest(Protocol):
    """What helpers shared by test modules need of a module's grid: Env here, the hosting
    tests' own (test_hosting.py, test_hosting_parity.py)."""

    @property
    def grid(self) -> Grid: ...
    @property
    def fleet(self) -> Fleet: ...


def hosted_fleet(devices: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """A fleet of the hosting tests' own (test_hosting*.py, test_presence_fanout.py): devices on
    the component, operators alice and bob, a short presence grace; `settings` add or override."""
    return {"domain": "localhost", "presence_grace_s": 2.0, "hosting": "component",
            "operators": [{"name": "alice"}, {"name": "bob"}], **settings, "devices": devices}


@asynccontextmanager
async def running_grid(fleet: Fleet, data: Path, prepare: Callable[[Grid], None] | None = None,
                       **options: Any) -> AsyncIterator[Grid]:
    """A grid of a module's own (its Prosody and the parts ``options`` name, as Grid takes
    them; ``prepare`` sets what a test changes before it starts), up for the block, then stopped."""
    grid = Grid(fleet, data, **options)
    if prepare is not None:
        prepare(grid)
    await grid.start()
    try:
        yield grid
    finally:
        await grid.stop()


async def plain_client(grid: Grid, name: str) -> ClientXMPP:
    """A plain slixmpp session of account ``name`` (a stock client: roster fetched, available),
    on a resource of its own."""
    client = make_client(f"{grid.fleet.jid(name)}/plain-{random.randrange(1 << 20)}", grid.secrets.password(name),
                         grid.endpoint)
    await open_session(client, grid.endpoint)
    await client.get_roster()
    client.send_presence()
    return client


def link_of(grid: Grid) -> ComponentLink:
    """The component link of a hosting grid (its devices on one XEP-0114 connection)."""
    assert grid.bots is not None and grid.bots.link is not None
    return grid.bots.link


def agent_of(grid: Grid, name: str) -> DeviceAgent:
    assert grid.bots is not None
    return grid.bots.devices[name]


class Written:
    """What a component link writes to the server while installed (``with Written(link) as
    seen:``): each socket write, as text, in ``writes``."""

    def __init__(self, link: ComponentLink) -> None:
        assert link.transport is not None
        self.transport = link.transport
        self.original = link.transport.write
        self.writes: list[str] = []

    def __enter__(self) -> Written:
        self.transport.write = lambda data: (self.writes.append(bytes(data).decode()), self.original(data))  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        self.transport.write = self.original  # type: ignore[method-assign]

    def to(self, jid: str) -> int:
        """Stanzas addressed to ``jid`` (a bare JID counts its resources too)."""
        return sum(w.count(f"to=\"{jid}") for w in self.writes)

    def presence_to(self, jid: str, sender: str) -> int:
        """Presence stanzas from ``sender`` (bare) to ``jid`` (bare, any resource)."""
        tags = re.findall(r"<presence\b[^>]*>", "".join(self.writes))
        return sum(1 for t in tags if re.search(rf'to="{re.escape(jid)}[/"]', t) and f'from="{sender}' in t)

    def messages_with(self, element: str) -> list[str]:
        """The messages written that hold an ``element`` (its name, as written)."""
        return [m for m in re.findall(r"<message\b.*?</message>", "".join(self.writes), re.S) if f"<{element}" in m]


@pytest.fixture(scope="session")
def fleet() -> Fleet:
    return parse_fleet(TEST_FLEET)


@pytest_asyncio.fixture(scope="session")
async def env(tmp_path_factory: pytest.TempPathFactory, fleet: Fleet) -> AsyncIterator[Env]:
    data = tmp_path_factory.mktemp("grid")
    only = ([d.name for d in fleet.devices if d.name not in APART] + [b.name for b in fleet.billing]
            + ["maker", "watchdog", "console"])
    async with running_grid(fleet, data, only=only) as grid:
        yield Env(grid, fleet, data)


@pytest_asyncio.fixture
async def alice(env: Env) -> AsyncIterator[GridOperator]:
    op = env.operator("alice", resource=f"test-{os.urandom(3).hex()}")
    await op.connect()
    try:
        yield op
    finally:
        await op.close()


async def run_cli(*args: str, timeout: float = 60.0, env_vars: dict[str, str] | None = None) -> tuple[int, str, str]:
    """Run the installed console script without blocking the session loop."""
    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(
        str(exe), *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env_vars or {})}, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def run_python(*args: str, timeout: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


async def until(check: Callable[[], Any], timeout: float = 10.0, what: str = "the condition") -> Any:
    """Poll `check` until it gives something true (returned), or fail after `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not (got := check()):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.05)
    return got


async def start_up(data: Path, fleet: Path | None, *extra: str, timeout: float = 40,
                   stderr: int = asyncio.subprocess.PIPE,
                   new_session: bool = False) -> tuple[asyncio.subprocess.Process, str]:
    """`gridpresence up` as a person runs it (`--fleet FILE` unless ``fleet`` is None; `extra`
    says the rest, as `--devices N`), until it says it is up (its Ctrl-C line, within `timeout`
    seconds); returns the process and what it printed. One that does not come up is killed.
    ``stderr=DEVNULL`` for a process that logs more than an unread pipe holds (or a file's
    descriptor). ``new_session``: `up` leads a process group of its own, as a terminal's shell
    starts it, so a test can send the group a terminal's Ctrl-C (os.killpg) without hitting pytest."""
    exe = Path(sys.executable).with_name("gridpresence")
    fleet_args = ("--fleet", str(fleet)) if fleet is not None else ()
    proc = await asyncio.create_subprocess_exec(str(exe), "up", "--data", str(data), *fleet_args, *extra,
                                                stdout=asyncio.subprocess.PIPE, stderr=stderr,
                                                start_new_session=new_session)
    seen = ""
    try:
        async with asyncio.timeout(timeout):
            while "Ctrl-C" not in seen:
                line = await proc.stdout.readline()  # type: ignore[union-attr]
                if not line:
                    why = (await proc.stderr.read()).decode() if proc.stderr is not None else ""
                    raise AssertionError(f"up ended early: {seen}{why}")
                seen += line.decode()
    except BaseException:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        raise
    return proc, seen
