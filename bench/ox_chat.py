#!/usr/bin/env python3
"""Signed, encrypted chat (OpenPGP for XMPP) with a device bot: the operator seals `status`,
the device opens it (decrypt, verify, checks), answers and seals the answer, the operator
opens it. Same run, same server, interleaved: the same `status` as plain chat, and the raw
slixmpp echo baseline. The ratio OX / plain is what the OpenPGP work costs per command.

    python bench/ox_chat.py [--devices 5] [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

from common import chat_bench, summary
from slixmpp import Message

from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.host.grid import Grid
from gridpresence.protocol.openpgp import FALLBACK_BODY, ox
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.ox import open_chat, seal_chat

OPERATOR = "bench-op@localhost"


class Operator:
    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.client = make_client(f"{OPERATOR}/ox", grid.secrets.password("bench-op"), grid.endpoint)
        self.key = grid.keys.secret("bench-op")
        # Announces the operator's key on PEP (devices look it up there) and pins the devices' keys.
        self.keyring = PepKeyring(self.client, PartyKeys(secret_file=grid.keys.secret_path("bench-op")))
        self.reply: asyncio.Future[Message] | None = None
        self.client.add_event_handler("message", self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg["type"] == "chat" and self.reply is not None and not self.reply.done():
            self.reply.set_result(msg)

    async def _exchange(self, msg: Message) -> Message:
        self.reply = asyncio.get_running_loop().create_future()
        msg.send()
        return await asyncio.wait_for(self.reply, 10)

    async def plain(self, to: str, text: str) -> float:
        t0 = time.perf_counter()
        await self._exchange(self.client.make_message(mto=to, mbody=text, mtype="chat"))
        return time.perf_counter() - t0

    async def ox(self, to: str, text: str) -> float:
        t0 = time.perf_counter()
        device_key = await self.keyring.key_for(to)
        msg = self.client.make_message(mto=to, mbody=FALLBACK_BODY, mtype="chat")
        msg.append(seal_chat(text, self.key, to, device_key))
        reply = await self._exchange(msg)
        answer = reply.xml.find(ox("openpgp"))
        if answer is None:
            raise SystemExit(f"the device answered in plain text: {reply['body']}")
        await open_chat(answer, to, OPERATOR, self.key, self.keyring)
        return time.perf_counter() - t0


async def main(devices: int, rounds: int) -> None:
    async with chat_bench(devices, "oxbench-") as (grid, pair):
        op = Operator(grid)
        await open_session(op.client, grid.endpoint)
        op.client.send_presence()
        await op.keyring.announced()
        jids = [f"{d.name}@localhost" for d in grid.fleet.devices]
        await pair.sequential(20)  # warm-up
        for i in range(20):
            await op.plain(jids[i % devices], "status")
            await op.ox(jids[i % devices], "status")
        base: list[float] = []
        plain: list[float] = []
        ox: list[float] = []
        for i in range(rounds):  # interleaved, so drift in the machine's load hits all three alike
            base.extend(await pair.sequential(1))
            plain.append(await op.plain(jids[i % devices], "status"))
            ox.append(await op.ox(jids[i % devices], "status"))
        print(f"OX chat round trips, {devices} device bots, {rounds} rounds")
        results = {
            "baseline echo": summary("baseline: raw slixmpp chat echo", base),
            "plain status": summary("plain chat 'status' to a device bot", plain),
            "ox status": summary("OX 'status' (seal, open, answer, seal, open)", ox),
        }
        for name, samples in (("plain status", plain), ("ox status", ox)):
            results[name]["ratio_to_baseline"] = statistics.median(samples) / statistics.median(base)
        ratio = statistics.median(ox) / statistics.median(plain)
        print(f"  ratio OX / plain chat median: {ratio:.2f}; OX / baseline: {results['ox status']['ratio_to_baseline']:.2f}")
        results["ox status"]["ratio_to_plain"] = ratio
        print(json.dumps(results))
        await close_session(op.client)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.devices, args.rounds))
