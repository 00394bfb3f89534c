#!/usr/bin/env python3
"""One field gateway hosting N Modbus IEDs (the shipped load-controller map) on one pymodbus
server (its own process, so this process's CPU is the gateway's), against a raw pymodbus read
loop of the same registers measured in the same run.

- Poll cycle: every IED read once, all at once (the gateway: FieldIed.poll(), i.e. the driver's
  batched reads, decoding and the presence model's validation; the baseline: the same requests
  with bare AsyncModbusTcpClient calls, one connection per IED as the gateway has). Cycle time,
  and CPU per IED per poll (process time over the cycles).
- Memory per IED: RSS growth of this process from creating the gateway to every identity
  logged in (field link, FieldDevice, device bot and its XMPP session), over N.
- Presence latency: a register written by a separate Modbus client (load 20 % <-> 60 %) until
  the operator sees the IED's presence change, with every IED polled every --poll seconds.
  Meanwhile one slow IED (bench-1: every request answered --slow-ms late) is commanded shed /
  restore back to back (--slow-ms 0: not at all), and the changes are on the other IEDs: a slow
  IED's commands must not delay the others' presence (issue 15: the command path is awaited).

Goals (issue 15): gateway poll cost <= 1.5x the raw loop; register -> operator p99 <= one poll
interval + 50 ms.

    python bench/gateway.py [--ieds 200] [--cycles 20] [--poll 1.0] [--changes 30] [--slow-ms 300]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common import summary

from pymodbus.client import AsyncModbusTcpClient

from gridpresence.config import parse_fleet
from gridpresence.gateway.field_device import FieldIed, FieldLoop
from gridpresence.gateway.site import load_site
from gridpresence.host.gateway import Gateway
from gridpresence.host.grid import SECRETS_FILE, Grid
from gridpresence.operator.library import GridOperator
from gridpresence.server.accounts import Secrets
from gridpresence.server.ports import free_port

UNITS_PER_SERVER = 200  # unit ids 1..247 per Modbus connection target; one server holds them


def serve(port: int, units: int, ready: multiprocessing.synchronize.Event,  # type: ignore[name-defined]
          slow_s: Any) -> None:
    """The IEDs: one pymodbus server, ``units`` unit ids with the load controller's tables;
    unit 1 answers every request ``slow_s.value`` seconds late (its connection waits, the
    others do not; the poll-cycle runs keep it at 0)."""
    from pymodbus.server import ModbusTcpServer
    from pymodbus.simulator import DataType, SimData, SimDevice

    async def slow(*_args: object) -> None:
        if slow_s.value:
            await asyncio.sleep(slow_s.value)

    def device(unit: int) -> SimDevice:
        return SimDevice(unit, simdata=([SimData(0, count=16, values=False, datatype=DataType.BITS)],
                                        [SimData(0, count=16, values=False, datatype=DataType.BITS)],
                                        [SimData(0, count=16, values=[200, 1000, 200, 0, 0, 1234] + [0] * 10,
                                                 datatype=DataType.REGISTERS)],
                                        [SimData(0, count=16, values=0, datatype=DataType.REGISTERS)]),
                         action=slow if unit == 1 else None)

    async def main() -> None:
        server = ModbusTcpServer([device(u) for u in range(1, units + 1)], address=("127.0.0.1", port))
        await server.serve_forever(background=True)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


# The slow IED's map: the load controller's, with the shed coil itself read back (the bench's
# simulator has no logic linking it to "running").
SLOW_MAP = """
[maps.slow-load]
protocol = "modbus"
points.shed = { table = "coil", address = 0 }
points.running = { table = "discrete_input", address = 0 }
points.kw = { table = "holding", address = 0, scale = 0.1 }
points.capacity_kw = { table = "holding", address = 1, scale = 0.1 }
points.load_pct = { table = "holding", address = 2, scale = 0.1 }
telemetry = { kw = "kw", capacity_kw = "capacity_kw", load_pct = "load_pct" }
state = { on = "running" }
commands.shed = { writes = [{ point = "shed", value = true }], confirm = { point = "shed", equals = true }, timeout_s = 5 }
commands.restore = { writes = [{ point = "shed", value = false }], confirm = { point = "shed", equals = false }, timeout_s = 5 }
"""


def site_text(n: int, port: int, poll_s: float, slow: bool = False) -> str:
    return "".join(
        f'[[ieds]]\nname = "bench-{i}"\nkind = "load"\n'
        f'map = "{"slow-load" if slow and i == 1 else "modbus-load-controller"}"\npoll_s = {poll_s}\n'
        f'link = {{ protocol = "modbus-tcp", host = "127.0.0.1", port = {port}, unit = {i}, timeout_s = 2.0 }}\n\n'
        for i in range(1, n + 1)) + (SLOW_MAP if slow else "")


async def raw_cycles(n: int, port: int, cycles: int) -> tuple[list[float], float]:
    """The baseline: the registers the gateway polls (inputs 0-1, holding 0-5; the shed coil is
    only written) with bare calls."""
    clients = [AsyncModbusTcpClient("127.0.0.1", port=port, timeout=2.0) for _ in range(n)]
    await asyncio.gather(*(c.connect() for c in clients))

    async def one(client: AsyncModbusTcpClient, unit: int) -> None:
        await client.read_discrete_inputs(0, count=2, device_id=unit)
        await client.read_holding_registers(0, count=6, device_id=unit)

    times = []
    cpu0 = time.process_time()
    for _ in range(cycles):
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, u) for u, c in enumerate(clients, start=1)))
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    for c in clients:
        c.close()
    return times, cpu


async def gateway_cycles(site_path: Path, cycles: int, fresh: bool = False) -> tuple[list[float], float, int]:
    """The gateway's polls of the same IEDs, on its field-I/O thread. The bench's registers do
    not change, so a poll reuses its validated presence; ``fresh`` forgets it before each cycle
    (the cost when every reading changes at every poll)."""
    site = load_site(site_path)
    loop = FieldLoop()
    loop.start()
    fields = [FieldIed(ied, site.map_for(ied)) for ied in site.ieds]

    async def cycle() -> None:
        await asyncio.gather(*(f.poll() for f in fields))

    await asyncio.wrap_future(loop.submit(cycle()))  # connect
    requests0 = sum(f.driver.requests for f in fields)  # type: ignore[attr-defined]
    times = []
    cpu0 = time.process_time()
    for _ in range(cycles):
        if fresh:
            for f in fields:
                f._last_good = None  # noqa: SLF001  (what a changed reading does)
        t0 = time.perf_counter()
        await asyncio.wrap_future(loop.submit(cycle()))
        times.append(time.perf_counter() - t0)
    cpu = time.process_time() - cpu0
    requests = sum(f.driver.requests for f in fields) - requests0  # type: ignore[attr-defined]
    bad = [f.ied.name for f in fields if f.status.report is None]
    if bad:
        raise SystemExit(f"gateway polls without presence: {bad[:5]}")
    await asyncio.to_thread(loop.stop)
    return times, cpu, requests // cycles


def rss_kib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() // 1024


async def command_slow_ied(alice: GridOperator, times: list[float]) -> None:
    """bench-1, the slow IED: shed, restore, shed... back to back, until cancelled."""
    action = "shed"
    while True:
        t0 = time.perf_counter()
        outcome = await alice.command("bench-1", action, ttl_s=60)
        times.append(time.perf_counter() - t0)
        if not outcome.ok:
            print(f"  slow IED: {action} {outcome.status.value}: {outcome.detail}", flush=True)
        action = "restore" if action == "shed" else "shed"


async def latency(site_path: Path, n: int, port: int, changes: int, poll_s: float,
                  slow: bool) -> tuple[list[float], float, list[float]]:
    with tempfile.TemporaryDirectory(prefix="gw-bench-") as tmp:
        fleet = parse_fleet({"operators": [{"name": "alice"}], "devices": [{"name": "sim", "kind": "load",
                                                                             "rated_kw": 10}],
                             "sites": [{"file": str(site_path)}]}, "bench", Path(tmp))
        grid = Grid(fleet, Path(tmp) / "grid", only=["sim"])
        await grid.start()
        try:
            before = rss_kib()
            gateway = Gateway(load_site(site_path), grid.fleet, grid.endpoint,
                              Secrets(grid.data_dir / SECRETS_FILE), data_dir=grid.data_dir)
            await gateway.start(timeout=300)
            per_ied_kib = (rss_kib() - before) / n
            alice = GridOperator.from_connection(grid.connection, operator="alice")
            await alice.connect(timeout=120, settle_s=2.0)
            writer = AsyncModbusTcpClient("127.0.0.1", port=port)
            await writer.connect()
            rng = random.Random(15)
            samples: list[float] = []
            slow_times: list[float] = []
            commanding = asyncio.create_task(command_slow_ied(alice, slow_times)) if slow else None
            try:
                await asyncio.sleep(2 * poll_s)
                for i in range(changes):
                    unit = rng.randrange(2 if slow else 1, n + 1)
                    name = f"bench-{unit}"
                    now = alice.device(name).report.telemetry.load_pct  # type: ignore[union-attr]
                    target = 60.0 if now != 60.0 else 20.0
                    await asyncio.sleep(rng.uniform(0, poll_s))  # any phase of the poll
                    t0 = time.perf_counter()
                    await writer.write_register(2, int(target * 10), device_id=unit)
                    await alice.wait_for(lambda d, nm=name, t=target: d[nm].report is not None
                                         and d[nm].report.telemetry.load_pct == t, timeout=10)
                    samples.append(time.perf_counter() - t0)
            finally:
                if commanding is not None:
                    commanding.cancel()
                    await asyncio.gather(commanding, return_exceptions=True)
                writer.close()
                await alice.close()
                await gateway.stop()
        finally:
            await grid.stop()
    return samples, per_ied_kib, slow_times


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ieds", type=int, default=200)
    ap.add_argument("--cycles", type=int, default=20)
    ap.add_argument("--poll", type=float, default=1.0)
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--slow-ms", type=float, default=300.0, help="bench-1's answer delay while it is commanded "
                    "during the latency run (0: no slow IED)")
    args = ap.parse_args()
    if not 1 <= args.ieds <= UNITS_PER_SERVER:
        raise SystemExit(f"--ieds: 1..{UNITS_PER_SERVER}")
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    slow = args.slow_ms > 0 and args.ieds > 1
    slow_s = ctx.Value("d", 0.0)
    server = ctx.Process(target=serve, args=(port, args.ieds, ready, slow_s), daemon=True)
    server.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the Modbus server did not start")
        with tempfile.TemporaryDirectory(prefix="gw-site-") as tmp:
            site_path = Path(tmp) / "site.toml"
            site_path.write_text(site_text(args.ieds, port, args.poll))
            latency_site = Path(tmp) / "latency-site.toml"
            latency_site.write_text(site_text(args.ieds, port, args.poll, slow))
            print(f"{args.ieds} Modbus IEDs on one pymodbus server (pid {server.pid}), {args.cycles} poll cycles",
                  flush=True)
            # Alternate so drift on the machine hits both alike.
            raw_t, raw_cpu, gw_t, gw_cpu, new_t, new_cpu = [], 0.0, [], 0.0, [], 0.0
            requests = 0
            for _ in range(2):
                t, c = await raw_cycles(args.ieds, port, args.cycles // 2)
                raw_t += t
                raw_cpu += c
                t, c, requests = await gateway_cycles(site_path, args.cycles // 2)
                gw_t += t
                gw_cpu += c
                t, c, _ = await gateway_cycles(site_path, args.cycles // 2, fresh=True)
                new_t += t
                new_cpu += c
            raw = summary("raw pymodbus read loop: cycle", raw_t)
            gw = summary("gateway polls (FieldIed.poll): cycle", gw_t)
            new = summary("gateway polls, every reading new: cycle", new_t)
            polls = args.ieds * len(raw_t)
            print(f"  requests per IED per poll: gateway {requests / args.ieds:.1f}, raw 2.0")
            for label, cpu in (("gateway", gw_cpu), ("every reading new", new_cpu)):
                print(f"  CPU per IED per poll: raw {raw_cpu / polls * 1e6:8.1f} us   {label} {cpu / polls * 1e6:8.1f} us"
                      f"   ratio {cpu / raw_cpu:.2f}x (goal <= 1.5x)")
            print(f"  cycle time ratio (median): {gw['median_ms'] / raw['median_ms']:.2f}x, every reading new "
                  f"{new['median_ms'] / raw['median_ms']:.2f}x (goal <= 1.5x)")
            slow_s.value = args.slow_ms / 1000 if slow else 0.0
            samples, kib, slow_times = await latency(latency_site, args.ieds, port, args.changes, args.poll, slow)
            if slow:
                print(f"  while bench-1 answers {args.slow_ms:g} ms late and is commanded back to back:")
                summary("slow IED's command -> outcome", slow_times)
            lat = summary("register change -> operator presence", samples)
            print(f"  memory per IED (field link + bot + XMPP session): {kib:.0f} KiB")
            goal = args.poll * 1000 + 50
            print(f"  latency p99 {lat['p99_ms']:.0f} ms vs goal {goal:.0f} ms (one poll + 50 ms): "
                  f"{'met' if lat['p99_ms'] <= goal else 'NOT met'}; median / poll interval "
                  f"{statistics.median(samples) / args.poll:.2f}")
    finally:
        server.terminate()
        server.join(10)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
