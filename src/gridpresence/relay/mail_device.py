"""A device that can reach only SMTP ([00116], [00117]): its firewall lets mail out and nothing
else, so it pushes its data (a presence report) and outcomes by mail to the relay, which passes
them to the operators over XMPP."""

from __future__ import annotations

import asyncio

from gridpresence.agents.session import RelayEndpoint
from gridpresence.config import DeviceSpec
from gridpresence.devices import SimDevice, make_device
from gridpresence.protocol.models import Outcome, PresenceReport, utcnow
from gridpresence.relay.mail import MailSender, Payload, build_mail


class MailDevice:
    """A simulated device of `spec` that reports by mail from `address` (its bare JID)."""

    def __init__(self, spec: DeviceSpec, address: str, relay: RelayEndpoint) -> None:
        self.spec = spec
        self.address = address
        self.relay = relay
        self.sim: SimDevice = make_device(spec, utcnow())
        self._sender = MailSender(relay.smtp_host, relay.smtp_port)
        self._seq = 0

    def report(self) -> PresenceReport:
        self.sim.tick(utcnow())
        self._seq += 1
        return PresenceReport(kind=self.sim.kind, state=self.sim.state, critical=self.spec.critical,
                              telemetry=self.sim.telemetry(), restriction=self.sim.restriction,
                              refresh_s=self.spec.refresh_s, seq=self._seq)

    async def push(self, payload: Payload) -> None:
        """Mail one payload to the relay; raises smtplib.SMTPException with the relay's refusal."""
        await asyncio.to_thread(self._sender.send, build_mail(payload, self.address, [self.relay.jid]),
                                self.address, [self.relay.jid])

    async def push_report(self) -> PresenceReport:
        report = self.report()
        await self.push(report)
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
