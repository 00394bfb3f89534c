"""Billing reports ([0085]) as both sides see them: a metering device sends ONE report with two
encrypted parts, and each reader opens only the part made for it.

* :class:`ReportAudience`: who reads which part (billing party and the device's customer: the
  billing part; the utility's operators: the power-quality part).
* :func:`reader_keys`, :func:`seal_report`: the sender's side, shared by XMPP devices and
  mail-only ones.
* :class:`ReportReader`: the reader's side (billing agent, operator library, customers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from gridpresence.protocol.billing_report import (
    BillingData,
    BillingReport,
    PartData,
    PartName,
    QualityData,
    SealedPart,
    part_data_from_xml,
    part_data_to_xml,
)
from gridpresence.protocol.codec import PayloadError
from gridpresence.security.keyring import KeyLookup, KeyUnavailable
from gridpresence.security.parts import BadPart, PartProblem, seal, unseal
from gridpresence.security.pgp import pgpy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReportAudience:
    """Bare JIDs that may read each part."""

    billing_parties: tuple[str, ...]
    quality: tuple[str, ...]  # the utility's operators
    customer: str | None = None

    @property
    def billing(self) -> tuple[str, ...]:
        return (*self.billing_parties, *([self.customer] if self.customer else []))

    @property
    def everyone(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys((*self.billing, *self.quality)))

    def readers(self, name: PartName) -> tuple[str, ...]:
        return self.billing if name is PartName.BILLING else self.quality


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
