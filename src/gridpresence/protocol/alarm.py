"""The alarm payload ([00145]): a typed ``<alarm/>`` next to the body an ordinary chat client shows.

Validation is the pydantic model; the XML reuses the codec's attribute rules (hyphenated
field names, unknown attributes ignored).
"""

from __future__ import annotations

from enum import StrEnum
from xml.etree import ElementTree as ET

from pydantic import AwareDatetime, Field, field_validator
from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.codec import _attrs, _expect, _fields, _validate, q
from gridpresence.protocol.models import _ID, NS, _Model, utcnow


class AlarmKind(StrEnum):
    HIGH_LOADING = "high-loading"
    TRIP_IMMINENT = "trip-point-imminent"
    BREAKER_TRIPPED = "breaker-tripped"
    LOW_FUEL = "low-fuel"
    TEMPERATURE_EXCEEDED = "temperature-exceeded"
    SERVICE_REQUIRED = "service-required"
    BRANCH_NEAR_LIMIT = "branch-near-limit"  # a master IED's advice: what to shed or start


class AlarmLevel(StrEnum):
    WARNING = "warning"  # every available operator is told
    URGENT = "urgent"  # the first available operator on duty is told, then the next


class AlarmStatus(StrEnum):
    RAISED = "raised"
    ACKNOWLEDGED = "acknowledged"
    CLEARED = "cleared"  # a warning whose reading went back to normal before anyone acknowledged it


URGENT_KINDS = frozenset({AlarmKind.TRIP_IMMINENT, AlarmKind.BREAKER_TRIPPED, AlarmKind.TEMPERATURE_EXCEEDED})


class Alarm(_Model):
    id: str
    device: str = Field(min_length=3, max_length=300)
    kind: AlarmKind
    level: AlarmLevel
    status: AlarmStatus = AlarmStatus.RAISED
    value: float | None = Field(default=None, allow_inf_nan=False)
    threshold: float | None = Field(default=None, allow_inf_nan=False)
    raised: AwareDatetime = Field(default_factory=utcnow)
    escalation: int = Field(default=0, ge=0)  # how many times it was sent again unacknowledged
    acked_by: str | None = Field(default=None, max_length=300)
    text: str = Field(default="", max_length=300)

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("alarm id must be 1-64 characters of [A-Za-z0-9._:-]")
        return value


def alarm_to_xml(alarm: Alarm) -> ET.Element:
    el = ET.Element(q("alarm"), _attrs(alarm, skip=("text",)))
    el.text = alarm.text or None
    return el


def alarm_from_xml(el: ET.Element | None) -> Alarm:
    el = _expect(el, "alarm")
    return _validate(Alarm, {**_fields(Alarm, el.attrib), "text": (el.text or "").strip()}, "alarm")


class GridAlarm(ElementBase):
    name = "alarm"
    namespace = NS
    plugin_attrib = "grid_alarm"


register_stanza_plugin(Message, GridAlarm)
