"""A device that can reach only SMTP ([00116], [00117]): its firewall lets mail out and nothing
else, so it pushes its data (a presence report) and outcomes by mail to the relay, which passes
them to the operators over XMPP. Everything it mails is signed with its own key; a meter's
billing report is sealed part by part for its readers before it leaves the device ([0085])."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import json
import logging
import os
from pathlib import Path

from gridpresence.security.reports import ReportAudience, reader_keys, seal_report
from gridpresence.device.reports import close_period
from gridpresence.xmpp.session import RelayEndpoint
from gridpresence.config import DeviceSpec
from gridpresence.physics import SimDevice, make_device
from gridpresence.physics.metering import MeterRegisters
from gridpresence.protocol.billing_report import BillingReport
from gridpresence.protocol.models import Outcome, PresenceReport, utcnow
from gridpresence.transport.mail import MailSender, Payload, build_mail
from gridpresence.security.keyring import KeyLookup
from gridpresence.security.pgp import pgpy

log = logging.getLogger(__name__)

MAIL_DEVICES_DIR = "mail-devices"  # in the grid's data dir: each mail-only device's kept state


class MailDevice:
    """A simulated device of `spec` that reports by mail from `address` (its bare JID)."""

    def __init__(self, spec: DeviceSpec, address: str, relay: RelayEndpoint, *, secret: pgpy.PGPKey | None = None,
                 keyring: KeyLookup | None = None, audience: ReportAudience | None = None,
                 state_file: Path | None = None) -> None:
        self.spec = spec
        self.address = address
        self.relay = relay
        self.secret = secret  # signs every mail; without it the relay refuses the device's data
        self.keyring = keyring  # the readers' public keys, for billing reports
        self.audience = audience
        # What the IED itself keeps between two runs of its uplink (a meter keeps metering, its
        # register keeps counting): report sequence, energy register, when it last reported.
        self.state_file = state_file
        kept = self._load()
        now = utcnow()
        try:  # the physics runs on from the last report (never from a time ahead of the clock)
            since = min(dt.datetime.fromisoformat(str(kept["at"])), now) if "at" in kept else now
        except (TypeError, ValueError):
            since = now
        self.sim: SimDevice = make_device(spec, since)
        registers = getattr(self.sim, "registers", None)
        kwh = kept.get("register_kwh")
        if isinstance(registers, MeterRegisters) and isinstance(kwh, (int, float)):
            registers.register_kwh = registers.start_kwh = float(kwh)
        self._sender = MailSender(relay.smtp_host, relay.smtp_port, relay.ca_file)
        seq = kept.get("seq", 0)
        self._seq = seq if isinstance(seq, int) else 0

    def _load(self) -> dict[str, object]:
        if self.state_file is None or not self.state_file.exists():
            return {}
        try:
            kept = json.loads(self.state_file.read_text())
            return kept if isinstance(kept, dict) else {}
        except (OSError, ValueError) as exc:  # a damaged file costs the history, not the device
            log.warning("%s: kept state unreadable (%s): starting afresh", self.spec.name, exc)
            return {}

    def _keep(self) -> None:
        """Written after each mail that left, atomically: a crash never leaves half a file."""
        if self.state_file is None:
            return
        registers = getattr(self.sim, "registers", None)
        kept = {"seq": self._seq, "at": utcnow().isoformat(),
                "register_kwh": registers.register_kwh if isinstance(registers, MeterRegisters) else None}
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(kept))
        os.replace(tmp, self.state_file)

    def report(self) -> PresenceReport:
        self.sim.tick(utcnow())
        self._seq += 1
        return PresenceReport(kind=self.sim.kind, state=self.sim.state, critical=self.spec.critical,
                              telemetry=self.sim.telemetry(), restriction=self.sim.restriction,
                              refresh_s=self.spec.refresh_s, seq=self._seq)

    async def push(self, payload: Payload, to: list[str] | None = None) -> None:
        """Mail one payload (to the relay unless `to` is given); raises smtplib.SMTPException with
        the relay's refusal, or OSError (MailTLSError) when no verified STARTTLS session is possible."""
        rcpts = to or [self.relay.jid]
        await asyncio.to_thread(self._sender.send, build_mail(payload, self.address, rcpts, self.secret),
                                self.address, rcpts)

    async def push_billing_report(self) -> BillingReport:
        """Close the metering period and mail its report, one mail to all its readers; the relay
        passes it on sealed. Raises KeyUnavailable if no reader of a part has a key. If the relay
        refuses or cannot be reached, the period stays open: its readings go in the next report."""
        registers = getattr(self.sim, "registers", None)
        if not isinstance(registers, MeterRegisters):
            raise ValueError(f"a {self.spec.kind.value} keeps no billing registers")
        if self.secret is None or self.keyring is None or self.audience is None:
            raise ValueError("a billing report needs the device's key, the readers' keys and its audience")
        keys = await reader_keys(self.audience, self.keyring)
        self.sim.tick(utcnow())
        unsent = copy.copy(registers)  # the open period as it is, kept in case the mail fails
        billing, quality = close_period(registers, self.address, self.audience.customer,
                                        getattr(self.sim, "load_pct", 0.0))
        report = seal_report(billing, quality, self.secret, keys)
        try:
            await self.push(report, list(self.audience.everyone))
        except BaseException:
            setattr(self.sim, "registers", unsent)
            raise
        self._keep()
        return report

    async def push_report(self) -> PresenceReport:
        report = self.report()
        await self.push(report)
        self._keep()
        return report

    async def push_outcome(self, outcome: Outcome) -> None:
        await self.push(outcome)

    async def run(self, count: int = 0) -> None:
        """Push a report now and every refresh interval (`count` reports, 0 = forever)."""
        sent = 0
        while True:
            await self.push_report()
            sent += 1
            if count and sent >= count:
                return
            await asyncio.sleep(self.spec.refresh_s)

    def close(self) -> None:
        self._sender.close()
