"""A sans-I/O BOSH client session (XEP-0124, with the XMPP binding of XEP-0206).

It builds request bodies and consumes response bodies; it never touches a socket or a clock
(callers pass ``now``), so every rule below is unit-tested without a network:

- session creation negotiates ``wait``/``hold``/``requests``/``polling``/``inactivity``;
- request ids are consecutive; at most ``requests`` are outstanding (pipelining), and
  responses are handed out strictly in rid order even when they arrive out of order;
- a request whose HTTP exchange broke is sent again with the same rid and the same body
  (the connection manager answers a repeated rid from its cache), so no stanza is lost;
- when an empty poll came back empty sooner than ``polling`` seconds (the server holds no
  request: pure polling), the next empty poll waits out the interval; a poll answered with
  data is renewed at once, so pushed stanzas are never delayed;
- ``xmpp:restart`` after SASL, and a terminate that carries the last queued stanzas;
- bad responses (not XML, not a body, a wrong sid, HTTP 404, terminate with a condition)
  raise :class:`BoshError` subclasses with a sentence a person can act on.
"""

from __future__ import annotations

import random
import re
import xml.etree.ElementTree as ET
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

NS_HTTPBIND = "http://jabber.org/protocol/httpbind"
NS_XBOSH = "urn:xmpp:xbosh"
NS_CLIENT = "jabber:client"
BOSH_VERSION = "1.11"
MAX_RID = 2**53 - 1  # XEP-0124 §14: rids must stay below 2^53
# Sane upper bounds for what a connection manager may grant (seconds, or counts).
MAX_WAIT_S = 3600
MAX_HOLD = 100
MAX_REQUESTS = 100
MAX_SECONDS = 86400

# The opening tag of one serialized stanza: its name, and whether it declares a namespace.
_FIRST_TAG = re.compile(rb"^\s*<([A-Za-z_][\w.:-]*)([^>]*)>", re.S)


class BoshError(RuntimeError):
    """The BOSH session cannot continue; the message says why. When `retryable`, the same
    request may be sent again (the connection manager answers a repeated rid from its cache)."""

    retryable = False


