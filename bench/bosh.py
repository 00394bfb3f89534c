#!/usr/bin/env python3
"""TCP against BOSH, same run, same server: command/outcome round trips and throughput, and
the time from "XMPP port blocked" to "online via BOSH".

- Round trip: the operator (TCP) sends READ to a device and waits for its outcome, one at a
  time; one device is on the XMPP port, its twin on BOSH over HTTPS. Rounds alternate.
- Throughput: N commands in flight at once to one device; command/outcome pairs per second.
- Blocked to online: a device bot process starts in a network namespace whose nftables
  rules drop the XMPP port (outbound HTTP(S) only); time until the operator sees it present
  over BOSH. Baseline: the same start with no firewall (online over TCP).

Goals (issue 3): BOSH median RTT <= 2x TCP; BOSH throughput >= 50 % of TCP; blocked to
online <= 5 s. Needs root (namespaces, nftables).

    python bench/bosh.py [--rounds 7] [--n 200] [--inflight 500] [--starts 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import percentile, summary

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import netlab  # noqa: E402  (the firewall tests' namespace helpers)

from gridpresence.host.fleet import device_agent  # noqa: E402
from gridpresence.security.pep_keyring import PartyKeys  # noqa: E402
from gridpresence.operator.library import GridOperator  # noqa: E402
from gridpresence.config import parse_fleet  # noqa: E402
from gridpresence.host.grid import Grid  # noqa: E402
from gridpresence.protocol import Action, OutcomeStatus  # noqa: E402
from gridpresence.server import ServerPorts, free_port  # noqa: E402
from gridpresence.transport.policy import ConnectionPolicy  # noqa: E402

FLEET = {
    "domain": "grid.test",
    "presence_grace_s": 5.0,
    "operators": [{"name": "bench-op"}],
    "devices": [{"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 300} for n in ("dev-tcp", "dev-bosh", "dev-ns")],
}


async def round_trips(op: GridOperator, name: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        outcome = await op.command(name, Action.READ, ttl_s=30)
        out.append(time.perf_counter() - t0)
        if outcome.status is not OutcomeStatus.EXECUTED:
            raise SystemExit(f"{name}: {outcome.summary()}")
    return out


async def in_flight(op: GridOperator, name: str, n: int) -> float:
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(op.command(name, Action.READ, ttl_s=60) for _ in range(n)))
    elapsed = time.perf_counter() - t0
    if any(o.status is not OutcomeStatus.EXECUTED for o in outcomes):
        raise SystemExit(f"{name}: not every command executed")
    return n / elapsed


async def time_to_online(lab: netlab.Lab, op: GridOperator, firewall: bool) -> tuple[float, str | None]:
    lab.web_only("sec1") if firewall else lab.firewall("sec1", None)
    t0 = time.perf_counter()
    bot = await lab.start_bot("sec1", "dev-ns")
    try:
        await op.wait_for(lambda d: d["dev-ns"].present, timeout=30)
        return time.perf_counter() - t0, op.devices["dev-ns"].transport
    finally:
        await netlab.stop_bot(bot, graceful=True)
        await op.wait_for(lambda d: not d["dev-ns"].present, timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--n", type=int, default=200, help="sequential round trips per transport per round")
    parser.add_argument("--inflight", type=int, default=500, help="commands in flight at once")
    parser.add_argument("--starts", type=int, default=3, help="device starts per case (blocked, open)")
    args = parser.parse_args()
    fleet = parse_fleet(FLEET)
    with netlab.namespaces() as names:
        data = Path(tempfile.mkdtemp(prefix="boshbench-"))
        ports = ServerPorts(c2s=free_port(netlab.PUBLIC), http=80, https=443, component=free_port(netlab.PUBLIC))
        grid = Grid(fleet, data, bind=netlab.PUBLIC, ports=ports, bots=False)
        await grid.start()
        lab = netlab.Lab(names, grid, fleet, data)
        devices = {name: device_agent(fleet, name, grid.endpoint, grid.secrets.password(name),
                                        PartyKeys.in_data_dir(data, name), tick_s=300)
                   for name in ("dev-tcp", "dev-bosh")}
        devices["dev-bosh"].client.policy = ConnectionPolicy(use_tcp=False)
        op = GridOperator.from_connection(grid.connection, resource="bench")
        try:
            for dev in devices.values():
                await dev.start()
            assert devices["dev-tcp"].client.transport_name == "tcp"
            assert devices["dev-bosh"].client.transport_name == "bosh"
            await op.connect(settle_s=5)
            for name in devices:
                await round_trips(op, name, 50)  # warm-up
            rtt: dict[str, list[float]] = {n: [] for n in devices}
            tput: dict[str, list[float]] = {n: [] for n in devices}
            rtt_ratio, tput_ratio = [], []
            for _ in range(args.rounds):
                for name in devices:
                    rtt[name] += await round_trips(op, name, args.n)
                    tput[name].append(await in_flight(op, name, args.inflight))
                rtt_ratio.append(statistics.median(rtt["dev-bosh"][-args.n:]) / statistics.median(rtt["dev-tcp"][-args.n:]))
                tput_ratio.append(tput["dev-bosh"][-1] / tput["dev-tcp"][-1])
            results: dict[str, object] = {}
            print(f"command/outcome round trip, one at a time ({args.rounds} rounds x {args.n}):")
            results["rtt_tcp"] = summary("TCP (XMPP port)", rtt["dev-tcp"])
            results["rtt_bosh"] = summary("BOSH (HTTPS)", rtt["dev-bosh"])
            results["rtt_ratio_median"] = statistics.median(rtt_ratio)
            print(f"  BOSH/TCP median round trip: {results['rtt_ratio_median']:.2f}x (goal <= 2x; "
                  f"per-round {min(rtt_ratio):.2f}..{max(rtt_ratio):.2f})")
            print(f"throughput, {args.inflight} commands in flight to one device:")
            for name, label in (("dev-tcp", "TCP"), ("dev-bosh", "BOSH")):
                med = statistics.median(tput[name])
                print(f"  {label:<5} median {med:8.0f} pairs/s   worst round {min(tput[name]):8.0f} pairs/s")
                results[f"throughput_{label.lower()}_per_s"] = med
            results["throughput_ratio_median"] = statistics.median(tput_ratio)
            print(f"  BOSH/TCP throughput: {results['throughput_ratio_median']:.0%} (goal >= 50 %; "
                  f"per-round {min(tput_ratio):.0%}..{max(tput_ratio):.0%})")
            print(f"device process start to online ({args.starts} starts each):")
            opened, blocked = [], []
            for _ in range(args.starts):
                t, transport = await time_to_online(lab, op, firewall=False)
                assert transport == "tcp", transport
                opened.append(t)
                t, transport = await time_to_online(lab, op, firewall=True)
                assert transport == "bosh", transport
                blocked.append(t)
            results["online_open_tcp"] = summary("no firewall (online over TCP)", opened)
            results["online_blocked_bosh"] = summary("XMPP port blocked (online over BOSH)", blocked)
            extra = statistics.median(blocked) - statistics.median(opened)
            results["fallback_cost_s"] = extra
            print(f"  blocked to online via BOSH: median {statistics.median(blocked):.2f} s, worst "
                  f"{percentile(blocked, 99):.2f} s (goal <= 5 s); fallback adds {extra:.2f} s to a plain start")
            print(json.dumps(results))
        finally:
            await op.close()
            for dev in devices.values():
                await dev.stop()
            for role in names:
                lab.firewall(role, None)
            await grid.stop()


if __name__ == "__main__":
    asyncio.run(main())
