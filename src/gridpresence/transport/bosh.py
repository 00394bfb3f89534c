"""BOSH for slixmpp: an asyncio Transport that carries an XMPP stream over HTTP(S) requests.

slixmpp's XMLStream is an asyncio Protocol that writes raw XML to ``transport.write`` and
parses whatever ``data_received`` gets. :class:`BoshTransport` sits in the socket's place:

- what slixmpp writes is sorted into BOSH work — its stream header opens the session (or,
  after SASL, asks for ``xmpp:restart``), its stream footer terminates, anything else is a
  stanza for the next request body;
- each response body's children go to ``data_received`` as if they had arrived on a stream,
  after a stream header of our own at session start and at every restart.

The rules of the session (rids, pipelining, retransmission, errors) live in the sans-I/O
:mod:`gridpresence.transport.bosh_session`; this module only does the HTTP and the timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from typing import Any, Protocol
from urllib.parse import urlsplit
from xml.sax.saxutils import quoteattr

import aiohttp

from gridpresence.transport.bosh_session import (
    BoshError,
    BoshSession,
    Payload,
    Request,
    StreamStart,
    Terminated,
)

log = logging.getLogger(__name__)

# How long past the negotiated `wait` an HTTP exchange may take before it counts as broken.
HTTP_MARGIN_S = 5.0
CONNECT_TIMEOUT_S = 5.0  # a firewall that drops SYNs must not stall a retransmission for long
# Before renewing the long poll, let the stanzas the last response caused (an outcome for a
# command) be written: they then ride on the poll itself, one HTTP request instead of two.
POLL_COALESCE_S = 0.002
FEED_CHUNK = 4096  # bytes handed to the XMPP parser at a time, like reads from a socket
MAX_ATTEMPTS = 4  # sends of one request (1 + retransmissions) before the session is given up


class _Stream(Protocol):
    """What the transport drives: slixmpp's XMLStream (an asyncio.BaseProtocol, so not typed as
    an asyncio.Protocol, that reads data all the same)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None: ...
    def data_received(self, data: bytes) -> None: ...
    def connection_lost(self, exception: BaseException | None) -> None: ...


