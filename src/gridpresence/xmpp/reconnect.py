"""The one reconnect policy of every grid party: a session lost after it was established is
re-established by itself, with back-off and jitter, and said in the log.

Every client :func:`~gridpresence.xmpp.session.make_client` makes carries a :class:`Reconnector`
(``client.reconnector``). It arms itself at the first ``session_start`` and disarms when the
party leaves (:func:`~gridpresence.xmpp.session.close_session`), so a failed first login is
still an error for the caller, not a loop. After each return the party's *resume* steps run
(fetch the roster, send presence, flush a queue ...), and listeners see a
:class:`SessionChange`: for a library user a reconnect is an event, not a dead object.

The back-off only paces our own tries after a loss; slixmpp's connect loop paces the TCP tries
that fail in between (capped by ``ConnectionPolicy.max_backoff_s``).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from slixmpp import ClientXMPP

log = logging.getLogger(__name__)

FIRST_DELAY_S = 0.2  # a server restart takes about a second: try soon
MAX_DELAY_S = 2.0  # all parties back within a few seconds of the server (issue 14: <= 5 s)
JITTER = 0.5  # +-50 %: a fleet that lost the server at once does not return at once


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds to wait before try number `attempt` (1, 2, ...): doubling from FIRST_DELAY_S up
    to MAX_DELAY_S, each spread by JITTER."""
    base = min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** max(0, attempt - 1))
    return base * (1 + (rng or random).uniform(-JITTER, JITTER))


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
        # A hosted identity's session follows its component link's: the link says it, not each.
        self.quiet = False
        client.add_event_handler("session_start", self._on_session_start)
        client.add_event_handler("disconnected", self._on_disconnected)

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

    def _on_disconnected(self, reason: object) -> None:
        self.online.clear()
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
