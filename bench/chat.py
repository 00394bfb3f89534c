#!/usr/bin/env python3
"""Chat round trips with a device bot: an operator types `status` (or `shed`/`restore`) and
waits for the bot's reply. Baseline, same run, same server: a plain slixmpp chat message to an
echo client and back. The ratio is what parsing, the command path and a reply for people cost.

    python bench/chat.py [--devices 20] [--rounds 300]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from common import chat_bench, summary

from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.host.grid import Grid


class Operator:
    def __init__(self, grid: Grid) -> None:
        self.client = make_client("bench-op@localhost/chat", grid.secrets.password("bench-op"), grid.endpoint)
        self.endpoint = grid.endpoint
        self.reply: asyncio.Future[float] | None = None
        self.client.add_event_handler("message", self._on_message)

    def _on_message(self, msg: object) -> None:
        if self.reply is not None and not self.reply.done():
            self.reply.set_result(time.perf_counter())

    async def ask(self, to: str, text: str) -> float:
        self.reply = asyncio.get_running_loop().create_future()
        t0 = time.perf_counter()
        self.client.send_message(mto=to, mbody=text, mtype="chat")
        return await asyncio.wait_for(self.reply, 10) - t0


async def main(devices: int, rounds: int) -> None:
    async with chat_bench(devices, "chatbench-") as (grid, pair):
        op = Operator(grid)
        await open_session(op.client, op.endpoint)
        op.client.send_presence()
        names = [d.name for d in grid.fleet.devices]
        await pair.sequential(20)  # warm-up
        for i in range(20):
            await op.ask(f"{names[i % devices]}@localhost", "status")
        results: dict[str, dict[str, float]] = {}
        base: list[float] = []
        status: list[float] = []
        action: list[float] = []
        for i in range(rounds):  # interleaved, so drift in the machine's load hits all three alike
            base.extend(await pair.sequential(1))
            status.append(await op.ask(f"{names[i % devices]}@localhost", "status"))
            action.append(await op.ask(f"{names[i % devices]}@localhost", "shed" if i // devices % 2 == 0 else "restore"))
        print(f"chat round trips, {devices} device bots, {rounds} rounds")
        results["baseline echo"] = summary("baseline: raw slixmpp chat echo", base)
        results["status"] = summary("chat 'status' to a device bot", status)
        results["shed/restore"] = summary("chat 'shed'/'restore' (command path)", action)
        for name in ("status", "shed/restore"):
            ratio = statistics.median({"status": status, "shed/restore": action}[name]) / statistics.median(base)
            print(f"  ratio {name} / baseline median: {ratio:.2f}")
            results[name]["ratio_to_baseline"] = ratio
        print(json.dumps(results))
        await close_session(op.client)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    asyncio.run(main(args.devices, args.rounds))
