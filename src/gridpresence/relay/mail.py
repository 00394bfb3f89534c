"""Grid payloads as RFC 5322 mail, and back: the one place that knows the mail form.

A grid mail has a short text part for people and the payload XML (the same element the
XMPP stanza carries, see PROTOCOL.md) as a part of type :data:`CONTENT_TYPE`. Mail addresses
are the parties' bare JIDs, so ``load-1@localhost`` is both the device's JID and its address.
"""

from __future__ import annotations

import smtplib
import threading
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parseaddr
from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import (
    PayloadError,
    command_from_xml,
    command_to_xml,
    outcome_from_xml,
    outcome_to_xml,
    q,
    report_from_xml,
    report_to_xml,
)
from gridpresence.protocol.models import Command, Outcome, PresenceReport
from gridpresence.protocol.openpgp import OPENPGP_NS, element_to_text
from gridpresence.security.gate import Refusal, open_command

CONTENT_TYPE = "application/vnd.gridpresence+xml"
_MAINTYPE, _SUBTYPE = CONTENT_TYPE.split("/")
# compat32 parses ~10x faster than the modern policy, and we read only three headers and one part.
_PARSER = BytesParser(policy=policy.compat32)



@dataclass(frozen=True)
class SignedCommand:
    """A signed command (``<openpgp/>``), carried verbatim: the relay reads the command inside
    to route it (device, expiry, issuer) but cannot change it; the device verifies it."""

    command: Command  # as claimed; only the device checks the signature
    xml: str  # the <openpgp/> element exactly as the issuer signed it


Payload = Command | SignedCommand | Outcome | PresenceReport


class MailError(ValueError):
    """A mail that is not a grid mail; the message says why (sent back in the SMTP reply)."""


@dataclass(frozen=True)
class GridMail:
    """A parsed grid mail: who sent it (header From, lower-cased) and its one payload."""

    sender: str
    message_id: str
    payload: Payload


def _xml(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


def payload_xml(payload: Payload) -> str:
    if isinstance(payload, SignedCommand):
        return payload.xml
    if isinstance(payload, Command):
        return _xml(command_to_xml(payload))
    if isinstance(payload, Outcome):
        return _xml(outcome_to_xml(payload))
    return _xml(report_to_xml(payload))


def payload_from_xml(text: str | bytes) -> Payload:
    """The grid payload an XML text holds; raises :class:`PayloadError`."""
    try:
        element = ET.fromstring(text)
    except ET.ParseError as exc:
        raise PayloadError(f"payload is not well-formed XML: {exc}") from None
    if element.tag == f"{{{OPENPGP_NS}}}openpgp":
        return signed_command(element)
    if element.tag == q("command"):
        return command_from_xml(element)
    if element.tag == q("outcome"):
        return outcome_from_xml(element)
    if element.tag == q("device"):
        return report_from_xml(element)
    raise PayloadError(f"unknown grid payload <{element.tag}>")


def signed_command(element: ET.Element) -> SignedCommand:
    """A signed command read for routing (the signature is the device's to check)."""
    try:
        return SignedCommand(open_command(element).command, element_to_text(element))
    except Refusal as exc:
        raise PayloadError(f"not a signed command: {exc.detail}") from None


def _summary(payload: Payload, sender: str) -> tuple[str, str]:
    if isinstance(payload, SignedCommand):
        subject, text = _summary(payload.command, sender)
        return subject, "Signed " + text
    if isinstance(payload, Command):
        return (f"gridpresence command {payload.action.value} {payload.id}",
                f"{payload.action.value} issued by {payload.issuer} at {payload.issued:%Y-%m-%d %H:%M:%S} UTC, "
                f"expires {payload.expires:%Y-%m-%d %H:%M:%S} UTC.\n")
    if isinstance(payload, Outcome):
        return (f"gridpresence outcome {payload.status.value} {payload.command_id}",
                f"{payload.device}: {payload.summary()}\n")
    return f"gridpresence data from {sender}", f"{sender}: {payload.status_text()}\n"


def message_id_for(payload: Payload, sender: str) -> str:
    """A Message-ID that names the payload, so the same payload mailed twice is recognisable."""
    if isinstance(payload, SignedCommand):
        key = f"command.{payload.command.id}"
    elif isinstance(payload, Command):
        key = f"command.{payload.id}"
    elif isinstance(payload, Outcome):
        key = f"outcome.{payload.command_id}"
    else:
        key = f"report.{payload.seq}.{payload.at.timestamp():.6f}"
    return f"<{key}.{sender.replace('@', '.')}@gridpresence>"


def build_mail(payload: Payload, sender: str, recipients: list[str]) -> EmailMessage:
    """The RFC 5322 message carrying `payload` from `sender` to `recipients` (bare JIDs)."""
    subject, text = _summary(payload, sender)
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = Address(addr_spec=sender)
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id_for(payload, sender)
    msg.set_content(text)
    msg.add_attachment(payload_xml(payload).encode(), maintype=_MAINTYPE, subtype=_SUBTYPE,
                       filename="payload.xml")
    return msg


def parse_mail(raw: bytes) -> GridMail:
    """The grid payload of a raw mail; raises :class:`MailError` saying what is wrong."""
    try:
        msg = _PARSER.parsebytes(raw)
    except Exception as exc:  # the email package raises many kinds on broken input
        raise MailError(f"unparseable message: {exc}") from None
    sender = parseaddr(str(msg.get("From", "")))[1].lower()
    if not sender:
        raise MailError("message has no From address")
    parts = [p for p in msg.walk() if p.get_content_type() == CONTENT_TYPE]
    if len(parts) != 1:
        raise MailError(f"message must carry exactly one {CONTENT_TYPE} part, found {len(parts)}")
    try:
        body = parts[0].get_payload(decode=True)
        payload = payload_from_xml(body if isinstance(body, bytes) else b"")
    except PayloadError as exc:
        raise MailError(str(exc)) from None
    return GridMail(sender=sender, message_id=str(msg.get("Message-ID", "")).strip(), payload=payload)


class MailSender:
    """An SMTP client that keeps one connection open (reconnecting when it drops).

    Blocking (stdlib smtplib): call it through ``asyncio.to_thread``. A lock keeps one
    transaction at a time on the connection.
    """

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._smtp: smtplib.SMTP | None = None
        self._lock = threading.Lock()

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> None:
        """Send one mail; raises smtplib.SMTPException (with the server's code) or OSError."""
        with self._lock:
            for attempt in (1, 2):
                if self._smtp is None:
                    self._smtp = smtplib.SMTP(self.host, self.port, timeout=self.timeout)
                try:
                    self._smtp.send_message(msg, from_addr=sender, to_addrs=recipients)
                    return
                except smtplib.SMTPServerDisconnected:
                    self._smtp = None  # an idle connection the server timed out: one fresh try
                    if attempt == 2:
                        raise
                except smtplib.SMTPException:
                    self._reset()
                    raise

    def _reset(self) -> None:
        try:
            if self._smtp is not None:
                self._smtp.rset()
        except (smtplib.SMTPException, OSError):
            self._smtp = None

    def close(self) -> None:
        with self._lock:
            if self._smtp is not None:
                try:
                    self._smtp.quit()
                except (smtplib.SMTPException, OSError):
                    pass
                self._smtp = None
