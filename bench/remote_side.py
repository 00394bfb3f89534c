#!/usr/bin/env python3
"""The far end of a benchmark, in its own process as it would be on real hardware: the device
bots of a bench grid plus the baseline's echo responder. Prints "ready" once all are online and
runs until stdin closes.

Lines on stdin steer a profile of this process (bench/fanout.py --profile): ``profile`` starts
cProfile, ``dump PATH`` stops it, writes its stats to PATH and answers ``dumped``."""

from __future__ import annotations

import asyncio
import cProfile
import sys
from pathlib import Path

from common import EchoResponder

from gridpresence.server.accounts import Secrets
from gridpresence.host.fleet import FleetBots
from gridpresence.xmpp.session import ConnectionInfo
from gridpresence.config import load_fleet
from gridpresence.host.grid import CONNECTION_FILE, FLEET_COPY, SECRETS_FILE


async def main(data: Path, tick_s: float) -> None:
    info = ConnectionInfo.load(data / CONNECTION_FILE)
    fleet = load_fleet(data / FLEET_COPY)
    secrets = Secrets(data / SECRETS_FILE)
    bots = FleetBots(fleet, info.server, secrets, only=[d.name for d in fleet.devices], tick_s=tick_s,
                     with_services=False, data_dir=data)  # as deployed: each device announces its key
    echo = EchoResponder(info.server, secrets)
    await asyncio.gather(bots.start(), echo.start())
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    profile: cProfile.Profile | None = None
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        word, _, arg = line.strip().partition(" ")
        if word == "profile":
            profile = cProfile.Profile()
            profile.enable()
        elif word == "dump" and profile is not None:
            profile.disable()
            profile.dump_stats(arg)
            profile = None
            print("dumped", flush=True)
    await asyncio.gather(bots.stop(), echo.stop())


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2])))
