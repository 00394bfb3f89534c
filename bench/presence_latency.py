#!/usr/bin/env python3
"""Presence propagation at fleet size: from a device's state change to the operator library
seeing it, and an operator's login until it sees every device with its state.

Three processes besides Prosody, as deployed: the devices (``--hosting component``: every
identity on one XEP-0114 link, xmpp/component.py; ``c2s``: a session each) in one; the watchdog
and the console in another; the operator (GridOperator) in this one. A change is timed from
just before the device's physics changes (in the devices' process) to the operator's tracker
telling it (here): both ends read ``time.monotonic()``, which is CLOCK_MONOTONIC, one clock for
every process of the machine, so no clock offset enters the figures. The devices' process
sends its (device, seq, instant) list when a run ends; the two lists are matched here.

Changes: the fleet's loads shed / restored in turn, paced at ``--rate`` per second (default 1 %
of the devices per second); each goes to every subscriber, and the load's branch meter re-sums
and tells its reading, as in the field. Baseline, same run, same server: a plain slixmpp
client's presence (status text only; a manufacturer's account, in the devices' process) seen
by a plain slixmpp client of the operator's account (another resource, here).

Login: ``GridOperator.connect`` (roster, presence, the probe answers for every device, the
tracker) until every device is seen present with its state, against the plain client's login
until every device's presence is in (same account, another resource). Reported: median, p99,
ratios; CPU per change of each process; stanzas the devices' process writes per change.

    python bench/presence_latency.py [--devices 100] [--hosting c2s|component] [--rate R]
        [--changes N] [--login-rounds 2] [--profile DIR]

The issue's case: ``--devices 10000 --hosting component --rate 100 --login-rounds 0`` (1 % of
10,000 changing each second; the login is bench/operator_scale.py's).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from common import cpu_seconds, percentile, summary

from gridpresence.config import load_fleet, parse_fleet, synthetic_fleet_data
from gridpresence.host.fleet import FleetBots
from gridpresence.host.grid import CONNECTION_FILE, FLEET_COPY, SECRETS_FILE, Grid
from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceChange
from gridpresence.protocol import Action, DeviceKind
from gridpresence.protocol.models import DeviceState, utcnow
from gridpresence.server.accounts import CONSOLE, WATCHDOG, Secrets
from gridpresence.xmpp import component
from gridpresence.xmpp.session import ConnectionInfo, close_session, make_client, open_session

RAW_SENDER = "raw-maker"  # a manufacturer's account, added for the baseline: its roster holds the operators
OPERATOR = "alice"
PAUSES_ENV = "GRIDBENCH_PAUSES"  # set by --pauses, read by the children too
LOGIN_OPERATOR = "bob"


def now() -> float:
    return time.monotonic()  # CLOCK_MONOTONIC: the same clock in every process of the machine


# -- where the time goes: pauses of each process -------------------------------------------

class Pauses:
    """This process's cyclic-GC collections and event-loop stalls, as (start, end, what) in
    monotonic time, so a slow change can be laid beside what each process was doing then."""

    GC_MIN_S = 0.001  # shorter collections are not worth a line
    STALL_MIN_S = 0.005  # the loop came back this much later than asked
    STEP_S = 0.002
    SAMPLE_S = 0.003

    def __init__(self) -> None:
        self.spans: list[tuple[float, float, str]] = []
        self.stacks: dict[str, int] = {}  # where the loop was, sampled while it was stalled
        self._gc_t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.stacks = {}
        if not os.environ.get(PAUSES_ENV):  # it costs each process a few % of a core: asked for only
            return
        gc.callbacks.append(self._gc)
        self._task = asyncio.ensure_future(self._probe())
        self._beat = now()
        self._main = threading.get_ident()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        """Every SAMPLE_S, while the loop has not come back for STALL_MIN_S: what it is running."""
        while True:
            time.sleep(self.SAMPLE_S)
            if now() - self._beat < self.STALL_MIN_S:
                continue
            frame = sys._current_frames().get(self._main)
            names = []
            while frame is not None and len(names) < 40:
                code = frame.f_code
                names.append(f"{Path(code.co_filename).name}:{code.co_name}")
                frame = frame.f_back
            key = " < ".join(n for n in names[:12])
            self.stacks[key] = self.stacks.get(key, 0) + 1

    def top_stacks(self, n: int = 8) -> list[tuple[int, str]]:
        out = sorted(((c, k) for k, c in self.stacks.items()), reverse=True)[:n]
        self.stacks = {}
        return out

    def take(self) -> list[tuple[float, float, str]]:
        spans, self.spans = self.spans, []
        return spans

    def _gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_t0 = now()
        elif (t := now()) - self._gc_t0 >= self.GC_MIN_S:
            self.spans.append((self._gc_t0, t, f"gc{info['generation']}"))

    async def _probe(self) -> None:
        while True:
            t = self._beat = now()
            await asyncio.sleep(self.STEP_S)
            if (t1 := now()) - t - self.STEP_S >= self.STALL_MIN_S:
                self.spans.append((t + self.STEP_S, t1, "stall"))


def pause_summary(spans: list[list[Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for t0, t1, what in spans:
        s = out.setdefault(what, {"n": 0, "total_ms": 0.0, "max_ms": 0.0})
        s["n"] += 1
        s["total_ms"] += (t1 - t0) * 1000
        s["max_ms"] = max(s["max_ms"], (t1 - t0) * 1000)
    return out


def tail_causes(sent: list[list[Any]], seen: dict[tuple[str, Any], float], pauses: dict[str, list[list[Any]]],
                top: int = 15) -> list[dict[str, Any]]:
    """The slowest changes, each with what every process paused for while it was on its way."""
    rows = []
    for jid, key, t0 in sent:
        t1 = seen.get((jid, key))
        if t1 is not None:
            rows.append((t1 - t0, t0, t1))
    rows.sort(reverse=True)
    out = []
    for lat, t0, t1 in rows[:top]:
        during = {name: [f"{what} {(b - a) * 1000:.0f}ms@{(a - t0) * 1000:+.0f}" for a, b, what in spans
                         if a < t1 and b > t0] for name, spans in pauses.items()}
        out.append({"ms": round(lat * 1000, 1), **{k: v for k, v in during.items() if v}})
    return out


# -- the devices' process ------------------------------------------------------------------

class Written:
    """Stanzas the hosted identities write to the link (counted at the link's transport)."""

    count = 0

    @classmethod
    def install(cls) -> None:
        original = component._LinkTransport.write

        def write(self: component._LinkTransport, data: bytes) -> None:
            cls.count += 1
            original(self, data)

        component._LinkTransport.write = write  # type: ignore[method-assign]


async def devices_child(data: Path, profile: str | None) -> None:
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(data / FLEET_COPY)
    secrets = Secrets(data / SECRETS_FILE)
    Written.install()
    bots = FleetBots(fleet, info.server, secrets, only=[d.name for d in fleet.devices], tick_s=3600,
                     with_services=False, data_dir=data)
    raw = make_client(f"{fleet.jid(RAW_SENDER)}/raw", secrets.password(RAW_SENDER), info.server)
    await bots.start()
    await open_session(raw, info.server)
    await raw.get_roster()
    raw.send_presence()
    loads = [a for a in bots.devices.values() if a.spec.kind is DeviceKind.LOAD]
    pauses = Pauses()
    pauses.start()
    print(json.dumps({"ready": len(bots.devices)}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    turn = 0
    while line := await reader.readline():
        cmd, n, rate = line.decode().split()
        changes, pace = int(n), 1 / float(rate)
        sent: list[tuple[str, int | str, float]] = []
        prof = cProfile.Profile() if profile and cmd == "grid" else None
        cpu0, written0 = cpu_seconds(os.getpid()), Written.count
        if prof:
            prof.enable()
        pauses.take()
        start = now()
        late: list[float] = []  # how long after its planned instant each change was made
        for i in range(changes):
            # Each change in a turn of the event loop of its own, as a fleet's devices change
            # (each in its own tick or command): one that is late (the machine was busy) must
            # not be made back to back with the next ones, which would time the sender's
            # catching up (the link writes nothing until the loop turns), not a change's way.
            await asyncio.sleep(max(0.0, start + i * pace - now()))
            late.append(now() - start - i * pace)
            if cmd == "raw":
                t0 = now()
                raw.send_presence(pstatus=f"change {i}", pshow="away" if i % 2 else None)
                sent.append(("raw", f"change {i}", t0))
                continue
            agent = loads[turn % len(loads)]
            turn += 1
            before = agent.sim.state
            action = Action.RESTORE if before is DeviceState.OFF else Action.SHED
            t0 = now()
            agent.sim.execute(action, {}, utcnow())
            report = agent.publish(force=False)  # as after a command: a change of state is broadcast
            if report is not None and report.state is not before:
                sent.append((agent.jid, report.seq, t0))
        await asyncio.sleep(1.0)  # the parents' re-sums and the last writes
        if prof:
            prof.disable()
            prof.dump_stats(profile)
        offline = sum(len(getattr(c, "_offline", ())) for c in bots.link.clients.values()) if bots.link else 0
        print(json.dumps({"sent": sent, "cpu_s": cpu_seconds(os.getpid()) - cpu0,
                          "written": Written.count - written0, "offline": offline,
                          "late_p99_ms": percentile(late, 99) * 1000 if late else 0.0,
                          "pauses": pauses.take(), "stacks": pauses.top_stacks()}), flush=True)
    await raw.disconnect()
    await bots.stop()


async def services_child(data: Path, profile: str | None) -> None:
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(data / FLEET_COPY)
    bots = FleetBots(fleet, info.server, Secrets(data / SECRETS_FILE), only=[WATCHDOG, CONSOLE], tick_s=3600,
                     data_dir=data)
    await bots.start()
    prof = cProfile.Profile() if profile else None
    if prof:  # from its start-up's end to the run's: the raw baseline and the changes
        prof.enable()
    pauses = Pauses()
    pauses.start()
    print(json.dumps({"ready": 2}), flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while await reader.readline():  # "pauses": what it paused for since it was last asked
        print(json.dumps({"pauses": pauses.take(), "stacks": pauses.top_stacks()}), flush=True)
    if prof:
        prof.disable()
        prof.dump_stats(profile)
    await bots.stop()


# -- this process: the operator ------------------------------------------------------------

class Child:
    def __init__(self, role: str, data: Path, profile: str | None = None) -> None:
        self.args = [sys.executable, __file__, "--child", role, str(data), *([profile] if profile else [])]
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, timeout: float) -> dict[str, Any]:
        self.proc = await asyncio.create_subprocess_exec(*self.args, stdin=asyncio.subprocess.PIPE,
                                                         stdout=asyncio.subprocess.PIPE, limit=1 << 26)
        return await self.read(timeout)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise SystemExit(f"{self.args[3]} process ended early")
        return json.loads(line)  # type: ignore[no-any-return]

    async def ask(self, line: str, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        return await self.read(timeout)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), 120)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


def matched(sent: list[list[Any]], seen: dict[tuple[str, Any], float]) -> tuple[list[float], int]:
    """Latencies of the changes seen here, and how many were never seen."""
    out, missed = [], 0
    for jid, key, t0 in sent:
        t1 = seen.get((jid, key))
        if t1 is None:
            missed += 1
        else:
            out.append(t1 - t0)
    return out, missed


class RawReceiver:
    """A plain slixmpp client of the operator's account: its login (until every device's
    presence is in) and the raw sender's presence changes, by status text."""

    def __init__(self, grid: Grid, devices: set[str]) -> None:
        self.grid, self.devices = grid, devices
        self.client = make_client(f"{grid.fleet.jid(OPERATOR)}/raw", grid.secrets.password(OPERATOR), grid.endpoint)
        self.sender = grid.fleet.jid(RAW_SENDER)
        self.present: set[str] = set()
        self.all_in = asyncio.Event()
        self.seen: dict[tuple[str, Any], float] = {}
        self.client.add_event_handler("presence", self._on)

    def _on(self, pres: Any) -> None:
        t1 = now()
        bare = pres["from"].bare
        if bare == self.sender and pres["from"].resource == "raw":
            self.seen[("raw", pres["status"])] = t1
        elif bare in self.devices and pres.xml.get("type") is None:
            self.present.add(bare)
            if len(self.present) == len(self.devices):
                self.all_in.set()

    async def login(self) -> float:
        t0 = now()
        await open_session(self.client, self.grid.endpoint, 120)
        await self.client.get_roster()
        self.client.send_presence()
        await asyncio.wait_for(self.all_in.wait(), 300)
        return now() - t0

    async def close(self) -> None:
        await close_session(self.client)


async def operator_login(grid: Grid, n: int, i: int) -> float:
    op = GridOperator.from_connection(grid.connection, operator=LOGIN_OPERATOR, resource=f"login-{i}")
    t0 = now()
    await op.connect(timeout=120, settle_s=300, tariff_s=0)
    try:
        await op.wait_for(lambda d: op.tracker.present_count >= n and all(v.state is not None for v in d.values()), 300)
        return now() - t0
    finally:
        await op.close()


def cpu_of(pids: dict[str, int]) -> dict[str, float]:
    return {name: cpu_seconds(pid) for name, pid in pids.items()}


async def settle(pids: dict[str, int], busy: float = 0.1, step_s: float = 1.0, limit_s: float = 300.0) -> float:
    """Wait until no process uses more than ``busy`` of a core over ``step_s`` (at most
    ``limit_s``); the time waited. A session of the operator's account that leaves is told to
    every device (10,000 presences for the host, the console and the watchdog to take in): a
    timed run started before they are would time that backlog, not a change's way."""
    t0 = now()
    before = cpu_of(pids)
    while now() - t0 < limit_s:
        await asyncio.sleep(step_s)
        after = cpu_of(pids)
        if all(after[k] - before[k] <= busy * step_s for k in pids):
            break
        before = after
    return now() - t0


async def main(args: argparse.Namespace) -> None:
    rate = args.rate or max(1.0, args.devices / 100)
    changes = args.changes or int(max(1000, 30 * rate))
    data = synthetic_fleet_data(args.devices, refresh_s=3600, hosting=args.hosting)  # refreshes out of the counts
    data["manufacturers"] = [{"name": RAW_SENDER}]
    fleet = parse_fleet(data)
    jids = {fleet.jid(d.name) for d in fleet.devices}
    grid = Grid(fleet, Path(tempfile.mkdtemp(prefix="gridbench-presence-")), bots=False, dashboard=False)
    t = time.perf_counter()
    await grid.start()
    where = Path(args.profile) if args.profile else None
    services = Child("services", grid.data_dir, str(where / "services.prof") if where else None)
    devices = Child("devices", grid.data_dir, str(where / "devices.prof") if where else None)
    op: GridOperator | None = None
    raw: RawReceiver | None = None
    results: dict[str, Any] = {"devices": args.devices, "hosting": args.hosting, "rate": rate}
    try:
        # The devices first, as `up` does (its link is up before any party logs in): a party's
        # login before it would have the server bounce its presence and probes to 10,000 JIDs.
        await devices.start(1800)
        await services.start(600)
        print(f"{args.devices} devices ({args.hosting}), watchdog and console up in {time.perf_counter() - t:.0f} s",
              flush=True)
        pids = {"operator (this)": os.getpid(), "devices": devices.pid, "services": services.pid,
                "prosody": int(grid.server.pidfile_path.read_text().strip())}

        # Login: the plain client (which stays for the raw baseline), then ours, in turn.
        raw = RawReceiver(grid, jids)
        logins_raw = [await raw.login()]
        logins_ours = []
        for i in range(args.login_rounds):
            logins_ours.append(await operator_login(grid, args.devices, i))
        print(f"operator login until all {args.devices} are seen with their state:")
        results["login_raw"] = summary("raw slixmpp login, every presence in", logins_raw)
        if logins_ours:  # --login-rounds 0: propagation only (the plain client's login still comes first)
            results["login_ours"] = summary("GridOperator.connect, all seen with state", logins_ours)
            results["login_ratio"] = statistics.median(logins_ours) / logins_raw[0]
            print(f"  ratio to raw: {results['login_ratio']:.2f}x", flush=True)

        # Propagation.
        op = GridOperator.from_connection(grid.connection, operator=OPERATOR, resource="bench")
        await op.connect(timeout=120, settle_s=300, tariff_s=0)
        seen: dict[tuple[str, Any], float] = {}

        def on_change(change: DeviceChange) -> None:
            report = change.current.report
            if report is not None and change.cause in ("presence", "recovered"):
                seen.setdefault((change.current.jid, report.seq), now())

        op.tracker.listen(on_change)
        # Its arrival (its presence and key announcement to every device) taken in before any
        # timing: the baseline would otherwise time that backlog.
        print(f"  the operator's arrival taken in by every process after "
              f"{await settle({k: v for k, v in pids.items() if k != 'operator (this)'}):.1f} s", flush=True)
        pauses = Pauses()
        pauses.start()
        await devices.ask(f"raw 200 {rate}", 120)  # warm-up
        await devices.ask(f"grid 200 {rate}", 120)
        await asyncio.sleep(1)
        print(f"presence propagation, {args.devices} devices online ({args.hosting}), {rate:g} changes/s:")
        got = await devices.ask(f"raw {changes} {rate}", changes / rate + 120)
        await asyncio.sleep(1)
        base, base_missed = matched(got["sent"], raw.seen)
        results["baseline"] = summary("raw slixmpp presence (status only)", base)
        results["baseline_sender_late_p99_ms"] = got["late_p99_ms"]
        raw_pauses = {"operator": pauses.take(), "devices": got["pauses"],
                      "services": (await services.ask("pauses", 60))["pauses"]}
        if args.pauses:
            results["baseline_tail"] = tail_causes(got["sent"], raw.seen, raw_pauses)
        await raw.close()  # so the operator's account has one session (ours) in the timed run
        _closed, raw = raw, None  # kept: its stream's last task ends while we wait below
        quiet = {k: v for k, v in pids.items() if k != "operator (this)"}
        print(f"  the baseline client's goodbye taken in by every process after {await settle(quiet):.1f} s",
              flush=True)
        prof = cProfile.Profile() if args.profile else None
        await services.ask("pauses", 60)
        pauses.take()
        pauses.top_stacks()
        cpu0 = cpu_of(pids)
        load_before = os.getloadavg()[0]  # the machine is shared: what else ran says how far figures travel
        if prof:
            prof.enable()
        got = await devices.ask(f"grid {changes} {rate}", changes / rate + 120)
        await asyncio.sleep(1)
        if prof:
            prof.disable()
            prof.dump_stats(str(Path(args.profile) / "operator.prof"))
        cpu1 = cpu_of(pids)
        cpu1["devices"] = cpu0["devices"] + got["cpu_s"]  # its own count: the run, without the reply
        ours, missed = matched(got["sent"], seen)
        if args.pauses:
            told = await services.ask("pauses", 60)
            run_pauses = {"operator": pauses.take(), "devices": got["pauses"], "services": told["pauses"]}
            results["stalled_in"] = {"operator": pauses.top_stacks(), "devices": got["stacks"], "services": told["stacks"]}
            print("  where each process's loop was while stalled (samples every 3 ms):")
            for name, rows in results["stalled_in"].items():
                for count, where in rows[:5]:
                    print(f"    {name} {count}: {where}")
            results["pauses"] = {k: pause_summary(v) for k, v in run_pauses.items()}
            results["baseline_pauses"] = {k: pause_summary(v) for k, v in raw_pauses.items()}
            results["tail"] = tail_causes(got["sent"], seen, run_pauses)
            print("  pauses in the timed run (GC collections >= 1 ms, loop stalls >= 5 ms): "
                  + json.dumps(results["pauses"]))
            print("  the slowest changes and what each process paused for meanwhile:")
            for row in results["tail"]:
                print("    " + json.dumps(row))
            print("  baseline's slowest: " + json.dumps(results["baseline_tail"][:8]))
        n = len(got["sent"])
        results["gridpresence"] = summary("device change -> operator library view", ours)
        results["missed"] = missed
        results["sender_late_p99_ms"] = got["late_p99_ms"]
        print(f"  the sender's own lateness, p99: {got['late_p99_ms']:.1f} ms "
              f"(baseline's {results['baseline_sender_late_p99_ms']:.1f} ms)")
        tenth = max(1, len(ours) // 10)  # a backlog that grows shows as a last tenth slower than the first
        results["median_first_tenth_ms"] = statistics.median(ours[:tenth]) * 1000
        results["median_last_tenth_ms"] = statistics.median(ours[-tenth:]) * 1000
        print(f"  median of the first tenth {results['median_first_tenth_ms']:.1f} ms, "
              f"of the last {results['median_last_tenth_ms']:.1f} ms")
        results["ratio_median"] = statistics.median(ours) / statistics.median(base)
        results["ratio_p99"] = percentile(ours, 99) / percentile(base, 99)
        print(f"  ratio to baseline: median {results['ratio_median']:.2f}x, p99 {results['ratio_p99']:.2f}x; "
              f"{missed} changes not seen (baseline {base_missed})")
        results["cpu_us_per_change"] = {k: (cpu1[k] - cpu0[k]) / n * 1e6 for k in pids}
        results["load_avg_1min"] = [load_before, os.getloadavg()[0]]
        print(f"  load average (1 min) {load_before:.2f} before the run, {os.getloadavg()[0]:.2f} after")
        results["written_per_change"] = got["written"] / n
        results["contacts_known_offline"] = got["offline"]
        print("  CPU per change: " + ", ".join(f"{k} {v:.0f} us" for k, v in results["cpu_us_per_change"].items())
              + f"; the devices' process wrote {results['written_per_change']:.2f} stanzas per change"
              + " (component link)" * (args.hosting == "component"), flush=True)
        print(json.dumps(results))
    finally:
        if op is not None:
            await op.close()
        if raw is not None:
            await raw.close()
        await devices.stop()
        await services.stop()
        await grid.stop()
        shutil.rmtree(grid.data_dir, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) >= 4 and sys.argv[1] == "--child":
        role, where = sys.argv[2], Path(sys.argv[3])
        profile = sys.argv[4] if len(sys.argv) > 4 else None
        asyncio.run(devices_child(where, profile) if role == "devices" else services_child(where, profile))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--hosting", choices=("c2s", "component"), default="c2s")
    parser.add_argument("--rate", type=float, default=0.0, help="changes per second (default: 1 %% of the devices)")
    parser.add_argument("--changes", type=int, default=0, help="timed changes (default: 30 s worth, at least 1000)")
    parser.add_argument("--login-rounds", type=int, default=2)
    parser.add_argument("--pauses", action="store_true",
                        help="record every process's GC collections and loop stalls (and where each loop was "
                        "while stalled) and lay the slowest changes beside them")
    parser.add_argument("--profile", help="a directory: cProfile of the devices' process and this one (the timed run), "
                        "and of the services' (baseline and run)")
    args = parser.parse_args()
    if args.profile:
        Path(args.profile).mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    if args.pauses:
        os.environ[PAUSES_ENV] = "1"
    asyncio.run(main(args))
