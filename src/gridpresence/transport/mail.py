"""Grid payloads as RFC 5322 mail, and back: the one place that knows the mail form.

A grid mail has a short text part for people, the payload XML (the same element the XMPP
stanza carries, see PROTOCOL.md) as a part of type :data:`CONTENT_TYPE`, and the sender's
detached OpenPGP signature over that payload as a part of type :data:`SIGNATURE_TYPE`. Mail
addresses are the parties' bare JIDs, so ``load-1@localhost`` is both the device's JID and its
address. Mail goes over STARTTLS only, verified against the grid's CA.
"""

from __future__ import annotations

import smtplib
import ssl
import threading
from dataclasses import dataclass
from email import policy
from email.headerregistry import Address
from email.message import EmailMessage
from email.parser import BytesParser
from email.utils import parseaddr
from pathlib import Path
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
from gridpresence.transport.tls import tls_context
from gridpresence.protocol.billing_report import BillingReport, billing_report_from_xml, billing_report_to_xml
from gridpresence.protocol.models import Command, Outcome, PresenceReport
from gridpresence.protocol.openpgp import OPENPGP_NS, element_to_text
from gridpresence.security.gate import Refusal, open_command
from gridpresence.security.detached import sign_detached
from gridpresence.security.pgp import pgpy

CONTENT_TYPE = "application/vnd.gridpresence+xml"
SIGNATURE_TYPE = "application/pgp-signature"
_MAINTYPE, _SUBTYPE = CONTENT_TYPE.split("/")
# compat32 parses ~10x faster than the modern policy, and we read only three headers and one part.
_PARSER = BytesParser(policy=policy.compat32)



@dataclass(frozen=True)
class SignedCommand:
    """A signed command (``<openpgp/>``), carried verbatim: the relay reads the command inside
    to route it (device, expiry, issuer) but cannot change it; the device verifies it."""

    command: Command  # as claimed; only the device checks the signature
    xml: str  # the <openpgp/> element exactly as the issuer signed it


Payload = Command | SignedCommand | Outcome | PresenceReport | BillingReport


class MailError(ValueError):
    """A mail that is not a grid mail; the message says why (sent back in the SMTP reply)."""


@dataclass(frozen=True)
class GridMail:
    """A parsed grid mail: who sent it (header From, lower-cased) and its one payload."""

    sender: str
    message_id: str
    payload: Payload
    payload_bytes: bytes  # exactly as mailed: what the signature is over
    signature: bytes | None = None  # the sender's detached OpenPGP signature, if the mail had one


def _xml(element: ET.Element) -> str:
    return ET.tostring(element, encoding="unicode")


def payload_xml(payload: Payload) -> str:
    if isinstance(payload, SignedCommand):
        return payload.xml
    if isinstance(payload, Command):
        return _xml(command_to_xml(payload))
    if isinstance(payload, Outcome):
        return _xml(outcome_to_xml(payload))
    if isinstance(payload, BillingReport):
        return _xml(billing_report_to_xml(payload))
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
    if element.tag == q("billing-report"):
        return billing_report_from_xml(element)
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
    if isinstance(payload, BillingReport):
        return f"gridpresence {payload.summary()}", f"{payload.summary()}: readable by its audiences only.\n"
    return f"gridpresence data from {sender}", f"{sender}: {payload.status_text()}\n"


def message_id_for(payload: Payload, sender: str) -> str:
    """A Message-ID that names the payload, so the same payload mailed twice is recognisable."""
    if isinstance(payload, SignedCommand):
        key = f"command.{payload.command.id}"
    elif isinstance(payload, Command):
        key = f"command.{payload.id}"
    elif isinstance(payload, Outcome):
        key = f"outcome.{payload.command_id}"
    elif isinstance(payload, BillingReport):
        key = f"billing-report.{payload.id}"
    else:
        key = f"report.{payload.seq}.{payload.at.timestamp():.6f}"
    return f"<{key}.{sender.replace('@', '.')}@gridpresence>"


