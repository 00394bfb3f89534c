"""The BOSH session rules (XEP-0124/0206), without sockets: bodies in, bodies out."""

from __future__ import annotations

import random
import xml.etree.ElementTree as ET
from collections import Counter

import pytest

from gridpresence.transport.bosh_session import (
    NS_HTTPBIND,
    NS_XBOSH,
    BoshError,
    BoshHTTPError,
    BoshProtocolError,
    BoshSession,
    BoshTerminated,
    Kind,
    Payload,
    StreamStart,
    Terminated,
)

B = f"{{{NS_HTTPBIND}}}"


def body(attrs: str = "", children: str = "") -> bytes:
    return f"<body xmlns='{NS_HTTPBIND}' {attrs}>{children}</body>".encode()


def created(requests: int = 2, polling: int = 5, extra: str = "") -> tuple[BoshSession, int]:
    s = BoshSession(to="grid.test", wait=30, hold=1, rid=1000)
    req = s.next_request(0.0)
    assert req is not None and req.kind is Kind.CREATE
    events = s.receive(req.rid, 200, body(
        f"sid='s1' wait='30' hold='1' requests='{requests}' polling='{polling}' inactivity='60' from='grid.test' {extra}",
        "<stream:features xmlns:stream='http://etherx.jabber.org/streams'/>"))
    assert isinstance(events[0], StreamStart) and events[0].sid == "s1"
    assert isinstance(events[1], Payload) and b"features" in events[1].xml
    return s, req.rid


def test_session_creation_request_carries_the_negotiation_attributes() -> None:
    s = BoshSession(to="grid.test", wait=45, hold=1, rid=77)
    req = s.next_request(0.0)
    assert req is not None
    root = ET.fromstring(req.body)
    assert root.tag == f"{B}body"
    assert root.get("rid") == "77" and root.get("to") == "grid.test"
    assert root.get("wait") == "45" and root.get("hold") == "1" and root.get("ver")
    assert root.get(f"{{{NS_XBOSH}}}version") == "1.0"
    assert root.get("sid") is None
    assert s.next_request(0.0) is None  # nothing else until the sid is known


def test_negotiated_values_are_taken_from_the_server() -> None:
    s, _ = created(requests=3, polling=7)
    g = s.granted
    assert (g.sid, g.wait, g.hold, g.requests, g.polling, g.inactivity) == ("s1", 30, 1, 3, 7, 60)


def test_rids_are_consecutive_and_pipelining_stops_at_requests() -> None:
    s, rid0 = created(requests=2)
    poll = s.next_request(1.0)
    assert poll is not None and poll.empty and poll.rid == rid0 + 1
    s.queue(b"<message to='a@grid.test'><body>1</body></message>")
    second = s.next_request(1.0)
    assert second is not None and second.rid == rid0 + 2 and b"<message xmlns='jabber:client'" in second.body
    s.queue(b"<message to='a@grid.test'><body>2</body></message>")
    assert s.next_request(1.0) is None  # two outstanding = the server's limit
    s.receive(poll.rid, 200, body("sid='s1'"), now=2.0)
    third = s.next_request(2.0)
    assert third is not None and third.rid == rid0 + 3 and b"<body>2</body>" in third.body
    assert ET.fromstring(third.body).get("sid") == "s1"


def test_responses_are_delivered_in_rid_order() -> None:
    s, _ = created(requests=2)
    s.queue(b"<iq type='get' id='1'/>")
    a = s.next_request(1.0)
    s.queue(b"<iq type='get' id='2'/>")
    b = s.next_request(1.0)
    assert a and b
    assert s.receive(b.rid, 200, body("sid='s1'", "<iq xmlns='jabber:client' id='second' type='result'/>")) == []
    out = s.receive(a.rid, 200, body("sid='s1'", "<iq xmlns='jabber:client' id='first' type='result'/>"))
    assert [ET.fromstring(e.xml).get("id") for e in out if isinstance(e, Payload)] == ["first", "second"]


def test_a_broken_request_is_resent_with_the_same_rid_and_payload() -> None:
    s, _ = created()
    s.queue(b"<message to='a@grid.test'><body>keep me</body></message>")
    req = s.next_request(1.0)
    assert req is not None
    again = s.broken(req.rid, now=1.5)
    assert (again.rid, again.body, again.attempts) == (req.rid, req.body, 1)
    # The retransmission's answer is consumed normally and nothing was renumbered.
    s.receive(req.rid, 200, body("sid='s1'"))
    nxt = s.next_request(2.0)
    assert nxt is not None and nxt.rid == req.rid + 1