class BoshTransport(asyncio.Transport):
    """One BOSH session driving one slixmpp XMLStream (``protocol``)."""

    def __init__(self, url: str, domain: str, ssl_context: ssl.SSLContext | None,
                 *, wait: int = 30, hold: int = 1) -> None:
        super().__init__()
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError(f"BOSH URL must be http(s)://..., not {url!r}")
        self.url = url
        self.secure = url.startswith("https:")
        self._protocol: _Stream | None = None
        self._held: list[StreamStart | Payload | Terminated] = []  # answers that came before attach
        self._header_seen = False
        self.session = BoshSession(to=domain, wait=wait, hold=hold)
        self._ssl = ssl_context if self.secure else None
        self._http: aiohttp.ClientSession | None = None
        self._wake = asyncio.Event()
        self._driver: asyncio.Task[None] | None = None
        self._exchanges: set[asyncio.Task[None]] = set()
        self._delivering = asyncio.Lock()
        self._closing = False
        self._lost = False
        self.error: BaseException | None = None  # why the session ended, if it failed
        self.created = asyncio.get_running_loop().create_future()  # sid known, or the failure

    # -- asyncio.Transport ---------------------------------------------------------------

    async def open(self, timeout: float) -> None:
        """Create the BOSH session; raises :class:`BoshError` (or TimeoutError) if the server
        does not grant one in time. Nothing is told to any protocol until :meth:`attach`."""
        self._http = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else False, limit=8),
            headers={"Content-Type": "text/xml; charset=utf-8"},
        )
        self._driver = asyncio.ensure_future(self._drive())
        try:
            await asyncio.wait_for(asyncio.shield(self.created), timeout)
        except BaseException:
            self._lose(None)
            raise

    def attach(self, protocol: _Stream) -> None:
        """Hand the open session to slixmpp: it writes its stream header (which the session
        creation already stands for) and then reads the features the server sent."""
        self._protocol = protocol
        protocol.connection_made(self)
        held, self._held = self._held, []
        self._deliver(held)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost:
            return
        chunk = bytes(data).strip()
        if not chunk:
            return  # whitespace keepalive: BOSH keeps the session alive by its own requests
        if chunk.startswith(b"<?xml") or chunk.startswith(b"<stream:stream"):
            if self._header_seen:  # a second header: slixmpp restarts the stream after SASL
                start = self.session.restart()
                events: list[StreamStart | Payload | Terminated] = [start]
                asyncio.get_running_loop().call_soon(self._deliver, events)
            self._header_seen = True
        elif chunk == b"</stream:stream>":
            self._closing = True
            self.session.terminate()
        else:
            try:
                self.session.queue(chunk)
            except BoshError as exc:
                log.warning("BOSH: dropped a stanza written while closing: %s", exc)
                return
        self._wake.set()

    def is_closing(self) -> bool:
        return self._closing or self._lost

    def close(self) -> None:
        """Polite close: terminate the session (if any) and report the loss when answered."""
        if self._lost or self._closing:
            return
        self._closing = True
        if self.session.created and not self.session.closed:
            self.session.terminate()
            self._wake.set()
        else:
            self._lose(None)

    def abort(self) -> None:
        """Drop everything now, as a broken network would; the server-side session stays
        until its inactivity limit (that is what lets XEP-0198 resume it)."""
        self._lose(None)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            parts = urlsplit(self.url)
            return (parts.hostname, parts.port or (443 if self.secure else 80))
        if name == "sslcontext":
            return self._ssl
        return default  # no socket and no single ssl_object: requests use several connections

    def can_write_eof(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0

    # -- the HTTP side -----------------------------------------------------------------

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while not self._lost and not self.session.closed:
                if self.session.idle:
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), POLL_COALESCE_S)
                self._wake.clear()
                now = loop.time()
                req = self.session.next_request(now)
                if req is not None:
                    task = asyncio.ensure_future(self._exchange(req))
                    self._exchanges.add(task)
                    task.add_done_callback(self._exchanges.discard)
                    continue
                due = self.session.poll_due(now) if self.session.outstanding == 0 else None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), None if due is None else max(0.0, due - now))
        except BoshError as exc:
            self._lose(exc)

    async def _exchange(self, req: Request) -> None:
        loop = asyncio.get_running_loop()
        assert self._http is not None
        wait = self.session.granted.wait if self.session.created else self.session.wait
        timeout = aiohttp.ClientTimeout(total=wait + HTTP_MARGIN_S, sock_connect=CONNECT_TIMEOUT_S)
        try:
            while True:
                try:
                    async with self._http.post(self.url, data=req.body, timeout=timeout) as resp:
                        status, body = resp.status, await resp.read()
                    events = self.session.receive(req.rid, status, body, now=loop.time())
                    break
                except (aiohttp.ClientError, TimeoutError, OSError, BoshError) as exc:
                    if isinstance(exc, BoshError) and not exc.retryable:
                        raise
                    try:
                        req = self.session.broken(req.rid, loop.time(), MAX_ATTEMPTS)
                    except BoshError as gave_up:
                        raise BoshError(f"{gave_up} ({self.url}): {exc or type(exc).__name__}") from exc
                    log.info("BOSH: request %d broke (%s); sending it again", req.rid, exc or type(exc).__name__)
                    await asyncio.sleep(min(0.25 * 2 ** req.attempts, 2.0))
            self._wake.set()  # a request slot is free again
            async with self._delivering:  # FIFO: answers stay in rid order
                await self._feed(events)
        except BoshError as exc:
            self._lose(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug must end the session visibly, not hang it
            log.exception("BOSH: exchange failed")
            self._lose(BoshError(f"BOSH transport failed: {exc}"))
        else:
            self._wake.set()

    async def _feed(self, events: list[StreamStart | Payload | Terminated]) -> None:
        """Deliver a response the way a socket would: a big batch of stanzas in pieces, with
        the loop free in between, so answers to the first ones go out while the rest are read."""
        for event in events:
            if isinstance(event, Payload) and len(event.xml) > FEED_CHUNK and self._protocol is not None:
                data = event.xml
                for start in range(0, len(data), FEED_CHUNK):
                    if self._lost:
                        return
                    self._protocol.data_received(data[start:start + FEED_CHUNK])
                    await asyncio.sleep(0)
            else:
                self._deliver([event])

    def _deliver(self, events: list[StreamStart | Payload | Terminated]) -> None:
        if events and not self.created.done():
            self.created.set_result(None)
        if self._protocol is None:
            self._held.extend(events)
            return
        for event in events:
            if self._lost:
                return
            if isinstance(event, StreamStart):
                self._protocol.data_received(_stream_header(event).encode())
            elif isinstance(event, Payload):
                self._protocol.data_received(event.xml)
            else:
                cond = event.condition
                self._lose(BoshError(f"BOSH session ended by the server: {cond}") if cond else None)

    def _lose(self, exc: BaseException | None) -> None:
        if self._lost:
            return
        self._lost = True
        self._closing = True
        self.error = exc
        if exc is not None:
            log.warning("BOSH session to %s lost: %s", self.url, exc)
        if not self.created.done():
            self.created.set_exception(exc or BoshError("BOSH session closed before it was created"))
            self.created.exception()  # retrieved: nobody need await it
        current = asyncio.current_task()
        for task in [self._driver, *self._exchanges]:
            if task is not None and task is not current:
                task.cancel()
        if self._http is not None:
            asyncio.ensure_future(self._http.close())
        if self._protocol is not None:
            asyncio.get_running_loop().call_soon(self._protocol.connection_lost, exc)


def _stream_header(start: StreamStart) -> str:
    return ("<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' "
            f"version='1.0' id={quoteattr(start.sid)} from={quoteattr(start.from_)}>")