def build_mail(payload: Payload, sender: str, recipients: list[str], signer: pgpy.PGPKey | None = None) -> EmailMessage:
    """The RFC 5322 message carrying `payload` from `sender` to `recipients` (bare JIDs), signed
    with the sender's secret key `signer` when given."""
    subject, text = _summary(payload, sender)
    msg = EmailMessage(policy=policy.SMTP)
    msg["From"] = Address(addr_spec=sender)
    msg["To"] = ", ".join(recipients)
    msg["Subject"] = subject
    msg["Message-ID"] = message_id_for(payload, sender)
    msg.set_content(text)
    data = payload_xml(payload).encode()
    msg.add_attachment(data, maintype=_MAINTYPE, subtype=_SUBTYPE, filename="payload.xml")
    if signer is not None:
        msg.add_attachment(sign_detached(data, signer).encode("ascii"), maintype="application",
                           subtype="pgp-signature", filename="payload.xml.sig")
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
    body = parts[0].get_payload(decode=True)
    data = body if isinstance(body, bytes) else b""
    try:
        payload = payload_from_xml(data)
    except PayloadError as exc:
        raise MailError(str(exc)) from None
    signatures = [p for p in msg.walk() if p.get_content_type() == SIGNATURE_TYPE]
    if len(signatures) > 1:
        raise MailError(f"message carries {len(signatures)} {SIGNATURE_TYPE} parts; one signature, please")
    signature = signatures[0].get_payload(decode=True) if signatures else None
    return GridMail(sender=sender, message_id=str(msg.get("Message-ID", "")).strip(), payload=payload,
                    payload_bytes=data, signature=signature if isinstance(signature, bytes) else None)


class MailTLSError(OSError):
    """STARTTLS with the relay failed: it did not offer it, or its certificate is not trusted."""


def open_smtp(host: str, port: int, tls: ssl.SSLContext, timeout: float = 10.0) -> smtplib.SMTP:
    """An SMTP session that has done STARTTLS; raises :class:`MailTLSError` saying why not."""
    smtp = smtplib.SMTP(host, port, timeout=timeout)
    try:
        smtp.ehlo()
        if not smtp.has_extn("starttls"):
            raise MailTLSError(f"the relay at {host}:{port} does not offer STARTTLS; not sending in clear")
        smtp.starttls(context=tls)
        smtp.ehlo()
    except ssl.SSLError as exc:
        smtp.close()
        why = (f"certificate verify failed: {exc.verify_message}" if isinstance(exc, ssl.SSLCertVerificationError)
               else exc.reason or str(exc))
        raise MailTLSError(f"TLS with the relay at {host}:{port} failed: {why} "
                           "(does the client trust the grid's CA file?)") from None
    except BaseException:
        smtp.close()
        raise
    return smtp


def smtp_reply(exc: smtplib.SMTPResponseException) -> str:
    """The server's reply text of a refusal (smtplib gives it as bytes, typed as bytes or str)."""
    text = exc.smtp_error
    return text.decode(errors="replace") if isinstance(text, bytes) else text


class MailSender:
    """An SMTP client that keeps one STARTTLS connection open (reconnecting when it drops),
    verifying the relay against `ca_file`.

    Blocking (stdlib smtplib): call it through ``asyncio.to_thread``. A lock keeps one
    transaction at a time on the connection.
    """

    def __init__(self, host: str, port: int, ca_file: Path | None, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._tls = tls_context(ca_file)  # the same trust as every XMPP session: the grid's CA
        self._smtp: smtplib.SMTP | None = None
        self._lock = threading.Lock()

    def send(self, msg: EmailMessage, sender: str, recipients: list[str]) -> None:
        """Send one mail; raises smtplib.SMTPException (with the server's code) or OSError."""
        with self._lock:
            for attempt in (1, 2):
                if self._smtp is None:
                    self._smtp = open_smtp(self.host, self.port, self._tls, self.timeout)
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
