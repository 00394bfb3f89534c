"""A metering device bot's billing reports ([0085]): every ``billing_report_s`` and on request,
one report whose parts are sealed for their readers (``security.reports``)."""

from __future__ import annotations

import asyncio
import logging
import uuid

from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.physics.metering import MeterRegisters
from gridpresence.protocol.billing_report import (
    BillingData,
    BillingReport,
    QualityData,
    billing_report_to_xml,
)
from gridpresence.protocol.models import utcnow
from gridpresence.security.reports import ReportAudience, reader_keys, seal_report
from gridpresence.device.host import DeviceHost


log = logging.getLogger(__name__)


def close_period(registers: MeterRegisters, device: str, customer: str | None,
                 load_pct: float) -> tuple[BillingData, QualityData]:
    return registers.close(uuid.uuid4().hex, device, customer, utcnow(), load_pct)


class BillingReporter:
    """A metering device bot's reports: every ``billing_report_s`` and whenever a reader asks
    (``<billing-report-request/>``). The one report goes to every reader of either part."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.secret = agent.keyring.secret_key
        self.keyring = agent.keyring  # readers' keys over PEP (XEP-0373), pinned on first use
        self.audience = agent.setup.audience or ReportAudience(billing_parties=(), quality=())
        self.registers: MeterRegisters = getattr(agent.sim, "registers")
        self.registers.peak = agent.setup.peak
        self.sent: list[BillingReport] = []
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        if self.secret is None or not self.audience.everyone:
            # Unsigned billing data is worth nothing to its readers, and nobody would read it.
            log.info("%s: no OpenPGP key or no readers: no billing reports", agent.spec.name)
            return
        agent.client.register_handler(Callback("billing report request",
                                               StanzaPath("message/grid_billing_report_request"), self._on_request))
        agent.client.add_event_handler("session_start", self._start)

    def _start(self, _event: object) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._every())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _every(self) -> None:
        while True:
            await asyncio.sleep(self.agent.spec.billing_report_s)
            try:
                await self.send_report()
            except Exception as exc:  # a missing key must not end the schedule
                log.warning("%s: billing report not sent: %s", self.agent.spec.name, exc)

    async def send_report(self) -> BillingReport:
        """Close the period now and send its report to every reader."""
        if self.secret is None:
            raise ValueError(f"{self.agent.spec.name} has no OpenPGP secret key: it cannot sign billing reports")
        async with self._busy:  # one period closes at a time
            keys = await reader_keys(self.audience, self.keyring)
            sim = self.agent.sim
            sim.tick(utcnow())  # from here on nothing waits: no reading falls between two periods
            billing, quality = close_period(self.registers, self.agent.jid, self.audience.customer,
                                            getattr(sim, "load_pct", 0.0))
            report = seal_report(billing, quality, self.secret, keys)
            body = f"{report.summary()}: readable by its audiences only"
            for reader in self.audience.everyone:
                msg = self.agent.client.make_message(mto=reader, mtype="normal", mbody=body)
                msg.append(billing_report_to_xml(report))
                msg.send()
            self.sent.append(report)
            del self.sent[:-10]
            log.info("%s: sent %s", self.agent.spec.name, report.summary())
            return report

    def _on_request(self, msg: StanzaBase) -> None:
        asker = msg["from"].bare
        if asker not in self.audience.everyone:
            err = self.agent.client.make_message(mto=msg["from"], mtype="error")
            err["error"]["type"] = "auth"
            err["error"]["condition"] = "forbidden"
            err["error"]["text"] = "only the billing party, the customer and operators may ask for billing reports"
            err.send()
            return

        async def send() -> None:
            try:
                await self.send_report()
            except Exception as exc:
                log.warning("%s: requested billing report not sent: %s", self.agent.spec.name, exc)

        asyncio.ensure_future(send())


