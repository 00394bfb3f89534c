#!/usr/bin/env python3
"""Cost of public keys over PEP (XEP-0373): device logins with and without key announcement,
and how long a party waits for another's key.

Logins: N device bots log in 16 at a time (as FleetBots does), first without keys (the
baseline), then announcing their keys for the first time (three IQs each), then again with
the keys already announced (one IQ each: the metadata lists the key), then the baseline again;
per-device login time and the whole fleet's, ratio to the baseline's median.
Lookups: an operator fetches every device's key one at a time (metadata, key, subscription:
uncached ``key_for``), against a raw one-IQ PEP read of the same node (the baseline);
then every device's key again from the cache.

    python bench/keys.py [--devices 1000] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from common import bench_fleet, percentile, summary

from gridpresence.device.agent import DeviceAgent
from gridpresence.host.fleet import LOGIN_CONCURRENCY, FleetBots
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.host.grid import Grid
from gridpresence.protocol.ox_xml import PUBLIC_KEYS_NODE
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring


async def login_fleet(grid: Grid, with_keys: bool) -> tuple[float, list[float]]:
    """Log every device in (16 at a time), time each login (until its key is announced) and the
    whole fleet's; then log them out."""
    bots = FleetBots(grid.fleet, grid.endpoint, grid.secrets, with_services=False,
                     only=[d.name for d in grid.fleet.devices],
                     data_dir=grid.data_dir if with_keys else None)
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    each: list[float] = []

    async def started(bot: DeviceAgent) -> None:
        """As FleetBots.start does it: the login in the gate, the key announcement after it."""
        async with gate:
            t0 = time.perf_counter()
            await bot.login()
        if with_keys and not await bot.keyring.announced():
            raise SystemExit(f"{bot.jid} did not announce its key")
        each.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(started(b) for b in bots.devices.values()))
    total = time.perf_counter() - t0
    await bots.stop()
    return total, each


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    fleet = bench_fleet(args.devices)
    t0 = time.perf_counter()
    grid = Grid(fleet, Path(tempfile.mkdtemp(prefix="gridbench-keys-")), bots=False)
    await grid.start()
    print(f"{args.devices} accounts and keys provisioned in {time.perf_counter() - t0:.1f} s", flush=True)
    try:
        plain_total, plain_each = await login_fleet(grid, with_keys=False)
        first_total, first_each = await login_fleet(grid, with_keys=True)
        plain_totals, again_totals = [plain_total], []
        again_each: list[float] = []
        for _ in range(args.rounds):
            total, each = await login_fleet(grid, with_keys=True)
            again_totals.append(total)
            again_each += each
            total, each = await login_fleet(grid, with_keys=False)
            plain_totals.append(total)
            plain_each += each
        base = statistics.median(plain_totals)
        print(f"{args.devices} device logins, {LOGIN_CONCURRENCY} at a time:")
        summary("one login, no key (baseline)", plain_each)
        summary("one login, key announced first time", first_each)
        summary("one login, key already announced", again_each)
        summary(f"all {args.devices}, no key (baseline)", plain_totals)
        summary(f"all {args.devices}, announcing (first time)", [first_total])
        summary(f"all {args.devices}, already announced", again_totals)
        print(f"  ratio to baseline: first announcement {first_total / base:.2f}x, "
              f"already announced {statistics.median(again_totals) / base:.2f}x", flush=True)

        # Lookups, by an operator of the grid.
        acc = grid.connection.operator()
        client = make_client(f"{acc.jid}/bench", acc.password, grid.endpoint)
        ring = PepKeyring(client, PartyKeys(None, None))
        await open_session(client, grid.endpoint)
        client.send_presence()
        jids = [fleet.jid(d.name) for d in fleet.devices]
        pubsub = client.plugin["xep_0060"]
        raw: list[float] = []
        for jid in jids:
            t0 = time.perf_counter()
            await pubsub.get_items(jid, PUBLIC_KEYS_NODE, max_items=1)
            raw.append(time.perf_counter() - t0)
        fetch: list[float] = []
        for jid in jids:
            t0 = time.perf_counter()
            await ring.key_for(jid)
            fetch.append(time.perf_counter() - t0)
        cached: list[float] = []
        for jid in jids:
            t0 = time.perf_counter()
            ring.cached(jid)
            cached.append(time.perf_counter() - t0)
        print(f"key lookups of {len(jids)} devices, one at a time:")
        summary("raw PEP read of the metadata node (baseline)", raw)
        summary("key_for, first time (fetch, check, pin)", fetch)
        summary("cached(), afterwards", cached)
        print(f"  ratio to one raw PEP read: key_for {statistics.median(fetch) / statistics.median(raw):.2f}x, "
              f"cached {statistics.median(cached) / statistics.median(raw):.4f}x;  "
              f"p99 key_for {percentile(fetch, 99) * 1000:.2f} ms", flush=True)
        await close_session(client)
    finally:
        await grid.stop()


if __name__ == "__main__":
    asyncio.run(main())
