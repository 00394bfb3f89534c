"""Orderly stops on Ctrl-C and SIGTERM for the long-running commands (up, bots, relay)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable


def stop_signal() -> asyncio.Event:
    """Ctrl-C / SIGTERM set the returned event. Installed before anything starts, so a signal
    during start-up still ends in an orderly stop (devices say goodbye, Prosody is stopped)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def unless_stopped(work: Awaitable[None], stop: asyncio.Event) -> None:
    """Run `work` to its end, or cancel it when a stop signal comes first."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    if not task.done():
        task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
