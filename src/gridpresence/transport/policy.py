"""How every grid party reaches the server: the XMPP port first, BOSH over HTTPS when a
firewall lets only web traffic out, and back to the faster XMPP port once it opens again.

:class:`GridClient` is slixmpp's ClientXMPP with one hook replaced: ``_attempt_connection``,
the step that opens a socket. Everything above it — slixmpp's connect loop with its back-off,
reconnects, STARTTLS, SASL, XEP-0198 — runs unchanged over either transport, so a
reconnect automatically follows the same policy.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Any, Literal

import aiohttp
from slixmpp import ClientXMPP

from gridpresence.transport.bosh import BoshTransport
from gridpresence.transport.bosh_session import BoshError

log = logging.getLogger(__name__)

TransportName = Literal["tcp", "bosh"]

FIRST_DELAY_S = 0.2  # a server restart takes about a second: try soon
FLAT_TRIES = 3  # so many tries FIRST_DELAY_S apart before doubling: a refused try costs nothing,
#                 a party still waiting seconds after its server is back costs the whole recovery
MAX_DELAY_S = 2.0  # all parties back within a few seconds of the server (issue 14: <= 5 s)
JITTER = 0.5  # +-50 %: a fleet that lost the server at once does not return at once


def backoff_delay(attempt: int, rng: random.Random | None = None, cap: float = MAX_DELAY_S) -> float:
    """Seconds to wait before try number `attempt` (1, 2, ...): FIRST_DELAY_S for the first
    FLAT_TRIES, then doubling up to `cap`, each spread by JITTER. The one back-off of every
    party (xmpp/reconnect.py paces the first try after a loss, GridClient the TCP/BOSH tries
    that fail after it)."""
    base = min(cap, FIRST_DELAY_S * 2 ** max(0, attempt - FLAT_TRIES))
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))
XRD_NS = "http://docs.oasis-open.org/ns/xri/xrd-1.0"
BOSH_REL = "urn:xmpp:alt-connections:xbosh"


@dataclass(frozen=True)
class ConnectionPolicy:
    """`tcp_timeout_s`: how long the XMPP port may take to accept before BOSH is tried.
    `tcp_retry_s`: while on BOSH, how often to check whether the XMPP port opened again
    (0 disables the check). `bosh_timeout_s`: how long BOSH session creation may take."""

    tcp_timeout_s: float = 3.0
    tcp_retry_s: float = 60.0
    bosh_timeout_s: float = 10.0
    bosh_wait_s: int = 20
    use_tcp: bool = True
    max_backoff_s: float = MAX_DELAY_S  # slixmpp backs off up to 300 s; a party should be back seconds after the server
    # A c2s port that served this client and now refuses (RST) is a restarting server, not a
    # firewall (a firewall's drop is a time-out): BOSH, served by the same server, would only be
    # a slower way back. Only after this long of refusals is BOSH tried.
    refused_grace_s: float = 5.0
    # Liveness (xmpp/reconnect.py): a session that heard nothing for `keepalive_s` pings the
    # server (XEP-0199); no answer within `keepalive_timeout_s` and the connection is dropped
    # and made again. A hung server (SIGSTOP, a frozen VM) is noticed within their sum. A
    # connection that has not become a session within `login_timeout_s` is dropped likewise.
    keepalive_s: float = 5.0
    keepalive_timeout_s: float = 5.0
    login_timeout_s: float = 15.0


class GridClient(ClientXMPP):
    """A ClientXMPP that falls back to BOSH; `transport_name` says which one carries it."""

    def __init__(self, jid: str, password: str, *, ssl_context: ssl.SSLContext, bosh_url: str | None = None,
                 web_url: str | None = None, policy: ConnectionPolicy | None = None) -> None:
        super().__init__(jid, password, ssl_context=ssl_context)
        self.bosh_url = bosh_url
        self.web_url = web_url  # where to look for host-meta (XEP-0156) when no bosh_url is given
        self.policy = policy or ConnectionPolicy()
        self.transport_name: TransportName | None = None
        self.last_error: str | None = None  # why the latest connection attempt failed
        self.bosh: BoshTransport | None = None
        self._probe: asyncio.Task[None] | None = None
        self._failed_tries = 0  # connection tries failed in a row (the back-off's step)
        self._tcp_served = False  # the c2s port gave this client a connection once
        self._refused_since: float | None = None  # monotonic start of the current run of refusals
        self.last_heard = time.monotonic()  # when the server last sent us anything (liveness)
        self.plugin["feature_mechanisms"].security_callback = self._security
        self.add_event_handler("disconnected", self._on_disconnected)
        self.add_event_handler("connection_failed", self._on_connection_failed)

    async def _attempt_connection(self, host: str, port: int, tls: bool, server_hostname: str | None) -> bool:
        if self.policy.use_tcp:
            try:
                ok = await asyncio.wait_for(super()._attempt_connection(host, port, tls, server_hostname),
                                            self.policy.tcp_timeout_s)
            except TimeoutError:
                log.info("%s: XMPP port %s:%s silent for %.1f s", self.boundjid.bare, host, port,
                         self.policy.tcp_timeout_s)
                ok = False
            if not ok:
                self.last_error = f"XMPP port {host}:{port} unreachable"
            if ok:
                self.transport_name = "tcp"
                self.last_error = None
                self._tcp_served, self._refused_since, self._failed_tries = True, None, 0
                return True
            if self._restarting_server():
                return False
        if self.bosh_url is None and self.web_url is not None:
            self.bosh_url = await discover_bosh_url(self.web_url, self.ssl_context)
        if not self.bosh_url or self._current_connection_attempt is None:
            if self.web_url is not None and not self.bosh_url:
                self.last_error = f"{self.last_error}; no BOSH endpoint announced at {self.web_url}"
            return False
        return await self._attempt_bosh(self.bosh_url)

    async def _attempt_bosh(self, url: str) -> bool:
        transport = BoshTransport(url, self.boundjid.domain, self.ssl_context, wait=self.policy.bosh_wait_s)
        try:
            await transport.open(self.policy.bosh_timeout_s)
        except (BoshError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            self.last_error = f"BOSH at {url} failed: {exc or type(exc).__name__}"
            log.info("%s: %s", self.boundjid.bare, self.last_error)
            self.event("connection_failed", exc)
            return False
        if self._current_connection_attempt is None:  # cancelled meanwhile
            transport.abort()
            return False
        if not transport.secure:
            # The server offers no login over plain-HTTP BOSH either; say so now, not at a time-out.
            transport.abort()
            self.last_error = f"{url} is plain HTTP: credentials are only sent over HTTPS"
            self.event("failed_all_auth")
            return False
        log.info("%s: connected over BOSH (%s)", self.boundjid.bare, url)
        self.transport_name = "bosh"
        self.last_error = None
        self.bosh = transport
        self._connect_loop_wait = 0
        self._failed_tries = 0
        self.event_when_connected = "connected"
        # BOSH is secured by HTTPS or not at all: STARTTLS inside it cannot work (XEP-0206 §4).
        self.enable_starttls = False
        self._no_resume_onto_bosh()
        transport.attach(self)
        if self.policy.use_tcp and self.policy.tcp_retry_s > 0 and self.custom_address:
            self._probe = asyncio.ensure_future(self._probe_tcp())
        return True

    def data_received(self, data: bytes | str) -> None:
        self.last_heard = time.monotonic()  # any byte proves the server alive: no ping needed
        super().data_received(data)

    def _on_connection_failed(self, error: object) -> None:
        if isinstance(error, ConnectionRefusedError):
            if self._refused_since is None:
                self._refused_since = time.monotonic()
        else:
            self._refused_since = None

    def _restarting_server(self) -> bool:
        """The c2s port that served us refuses, not for long yet: wait for it, not for BOSH."""
        return (self._tcp_served and self._refused_since is not None
                and time.monotonic() - self._refused_since < self.policy.refused_grace_s)

    def reschedule_connection_attempt(self) -> asyncio.Future[Any] | None:
        # slixmpp's own wait doubles without jitter (1, 3, 7 ... s): a fleet refused together
        # would retry together. Ours is jittered and starts where the reconnector's first try
        # left off.
        attempt = super().reschedule_connection_attempt()
        self._failed_tries += 1
        self._connect_loop_wait = backoff_delay(self._failed_tries + 1, cap=self.policy.max_backoff_s)  # read when it runs
        return attempt

    def _no_resume_onto_bosh(self) -> None:
        """Prosody 0.12's mod_smacks cannot resume a stream onto a BOSH session (it needs a raw
        connection and fails with a traceback, leaving the client waiting). Start a fresh
        session instead, and send again what the server never acknowledged (at least once:
        commands carry ids, so a duplicate is answered from memory, not executed twice)."""
        sm = self.plugin["xep_0198"] if "xep_0198" in self.plugin else None
        if sm is None or not sm.sm_id:
            return
        unacked = [stanza for _seq, stanza in sm.unacked_queue]
        self.event("session_end")  # the old session is over; slixmpp and the SM plugin reset

        def resend(_event: object) -> None:
            for stanza in unacked:
                self.send(stanza)

        if unacked:
            self.add_event_handler("session_start", resend, disposable=True)

    def _security(self, values: set[str]) -> dict[str, Any]:
        """BOSH over https:// is encrypted even though slixmpp sees no TLS socket of its own."""
        result: dict[str, Any] = self.plugin["feature_mechanisms"]._default_security(values)
        if "encrypted" in values and self.transport_name == "bosh" and self.bosh is not None:
            result["encrypted"] = self.bosh.secure  # plain HTTP never gets this far (_attempt_bosh)
        return result

    async def _probe_tcp(self) -> None:
        """While on BOSH: once the XMPP port accepts again, reconnect (TCP is tried first)."""
        while self.transport_name == "bosh" and self.custom_address:
            await asyncio.sleep(self.policy.tcp_retry_s)
            host, port = self.custom_address
            try:
                _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                         self.policy.tcp_timeout_s)
            except (OSError, TimeoutError):
                continue
            writer.close()
            log.info("%s: XMPP port %s:%s reachable again; leaving BOSH", self.boundjid.bare, host, port)
            self.reconnect(reason="moving back to the XMPP port")
            return

    def _on_disconnected(self, _event: object) -> None:
        self.enable_starttls = True  # the next attempt starts with the XMPP port again
        self.transport_name = None
        self.bosh = None
        if self._probe is not None and self._probe is not asyncio.current_task():
            self._probe.cancel()
        self._probe = None


