"""The issuer's side of store-and-forward: a command for a device without presence goes to the
relay as mail ([00118]), and the issuer gets "queued" until the relay passes on the real outcome."""

from __future__ import annotations

import asyncio
import smtplib
from xml.etree import ElementTree as ET

from gridpresence.xmpp.session import RelayEndpoint
from gridpresence.protocol.models import Command, Outcome, OutcomeStatus
from gridpresence.protocol.codec import q
from gridpresence.protocol.openpgp import element_to_text
from gridpresence.transport.mail import MailSender, SignedCommand, build_mail, smtp_reply
from gridpresence.security.pgp import pgpy


class RelayRoute:
    """Mails commands to the relay over one kept-open SMTP connection."""

    def __init__(self, relay: RelayEndpoint, signer: pgpy.PGPKey | None = None) -> None:
        self.relay = relay
        self.jid = relay.jid
        self.signer = signer  # the issuer's secret key: its mailed commands carry its signature
        self._sender = MailSender(relay.smtp_host, relay.smtp_port, relay.ca_file)

    async def queue(self, cmd: Command, device: str, wire: ET.Element | None = None) -> Outcome:
        """Hand `cmd` for `device` (bare JID) to the relay as `wire` — its signed ``<openpgp/>``,
        carried verbatim — or, without one, as the bare ``<command/>`` (which devices refuse
        unsigned): "queued", or "undeliverable" with the relay's refusal (its SMTP reply) or
        why it could not be reached."""
        payload = cmd if wire is None or wire.tag == q("command") else SignedCommand(cmd, element_to_text(wire))
        mail = build_mail(payload, cmd.issuer, [device], self.signer)
        try:
            await asyncio.to_thread(self._sender.send, mail, cmd.issuer, [device])
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = next(iter(exc.recipients.values()))
            return self._undeliverable(cmd, device, f"relay refused: {code} {text.decode(errors='replace')}")
        except smtplib.SMTPResponseException as exc:
            return self._undeliverable(cmd, device, f"relay refused: {exc.smtp_code} {smtp_reply(exc)}")
        except (smtplib.SMTPException, OSError) as exc:
            return self._undeliverable(cmd, device, f"relay at {self.relay.smtp_host}:{self.relay.smtp_port} "
                                                    f"unreachable: {exc}")
        return Outcome(command_id=cmd.id, device=device, status=OutcomeStatus.QUEUED,
                       detail=f"no presence; queued by the relay until {cmd.expires:%H:%M:%S} UTC")

    @staticmethod
    def _undeliverable(cmd: Command, device: str, detail: str) -> Outcome:
        return Outcome(command_id=cmd.id, device=device, status=OutcomeStatus.UNDELIVERABLE, detail=detail[:500])

    def close(self) -> None:
        self._sender.close()
