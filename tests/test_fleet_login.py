"""A fleet's login has no limit on the whole, only on standing still, and says how far it is;
a supervised child is given up on only when it falls silent before it is ready."""

from __future__ import annotations

import asyncio
import sys

import pytest

from gridpresence.host import fleet as fleet_mod
from gridpresence.host.fleet import log_in_all
from gridpresence.host.processes import SupervisedChild
from gridpresence.xmpp.session import SessionError


class _Keyring:
    async def announced(self) -> None:
        return None


class _Bot:
    """What log_in_all drives: a login that takes `delay` (or never ends when `stuck`)."""

    def __init__(self, delay: float, stuck: bool = False) -> None:
        self.delay = delay
        self.stuck = stuck
        self.keyring = _Keyring()
        self.logged_in = False
        self.cancelled = False

    async def login(self, timeout: float = 20.0) -> None:
        try:
            if self.stuck:
                await asyncio.Event().wait()
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        self.logged_in = True

    async def start(self, timeout: float = 20.0) -> None:
        await self.login(timeout)

    async def stop(self) -> None:
        return None


async def test_a_login_longer_than_the_stall_limit_finishes_while_it_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet_mod, "PROGRESS_EVERY_S", 0.05)
    bots = [_Bot(0.04) for _ in range(8 * fleet_mod.LOGIN_CONCURRENCY)]  # 8 waves of 0.04 s: ~0.32 s
    said: list[str] = []
    loop = asyncio.get_running_loop()
    began = loop.time()
    await log_in_all(bots, stall_s=0.15, progress=said.append)
    assert loop.time() - began > 0.15  # longer on the whole than the stall limit
    assert all(b.logged_in for b in bots)
    assert said, "a long login says how far it is"
    counts = [int(line.split(" of ")[0]) for line in said]
    assert counts == sorted(counts) and all(line.endswith(f"of {len(bots)} bots logged in") for line in said)


async def test_a_stalled_login_fails_saying_how_far_it_got_and_cancels_the_rest() -> None:
    bots = [_Bot(0.0) for _ in range(20)] + [_Bot(0.0, stuck=True)]
    with pytest.raises(SessionError, match=r"logins stalled: 20 of 21 bots logged in, none in the last 0.3 s"):
        await log_in_all(bots, stall_s=0.3)
    assert bots[-1].cancelled and not bots[-1].logged_in


async def test_a_failed_login_is_its_own_error() -> None:
    class Refused(_Bot):
        async def login(self, timeout: float = 20.0) -> None:
            raise SessionError("refused")

    with pytest.raises(SessionError, match="^refused$"):
        await log_in_all([_Bot(0.01), Refused(0.0)], stall_s=5)


def _child(script: str, quiet: float, progress: list[str]) -> SupervisedChild:
    return SupervisedChild("kids", [sys.executable, "-u", "-c", script], ready="running", hung_after_s=0,
                           progress=progress.append, ready_quiet_s=quiet)


async def test_a_child_that_keeps_saying_how_far_it_is_may_take_longer_than_the_quiet_limit() -> None:
    script = ("import time\n"
              "for n in range(6):\n"
              "    print(f'{n} of 6 bots logged in', flush=True); time.sleep(0.15)\n"
              "print('running', flush=True); time.sleep(30)\n")
    said: list[str] = []
    child = _child(script, quiet=0.5, progress=said)
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await child.start()
        assert loop.time() - began > 0.5
        assert said[:2] == ["kids: 0 of 6 bots logged in", "kids: 1 of 6 bots logged in"] and len(said) == 6
    finally:
        await child.stop()
    assert child.process is not None and child.process.returncode is not None


async def test_a_child_silent_before_it_is_ready_is_given_up_on() -> None:
    child = _child("import time; print('0 of 3 bots logged in', flush=True); time.sleep(30)", quiet=0.4,
                   progress=[])
    try:
        with pytest.raises(RuntimeError, match="kids: not ready, and silent for 0.4 s"):
            await child._spawn()
    finally:
        await child.stop()
    assert child.process is not None and child.process.returncode is not None