async def discover_bosh_url(base_url: str, ssl_context: ssl.SSLContext | None, timeout: float = 3.0) -> str | None:
    """XEP-0156: the BOSH URL the server announces at ``base_url/.well-known/host-meta``
    (JSON first, then XRD), or None when it announces none."""
    base = base_url.rstrip("/")
    # (ssl_context None: aiohttp's default check, which True names)
    conn = aiohttp.TCPConnector(ssl=(ssl_context or True) if base.startswith("https:") else False)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        try:
            async with http.get(f"{base}/.well-known/host-meta.json") as resp:
                if resp.status == 200:
                    data = await resp.json(content_type=None)
                    for link in data.get("links", []) if isinstance(data, dict) else []:
                        if isinstance(link, dict) and link.get("rel") == BOSH_REL and isinstance(link.get("href"), str):
                            return str(link["href"])
            async with http.get(f"{base}/.well-known/host-meta") as resp:
                if resp.status == 200:
                    root = ET.fromstring(await resp.read())
                    for link in root.iter(f"{{{XRD_NS}}}Link"):
                        if link.get("rel") == BOSH_REL and link.get("href"):
                            return link.get("href")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, ET.ParseError) as exc:
            log.info("host-meta discovery at %s failed: %s", base, exc or type(exc).__name__)
    return None
