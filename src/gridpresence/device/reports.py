"""Billing reports ([0085]): a metering device sends ONE report with two encrypted parts; each
reader opens only the part made for it.

* :class:`ReportAudience`: who reads which part (billing party and the device's customer: the
  billing part; the utility's operators: the power-quality part).
* :func:`reader_keys`, :func:`seal_report`: the device side, shared by XMPP devices and
  mail-only ones.
* :class:`ReportReader`: the reader side (billing agent, operator library, customers).
* :class:`BillingReporter`: a device bot's periodic and on-request reports.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from slixmpp import ClientXMPP
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.config import DeviceSpec, Fleet
from gridpresence.physics.metering import MeterRegisters, PeakHours
from gridpresence.protocol.billing_report import (
    BillingData,
    BillingReport,
    PartData,
    PartName,
    QualityData,
    SealedPart,
    billing_report_from_xml,
    billing_report_to_xml,
    part_data_from_xml,
    part_data_to_xml,
    request_to_xml,
)
from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.models import DeviceKind, utcnow
from gridpresence.protocol.addressing import origin_of
from gridpresence.security.keyring import KeyLookup, KeyUnavailable
from gridpresence.security.parts import BadPart, PartError, PartProblem, seal, unseal
from gridpresence.security.pgp import pgpy

if TYPE_CHECKING:
    from gridpresence.device.agent import DeviceAgent

log = logging.getLogger(__name__)

METERING_KINDS = frozenset({DeviceKind.METER, DeviceKind.MASTER})


@dataclass(frozen=True)
class ReportAudience:
    """Bare JIDs that may read each part."""

    billing_parties: tuple[str, ...]
    quality: tuple[str, ...]  # the utility's operators
    customer: str | None = None

    @classmethod
    def of(cls, fleet: Fleet, device: DeviceSpec) -> ReportAudience:
        return cls(billing_parties=tuple(fleet.jid(b.name) for b in fleet.billing),
                   quality=tuple(fleet.jid(o.name) for o in fleet.operators),
                   customer=fleet.jid(device.customer) if device.customer else None)

    @property
    def billing(self) -> tuple[str, ...]:
        return (*self.billing_parties, *([self.customer] if self.customer else []))

    @property
    def everyone(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.billing, *self.quality)))

    def readers(self, name: PartName) -> tuple[str, ...]:
        return self.billing if name is PartName.BILLING else self.quality


def peak_hours(fleet: Fleet) -> PeakHours:
    """The peak window of the fleet's (first) billing party: the meters' tariff registers."""
    if not fleet.billing:
        return PeakHours()
    spec = fleet.billing[0]
    return PeakHours(spec.peak_start_hour, spec.peak_end_hour % 24)


def close_period(registers: MeterRegisters, device: str, customer: str | None,
                 load_pct: float) -> tuple[BillingData, QualityData]:
    return registers.close(uuid.uuid4().hex, device, customer, utcnow(), load_pct)


ReaderKeys = dict[PartName, dict[str, pgpy.PGPKey]]


async def reader_keys(audience: ReportAudience, keyring: KeyLookup, timeout: float = 5.0) -> ReaderKeys:
    """Each part's readers' public keys. A reader whose key cannot be found (never announced,
    changed) is left out with a warning; a part none of whose readers has a usable key raises
    KeyUnavailable. Looked up before a period is closed, so a failure loses no readings."""
    keys: ReaderKeys = {}
    for name in PartName:
        readers = audience.readers(name)
        if not readers:
            continue  # e.g. a fleet without a billing party
        found, missing = {}, []
        for jid in readers:
            try:
                found[jid] = await keyring.key_for(jid, timeout)
            except KeyUnavailable as exc:
                missing.append(exc)
        if not found:
            raise missing[0]
        for gap in missing:
            log.warning("%s part not encrypted to %s: %s", name.value, gap.jid, gap.reason)
        keys[name] = found
    return keys


def seal_report(billing: BillingData, quality: QualityData, signer: pgpy.PGPKey, keys: ReaderKeys) -> BillingReport:
    """Both parts, each signed by the device and encrypted to its own readers only."""
    parts = tuple(SealedPart(name=name, data=seal(part_data_to_xml(data), signer, keys[name]))
                  for name, data in ((PartName.BILLING, billing), (PartName.POWER_QUALITY, quality)) if name in keys)
    return BillingReport(id=billing.report, device=billing.device, issued=billing.period_end, parts=parts)


class ReportReader:
    """Opens the part of a report made for this party (`me`, with its secret key)."""

    def __init__(self, me: str, secret: pgpy.PGPKey, keyring: KeyLookup, part: PartName) -> None:
        self.me = me
        self.secret = secret
        self.keyring = keyring
        self.part = part

    async def read(self, report: BillingReport, timeout: float = 5.0) -> PartData:
        """The cleartext of our part; raises NotForYou, BadPart or KeyUnavailable."""
        sealed = report.part(self.part)
        if sealed is None:
            raise BadPart(PartProblem.NOT_SIGNCRYPT, f"report {report.id} has no {self.part.value} part")
        sender_key = await self.keyring.key_for(report.device, timeout)
        content = unseal(sealed.data, self.me, self.secret, report.device, sender_key)
        try:
            data = part_data_from_xml(self.part, content.payload)
        except PayloadError as exc:
            raise BadPart(PartProblem.NOT_SIGNCRYPT, str(exc)) from None
        if data.report != report.id or data.device != report.device:
            # Signed by the device, but cut from another report: a replay or a splice.
            raise BadPart(PartProblem.NOT_SIGNCRYPT, f"the part belongs to report {data.report} of {data.device}")
        return data


class BillingReporter:
    """A metering device bot's reports: every ``billing_report_s`` and whenever a reader asks
    (``<billing-report-request/>``). The one report goes to every reader of either part."""

    def __init__(self, agent: DeviceAgent, audience: ReportAudience, peak: PeakHours = PeakHours()) -> None:
        secret = agent.keyring.secret_key
        if secret is None:
            raise ValueError(f"{agent.spec.name} has no OpenPGP secret key: it cannot sign billing reports")
        self.agent = agent
        self.secret = secret
        self.keyring = agent.keyring  # readers' keys over PEP (XEP-0373), pinned on first use
        self.audience = audience
        self.registers: MeterRegisters = getattr(agent.sim, "registers")
        self.registers.peak = peak
        self.sent: list[BillingReport] = []
        self._task: asyncio.Task[None] | None = None
        self._busy = asyncio.Lock()
        agent.client.register_handler(Callback("billing report request",
                                               StanzaPath("message/grid_billing_report_request"), self._on_request))
        agent.client.add_event_handler("session_start", self._start)

    def _start(self, _event: object) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._every())

    def stop(self) -> None:
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


class ReportInbox:
    """A reader's billing reports as they arrive on `client`, from the device itself or passed
    on by a relay (XEP-0033 ``ofrom`` names the device). Keeps the opened parts, oldest first;
    a report it cannot open is logged and, when it came straight from its sender, answered with
    an error saying why."""

    def __init__(self, client: ClientXMPP, reader: ReportReader, relays: Iterable[str] = (), keep: int = 1000) -> None:
        self.client = client
        self.reader = reader
        self.relays = frozenset(relays)
        self.keep = keep
        self.received: list[PartData] = []
        self.refused: list[str] = []  # why reports were refused, newest last
        self._arrived = asyncio.Event()
        client.register_handler(Callback("billing report", StanzaPath("message/grid_billing_report"), self._on_report))

    def _on_report(self, msg: StanzaBase) -> None:
        asyncio.ensure_future(self._read_logged(msg))

    async def _read_logged(self, msg: StanzaBase) -> None:
        try:
            await self._read(msg)
        except Exception:  # one bad report must not leave a task failing silently, nor stop the next
            log.exception("%s: billing report from %s could not be handled", self.reader.me, msg["from"])

    async def _read(self, msg: StanzaBase) -> None:
        sender = msg["from"].bare
        try:
            report = billing_report_from_xml(msg["grid_billing_report"].xml)
            origin = origin_of(msg.xml) if sender in self.relays else sender
            if origin != report.device:
                raise BadPart(PartProblem.WRONG_SIGNER, f"report of {report.device} sent by {origin or sender}")
            data = await self.reader.read(report)
        except (PayloadError, PartError, KeyUnavailable) as exc:
            why = f"billing report refused: {exc}"
            log.warning("%s: %s (from %s)", self.reader.me, why, sender)
            self.refused.append(why)
            del self.refused[:-100]
            if sender not in self.relays:
                err = self.client.make_message(mto=msg["from"], mtype="error")
                err["error"]["type"] = "modify"
                err["error"]["condition"] = "not-acceptable"
                err["error"]["text"] = why[:500]
                err.send()
            return
        self.received.append(data)
        del self.received[:-self.keep]
        log.info("%s: %s part of report %s from %s read", self.reader.me, self.reader.part.value, report.id,
                 report.device)
        self._arrived.set()

    async def wait(self, predicate: Callable[[PartData], bool], timeout: float) -> PartData:
        """The first received part (already here or arriving) that `predicate` accepts."""
        async with asyncio.timeout(timeout):
            while True:
                for data in reversed(self.received):
                    if predicate(data):
                        return data
                self._arrived.clear()
                await self._arrived.wait()


def request_report(client: ClientXMPP, device: str) -> None:
    """Ask a metering device for a billing report now (it goes to every reader)."""
    msg = client.make_message(mto=device, mtype="normal")
    msg.append(request_to_xml())
    msg.send()
