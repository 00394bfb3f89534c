"""The one reconnect policy of every grid party: a session lost after it was established is
re-established by itself, with back-off and jitter, and said in the log.

Every client :func:`~gridpresence.xmpp.session.make_client` makes carries a :class:`Reconnector`
(``client.reconnector``). It arms itself at the first ``session_start`` and disarms when the
party leaves (:func:`~gridpresence.xmpp.session.close_session`), so a failed first login is
still an error for the caller, not a loop. After each return the party's *resume* steps run
(fetch the roster, send presence, flush a queue ...), and listeners see a
:class:`SessionChange`: for a library user a reconnect is an event, not a dead object.

The back-off only paces our own tries after a loss; slixmpp's connect loop paces the TCP tries
that fail in between (the same jittered back-off, capped by ``ConnectionPolicy.max_backoff_s``).

A server that dies closes our sockets; one that hangs (SIGSTOP, a frozen machine, a cut that
drops packets) does not. So a session that has heard nothing for ``keepalive_s`` pings the
server (XEP-0199) and drops the connection when no answer comes within ``keepalive_timeout_s``,
and a connection that does not become a session within ``login_timeout_s`` is dropped too;
either loss is then handled as any other.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from slixmpp import ClientXMPP
from slixmpp.exceptions import IqError, IqTimeout

from gridpresence.transport.policy import FIRST_DELAY_S, JITTER, MAX_DELAY_S, ConnectionPolicy, backoff_delay

__all__ = ["FIRST_DELAY_S", "JITTER", "MAX_DELAY_S", "Reconnector", "SessionChange", "SessionEvent",
           "backoff_delay", "reconnector_of"]

log = logging.getLogger(__name__)


class SessionEvent(enum.Enum):
    LOST = "lost"
    BACK = "back"


@dataclass(frozen=True)
class SessionChange:
    event: SessionEvent
    party: str  # bare JID
    at: float  # time.time()
    down_s: float = 0.0  # for BACK: how long the session was gone
    reason: str = ""


Resume = Callable[[], Awaitable[None]]


class Reconnector:
    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.armed = False  # a first session was established
        self.closing = False  # the party is leaving: a loss is expected
        self.reconnects = 0
        self.lost_at: float | None = None  # monotonic time of the current loss
        self._attempt = 0
        self._timer: asyncio.TimerHandle | None = None
        self._resumes: list[Resume] = []
        self._listeners: list[Callable[[SessionChange], None]] = []
        self._resuming: asyncio.Task[None] | None = None
        self.online = asyncio.Event()
        self.policy: ConnectionPolicy = getattr(client, "policy", None) or ConnectionPolicy()
        self.dead_server_drops = 0  # connections dropped because the server stopped answering
        self._alive: asyncio.Task[None] | None = None
        self._login_timer: asyncio.TimerHandle | None = None
        # A hosted identity's session follows its component link's: the link says it, not each.
        self.quiet = False
        client.add_event_handler("session_start", self._on_session_start)
        client.add_event_handler("disconnected", self._on_disconnected)
        client.add_event_handler("connected", self._on_connected)

    @property
    def party(self) -> str:
        return str(self.client.boundjid.bare)

    def on_resume(self, step: Resume) -> None:
        """Run `step` after every re-established session (not after the first login)."""
        self._resumes.append(step)

    def listen(self, callback: Callable[[SessionChange], None]) -> Callable[[], None]:
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def close(self) -> None:
        """The party leaves: no more tries."""
        self.closing = True
        self.online.clear()
        self._stop_liveness()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._resuming is not None:
            self._resuming.cancel()

    def _tell(self, change: SessionChange) -> None:
        for listener in list(self._listeners):
            try:
                listener(change)
            except Exception:  # a listener's fault must not stop the reconnect
                log.exception("%s: session listener failed", self.party)

    # -- liveness: a hung server is a lost one --------------------------------------------

    def _stop_liveness(self) -> None:
        if self._alive is not None and self._alive is not asyncio.current_task():
            self._alive.cancel()
        self._alive = None
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None

    def _on_connected(self, _event: object) -> None:
        if self._login_timer is not None:
            self._login_timer.cancel()
        if self.armed and self.policy.login_timeout_s > 0:  # a first login has open_session's own time-out
            self._login_timer = asyncio.get_running_loop().call_later(self.policy.login_timeout_s, self._login_stalled)

    def _login_stalled(self) -> None:
        self._login_timer = None
        if self.closing or self.online.is_set() or not self.client.is_connected():
            return
        self._drop(f"no session within {self.policy.login_timeout_s:g} s of connecting")

    def _drop(self, why: str) -> None:
        self.dead_server_drops += 1
        log.warning("%s: the server does not answer (%s); dropping the connection", self.party, why)
        self.client.disconnect_reason = why
        self.client.abort()

    async def _keep_alive(self) -> None:
        """While the session lasts: ping the server whenever it has been silent for keepalive_s."""
        interval, timeout = self.policy.keepalive_s, self.policy.keepalive_timeout_s
        ping = self.client.plugin["xep_0199"]
        while self.online.is_set() and not self.closing:
            heard = getattr(self.client, "last_heard", None)
            silent = time.monotonic() - heard if heard is not None else interval
            if silent < interval:
                await asyncio.sleep(interval - silent)
                continue
            asked = time.monotonic()
            try:
                await ping.send_ping(self.client.boundjid.domain, timeout=timeout)
            except IqTimeout:
                heard = getattr(self.client, "last_heard", None)
                if heard is not None and heard > asked:
                    continue  # the server sent us other things meanwhile: alive; the answer is queued behind them
                if self.online.is_set() and not self.closing:
                    self._drop(f"no answer to a ping within {timeout:g} s")
                return
            except IqError:
                pass  # an error reply is an answer too: the server is alive
            if heard is None:
                await asyncio.sleep(interval)

    def _on_disconnected(self, reason: object) -> None:
        self.online.clear()
        self._stop_liveness()
        if self.closing or not self.armed:
            return
        if self.lost_at is None:
            self.lost_at = time.monotonic()
            self._attempt = 0
            log.log(logging.INFO if self.quiet else logging.WARNING, "%s: connection to the server lost (%s); "
                    "reconnecting", self.party, reason or "closed")
            self._tell(SessionChange(SessionEvent.LOST, self.party, time.time(), reason=str(reason or "")))
        self._schedule()

    def _schedule(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._attempt += 1
        delay = backoff_delay(self._attempt)
        log.info("%s: reconnect try %d in %.2f s", self.party, self._attempt, delay)
        self._timer = asyncio.get_running_loop().call_later(delay, self._try)

    def _try(self) -> None:
        self._timer = None
        if self.closing or self.client.is_connected():
            return
        attempt = self.client._current_connection_attempt  # slixmpp's own loop is still trying
        if attempt is not None and not attempt.done():
            return
        address = self.client.custom_address
        self.client.connect(*(address or (None, None)))

    def _on_session_start(self, _event: object) -> None:
        if self.closing:
            return
        first = not self.armed
        self.armed = True
        self.online.set()
        if self._login_timer is not None:
            self._login_timer.cancel()
            self._login_timer = None
        if self.policy.keepalive_s > 0 and "xep_0199" in self.client.plugin:
            if self._alive is not None:
                self._alive.cancel()
            self._alive = asyncio.ensure_future(self._keep_alive())
        if first or self.lost_at is None:
            return
        down = time.monotonic() - self.lost_at
        self.lost_at = None
        self.reconnects += 1
        log.log(logging.INFO if self.quiet else logging.WARNING, "%s: session re-established after %.1f s "
                "(reconnect %d)", self.party, down, self.reconnects)
        self._resuming = asyncio.ensure_future(self._resume(down))

    async def _resume(self, down: float) -> None:
        for step in list(self._resumes):
            try:
                await step()
            except Exception:  # one failed step must not keep the others from running
                log.exception("%s: resuming after a reconnect failed", self.party)
        self._tell(SessionChange(SessionEvent.BACK, self.party, time.time(), down_s=down))


def reconnector_of(client: ClientXMPP) -> Reconnector:
    """The client's reconnector (made with the client in make_client)."""
    found = getattr(client, "reconnector", None)
    if found is None:
        found = Reconnector(client)
        client.reconnector = found  # type: ignore[attr-defined]
    return found