class BoshProtocolError(BoshError):
    """The connection manager answered with something that is not a valid BOSH response."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class BoshTerminated(BoshError):
    """The connection manager ended the session (``type='terminate'``)."""

    def __init__(self, condition: str | None, detail: str = "") -> None:
        self.condition = condition
        super().__init__(
            f"BOSH session terminated by the server: {condition or 'no condition given'}"
            + (f" ({detail})" if detail else "")
        )


class BoshHTTPError(BoshError):
    """The HTTP exchange failed: 5xx may be retried, 4xx (404: unknown session) may not."""

    def __init__(self, status: int, url: str = "") -> None:
        self.status = status
        self.retryable = status >= 500
        hint = " (unknown session or wrong URL)" if status == 404 else ""
        super().__init__(f"BOSH request{' to ' + url if url else ''} failed with HTTP {status}{hint}")


class Kind(Enum):
    CREATE = "create"
    PAYLOAD = "payload"  # stanzas, or an empty poll
    RESTART = "restart"
    TERMINATE = "terminate"


@dataclass
class Request:
    rid: int
    kind: Kind
    body: bytes
    empty: bool
    sent_at: float = 0.0
    attempts: int = 0
    first_failure: float | None = None


@dataclass
class StreamStart:
    """A (re)started XMPP stream: the transport feeds a stream header to the XMPP parser."""

    sid: str
    from_: str


@dataclass
class Payload:
    """One top-level child of a response body (a stanza, stream features, an SM element)."""

    xml: bytes


@dataclass
class Terminated:
    """The session ended cleanly (our terminate was answered, or the server ended it)."""

    condition: str | None = None


Event = StreamStart | Payload | Terminated


@dataclass
class Negotiated:
    """What the connection manager granted in its session creation response."""

    sid: str = ""
    wait: int = 60
    hold: int = 1
    requests: int = 2
    polling: int = 0
    inactivity: int = 60
    maxpause: int = 0
    acks: bool = False


@dataclass
class BoshSession:
    """One BOSH session's bookkeeping. Use in this order: :meth:`queue` stanzas and
    :meth:`restart`/:meth:`terminate` as XMPP asks; send whatever :meth:`next_request`
    returns; hand each HTTP answer to :meth:`receive` (or :meth:`broken` when the exchange
    failed) and act on the events it returns."""

    to: str
    wait: int = 60
    hold: int = 1
    lang: str = "en"
    route: str | None = None
    rid: int = field(default_factory=lambda: random.randint(1 << 20, 1 << 40))
    granted: Negotiated = field(default_factory=Negotiated)
    created: bool = False
    closed: bool = False
    _queue: deque[bytes] = field(default_factory=deque)
    _restart_wanted: bool = False
    _terminate_wanted: bool = False
    _create_sent: bool = False
    _terminate_sent: bool = False
    _pending: dict[int, Request] = field(default_factory=dict)
    _answers: dict[int, list[Event]] = field(default_factory=dict)
    _next_deliver: int = 0
    _poll_not_before: float | None = None
    # The highest rid the server says it received (XEP-0124 §9.2), when it acknowledges; lost
    # requests are found by their broken HTTP exchange, so this is for diagnostics only.
    server_ack: int | None = None

    def __post_init__(self) -> None:
        self._next_deliver = self.rid

    # -- what XMPP asks for ------------------------------------------------------------

    def queue(self, stanza: bytes) -> None:
        """One serialized top-level element to send; ``jabber:client`` is declared on stanzas
        that rely on the stream's default namespace (a body's default namespace is BOSH's)."""
        if self._terminate_wanted or self.closed:
            raise BoshError("BOSH session is closing; nothing more can be sent")
        self._queue.append(_qualify(stanza))

    def restart(self) -> StreamStart:
        """Ask for a stream restart (XEP-0206 §5, after SASL success). The new stream starts
        now, not when the restart request is answered: the server may put the new stream's
        features on an earlier, held request."""
        self._restart_wanted = True
        return StreamStart(self.granted.sid, self.to)

    def terminate(self) -> None:
        """End the session after sending what is queued."""
        self._terminate_wanted = True

    # -- what to send ------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        return len(self._pending)

    @property
    def idle(self) -> bool:
        """Nothing to send and nothing outstanding: the next request would be an empty poll."""
        return (self.created and not self.closed and not self._pending and not self._queue
                and not self._restart_wanted and not self._terminate_wanted)

    def poll_due(self, now: float) -> float | None:
        """When an empty poll may next be sent (None: no restriction)."""
        return self._poll_not_before

    def next_request(self, now: float) -> Request | None:
        """The next request to send now, or None (wait for a response or for `poll_due`)."""
        if self.closed:
            return None
        if not self._create_sent:
            self._create_sent = True
            return self._new(Kind.CREATE, self._create_body(), empty=True, now=now)
        if not self.created or self._terminate_sent:
            return None  # nothing may be sent before the sid is known, or after terminate
        if self.outstanding >= max(1, self.granted.requests):
            return None
        if self._restart_wanted:
            self._restart_wanted = False
            return self._new(Kind.RESTART, self._body({
                "to": self.to, "xml:lang": self.lang, "{%s}restart" % NS_XBOSH: "true"}), empty=False, now=now)
        if self._terminate_wanted:
            self._terminate_sent = True
            return self._new(Kind.TERMINATE, self._body({"type": "terminate"}, self._drain()), empty=False, now=now)
        if self._queue:
            return self._new(Kind.PAYLOAD, self._body({}, self._drain()), empty=False, now=now)
        # Keep one request waiting at the server so it can push to us (long polling).
        if self.outstanding == 0:
            due = self.poll_due(now)
            if due is not None and now < due:
                return None
            self._poll_not_before = None
            return self._new(Kind.PAYLOAD, self._body({}), empty=True, now=now)
        return None

    def _drain(self) -> bytes:
        data = b"".join(self._queue)
        self._queue.clear()
        return data

    def _new(self, kind: Kind, body: bytes, empty: bool, now: float) -> Request:
        req = Request(self.rid, kind, body, empty, sent_at=now)
        self.rid += 1
        if self.rid > MAX_RID:
            raise BoshError("BOSH request ids exhausted; start a new session")
        self._pending[req.rid] = req
        return req

    def _create_body(self) -> bytes:
        attrs = {
            "content": "text/xml; charset=utf-8",
            "hold": str(self.hold),
            "rid": str(self.rid),
            "to": self.to,
            "ver": BOSH_VERSION,
            "wait": str(self.wait),
            "ack": "1",
            "xml:lang": self.lang,
            "{%s}version" % NS_XBOSH: "1.0",
        }
        if self.route:
            attrs["route"] = self.route
        return _serialize(attrs, b"")

    def _body(self, extra: dict[str, str], payload: bytes = b"") -> bytes:
        # Only an ack that differs from the obvious (rid - 1) need be sent (§9.1); we process
        # responses in order, so the highest answered rid is always rid - 1 of the next one.
        return _serialize({"rid": str(self.rid), "sid": self.granted.sid, **extra}, payload)

    # -- what came back ----------------------------------------------------------------

    def broken(self, rid: int, now: float = 0.0, max_attempts: int = 4) -> Request:
        """The HTTP exchange for `rid` failed without an answer: the same request, to be sent
        again unchanged (same rid, same payload) so nothing is lost or duplicated. Raises
        :class:`BoshError` once it failed `max_attempts` times, or for longer than the
        server's inactivity limit (the server has dropped the session by then)."""
        req = self._pending.get(rid)
        if req is None:
            raise BoshError(f"no outstanding BOSH request with rid {rid}")
        req.attempts += 1
        if req.first_failure is None:
            req.first_failure = now
        if req.attempts >= max_attempts:
            raise BoshError(f"BOSH request {rid} failed {req.attempts} times")
        if self.created and now - req.first_failure > self.granted.inactivity:
            raise BoshError(f"BOSH request {rid} failing for longer than the server's "
                            f"{self.granted.inactivity:g} s inactivity limit")
        return req

    def receive(self, rid: int, status: int, body: bytes, now: float = 0.0) -> list[Event]:
        """Consume the HTTP answer to request `rid`; returns the events now deliverable in rid
        order. Raises :class:`BoshError` for answers that end the session."""
        req = self._pending.get(rid)
        if req is None:
            raise BoshError(f"answer for rid {rid}, which is not outstanding")
        if status != 200:
            raise BoshHTTPError(status)
        root = _parse(body)
        attrs = root.attrs
        if req.kind is Kind.CREATE:
            if attrs.get("type") == "terminate":
                raise BoshTerminated(attrs.get("condition"), root.text())
            self._negotiate(attrs)
        elif attrs.get("sid", self.granted.sid) != self.granted.sid:
            raise BoshProtocolError(f"BOSH response for session {attrs.get('sid')!r}, expected {self.granted.sid!r}")
        ack = _int(attrs, "ack", -1, MAX_RID) if req.kind is not Kind.CREATE else -1
        del self._pending[rid]
        events: list[Event] = []
        if req.kind is Kind.CREATE:
            events.append(StreamStart(self.granted.sid, attrs.get("from", self.to)))
        if root.inner.strip():
            events.append(Payload(root.inner))
        elif req.empty and req.kind is Kind.PAYLOAD and now - req.sent_at < self.granted.polling:
            self._poll_not_before = req.sent_at + self.granted.polling  # not held: we are polling
        if ack >= 0:
            self.server_ack = ack
        if attrs.get("type") == "terminate":
            condition = attrs.get("condition")
            if condition and req.kind is not Kind.TERMINATE:
                self._answers[rid] = events
                self.closed = True
                raise BoshTerminated(condition, root.text())
            events.append(Terminated(condition))
        elif req.kind is Kind.TERMINATE:
            events.append(Terminated(None))
        self._answers[rid] = events
        return self._deliverable()

    def _deliverable(self) -> list[Event]:
        out: list[Event] = []
        while self._next_deliver in self._answers:
            out.extend(self._answers.pop(self._next_deliver))
            self._next_deliver += 1
        if any(isinstance(e, Terminated) for e in out):
            self.closed = True
        return out

    def _negotiate(self, attrs: dict[str, str]) -> None:
        sid = attrs.get("sid")
        if not sid:
            raise BoshProtocolError("BOSH session creation response has no sid")
        g = self.granted
        g.sid = sid
        g.wait = _int(attrs, "wait", self.wait, MAX_WAIT_S)
        g.hold = _int(attrs, "hold", self.hold, MAX_HOLD)
        # A server that omits 'requests' allows hold + 1 (§7.1).
        g.requests = max(1, _int(attrs, "requests", g.hold + 1, MAX_REQUESTS))
        g.polling = _int(attrs, "polling", 0, MAX_SECONDS)
        g.inactivity = _int(attrs, "inactivity", 60, MAX_SECONDS)
        g.maxpause = _int(attrs, "maxpause", 0, MAX_SECONDS)
        g.acks = "ack" in attrs
        self.created = True


