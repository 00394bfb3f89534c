"""The relay's SMTP side: an aiosmtpd handler that screens every mail before storing it ([00108]).

Only the fleet's parties may send (operators send commands; devices send their data and
outcomes), only to the fleet's addresses. Every refusal is a proper SMTP reply and nothing
refused is stored:

* 553 unknown sender, 550 unknown recipient or a sender/payload mismatch (not authorised),
* 552 too big (aiosmtpd enforces ``data_size_limit``, also for a ``SIZE=`` announced in MAIL),
* 554 a message that is not a grid mail (no payload part, invalid XML or values).

A mail is answered 250 only once its payload is committed to the queue.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, Envelope, Session

from gridpresence.protocol.models import Command, Outcome
from gridpresence.relay.mail import GridMail, MailError, SignedCommand, parse_mail, payload_xml
from gridpresence.relay.queue import CommandQueue

log = logging.getLogger(__name__)

MAX_MAIL_BYTES = 256 * 1024  # a grid payload is a few hundred bytes; an upgrade patch is not our job


@dataclass(frozen=True)
class Directory:
    """Who may mail the relay: the fleet's operators and devices (bare JIDs = mail addresses)."""

    operators: frozenset[str]
    devices: frozenset[str]
    relay: str

    def known(self, address: str) -> bool:
        return address in self.operators or address in self.devices or address == self.relay


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

    def __init__(self, directory: Directory, queue: CommandQueue, on_stored: Callable[[Stored], None]) -> None:
        self.directory = directory
        self.queue = queue
        self.on_stored = on_stored

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope, address: str,
                          mail_options: list[str]) -> str:
        sender = address.lower()
        if not self.directory.known(sender):
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
        try:
            stored = self._store(mail, envelope)
        except _Refused as exc:
            return str(exc)
        self.on_stored(stored)
        return "250 2.0.0 stored"

    def _store(self, mail: GridMail, envelope: Envelope) -> Stored:
        payload, sender, d = mail.payload, mail.sender, self.directory
        rcpts = list(dict.fromkeys(envelope.rcpt_tos))
        if isinstance(payload, (Command, SignedCommand)):
            cmd = payload.command if isinstance(payload, SignedCommand) else payload
            if sender not in d.operators or cmd.issuer != sender:
                raise _Refused("550 5.7.1 only an operator may mail commands, as their own issuer")
            if any(r not in d.devices for r in rcpts):
                raise _Refused("550 5.1.1 commands go to device addresses only")
            if isinstance(payload, SignedCommand) and len(rcpts) != 1:
                raise _Refused("550 5.1.1 a signed command goes to the one device it is signed for")
            added = self.queue.add(cmd, rcpts, payload_xml(payload))
            return Stored(command=cmd, devices=tuple(added))
        if sender not in d.devices:
            raise _Refused("550 5.7.1 only a device may mail its data or outcomes")
        if isinstance(payload, Outcome) and payload.device != sender:
            raise _Refused("550 5.7.1 an outcome must come from its own device")
        if any(r in d.devices for r in rcpts):
            raise _Refused("550 5.1.1 device data goes to the operators or the relay")
        key = mail.message_id or f"<{hashlib.sha256(payload_xml(payload).encode()).hexdigest()}.{sender}>"
        return Stored(inbox=self.queue.add_inbox(key, sender, payload_xml(payload)))


class _Refused(Exception):
    """An SMTP reply refusing a mail after its data was read."""


def smtp_factory(handler: RelayHandler, *, hostname: str, tls_context: ssl.SSLContext | None = None,
                 max_bytes: int = MAX_MAIL_BYTES) -> Callable[[], SMTP]:
    """The protocol factory for ``loop.create_server``: the relay shares its event loop with the
    XMPP side. A `tls_context` offers STARTTLS (and is where requiring it will be configured)."""

    def make() -> SMTP:
        return SMTP(handler, hostname=hostname, data_size_limit=max_bytes, tls_context=tls_context,
                    ident="gridpresence relay")

    return make
