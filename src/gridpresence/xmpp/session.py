"""One place that turns (endpoint, account) into a logged-in slixmpp client.

Every party — device, operator, billing, watchdog — connects through :func:`open_session`,
so TLS trust, plugin choice and login failures are handled the same way everywhere.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field
from slixmpp import ClientXMPP

from gridpresence.xmpp import slixfix  # noqa: F401  (our slixmpp patches: C-speed escaping and SCRAM)
from gridpresence.protocol import stanzas
from gridpresence.xmpp.reconnect import reconnector_of
from gridpresence.xmpp.dispatch import install as dispatch_by_shape
from gridpresence.transport.policy import ConnectionPolicy, GridClient
from gridpresence.transport.tls import tls_context

log = logging.getLogger(__name__)


class Endpoint(BaseModel):
    """Where the XMPP server is and how to trust it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    host: str = "127.0.0.1"
    c2s_port: int = Field(default=5222, ge=1, le=65535)
    domain: str = "localhost"
    ca_file: Path | None = None
    # BOSH (XEP-0206) endpoint used when the c2s port is unreachable, e.g. https://host:5281/http-bind
    bosh_url: str | None = Field(default=None, pattern=r"^https?://")
    # The server's web origin, where XEP-0156 host-meta announces BOSH when bosh_url is not given.
    web_url: str | None = Field(default=None, pattern=r"^https?://")
    # The server's XEP-0114 component port (loopback only) where hosted devices come in; None: none.
    component_port: int | None = Field(default=None, ge=1, le=65535)