def _serialize(attrs: dict[str, str], payload: bytes) -> bytes:
    parts = [b"<body xmlns='", NS_HTTPBIND.encode(), b"' xmlns:xmpp='", NS_XBOSH.encode(), b"'"]
    for key, value in attrs.items():
        name = key.replace("{%s}" % NS_XBOSH, "xmpp:")
        parts.append(f" {name}={_quote(value)}".encode())
    if not payload:
        return b"".join(parts) + b"/>"
    return b"".join(parts) + b">" + payload + b"</body>"


def _quote(value: str) -> str:
    return "'" + value.replace("&", "&amp;").replace("<", "&lt;").replace("'", "&apos;") + "'"


def _qualify(stanza: bytes) -> bytes:
    m = _FIRST_TAG.match(stanza)
    if m is None or b"xmlns=" in m.group(2) or b":" in m.group(1):
        return stanza
    return stanza[: m.end(1)] + b" xmlns='" + NS_CLIENT.encode() + b"'" + stanza[m.end(1):]


@dataclass
class _Body:
    """A response body: its attributes, and its children as raw XML for the XMPP parser."""

    attrs: dict[str, str]
    inner: bytes
    raw: bytes

    def text(self) -> str:
        """Character data inside the body (a terminate's explanation), for messages."""
        try:
            root = ET.fromstring(self.raw)
        except ET.ParseError:
            return ""
        return " ".join(t.strip() for t in root.itertext() if t.strip())[:200]


