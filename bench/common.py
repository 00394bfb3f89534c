"""Shared pieces of the benchmarks: a private grid, statistics, and the raw slixmpp baseline.

Numbers, not pass/fail: every script prints median, p99 and the ratio to a baseline measured
in the same run against the same server (the machine is small and noisy: ratios travel, absolute
milliseconds do not).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import statistics
import tempfile
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path

from slixmpp import ClientXMPP, Message, Presence

from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import Endpoint, close_session, make_client, open_session
from gridpresence.config import Fleet, Hosting, parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator


def percentile(samples: Sequence[float], pct: float) -> float:
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(name: str, samples_s: Sequence[float]) -> dict[str, float]:
    med, p99 = statistics.median(samples_s), percentile(samples_s, 99)
    print(f"  {name:<44} n={len(samples_s):<5} median {med * 1000:9.3f} ms   p99 {p99 * 1000:9.3f} ms", flush=True)
    return {"median_ms": med * 1000, "p99_ms": p99 * 1000, "n": len(samples_s)}


def bench_fleet(loads: int, refresh_s: float = 300.0, require_signatures: bool = True,
                hosting: Hosting = "c2s") -> Fleet:
    """N loads, one operator, and the baseline's echo pair (as billing parties: accounts whose
    rosters hold only the operator, so they are not flooded by device presence).
    ``require_signatures=False`` lets the devices take unsigned commands too (the signature
    benchmark's baseline, same devices). ``hosting="component"``: the loads are identities
    hosted on the grid's XEP-0114 component (xmpp/component.py), all on one connection."""
    return parse_fleet({
        "domain": "localhost",
        "hosting": hosting,
        "security": {"require_signatures": require_signatures},
        "operators": [{"name": "bench-op"}],
        "billing": [{"name": "echo-a"}, {"name": "echo-b"}],
        "devices": [{"name": f"dev-{i:04d}", "kind": "load", "rated_kw": 10, "refresh_s": refresh_s}
                    for i in range(loads)],
    })


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each named process spends inside ``with meter.measure(kind):`` blocks, summed
    per kind: where a fan-out's time goes when the machine, not the network, is the limit."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.spent: dict[str, dict[str, float]] = {}

    @contextlib.contextmanager
    def measure(self, kind: str) -> Iterator[None]:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        yield
        spent = self.spent.setdefault(kind, dict.fromkeys(self.pids, 0.0))
        for name, pid in self.pids.items():
            spent[name] += cpu_seconds(pid) - before[name]

    def report(self, kind: str, times: int, per: str) -> dict[str, float]:
        """Milliseconds per block, by process, printed on one line."""
        ms = {name: secs / times * 1000 for name, secs in self.spent[kind].items()}
        print(f"  CPU per {per}, {kind}: " + ", ".join(f"{name} {v:.0f} ms" for name, v in ms.items())
              + f" (total {sum(ms.values()):.0f} ms on {os.cpu_count()} cores)", flush=True)
        return ms

    def report_us(self, kind: str, times: int, per: str) -> dict[str, float]:
        """Microseconds per operation (``times`` of them in all), by process, on one line."""
        us = {name: secs / times * 1e6 for name, secs in self.spent[kind].items()}
        print(f"  CPU per {per}: " + ", ".join(f"{name} {v:.0f} us" for name, v in us.items())
              + f" (total {sum(us.values()):.0f} us)", flush=True)
        return us


class BenchGrid:
    """A bench grid: server, accounts and watchdog here; device bots and the echo responder in a
    second process (as they would be on other hardware), so the two sides use both cores."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.grid = Grid(fleet, Path(tempfile.mkdtemp(prefix="gridbench-")), only=["watchdog"])
        self.remote: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        await self.grid.start()
        tick = max(d.refresh_s for d in self.fleet.devices)  # drift only: keep ticks out of the timings
        self.remote = await asyncio.create_subprocess_exec(
            sys.executable, os.environ.get("REMOTE_SIDE", str(Path(__file__).with_name("remote_side.py"))), str(self.grid.data_dir), str(tick),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(self.remote.stdout.readline(), 900)  # type: ignore[union-attr]
        if line.strip() != b"ready":
            raise SystemExit("the device process did not come up")

    async def remote_profile(self, dump_to: Path | None = None) -> None:
        """Start cProfile in the device process, or (``dump_to``) stop it and write its stats."""
        assert self.remote is not None and self.remote.stdin is not None and self.remote.stdout is not None
        self.remote.stdin.write(b"profile\n" if dump_to is None else f"dump {dump_to}\n".encode())
        await self.remote.stdin.drain()
        if dump_to is not None:
            line = await asyncio.wait_for(self.remote.stdout.readline(), 60)
            if line.strip() != b"dumped":
                raise SystemExit(f"the device process did not write its profile: {line!r}")

    def pids(self) -> dict[str, int]:
        """The three processes of a bench: this one, the device bots' and the XMPP server."""
        assert self.remote is not None
        return {"operator side": os.getpid(), "device host": self.remote.pid,
                "prosody": int(self.grid.server.pidfile_path.read_text().strip())}

    async def stop(self) -> None:
        if self.remote is not None:
            self.remote.stdin.close()  # type: ignore[union-attr]
            await asyncio.wait_for(self.remote.wait(), 60)
        await self.grid.stop()
        shutil.rmtree(self.grid.data_dir, ignore_errors=True)


class EchoResponder:
    """The baseline's far end: a plain slixmpp client that echoes every chat message."""

    def __init__(self, endpoint: Endpoint, secrets: Secrets) -> None:
        self.endpoint = endpoint
        self.client = make_client("echo-b@localhost/bench", secrets.password("echo-b"), endpoint)
        self.client.add_event_handler("message", lambda msg: msg.reply(msg["body"]).send())

    async def start(self) -> None:
        await open_session(self.client, self.endpoint)
        self.client.send_presence()

    async def stop(self) -> None:
        await close_session(self.client)


class EchoPair:
    """The baseline: plain slixmpp chat messages to the echo responder and back."""

    def __init__(self, grid: Grid) -> None:
        self.endpoint = grid.endpoint
        self.sender = make_client("echo-a@localhost/bench", grid.secrets.password("echo-a"), self.endpoint)
        self.echo_jid = "echo-b@localhost/bench"
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.sender.add_event_handler("message", self._back)

    def _back(self, msg: Message) -> None:
        fut = self.waiting.pop(msg["body"], None)
        if fut is not None and not fut.done():
            fut.set_result(time.perf_counter())

    async def start(self) -> None:
        await open_session(self.sender, self.endpoint)
        self.sender.send_presence()

    async def stop(self) -> None:
        await close_session(self.sender)

    def _send(self, i: int) -> asyncio.Future[float]:
        fut: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        body = f"ping {i} {time.perf_counter_ns()}"
        self.waiting[body] = fut
        self.sender.send_message(mto=self.echo_jid, mbody=body, mtype="chat")
        return fut

    async def sequential(self, n: int) -> list[float]:
        """n round trips one after another: the latency baseline."""
        out = []
        for i in range(n):
            t0 = time.perf_counter()
            t1 = await asyncio.wait_for(self._send(i), 10)
            out.append(t1 - t0)
        return out

    async def pipelined(self, n: int) -> float:
        """n round trips all in flight at once: the throughput baseline (seconds for all)."""
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(self._send(i) for i in range(n))), max(60, n / 50))
        return time.perf_counter() - t0


