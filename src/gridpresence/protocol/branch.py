"""Branch totals a master IED publishes in its own presence ([00146]):

``<branches xmlns="urn:gridpresence:0"><branch device="branch-a@localhost" kind="meter"
kw="212.5" load-pct="53.1" capacity-kw="400.0"/>…</branches>``, one ``<branch/>`` per device
directly below it, with the net kW it adds (a generator's is negative)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from pydantic import Field

from gridpresence.protocol.codec import _attrs, _expect, _fields, _validate, q
from gridpresence.protocol.models import DeviceKind, _Model


class BranchTotal(_Model):
    device: str = Field(min_length=3, max_length=300)
    kind: DeviceKind
    kw: float = Field(ge=-1e7, le=1e7, allow_inf_nan=False)
    load_pct: float | None = Field(default=None, ge=0, le=150, allow_inf_nan=False)
    capacity_kw: float | None = Field(default=None, ge=0, le=1e7, allow_inf_nan=False)


def branches_to_xml(totals: list[BranchTotal]) -> ET.Element:
    el = ET.Element(q("branches"))
    for total in totals:
        ET.SubElement(el, q("branch"), _attrs(total))
    return el


def branches_from_xml(el: ET.Element | None) -> list[BranchTotal]:
    el = _expect(el, "branches")
    return [_validate(BranchTotal, _fields(BranchTotal, b.attrib), "branch") for b in el.findall(q("branch"))]
