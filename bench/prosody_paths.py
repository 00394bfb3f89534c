#!/usr/bin/env python3
"""What Prosody itself spends per round trip, by the path and shape of the stanzas: where the
server's share of a signed shed goes (bench/fanout.py: ~230 us of Prosody CPU per command
against ~90 us per raw chat round trip).

One client (the bench operator's account, whose roster holds the device) sends N (2000) messages in
flight to JIDs of the devices' component; a bare slixmpp component (no gridpresence code) answers
each, and the server's disco#info queries for the caps in its presence (as a device host does:
unanswered, Prosody's mod_pep asked again at every presence to a bare JID, thousands of queries
that no real grid sends). Paths, per round, all against the same server:

  chat      c2s -> c2s chat message and its echo: the raw baseline of bench/fanout.py
  signed    a message carrying a shed's <openpgp/> element (770 bytes, as the operator sends it:
            an 886-byte stanza) and a short body to the component, chat answer
  full      the same command; answered by a device's presence (714 bytes, outcome in it) to the
            client's full JID
  bare      the same presence to the client's bare JID, from a contact in its roster: how a
            hosted device's change reaches its subscribers (xmpp/component.py)

Printed per path: Prosody CPU per round trip, median and worst of the rounds, and its ratio to
the chat baseline of the same round.

    python bench/prosody_paths.py [--rounds 3] [--n 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from slixmpp import ComponentXMPP
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath

from common import EchoResponder, bench_fleet, client_for, cpu_seconds

from gridpresence.host.grid import Grid
from gridpresence.xmpp.component import COMPONENT_SECRET
from gridpresence.xmpp.session import close_session, open_session

# The caps the device's presence carries (XEP-0115), and the disco#info they hash: the component
# answers the server's query for them, as a device host does (Prosody's mod_pep asks a contact's
# caps when its presence reaches a bare JID; left unanswered, it asks again at every presence).
DISCO_INFO = "http://jabber.org/protocol/disco#info"
CAPS_FEATURES = ("http://jabber.org/protocol/caps", DISCO_INFO)
CAPS_VER = base64.b64encode(hashlib.sha1(
    ("client/pc//device<" + "".join(f + "<" for f in sorted(CAPS_FEATURES))).encode()).digest()).decode()
CAPS_NODE = "urn:gridpresence:caps"
# A shed's command as the operator sends it (the OpenPGP-signed XEP-0373 <signed/> payload), and
# the device's answering presence with the outcome in the issuer's copy (PROTOCOL.md).
SIGNED = ("<openpgp xmlns='urn:xmpp:openpgp:0'>" + "A" * 724 + "</openpgp>")  # a shed's: 724 base64 characters
PRESENCE = (
    "<presence id='{id}' to='{to}' from='dev-0000@devices.localhost/e6b84787d594'><show>away</show>"
    "<status>off, load 0%, 0.0 kW</status><device critical='false' at='2026-12-03T14:54:37.297409Z' kind='load' "
    "xmlns='urn:gridpresence:0' refresh-s='300.0' serial='SN-98FD6459B56C' state='off' seq='4' "
    "transport='component'><telemetry capacity-kw='10.0' kw='0.0' load-pct='0.0'/></device>"
    f"<c xmlns='http://jabber.org/protocol/caps' hash='sha-1' ver='{CAPS_VER}' "
    f"node='{CAPS_NODE}'/><outcome report-seq='4' status='executed' device='dev-0000@devices.localhost' "
    "command-id='a92b210afc9b486c8a34ec849a0abe6a' xmlns='urn:gridpresence:0'><detail>load shed</detail></outcome>"
    "</presence>")
PATHS = ("chat", "signed", "full", "bare")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    grid = Grid(bench_fleet(1, hosting="component"), Path(tempfile.mkdtemp(prefix="gridpaths-")), only=[])
    await grid.start()
    component = ComponentXMPP("devices.localhost", grid.secrets.password(COMPONENT_SECRET), "127.0.0.1",
                              grid.server.ports.component)
    client = client_for(grid, "bench-op")
    echo = EchoResponder(grid.endpoint, grid.secrets)
    waiting: dict[str, asyncio.Future[None]] = {}
    answer = {"path": "chat"}

    def on_command(msg: object) -> None:  # the component's answer, by the path measured
        to = msg["from"]  # type: ignore[index]
        if answer["path"] == "signed":
            component.send_raw(f"<message to='{to}' from='{msg['to']}' type='chat' id='{msg['id']}'>"  # type: ignore[index]
                               f"<body>{msg['id']}</body></message>")  # type: ignore[index]
        else:
            component.send_raw(PRESENCE.format(id=msg["id"], to=to if answer["path"] == "full" else to.bare))  # type: ignore[index]

    def back(key: str) -> None:
        fut = waiting.pop(key, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    asked = {"disco": 0}

    def on_disco(iq: object) -> None:  # the server's caps query (mod_pep), answered with what the caps hash
        xml = iq.xml  # type: ignore[attr-defined]
        asked["disco"] += 1
        node = xml.find(f"{{{DISCO_INFO}}}query").get("node", "")
        features = "".join(f"<feature var='{f}'/>" for f in CAPS_FEATURES)
        component.send_raw(f"<iq type='result' id='{xml.get('id')}' to='{xml.get('from')}' from='{xml.get('to')}'>"
                           f"<query xmlns='{DISCO_INFO}' node='{node}'><identity category='client' type='pc' "
                           f"name='device'/>{features}</query></iq>")

    component.register_handler(Callback("caps query", MatchXPath(f"{{jabber:component:accept}}iq/{{{DISCO_INFO}}}query"),
                                        on_disco))
    component.add_event_handler("message", on_command)
    client.add_event_handler("message", lambda msg: back(msg["body"]))  # the echo answers with the body
    client.add_event_handler("presence", lambda pres: back(pres["id"]))
    component.connect()
    await component.wait_until("session_start", 20)
    await open_session(client, grid.endpoint)
    client.send_presence()
    await echo.start()
    prosody = int(grid.server.pidfile_path.read_text().strip())

    async def run(path: str) -> float:
        """Prosody CPU seconds for n round trips of ``path``, all in flight."""
        answer["path"] = path
        loop = asyncio.get_running_loop()
        futs = []
        before = cpu_seconds(prosody)
        for i in range(args.n):
            tag = f"p{i}-{time.perf_counter_ns()}"
            futs.append(waiting.setdefault(tag, loop.create_future()))
            if path == "chat":
                client.send_raw(f"<message to='echo-b@localhost/bench' type='chat' id='{tag}'><body>{tag}</body></message>")
            else:  # with a body: a body-less one never reached a bare ComponentXMPP's handlers here
                client.send_raw(f"<message to='dev-0000@devices.localhost/r' type='normal' id='{tag}'>"
                                f"<body>{tag}</body>{SIGNED}</message>")
        await asyncio.wait_for(asyncio.gather(*futs), 120)
        await asyncio.sleep(0.2)  # Prosody's last writes
        return cpu_seconds(prosody) - before

    try:
        await run("chat")  # warm-up
        spent: dict[str, list[float]] = {p: [] for p in PATHS}
        for _ in range(args.rounds):
            for path in PATHS:
                spent[path].append(await run(path) / args.n)
        print(f"Prosody CPU per round trip, {args.n} in flight, {args.rounds} rounds (median, worst; ratio to chat; "
              f"{asked['disco']} caps queries from the server answered):")
        for path in PATHS:
            ratios = [s / c for s, c in zip(spent[path], spent["chat"])]
            print(f"  {path:<7} median {statistics.median(spent[path]) * 1e6:6.0f} us  worst "
                  f"{max(spent[path]) * 1e6:6.0f} us   ratio {statistics.median(ratios):.2f}x "
                  f"(worst {max(ratios):.2f}x)", flush=True)
    finally:
        await echo.stop()
        await close_session(client)
        component.disconnect()
        await asyncio.sleep(0.5)
        await grid.stop()
        shutil.rmtree(grid.data_dir, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