def client_for(grid: Grid, name: str, resource: str = "bench") -> ClientXMPP:
    """A plain slixmpp client of account ``name`` on ``resource`` (not connected)."""
    return make_client(f"{grid.fleet.jid(name)}/{resource}", grid.secrets.password(name), grid.endpoint)


@contextlib.asynccontextmanager
async def chat_bench(devices: int, prefix: str) -> AsyncIterator[tuple[Grid, EchoPair]]:
    """A grid of ``devices`` device bots (in this process) with the raw slixmpp echo pair of the
    chat baselines started; everything is stopped again on the way out."""
    fleet = bench_fleet(devices)
    data = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        async with Grid(fleet, data, only=[d.name for d in fleet.devices]) as grid:
            echo, pair = EchoResponder(grid.endpoint, grid.secrets), EchoPair(grid)
            for party in (echo, pair):
                await party.start()
            try:
                yield grid, pair
            finally:
                for party in (pair, echo):
                    await party.stop()
    finally:
        shutil.rmtree(data, ignore_errors=True)


async def raw_login_all_seen(grid: Grid, client: ClientXMPP, devices: set[str], wait_s: float,
                             on_device: Callable[[], None] | None = None) -> tuple[float, float]:
    """The login benches' baseline: a plain slixmpp ``client`` (client_for: an operator's
    account on a resource of its own) fetches its roster, says it is available, and waits until
    each of ``devices`` (bare JIDs) has sent its available presence; then it leaves. Returns the
    perf_counter instants of its connect and of the last device seen; ``on_device`` is called on
    each device's presence."""
    seen: set[str] = set()
    done = asyncio.Event()

    def on(pres: Presence) -> None:
        bare = pres["from"].bare
        if bare in devices and pres.xml.get("type") is None:
            seen.add(bare)
            if on_device is not None:
                on_device()
            if len(seen) == len(devices):
                done.set()

    client.add_event_handler("presence", on)
    t0 = time.perf_counter()
    await open_session(client, grid.endpoint, 120)
    await client.get_roster()
    client.send_presence()
    await asyncio.wait_for(done.wait(), wait_s)
    t1 = time.perf_counter()
    await close_session(client)
    return t0, t1


async def operator_login_all_seen(op: GridOperator, devices: int, wait_s: float) -> tuple[float, float]:
    """``op`` (made, and instrumented, by the caller) connects without waiting for a tariff
    until its library sees ``devices`` devices present, each with its state; then it leaves.
    Returns the perf_counter instants of its connect and of all seen."""
    t0 = time.perf_counter()
    await op.connect(timeout=120, settle_s=wait_s, tariff_s=0)
    try:
        await op.wait_for(lambda d: op.tracker.present_count >= devices
                          and all(v.state is not None for v in d.values()), wait_s)
        return t0, time.perf_counter()
    finally:
        await op.close()
