"""`up --processes`: the grid's parties as separate, supervised processes (issue 14), so one
hung or crashed process — a frozen device host, a relay that died — does not take the others
with it. Each child is a `gridpresence` sub-command (`bots`, `relay`) on the grid's data
directory, in a session of its own (a terminal's Ctrl-C reaches `up`, which stops them); it
dies with `up` (PR_SET_PDEATHSIG), and one that exits is started again with back-off and said
in the log. Its parties reconnect by themselves (xmpp/reconnect.py).

A child that hangs (SIGSTOP, a frozen event loop) does not exit, so each child writes a
heartbeat line to its stdout from its event loop (:func:`heartbeat`, once ready); one that has
been silent for ``hung_after_s`` is killed and so started again like one that crashed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence

from gridpresence.server.prosody import die_with_parent
from gridpresence.xmpp.reconnect import backoff_delay

log = logging.getLogger(__name__)

READY_QUIET_S = 60.0  # a child that says nothing this long before it is ready is stuck
PROGRESS_MARK = "logged in"  # ends a line saying how far logins are (host/fleet.py writes it)
STOP_TIMEOUT_S = 15.0
HEARTBEAT_ENV = "GRIDPRESENCE_HEARTBEAT_S"  # set for a supervised child: how often to beat
HEARTBEAT_LINE = "heartbeat"
HEARTBEAT_S = 1.0
HUNG_AFTER_S = 10.0  # a child silent this long is hung: killed and started again


def heartbeat() -> asyncio.Task[None] | None:
    """In a supervised child (its environment says so), once it is ready: a line on stdout
    every period, written by the event loop itself, so a frozen loop or a stopped process
    falls silent. Elsewhere (run by hand), nothing."""
    try:
        period = float(os.environ.get(HEARTBEAT_ENV, ""))
    except ValueError:
        return None
    if not period > 0:
        return None

    async def beat() -> None:
        while True:
            print(HEARTBEAT_LINE, flush=True)
            await asyncio.sleep(period)

    return asyncio.ensure_future(beat())


def gridpresence_argv(*args: str) -> list[str]:
    """This very program (same interpreter, same install) with `args`."""
    return [sys.executable, "-m", "gridpresence", *args]


class SupervisedChild:
    """One child process: started, waited for (`ready`: a line of its stdout saying so),
    restarted whenever it exits until :meth:`stop`."""

    def __init__(self, name: str, argv: Sequence[str], ready: str, hung_after_s: float = HUNG_AFTER_S,
                 progress: Callable[[str], None] | None = None, ready_quiet_s: float = READY_QUIET_S) -> None:
        self.name = name
        self.argv = list(argv)
        self.ready = ready
        self.hung_after_s = hung_after_s
        # Ten thousand logins take what they take: a child is given up on only when it falls
        # silent for ready_quiet_s before it is ready; its progress lines go to `progress`.
        self.progress = progress
        self.ready_quiet_s = ready_quiet_s
        self._said: float = 0.0  # monotonic time of the latest line before ready
        self.restarts = 0
        self.hung_kills = 0
        self._heard: float | None = None  # monotonic time of the latest line, once ready
        self._beats: asyncio.Task[None] | None = None
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._watch: asyncio.Task[None] | None = None
        self._readers: set[asyncio.Task[None]] = set()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.ensure_future(self._supervise())
        if self.hung_after_s > 0:
            self._beats = asyncio.ensure_future(self._watch_heartbeats())

    async def _spawn(self) -> None:
        self._heard = None
        env = {**os.environ, HEARTBEAT_ENV: f"{HEARTBEAT_S:g}"} if self.hung_after_s > 0 else None
        self.process = await asyncio.create_subprocess_exec(
            *self.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, env=env,
            # A session of its own: a terminal's Ctrl-C (SIGINT to the foreground group) reaches
            # `up` alone, which stops its children in order; PDEATHSIG still ties it to `up`.
            start_new_session=True,
            preexec_fn=die_with_parent(os.getpid()))  # stderr (its log) is ours
        assert self.process.stdout is not None
        ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())  # also when no one waits any more
        reader = asyncio.ensure_future(self._read(self.process.stdout, ready))
        self._readers.add(reader)
        reader.add_done_callback(self._readers.discard)
        self._said = time.monotonic()
        while not ready.done():
            quiet_until = self._said + self.ready_quiet_s
            await asyncio.wait([ready], timeout=max(0.0, quiet_until - time.monotonic()))
            if not ready.done() and time.monotonic() >= self._said + self.ready_quiet_s:
                raise RuntimeError(f"{self.name}: not ready, and silent for {self.ready_quiet_s:g} s")
        ready.result()

    async def _read(self, stream: asyncio.StreamReader, ready: asyncio.Future[None]) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace").rstrip()
            if ready.done():
                self._heard = time.monotonic()
            else:
                self._said = time.monotonic()
            if text == HEARTBEAT_LINE:
                continue
            log.info("%s: %s", self.name, text)
            if PROGRESS_MARK in text and not ready.done() and self.progress is not None:
                self.progress(f"{self.name}: {text}")
            if self.ready in text and not ready.done():
                ready.set_result(None)
                self._heard = time.monotonic()
        if not ready.done():
            ready.set_exception(RuntimeError(f"{self.name} ended before it was ready"))

    async def _supervise(self) -> None:
        while not self._stopping:
            assert self.process is not None
            status = await self.process.wait()
            if self._stopping:
                return
            died = time.monotonic()
            log.error("%s (pid %s) exited with status %s; starting it again", self.name, self.process.pid, status)
            attempt = 0
            while not self._stopping:
                attempt += 1
                try:
                    await self._spawn()
                    break
                except (RuntimeError, OSError) as exc:
                    delay = backoff_delay(attempt)
                    log.error("%s: restart %d failed (%s); again in %.1f s", self.name, attempt, exc, delay)
                    if self.process is not None and self.process.returncode is None:
                        self.process.kill()
                        await self.process.wait()
                    await asyncio.sleep(delay)
            self.restarts += 1
            log.warning("%s is back after %.2f s (restart %d)", self.name, time.monotonic() - died, self.restarts)

    async def _watch_heartbeats(self) -> None:
        """Kill a child that fell silent; `_supervise` starts it again."""
        while not self._stopping:
            await asyncio.sleep(min(1.0, self.hung_after_s / 4))
            process, heard = self.process, self._heard
            if process is None or process.returncode is not None or heard is None:
                continue  # starting, or exited (the supervisor has it)
            silent = time.monotonic() - heard
            if silent >= self.hung_after_s:
                self.hung_kills += 1
                log.error("%s (pid %s) is hung: no heartbeat for %.1f s; killing it to start it again",
                          self.name, process.pid, silent)
                self._heard = None
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    async def stop(self) -> None:
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
        if self._beats is not None:
            self._beats.cancel()
        process = self.process
        if process is None or process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGCONT)  # a frozen child must be able to take its SIGTERM
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            process.kill()
            await process.wait()
        for reader in list(self._readers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(reader, 2)
