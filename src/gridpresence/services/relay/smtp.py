"""The relay's SMTP side: an aiosmtpd handler that screens every mail before storing it ([00108]).

Only the fleet's parties may send (operators send commands; devices send their data and
outcomes), only to the fleet's addresses. Every refusal is a proper SMTP reply and nothing
refused is stored:

* 530 any transaction before STARTTLS (nothing, not even an address, travels in clear),
* 553 unknown sender, 550 unknown recipient or a sender/payload mismatch (not authorised),
* 550 device data without the device's valid OpenPGP signature (the envelope is not proof),
  451 when the device's key cannot be found just now (the device tries again later),
* 552 too big (aiosmtpd enforces ``data_size_limit``, also for a ``SIZE=`` announced in MAIL),
* 554 a message that is not a grid mail (no payload part, invalid XML or values),
* 451 an internal error (logged; never aiosmtpd's "500 Error: ..." with the exception).

A mail is answered 250 only once its payload is committed to the queue.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiosmtpd.smtp import SMTP, Envelope, Session

from gridpresence.protocol.billing_report import BillingReport
from gridpresence.protocol.models import Command, Outcome
from gridpresence.transport.mail import GridMail, MailError, SignedCommand, parse_mail, payload_xml
from gridpresence.services.relay.queue import CommandQueue
from gridpresence.security.detached import SignatureRefused, verify_detached
from gridpresence.security.keyring import KeyLookup, KeyUnavailable

log = logging.getLogger(__name__)

MAX_MAIL_BYTES = 256 * 1024  # a grid payload is a few hundred bytes; an upgrade patch is not our job


@dataclass(frozen=True)
class Directory:
    """Who may mail the relay: the fleet's operators and devices (bare JIDs = mail addresses)."""

    operators: frozenset[str]
    devices: frozenset[str]
    relay: str
    readers: frozenset[str] = frozenset()  # billing parties and customers: billing reports only

    def known(self, address: str) -> bool:
        return (address in self.operators or address in self.devices or address == self.relay
                or address in self.readers)


@dataclass(frozen=True)
class Stored:
    """What a mail added: commands for devices, or a pushed payload (inbox)."""

    command: Command | None = None
    devices: tuple[str, ...] = ()
    inbox: bool = False


class RelayHandler:
    """aiosmtpd handler (``handle_MAIL``/``handle_RCPT``/``handle_DATA`` hooks).

    `on_stored` is called after each commit so the XMPP side can deliver at once.
    """

    def __init__(self, directory: Directory, queue: CommandQueue, on_stored: Callable[[Stored], None],
                 keyring: KeyLookup) -> None:
        self.directory = directory
        self.queue = queue
        self.on_stored = on_stored
        self.keyring = keyring  # the public keys that mailed signatures are checked with

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        sender = address.lower()
        if not self.directory.known(sender) or sender in self.directory.readers:
            log.warning("refused mail from unknown sender %r (%s)", address, session.peer)
            return "553 5.7.1 sender not known to this grid"
        envelope.mail_from = sender
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          rcpt_options: list[str]) -> str:
        rcpt = address.lower()
        if not self.directory.known(rcpt):
            return "550 5.1.1 no such device or operator on this grid"
        envelope.rcpt_tos.append(rcpt)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        try:
            mail = parse_mail(envelope.original_content or b"")
        except MailError as exc:
            return f"554 5.6.0 not a grid mail: {exc}"[:500]
        if mail.sender != envelope.mail_from:
            return "550 5.7.1 header From does not match the envelope sender"
        rcpts = list(dict.fromkeys(envelope.rcpt_tos))
        # Who may send what to whom first (cheap and certain), then whether the sender signed it.
        refused = self._role_refusal(mail, rcpts) or await self._signature_refusal(mail)
        if refused is not None:
            log.warning("refused mail from %s: %s", mail.sender, refused)
            return refused[:500]
        self.on_stored(self._store(mail, rcpts))
        return "250 2.0.0 stored"

    async def handle_exception(self, error: Exception) -> str:
        """A bug met by some mail: log it, and answer a proper temporary failure instead of
        aiosmtpd's default "500 Error: (Type) text" (the sender keeps the mail and tries later)."""
        log.error("relay: a mail could not be screened", exc_info=error)
        return "451 4.3.0 internal error in the relay; try again later"

    def _role_refusal(self, mail: GridMail, rcpts: list[str]) -> str | None:
        payload, sender, d = mail.payload, mail.sender, self.directory
        if isinstance(payload, (Command, SignedCommand)):
            cmd = payload.command if isinstance(payload, SignedCommand) else payload
            if sender not in d.operators or cmd.issuer != sender:
                return "550 5.7.1 only an operator may mail commands, as their own issuer"
            if any(r not in d.devices for r in rcpts):
                return "550 5.1.1 commands go to device addresses only"
            if isinstance(payload, SignedCommand) and len(rcpts) != 1:
                return "550 5.1.1 a signed command goes to the one device it is signed for"
            return None
        if sender not in d.devices:
            return "550 5.7.1 only a device may mail its data or outcomes"
        if isinstance(payload, Outcome) and payload.device != sender:
            return "550 5.7.1 an outcome must come from its own device"
        if isinstance(payload, BillingReport) and payload.device != sender:
            return "550 5.7.1 a billing report must come from its own device"
        if any(r in d.devices for r in rcpts):
            return "550 5.1.1 device data goes to the operators or the relay"
        if not isinstance(payload, BillingReport) and any(r in d.readers for r in rcpts):
            return "550 5.1.1 only billing reports go to the billing party or customers"
        return None

    async def _signature_refusal(self, mail: GridMail) -> str | None:
        """Devices must sign what they mail (the envelope proves nothing); an operator's
        signature, when present, must be good too."""
        if mail.sender not in self.directory.devices and mail.signature is None:
            return None
        try:
            key = await self.keyring.key_for(mail.sender)
        except KeyUnavailable as exc:
            return f"451 4.7.1 cannot check the signature now: {exc}"
        try:
            verify_detached(mail.payload_bytes, mail.signature, mail.sender, key)
        except SignatureRefused as exc:
            return f"550 5.7.1 {exc}"
        return None

    def _store(self, mail: GridMail, rcpts: list[str]) -> Stored:
        """Commit a screened mail: commands per device, anything else to the inbox (once per id)."""
        payload = mail.payload
        if isinstance(payload, (Command, SignedCommand)):
            cmd = payload.command if isinstance(payload, SignedCommand) else payload
            added = self.queue.add(cmd, rcpts, payload_xml(payload))  # a signed one verbatim
            return Stored(command=cmd, devices=tuple(added))
        key = mail.message_id or f"<{hashlib.sha256(payload_xml(payload).encode()).hexdigest()}.{mail.sender}>"
        return Stored(inbox=self.queue.add_inbox(key, mail.sender, payload_xml(payload)))


def server_tls(cert: Path, key: Path) -> ssl.SSLContext:
    """The relay's side of STARTTLS: a certificate issued by the grid's CA."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    return ctx


def smtp_factory(handler: RelayHandler, *, hostname: str, tls_context: ssl.SSLContext,
                 max_bytes: int = MAX_MAIL_BYTES) -> Callable[[], SMTP]:
    """The protocol factory for ``loop.create_server``: the relay shares its event loop with the
    XMPP side. STARTTLS is required: a transaction before it is answered 530."""

    def make() -> SMTP:
        return SMTP(handler, hostname=hostname, data_size_limit=max_bytes, tls_context=tls_context,
                    require_starttls=True, ident="gridpresence relay")

    return make
