"""The relay's mail form and durable queue, without a server."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from gridpresence.protocol.models import (
    Action,
    Command,
    DeviceKind,
    DeviceState,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    Telemetry,
)
from gridpresence.transport.mail import MailError, build_mail, parse_mail
from gridpresence.services.relay.queue import CommandQueue, State


def test_each_payload_survives_the_mail_form() -> None:
    cmd = Command.new(Action.SHED, "alice@localhost", ttl_s=60, args={"why": "peak"})
    outcome = Outcome(command_id=cmd.id, device="far-1@localhost", status=OutcomeStatus.EXECUTED, detail="shed")
    report = PresenceReport(kind=DeviceKind.METER, state=DeviceState.ON, telemetry=Telemetry(kw=12.5), seq=3)
    for payload, sender in ((cmd, "alice@localhost"), (outcome, "far-1@localhost"), (report, "mailer-1@localhost")):
        raw = build_mail(payload, sender, ["relay@localhost"]).as_bytes()
        assert b"application/vnd.gridpresence+xml" in raw
        mail = parse_mail(raw)
        assert mail.payload == payload and mail.sender == sender and mail.message_id


@pytest.mark.parametrize("raw, why", [
    (b"From: alice@localhost\r\nSubject: hi\r\n\r\nshed load-1 please\r\n", "exactly one"),
    (b"Subject: hi\r\n\r\nx\r\n", "no From"),
    (b"From: a@localhost\r\nContent-Type: application/vnd.gridpresence+xml\r\n\r\n<command xmlns='urn:gridpresence:0'",
     "well-formed"),
    (b"From: a@localhost\r\nContent-Type: application/vnd.gridpresence+xml\r\n\r\n"
     b"<command xmlns='urn:gridpresence:0' id='x' action='melt' issuer='a@localhost'/>", "invalid command"),
    (b"From: a@localhost\r\nContent-Type: application/vnd.gridpresence+xml\r\n\r\n<tea xmlns='urn:x'/>", "unknown"),
])
def test_bad_mail_says_why(raw: bytes, why: str) -> None:
    with pytest.raises(MailError, match=why):
        parse_mail(raw)


def test_queue_is_idempotent_and_answers_once(tmp_path: Path) -> None:
    q = CommandQueue(tmp_path / "q.sqlite3")
    cmd = Command.new(Action.READ, "alice@localhost", ttl_s=60)
    assert q.add(cmd, ["far-1@localhost", "far-2@localhost"], "<x/>") == ["far-1@localhost", "far-2@localhost"]
    assert q.add(cmd, ["far-1@localhost"], "<x/>") == []  # the same mail again
    assert [c.id for c in q.queued_for("far-1@localhost")] == [cmd.id]
    q.mark([(cmd.id, "far-1@localhost")], State.DELIVERING)
    assert q.queued_for("far-1@localhost") == []
    assert q.requeue("far-1@localhost") == 1  # the device left before answering
    assert len(q.answer([(cmd.id, "far-1@localhost", "<o/>")])) == 1
    assert q.answer([(cmd.id, "far-1@localhost", "<o2/>")]) == []  # a second outcome changes nothing
    q.close()
    again = CommandQueue(tmp_path / "q.sqlite3")  # survives reopening
    assert again.get(cmd.id, "far-1@localhost").outcome == "<o/>"  # type: ignore[union-attr]
    assert again.counts() == {"answered": 1, "queued": 1}


def test_queue_expiry_gives_sent_commands_a_margin(tmp_path: Path) -> None:
    q = CommandQueue(tmp_path / "q.sqlite3")
    now = dt.datetime.now(dt.timezone.utc)
    old = Command.new(Action.READ, "alice@localhost", ttl_s=1, now=now - dt.timedelta(seconds=3))
    q.add(old, ["far-1@localhost", "far-2@localhost"], "<x/>")
    q.mark([(old.id, "far-2@localhost")], State.DELIVERING)
    t = now.timestamp()
    assert [r.device for r in q.due_to_expire(t, answer_margin_s=5)] == ["far-1@localhost"]
    assert {r.device for r in q.due_to_expire(t, answer_margin_s=1)} == {"far-1@localhost", "far-2@localhost"}
    assert q.next_expiry(answer_margin_s=5) == pytest.approx(old.expires.timestamp())
