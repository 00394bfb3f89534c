"""A misbehaving BOSH peer: every bad answer ends in a retry or a clear error, never a hang.

The peer is a small real HTTP server started here (Prosody never sends these answers), and
the client side is the real BoshTransport and GridClient.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import pytest_asyncio
from aiohttp import web

from gridpresence.xmpp.session import Endpoint, SessionError, make_client, open_session
from gridpresence.server import free_port
from gridpresence.transport.bosh import MAX_ATTEMPTS, BoshTransport
from gridpresence.transport.bosh_session import NS_HTTPBIND, BoshError
from gridpresence.transport.policy import ConnectionPolicy

import xml.etree.ElementTree as ET

FEATURES = "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>"


def _body(attrs: str, children: str = "") -> bytes:
    return f"<body xmlns='{NS_HTTPBIND}' {attrs}>{children}</body>".encode()


@dataclass
class Peer:
    url: str
    seen: Counter[int] = field(default_factory=Counter)
    bodies: dict[int, list[bytes]] = field(default_factory=lambda: defaultdict(list))


@pytest_asyncio.fixture
async def peer() -> AsyncIterator[Peer]:
    state = Peer(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        mode = request.match_info["mode"]
        raw = await request.read()
        root = ET.fromstring(raw)
        rid = int(root.get("rid", "0"))
        state.seen[rid] += 1
        state.bodies[rid].append(raw)
        if root.get("sid") is None:  # session creation
            if mode == "refuse":
                return web.Response(body=_body("type='terminate' condition='host-unknown'"))
            return web.Response(body=_body("sid='peer' wait='2' hold='1' requests='2' inactivity='30' polling='0'",
                                           FEATURES))
        if not len(root):  # an empty long poll: hold it a little, as a real manager would
            await asyncio.sleep(1.0)
            return web.Response(body=_body("sid='peer'"))
        if mode == "not-xml":
            return web.Response(body=b"<html><body>Bad gateway</html")
        if mode == "wrong-sid":
            return web.Response(body=_body("sid='someone-else'"))
        if mode in ("404", "503"):
            return web.Response(status=int(mode), body=b"")
        if mode == "terminate":
            return web.Response(body=_body("sid='peer' type='terminate' condition='remote-connection-failed'"))
        if mode == "drop-once" and state.seen[rid] == 1:
            assert request.transport is not None
            request.transport.close()  # the HTTP connection breaks before any answer
            return web.Response(body=b"")
        echoed = "".join(ET.tostring(child, encoding="unicode") for child in root)
        return web.Response(body=_body("sid='peer'", echoed))

    app = web.Application()
    app.router.add_post("/{mode}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    state.url = f"http://127.0.0.1:{port}"
    try:
        yield state
    finally:
        await runner.cleanup()


class Recorder(asyncio.Protocol):
    def __init__(self) -> None:
        self.data: list[bytes] = []
        self.lost: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data.append(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.lost.done():
            self.lost.set_result(exc)


async def _open(url: str) -> tuple[BoshTransport, Recorder]:
    transport = BoshTransport(url, "grid.test", None, wait=2)
    await transport.open(5)
    rec = Recorder()
    transport.attach(rec)
    assert rec.data and b"stream:stream" in rec.data[0] and b"features" in rec.data[1]
    return transport, rec


@pytest.mark.parametrize(
    ("mode", "message", "retried"),
    [
        ("not-xml", "not XML", True),
        ("wrong-sid", "someone-else", False),
        ("404", "HTTP 404", False),
        ("503", "HTTP 503", True),
        ("terminate", "remote-connection-failed", False),
    ],
)
async def test_bad_answer_ends_the_session_with_a_clear_error(peer: Peer, mode: str, message: str,
                                                              retried: bool) -> None:
    transport, rec = await _open(f"{peer.url}/{mode}")
    transport.write(b"<message to='x@grid.test'><body>hello</body></message>")
    started = time.monotonic()
    exc = await asyncio.wait_for(rec.lost, 15)
    assert isinstance(exc, BoshError) and message in str(exc)
    assert transport.is_closing() and time.monotonic() - started < 12
    stanza_rids = [rid for rid, bodies in peer.bodies.items() if b"hello" in bodies[0]]
    assert len(stanza_rids) == 1
    assert peer.seen[stanza_rids[0]] == (MAX_ATTEMPTS if retried else 1)
    if retried:  # each retransmission is the same request, byte for byte
        assert len(set(peer.bodies[stanza_rids[0]])) == 1


async def test_broken_http_connection_is_recovered_without_loss(peer: Peer) -> None:
    transport, rec = await _open(f"{peer.url}/drop-once")
    transport.write(b"<message to='x@grid.test'><body>keep me</body></message>")
    async with asyncio.timeout(10):
        while not any(b"keep me" in d for d in rec.data):
            await asyncio.sleep(0.05)
    rid = next(r for r, bodies in peer.bodies.items() if b"keep me" in bodies[0])
    assert peer.seen[rid] == 2 and peer.bodies[rid][0] == peer.bodies[rid][1]  # same rid, same payload
    assert sum(b"keep me" in d for d in rec.data) == 1  # delivered once
    assert not rec.lost.done()
    transport.write(b"</stream:stream>")  # clean terminate
    assert await asyncio.wait_for(rec.lost, 10) is None


async def test_refused_session_gives_the_client_a_clear_error(peer: Peer) -> None:
    endpoint = Endpoint(host="127.0.0.1", c2s_port=free_port(), domain="grid.test", bosh_url=f"{peer.url}/refuse")
    client = make_client("dev@grid.test", "pw", endpoint, policy=ConnectionPolicy(tcp_timeout_s=1.0))
    started = time.monotonic()
    with pytest.raises(SessionError, match="host-unknown"):
        await open_session(client, endpoint, timeout=4)
    assert time.monotonic() - started < 6
    assert not client.is_connected()
