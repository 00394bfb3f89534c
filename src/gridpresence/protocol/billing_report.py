"""A meter's billing report ([0085], [00100]): one message, two parts, each for its own audience.

``<billing-report xmlns="urn:gridpresence:0" id="…" device="meter-1@localhost" issued="…">``
holds one ``<part name="billing|power-quality">`` per audience, each an XEP-0373
``<openpgp/>``. Decrypted, a part's ``<signcrypt/>`` payload is ``<billing/>`` (for the billing
party and the meter's customer) or ``<power-quality/>`` (for the utility's operators). Anyone
who carries the report (the server, the email relay) sees only the envelope: which device, when,
and which parts. A ``<billing-report-request/>`` asks a meter for a report now.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated
from xml.etree import ElementTree as ET

from pydantic import AwareDatetime, Field, field_validator, model_validator
from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.codec import PayloadError, _attrs, _expect, _fields, _validate, q
from gridpresence.protocol.models import _ID, NS, _Model
from gridpresence.protocol.openpgp import openpgp_from_xml, openpgp_to_xml, ox

_JID = Field(min_length=3, max_length=300)


def _nonneg(hi: float = 1e12) -> object:
    return Field(ge=0.0, le=hi, allow_inf_nan=False)


class PartName(StrEnum):
    BILLING = "billing"  # for the billing party and the customer
    POWER_QUALITY = "power-quality"  # for the utility's operators


class _Period(_Model):
    report: str  # the envelope's id: a part cannot be moved into another report unnoticed
    device: str = _JID
    period_start: AwareDatetime
    period_end: AwareDatetime

    @field_validator("report")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("report id must be 1-64 characters of [A-Za-z0-9._:-]")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> _Period:
        if self.period_end < self.period_start:
            raise ValueError("period-end is before period-start")
        return self


class BillingData(_Period):
    """What the billing party bills from ([0089]): the energy register and the period's
    consumption split by the tariff's peak and off-peak hours ([0093])."""

    customer: str | None = Field(default=None, min_length=3, max_length=300)
    register_kwh: Annotated[float, _nonneg()]  # the meter's energy register at period end
    period_kwh: Annotated[float, _nonneg()]
    peak_kwh: Annotated[float, _nonneg()]
    off_peak_kwh: Annotated[float, _nonneg()]
    max_demand_kw: Annotated[float, _nonneg(1e7)]


class QualityData(_Period):
    """Power quality over the period, for the utility's engineers."""

    voltage_v: Annotated[float, _nonneg(1e6)]  # mean
    voltage_min_v: Annotated[float, _nonneg(1e6)]
    voltage_max_v: Annotated[float, _nonneg(1e6)]
    frequency_hz: float = Field(ge=40.0, le=70.0, allow_inf_nan=False)
    power_factor: float = Field(ge=0.0, le=1.0, allow_inf_nan=False)
    thd_pct: float = Field(ge=0.0, le=100.0, allow_inf_nan=False)  # total harmonic distortion
    load_pct: float = Field(ge=0.0, le=150.0, allow_inf_nan=False)  # mean
    sags: int = Field(ge=0)  # samples below 90 % of nominal voltage


PartData = BillingData | QualityData


class SealedPart(_Model):
    name: PartName
    data: bytes = Field(min_length=1, repr=False)  # the binary OpenPGP message


class BillingReport(_Model):
    """The envelope everyone on the way can see; the parts only their audiences can read."""

    id: str
    device: str = _JID
    issued: AwareDatetime
    parts: tuple[SealedPart, ...] = Field(min_length=1, max_length=len(PartName))

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        return _Period._id_shape(value)

    @model_validator(mode="after")
    def _one_of_each(self) -> BillingReport:
        names = [p.name for p in self.parts]
        if len(set(names)) != len(names):
            raise ValueError("a part name appears twice")
        return self

    def part(self, name: PartName) -> SealedPart | None:
        return next((p for p in self.parts if p.name is name), None)

    def summary(self) -> str:
        return f"billing report {self.id} from {self.device} ({', '.join(p.name.value for p in self.parts)}, encrypted)"


# -- XML ---------------------------------------------------------------------------------

_PART_TAGS: dict[PartName, tuple[str, type[BillingData] | type[QualityData]]] = {
    PartName.BILLING: ("billing", BillingData),
    PartName.POWER_QUALITY: ("power-quality", QualityData),
}


def billing_report_to_xml(report: BillingReport) -> ET.Element:
    el = ET.Element(q("billing-report"), _attrs(report))
    for part in report.parts:
        ET.SubElement(el, q("part"), {"name": part.name.value}).append(openpgp_to_xml(part.data))
    return el


def billing_report_from_xml(el: ET.Element | None) -> BillingReport:
    el = _expect(el, "billing-report")
    parts = []
    for part in el.findall(q("part")):
        try:
            name = PartName(part.get("name", ""))
        except ValueError:
            continue  # a part for an audience this version does not know: not ours to read
        parts.append(SealedPart(name=name, data=openpgp_from_xml(part.find(ox("openpgp")))))
    return _validate(BillingReport, {**_fields(BillingReport, el.attrib), "parts": tuple(parts)}, "billing report")


def part_data_to_xml(data: PartData) -> ET.Element:
    tag = "billing" if isinstance(data, BillingData) else "power-quality"
    return ET.Element(q(tag), _attrs(data))


def part_data_from_xml(name: PartName, el: ET.Element) -> PartData:
    """The cleartext of part `name`; raises :class:`PayloadError` if it is another part's data."""
    tag, model = _PART_TAGS[name]
    if el.tag != q(tag):
        raise PayloadError(f"the {name.value} part holds <{el.tag}>, not <{tag}>")
    return _validate(model, _fields(model, el.attrib), f"{name.value} part")


def request_to_xml() -> ET.Element:
    return ET.Element(q("billing-report-request"))


class GridBillingReport(ElementBase):
    name = "billing-report"
    namespace = NS
    plugin_attrib = "grid_billing_report"


class GridBillingReportRequest(ElementBase):
    name = "billing-report-request"
    namespace = NS
    plugin_attrib = "grid_billing_report_request"


register_stanza_plugin(Message, GridBillingReport)
register_stanza_plugin(Message, GridBillingReportRequest)

__all__ = ["BillingData", "BillingReport", "PartData", "PartName", "QualityData", "SealedPart"]