class Account(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    name: str
    jid: str
    password: str
    key_file: str | None = None  # the party's OpenPGP secret key (security/keys.py)


class RelayEndpoint(BaseModel):
    """The store-and-forward relay: its XMPP account and the SMTP port that takes commands."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    jid: str
    smtp_host: str = "127.0.0.1"
    smtp_port: int = Field(ge=1, le=65535)
    # The CA the relay's STARTTLS certificate is checked against (the embedded server's CA).
    ca_file: Path | None = None


class ConnectionInfo(BaseModel):
    """The contents of ``DIR/connection.json`` written by ``gridpresence up``."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    server: Endpoint
    operators: tuple[Account, ...]
    watchdog: str | None = None
    billing: tuple[str, ...] = ()
    presence_grace_s: float = Field(default=15.0, gt=0)
    relay: RelayEndpoint | None = None
    # Device serial numbers by bare JID, bound into signed commands (presence confirms them).
    serials: dict[str, str] = Field(default_factory=dict)
    # The historian's store: a SQLite file or a PostgreSQL URL (`gridpresence history` reads it).
    history: str | None = None
    # The operators' dashboard (HTTPS, the grid's CA): open it in a browser, log in as an operator.
    dashboard: str | None = None

    @classmethod
    def load(cls, path: Path) -> ConnectionInfo:
        try:
            return cls.model_validate(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise SessionError(f"{path}: not found; start the grid with `gridpresence up` first (in Docker: `docker compose up`, whose init step fills the volume)") from None
        except (ValueError, TypeError) as exc:
            raise SessionError(f"{path}: not a valid connection file: {exc}") from None

    def operator(self, name: str | None = None) -> Account:
        if not self.operators:
            raise SessionError("connection file lists no operator")
        if name is None:
            return self.operators[0]
        for acc in self.operators:
            if name in (acc.name, acc.jid):
                return acc
        raise SessionError(f"no operator named {name!r} in the connection file")


class SessionError(RuntimeError):
    """Could not log in: the message says why (server down, bad password, TLS)."""


CONNECTION_ENV = "GRIDPRESENCE_CONNECTION"
CONNECTION_FILE = "connection.json"  # as `gridpresence up` writes it into its data directory
DEFAULT_DATA = Path(".gridpresence")


def connection_path(connection: str | Path | None = None, data: str | Path | None = None) -> Path:
    """Where every command finds the grid: ``--connection FILE``, else ``DATA/connection.json``
    for a command given ``--data DATA``, else ``$GRIDPRESENCE_CONNECTION``, else
    ``.gridpresence/connection.json``."""
    if connection:
        return Path(connection)
    if data:
        return Path(data) / CONNECTION_FILE
    if env := os.environ.get(CONNECTION_ENV):
        return Path(env)
    return DEFAULT_DATA / CONNECTION_FILE


def data_dir(data: str | Path | None = None, connection: str | Path | None = None) -> Path:
    """The grid's data directory: ``--data DATA``, else the one holding its connection file."""
    return Path(data) if data else connection_path(connection).parent


async def ensure_running(endpoint: Endpoint, timeout: float = 2.0) -> None:
    """Fail at once, with :class:`SessionError`, when nothing listens where the grid should be
    (a stopped grid), instead of a login that waits its whole time-out. The XMPP port is tried
    first, then the BOSH/web port (a client behind a web-only firewall reaches the grid there)."""
    targets = [(endpoint.host, endpoint.c2s_port)]
    for url in (endpoint.bosh_url, endpoint.web_url):
        if url:
            parts = urlsplit(url)
            if parts.hostname:
                targets.append((parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)))
    why = ""
    for host, port in dict.fromkeys(targets):
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        except TimeoutError:  # (an OSError too: test it first)
            why = why or f"no answer within {timeout:g} s"
            continue
        except OSError as exc:
            why = why or (os.strerror(exc.errno) if exc.errno else str(exc))
            continue
        writer.close()
        return
    raise SessionError(f"the grid at {endpoint.host}:{endpoint.c2s_port} is not running ({why.lower()}); "
                       "start it with `gridpresence up`")


def make_client(jid: str, password: str, endpoint: Endpoint, plugins: tuple[str, ...] = (),
                policy: ConnectionPolicy | None = None) -> GridClient:
    """A slixmpp client that trusts only the configured CA and never sends a password in clear;
    it reaches the server over the c2s port, or over BOSH when that port is blocked."""
    stanzas.register()
    client = GridClient(jid, password, ssl_context=tls_context(endpoint.ca_file), bosh_url=endpoint.bosh_url,
                        web_url=endpoint.web_url, policy=policy)
    client.enable_direct_tls = False  # the c2s port speaks STARTTLS; a direct-TLS try only costs a round trip
    client.enable_plaintext = False
    # Only provisioned contacts see a grid party's presence: refuse ad-hoc subscription requests.
    client.roster.auto_authorize = False
    client.roster.auto_subscribe = False
    # The server echoes every presence we broadcast back to us; no grid party needs its own
    # account's presence, and skipping it saves a tenth of a device's CPU under load.
    client.client_roster.ignore_updates = True
    for name in ("xep_0030", "xep_0199", *plugins):
        client.register_plugin(name)
    reconnector_of(client)  # every party comes back by itself after a lost session (xmpp/reconnect.py)
    dispatch_by_shape(client)  # handler matching kept per stanza shape (a fan-out's outcomes and presence)
    return client


async def open_session(client: ClientXMPP, endpoint: Endpoint, timeout: float = 20.0) -> None:
    """Connect and log in; raises :class:`SessionError` on a refused login or a timeout."""
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()

    def _ok(_event: object) -> None:
        if not started.done():
            started.set_result(None)

    def _fail(why: str) -> None:
        if not started.done():
            started.set_exception(SessionError(why))

    handlers = {
        "session_start": _ok,
        "failed_all_auth": lambda _e: _fail(f"{client.boundjid.bare}: login refused ("
                                            f"{getattr(client, 'last_error', None) or 'wrong password or no such account'})"),
        "stream_error": lambda e: _fail(f"{client.boundjid.bare}: server closed the stream: {e['condition']}"),
    }
    for event, handler in handlers.items():
        client.add_event_handler(event, handler)
    try:
        client.connect(endpoint.host, endpoint.c2s_port)
        try:
            await asyncio.wait_for(started, timeout)
        except asyncio.TimeoutError:
            client.cancel_connection_attempt()
            client.abort()
            why = getattr(client, "last_error", None)
            raise SessionError(
                f"{client.boundjid.bare}: no session with {endpoint.host}:{endpoint.c2s_port} within {timeout:.0f} s"
                + (f" ({why})" if why else "")
            ) from None
        except SessionError:
            client.cancel_connection_attempt()
            client.abort()
            raise
    finally:
        for event, handler in handlers.items():
            client.del_event_handler(event, handler)


async def close_session(client: ClientXMPP, wait: float = 2.0) -> None:
    """Close the stream politely, waiting at most `wait` seconds; no reconnect after it."""
    reconnector_of(client).close()
    client.cancel_connection_attempt()
    try:
        await asyncio.wait_for(client.disconnect(wait=wait), wait + 1)
    except (asyncio.TimeoutError, ConnectionError):
        client.abort()