# The opening <body ...> tag; Prosody escapes '>' in attribute values, so [^>]* is exact there.
_BODY_START = re.compile(rb"\s*(?:<\?xml[^>]*\?>\s*)?<body\b[^>]*>")
_BODY_TAG = f"{{{NS_HTTPBIND}}}body"


def _parse(body: bytes) -> _Body:
    """Read a response body's attributes from its opening tag alone and hand the children on
    as they arrived: the XMPP parser reads (and checks) them once, instead of twice. Anything
    that does not look like a plain httpbind body gets a full parse and a precise error."""
    m = _BODY_START.match(body)
    if m is not None:
        head = m.group(0).lstrip()
        closed = head.endswith(b"/>")
        rest = body[m.end():].rstrip()
        if (closed and not rest) or (not closed and rest.endswith(b"</body>")):
            try:
                tag = ET.fromstring(head if closed else head[:-1] + b"/>")
            except ET.ParseError:
                tag = None
            if tag is not None and tag.tag == _BODY_TAG:
                return _Body(dict(tag.attrib), b"" if closed else rest[: -len(b"</body>")], body)
    try:
        root = ET.fromstring(body)
    except ET.ParseError as exc:
        raise BoshProtocolError(f"BOSH response is not XML ({exc}): {body[:80]!r}", retryable=True) from None
    if root.tag != _BODY_TAG:
        raise BoshProtocolError(f"BOSH response is <{root.tag}>, not an httpbind <body>", retryable=True)
    return _Body(dict(root.attrib), b"".join(ET.tostring(child) for child in root), body)


_DIGITS = re.compile(r"[0-9]{1,16}")


def _int(attrs: dict[str, str], name: str, default: int, maximum: int) -> int:
    """A numeric body attribute (XEP-0124 defines them all as non-negative integers): ASCII
    digits only, 0..`maximum`; anything else ('nan', '1e400', '²', '-1') is a protocol error."""
    raw = attrs.get(name)
    if raw is None:
        return default
    if _DIGITS.fullmatch(raw) is None:
        raise BoshProtocolError(f"BOSH attribute {name}={raw[:40]!r} is not a non-negative integer")
    value = int(raw)
    if value > maximum:
        raise BoshProtocolError(f"BOSH attribute {name}={value} is out of range (at most {maximum})")
    return value