def test_empty_polls_answered_at_once_respect_the_polling_interval() -> None:
    s, _ = created(requests=1, polling=5)
    poll = s.next_request(10.0)
    assert poll is not None and poll.empty
    s.receive(poll.rid, 200, body("sid='s1'"), now=10.2)  # not held: we are polling
    assert s.next_request(11.0) is None
    assert s.poll_due(11.0) == pytest.approx(15.0)
    later = s.next_request(15.0)
    assert later is not None and later.empty


def test_a_poll_answered_with_data_is_renewed_at_once() -> None:
    s, _ = created(requests=2, polling=5)
    poll = s.next_request(10.0)
    assert poll is not None
    s.receive(poll.rid, 200, body("sid='s1'", "<message xmlns='jabber:client'/>"), now=10.1)
    assert s.next_request(10.1) is not None


def test_restart_request_and_new_stream() -> None:
    s, _ = created()
    start = s.restart()
    assert isinstance(start, StreamStart) and start.sid == "s1"
    req = s.next_request(1.0)
    assert req is not None and req.kind is Kind.RESTART
    root = ET.fromstring(req.body)
    assert root.get(f"{{{NS_XBOSH}}}restart") == "true" and root.get("to") == "grid.test"


def test_terminate_carries_queued_stanzas_and_ends_cleanly() -> None:
    s, _ = created()
    s.queue(b"<presence type='unavailable'/>")
    s.terminate()
    req = s.next_request(1.0)
    assert req is not None and req.kind is Kind.TERMINATE
    assert ET.fromstring(req.body).get("type") == "terminate" and b"unavailable" in req.body
    with pytest.raises(BoshError):
        s.queue(b"<message/>")
    events = s.receive(req.rid, 200, body("sid='s1' type='terminate'"))
    assert isinstance(events[-1], Terminated) and s.closed
    assert s.next_request(2.0) is None


@pytest.mark.parametrize(
    ("status", "payload", "error", "retryable"),
    [
        (200, b"<html>gateway</html", BoshProtocolError, True),
        (200, b"<html/>", BoshProtocolError, True),
        (200, body("sid='someone-else'"), BoshProtocolError, False),
        (404, b"", BoshHTTPError, False),
        (503, b"", BoshHTTPError, True),
        (200, body("sid='s1' type='terminate' condition='policy-violation'"), BoshTerminated, False),
    ],
    ids=["not-xml", "not-a-body", "wrong-sid", "404", "503", "terminate-condition"],
)
def test_bad_answers_raise_typed_errors(status: int, payload: bytes, error: type[BoshError], retryable: bool) -> None:
    s, _ = created()
    req = s.next_request(1.0)
    assert req is not None
    with pytest.raises(error) as info:
        s.receive(req.rid, status, payload)
    assert info.value.retryable is retryable
    assert str(info.value)  # a sentence for the log, never empty
    if error is BoshTerminated:
        assert "policy-violation" in str(info.value) and s.closed


def test_session_creation_refused_by_the_server() -> None:
    s = BoshSession(to="grid.test")
    req = s.next_request(0.0)
    assert req is not None
    with pytest.raises(BoshTerminated, match="host-unknown"):
        s.receive(req.rid, 200, body("type='terminate' condition='host-unknown'"))


def test_namespaced_elements_keep_their_namespace() -> None:
    s, _ = created()
    s.queue(b"<r xmlns='urn:xmpp:sm:3'/>")
    req = s.next_request(1.0)
    assert req is not None and b"<r xmlns='urn:xmpp:sm:3'/>" in req.body


def test_retransmission_gives_up_after_attempts_or_inactivity() -> None:
    s, _ = created()  # inactivity 60
    req = s.next_request(1.0)
    assert req is not None
    s.broken(req.rid, now=2.0, max_attempts=10)
    s.broken(req.rid, now=50.0, max_attempts=10)
    with pytest.raises(BoshError, match="inactivity"):
        s.broken(req.rid, now=63.0, max_attempts=10)
    s2, _ = created()
    req2 = s2.next_request(1.0)
    assert req2 is not None
    for attempt in (1, 2):
        assert s2.broken(req2.rid, now=attempt, max_attempts=3).attempts == attempt
    with pytest.raises(BoshError, match="failed 3 times"):
        s2.broken(req2.rid, now=3, max_attempts=3)


# -- fuzzing: whatever the server sends, only typed BOSH errors come out ------------------

FUZZ_SEED = 20261121
NUMERIC = ("wait", "hold", "requests", "polling", "inactivity", "maxpause", "ack")
NASTY_VALUES = ("nan", "NaN", "inf", "-inf", "1e400", "1e3", "²", "٣", "１", "-1", "0", "1", "30", "3.5", "0x10",
                "1_000", " 5", "5 ", "", "+5", "99999999999999999999999", "9" * 400, "&#178;", "&#x661;", "\u00a0")


