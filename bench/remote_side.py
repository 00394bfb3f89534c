#!/usr/bin/env python3
"""The far end of a benchmark, in its own process as it would be on real hardware: the device
bots of a bench grid plus the baseline's echo responder. Prints "ready" once all are online and
runs until stdin closes."""

from __future__ import annotations

import asyncio
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
    await asyncio.gather(bots.start(timeout=600), echo.start())
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    await asyncio.gather(bots.stop(), echo.stop())


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), float(sys.argv[2])))