def _attr(value: str) -> str:
    """A quoted attribute value; character references ("&#178;") are left for the parser."""
    return "'" + (value if "&#" in value else value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;"))

def _random_attrs(rng: random.Random, create: bool) -> str:
    attrs = {"sid": "s1"} if create or rng.random() < 0.8 else {}
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(NUMERIC + ("type", "condition", "from", "rid", "ver", "x-" + str(rng.randint(0, 9))))
        attrs[name] = rng.choice(NASTY_VALUES) if rng.random() < 0.8 else str(rng.randint(0, 10**rng.randint(1, 20)))
    return " ".join(f"{k}={_attr(v)}'" for k, v in attrs.items())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        pos = rng.randrange(len(out) + 1)
        op = rng.randrange(5)
        if op == 0 and out:
            del out[pos:pos + rng.randint(1, 8)]
        elif op == 1:
            out[pos:pos] = rng.choice([b"<", b">", b"&", b"'", b'"', b"/", b"=", b"\x00", b"\xff", b"]]>", b"<!--",
                                       b"<?xml version='1.0' encoding='bogus'?>", b"&lt;", b"\xc3"])
        elif op == 2 and out:
            start = rng.randrange(len(out))
            out[pos:pos] = out[start:start + rng.randint(1, 20)]
        elif op == 3:
            del out[pos:]
        else:
            out[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 4)))
    return bytes(out)


def _fuzz_case(rng: random.Random) -> tuple[BoshSession, int, bytes]:
    """A session waiting on one request, and a random answer for it."""
    create = rng.random() < 0.4
    if create:
        s = BoshSession(to="grid.test", wait=30, hold=1, rid=1000)
        req = s.next_request(0.0)
    else:
        s, _ = created()
        s.queue(b"<message to='x@grid.test'><body>hi</body></message>")
        req = s.next_request(1.0)
    assert req is not None
    answer = body(_random_attrs(rng, create), rng.choice(["", "<message><body>hi</body></message>"]))
    if rng.random() < 0.4:
        answer = _mutate(rng, answer)
    return s, req.rid, answer


def test_fuzzed_bodies_give_only_typed_errors_and_recoverable_ones_leave_the_session_usable() -> None:
    rng = random.Random(FUZZ_SEED)
    outcomes: Counter[str] = Counter()
    for _ in range(1500):
        s, rid, answer = _fuzz_case(rng)
        try:
            events = s.receive(rid, 200, answer)
        except BoshError as exc:  # anything else (ValueError, OverflowError, …) fails the test
            assert str(exc)
            outcomes["retryable" if exc.retryable else "fatal"] += 1
            if exc.retryable:  # the same request, answered properly this time, carries on
                good = body("sid='s1' wait='30' hold='1' requests='2' inactivity='60'" if not s.created else "sid='s1'",
                            "<message><body>again</body></message>")
                assert any(isinstance(e, Payload) and b"again" in e.xml for e in s.receive(rid, 200, good))
                s.queue(b"<presence/>")
                after = s.next_request(2.0)
                assert after is not None and after.rid == rid + 1 and b"<presence" in after.body
            continue
        outcomes["accepted"] += 1
        assert all(isinstance(e, (StreamStart, Payload, Terminated)) for e in events)
        g = s.granted
        assert all(isinstance(v, int) and 0 <= v for v in (g.wait, g.hold, g.requests, g.polling, g.inactivity))
        if not s.closed and s.created:
            s.next_request(2.0)
    assert min(outcomes.values()) >= 50, outcomes  # every path was exercised


@pytest.mark.parametrize("attr", ["hold='nan'", "hold='1e400'", "requests='inf'", "wait='²'", "polling='-1'",
                                  "inactivity='3.5'", "wait='99999999'", "maxpause='٣'"])
def test_non_integer_or_unbounded_session_attributes_are_protocol_errors(attr: str) -> None:
    s = BoshSession(to="grid.test")
    req = s.next_request(0.0)
    assert req is not None
    with pytest.raises(BoshProtocolError, match=attr.split("=")[0]):
        s.receive(req.rid, 200, body(f"sid='s1' {attr}"))
    assert not s.created


def test_a_bad_ack_is_a_protocol_error_and_consumes_nothing() -> None:
    s, _ = created()
    req = s.next_request(1.0)
    assert req is not None
    with pytest.raises(BoshProtocolError, match="ack"):
        s.receive(req.rid, 200, body("sid='s1' ack='²'"))
    assert s.outstanding == 1  # the request is still the one outstanding
