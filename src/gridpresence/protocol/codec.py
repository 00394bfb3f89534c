"""XML form of the grid payloads: one function pair per payload, one place for the wire.

Attributes use hyphenated field names (``load-pct``); unknown attributes are ignored so an
older party can read a newer one's payloads, but every known value is validated.
"""

from __future__ import annotations

import datetime as dt
import json
from json.encoder import encode_basestring_ascii as _json_str  # a JSON string, ASCII only
from collections.abc import Mapping, Sequence
from enum import Enum
from typing import Any, TypeVar, get_args
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

from pydantic import BaseModel, ValidationError
from slixmpp.xmlstream import tostring

from gridpresence.protocol.models import (
    NS,
    Answer,
    Command,
    FaultRef,
    Health,
    Outcome,
    OutcomeRecord,
    PresenceReport,
    Restriction,
    Tariff,
    TariffPeriod,
    Telemetry,
)

M = TypeVar("M", bound=BaseModel)


class PayloadError(ValueError):
    """A payload that cannot be turned into a model; the message says which field and why."""


def q(name: str) -> str:
    """Qualified element name in the grid namespace."""
    return f"{{{NS}}}{name}"


def _text(value: Any) -> str:
    if type(value) is float:  # the commonest in presence: readings
        return repr(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return str(value.value)
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")
    if isinstance(value, float):
        return repr(value)
    return str(value)


_ATTR_NAMES: dict[type[BaseModel], tuple[tuple[str, str], ...]] = {}  # per model: (field, attribute)


def _attrs(model: BaseModel, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Scalar fields of a model as hyphenated attributes (None left out). Every presence,
    command and outcome is written with it: the field names are worked out once per model, and
    the commonest values (str, float, int) written without _text's chain of checks."""
    names = _ATTR_NAMES.get(type(model))
    if names is None:
        names = _ATTR_NAMES[type(model)] = tuple((f, f.replace("_", "-")) for f in type(model).model_fields)
    values = model.__dict__  # a pydantic model's field values
    out: dict[str, str] = {}
    for name, attr in names:
        value = values[name]
        kind = type(value)
        if value is None or name in skip:
            continue
        if kind is str:
            out[attr] = value
        elif kind is float:
            out[attr] = repr(value)
        elif kind is int:
            out[attr] = str(value)
        elif not isinstance(value, (BaseModel, dict, tuple)):
            out[attr] = _text(value)
    return out


_FIELD_OF: dict[type[BaseModel], dict[str, str]] = {}  # per model: attribute name (either spelling) -> field


def _fields(cls: type[BaseModel], attrib: Mapping[str, str]) -> dict[str, Any]:
    names = _FIELD_OF.get(cls)
    if names is None:  # once per model: every device presence is read with it
        names = _FIELD_OF[cls] = {**{f: f for f in cls.model_fields}, **{f.replace("_", "-"): f for f in cls.model_fields}}
    return {names[k]: v for k, v in attrib.items() if k in names}


def _validate(cls: type[M], data: dict[str, Any], what: str) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or what}: {e['msg']}" for e in exc.errors()
        )
        raise PayloadError(f"invalid {what}: {problems}") from None


def _expect(element: ET.Element | None, name: str) -> ET.Element:
    if element is None or element.tag != q(name):
        raise PayloadError(f"expected <{name} xmlns='{NS}'>")
    return element


# -- presence --------------------------------------------------------------------------


def report_to_xml(report: PresenceReport, tag: str = "device") -> ET.Element:
    el = ET.Element(q(tag), _attrs(report))
    ET.SubElement(el, q("telemetry"), _attrs(report.telemetry))
    if report.restriction is not None:
        r = ET.SubElement(el, q("restriction"), _attrs(report.restriction, skip=("note",)))
        r.text = report.restriction.note
    if report.faults:
        faults = ET.SubElement(el, q("faults"))
        for ref in report.faults:
            ET.SubElement(faults, q("fault"), _attrs(ref))
    return el


def report_to_text(report: PresenceReport, tag: str = "device") -> str:
    """report_to_xml's element serialised (its namespace declared on it), written from the
    model without an element or a serialiser: the payload of every presence a device host
    broadcasts (xmpp/component.py HostedClient.broadcast_presence)."""
    parts = [f"<telemetry{_telemetry_attrs(report.telemetry) if _REPORT_SHAPE_KNOWN else _attr_text(_attrs(report.telemetry))} />"]
    res = report.restriction
    if res is not None:
        note = escape(res.note) if res.note else ""
        parts.append(f"<restriction{_attr_text(_attrs(res, skip=('note',)))}>{note}</restriction>")
    if report.faults:
        faults = "".join(f"<fault{_attr_text(_attrs(ref))} />" for ref in report.faults)
        parts.append(f"<faults>{faults}</faults>")
    attrs = _report_attrs(report) if _REPORT_SHAPE_KNOWN else _attr_text(_attrs(report))
    return f'<{tag} xmlns="{NS}"{attrs}>{"".join(parts)}</{tag}>'


# The fields of a report and its telemetry in their order, as _report_attrs and _telemetry_attrs
# write them (checked against the models: a field added makes report_to_text take _attrs' way).
_REPORT_FIELDS = ("kind", "state", "critical", "telemetry", "restriction", "refresh_s", "seq", "at", "transport",
                  "serial", "faults", "under_fault")
_TELEMETRY_FIELDS = ("load_pct", "kw", "capacity_kw", "fuel_pct", "temperature_c", "energy_kwh", "breaker")


def _report_attrs(report: PresenceReport) -> str:
    """_attr_text(_attrs(report)), field by field: none of these values has anything to escape
    (enums, numbers, a UTC time, a Literal transport, a serial of [A-Za-z0-9._:-]). Every presence
    a device host broadcasts is written with it, and the general loop cost a third of the text."""
    v = report.__dict__
    text = (f' kind="{v["kind"].value}" state="{v["state"].value}" critical="{"true" if v["critical"] else "false"}"'
            f' refresh-s="{v["refresh_s"]!r}" seq="{v["seq"]!r}" at="{_utc_stamp(v["at"])}"')
    if v["transport"] is not None:
        text += f' transport="{v["transport"]}"'
    if v["serial"] is not None:
        text += f' serial="{v["serial"]}"'
    if v["under_fault"] is not None:
        text += f' under-fault="{"true" if v["under_fault"] else "false"}"'
    return text


_TELEMETRY_NUMBERS = tuple((f, f.replace("_", "-")) for f in _TELEMETRY_FIELDS[:-1])


def _telemetry_attrs(telemetry: Telemetry) -> str:
    """_attr_text(_attrs(telemetry)), field by field: numbers (repr) and the breaker's enum."""
    v = telemetry.__dict__
    text = "".join([f' {attr}="{v[name]!r}"' for name, attr in _TELEMETRY_NUMBERS if v[name] is not None])
    if v["breaker"] is not None:
        text += f' breaker="{v["breaker"].value}"'
    return text


# The reports read lately, by their XML's content. One device's presence reaches every party in
# a process that follows it (the watchdog, relay and console trackers, its master and branch
# meter): each would validate and keep a copy of its own, thousands of devices over. Reports
# are frozen, so all share one. A report without `at` is not kept (validation stamps it now).
_RECENT_REPORTS: dict[tuple[Any, ...], PresenceReport] = {}
MAX_RECENT_REPORTS = 4096


def report_from_xml(el: ET.Element | None, tag: str = "device") -> PresenceReport:
    el = _expect(el, tag)
    if "at" not in el.attrib:
        return _report_from_xml(el)
    key = tuple([(e.tag, tuple(e.attrib.items()), e.text) for e in el.iter()])
    report = _RECENT_REPORTS.get(key)
    if report is None:
        report = _report_from_xml(el)
        if len(_RECENT_REPORTS) >= MAX_RECENT_REPORTS:
            _RECENT_REPORTS.clear()
        _RECENT_REPORTS[key] = report
    return report


def _report_from_xml(el: ET.Element) -> PresenceReport:
    data = _fields(PresenceReport, el.attrib)
    tel = el.find(q("telemetry"))
    data["telemetry"] = _validate(Telemetry, _fields(Telemetry, tel.attrib), "telemetry") if tel is not None else Telemetry()
    res = el.find(q("restriction"))
    if res is not None:
        data["restriction"] = _validate(
            Restriction, {**_fields(Restriction, res.attrib), "note": (res.text or "").strip()}, "restriction"
        )
    faults = el.find(q("faults"))
    if faults is not None:
        data["faults"] = tuple(_validate(FaultRef, _fields(FaultRef, f.attrib), "fault") for f in faults.findall(q("fault")))
    return _validate(PresenceReport, data, "device presence")


# -- commands and outcomes ---------------------------------------------------------------


def command_to_xml(cmd: Command) -> ET.Element:
    el = ET.Element(q("command"), _attrs(cmd))
    for name, value in cmd.args.items():
        arg = ET.SubElement(el, q("arg"), {"name": name})
        arg.text = value
    return el


def _quoted(value: str) -> str:
    """An attribute value in double quotes, as ElementTree escapes it (whitespace kept exactly),
    by ``str.replace`` in C: saxutils' quoteattr costs more than the rest of a command's text."""
    return ('"' + value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\n", "&#10;").replace("\r", "&#13;").replace("\t", "&#09;") + '"')


def _attr_text(attrs: Mapping[str, str]) -> str:
    """Attributes as _quoted writes them, all values escaped in one pass (NUL, which XML
    forbids in any value, between them): a presence has a dozen, each a replace chain."""
    values = _quoted("\x00".join(attrs.values()))[1:-1].split("\x00")
    return "".join([f' {name}="{value}"' for name, value in zip(attrs, values)])


# Command's fields in their order, as _command_attrs writes them (checked against the model
# below: a field added to Command makes command_to_text take _attrs' general way again).
_COMMAND_FIELDS = ("id", "action", "issuer", "issued", "expires", "args", "serial", "answer")
_COMMAND_SHAPE_KNOWN = tuple(Command.model_fields) == _COMMAND_FIELDS
_UTC = dt.timezone.utc
_ANSWERS = (None, *get_args(Answer))
_OUTCOME_SHAPE_KNOWN = tuple(Outcome.model_fields) == ("command_id", "device", "status", "reason", "detail", "report",
                                                        "report_seq", "first")
_REPORT_SHAPE_KNOWN = (tuple(PresenceReport.model_fields) == _REPORT_FIELDS
                       and tuple(Telemetry.model_fields) == _TELEMETRY_FIELDS)


def _utc_stamp(value: dt.datetime) -> str:
    """_text's form of a datetime, without its checks (a command carries two)."""
    if value.tzinfo is not _UTC:
        value = value.astimezone(_UTC)
    return value.isoformat()[:-6] + "Z"  # (a UTC datetime's isoformat ends "+00:00")


def _command_attrs(cmd: Command) -> str:
    """_attrs(cmd) written out as command_to_text's attributes, field by field: a fan-out
    writes thousands of commands and the general loop cost half of each one's text."""
    serial = f" serial={_quoted(cmd.serial)}" if cmd.serial is not None else ""
    answer = f' answer="{cmd.answer}"' if cmd.answer is not None else ""  # (a Literal: nothing to escape)
    return (f" id={_quoted(cmd.id)} action={_quoted(cmd.action.value)} issuer={_quoted(cmd.issuer)}"
            f' issued="{_utc_stamp(cmd.issued)}" expires="{_utc_stamp(cmd.expires)}"{serial}{answer}')


def _general_command_attrs(cmd: Command) -> str:
    return "".join(f" {name}={_quoted(value)}" for name, value in _attrs(cmd).items())


def command_to_text(cmd: Command) -> str:
    """command_to_xml's element, serialised as ElementTree writes it but for the namespace's
    prefix (a default namespace here), in a fraction of its time: the bytes an issuer signs."""
    attrs = _command_attrs(cmd) if _COMMAND_SHAPE_KNOWN else _general_command_attrs(cmd)
    if not cmd.args:
        return f'<command xmlns="{NS}"{attrs} />'
    args = "".join(f"<arg name={_quoted(name)}>{escape(value)}</arg>" for name, value in cmd.args.items())
    return f'<command xmlns="{NS}"{attrs}>{args}</command>'


def command_from_xml(el: ET.Element | None) -> Command:
    el = _expect(el, "command")
    data = _fields(Command, el.attrib)
    if data.get("answer") not in _ANSWERS:  # a way a newer issuer asks for that this device has not: the message
        data.pop("answer", None)
    data["args"] = {a.get("name", ""): a.text or "" for a in el.findall(q("arg"))}
    return _validate(Command, data, "command")


# A batch of commands (PROTOCOL.md, "Commands in batches"): one signature over the commands of
# a fan-out to many devices of one host, each ``<command/>`` naming its device in ``to``.
COMMANDS_MAX = 1000  # commands read from one batch (an issuer sends at most BATCH_COMMANDS_MAX)
BATCH_COMMANDS_MAX = 100  # ...and writes at most this many, of at most BATCH_TEXT_MAX bytes
BATCH_TEXT_MAX = 40_000  # (its signed message stays under the 64 KiB an <openpgp/> may hold)


def commands_to_text(batch: Sequence[tuple[str, str]]) -> str:
    """``<commands/>`` of (a command as command_to_text writes it, its device's bare JID) pairs."""
    parts = [f"<command to={_quoted(device)}{text[len(_COMMAND_OPEN):]}" for text, device in batch]
    return f'<commands xmlns="{NS}">{"".join(parts)}</commands>'


_COMMAND_OPEN = f'<command xmlns="{NS}"'


def commands_by_device(batch: ET.Element) -> dict[str, ET.Element | None]:
    """Each device's ``<command/>`` in a ``<commands/>`` batch, by the bare JID in its ``to``
    (None for a device named twice: which one was meant is not for it to guess); raises
    :class:`PayloadError` for a batch of more than COMMANDS_MAX."""
    if len(batch) > COMMANDS_MAX:
        raise PayloadError(f"a batch of more than {COMMANDS_MAX} commands")
    found: dict[str, ET.Element | None] = {}
    for el in batch:
        device = el.get("to")
        if el.tag != _COMMAND or not device:
            continue
        found[device] = None if device in found else el
    return found


_COMMAND = q("command")


def outcome_to_xml(outcome: Outcome, *, by_seq: bool = False) -> ET.Element:
    """``by_seq``: the state after the command as ``report-seq`` (the seq of the presence that
    carries it, sent just before) instead of the whole ``<device/>`` report (PROTOCOL.md)."""
    attrs = _attrs(outcome, skip=("detail",))
    if by_seq and outcome.report is not None:
        attrs["report-seq"] = str(outcome.report.seq)
    el = ET.Element(q("outcome"), attrs)
    if outcome.detail:
        ET.SubElement(el, q("detail")).text = outcome.detail
    if outcome.report is not None and not by_seq:
        el.append(report_to_xml(outcome.report))
    if outcome.first is not None:
        ET.SubElement(el, q("first")).append(outcome_to_xml(outcome.first))
    return el


def outcome_wire(outcome: Outcome, *, by_seq: bool = False) -> tuple[ET.Element | None, str]:
    """outcome_to_xml's text (its namespace declared on it) and its element; the text written
    here without an element or a serialiser when the outcome is attributes and a detail only
    (what a device answers nearly every command with), and the element then None (made from the
    text by whoever needs one: a recipient in the same process). A device host sends the text."""
    text = _outcome_text(outcome, by_seq) if _OUTCOME_SHAPE_KNOWN else None
    if text is not None:
        return None, text
    el = outcome_to_xml(outcome, by_seq=by_seq)
    return el, tostring(el)


def _outcome_text(outcome: Outcome, by_seq: bool) -> str | None:
    """outcome_to_xml's element as text, field by field; None for one with a report to carry or
    a first outcome (the serialiser's job)."""
    v = outcome.__dict__
    report = v["report"]
    if v["first"] is not None or (report is not None and not by_seq):
        return None
    attrs = f" command-id={_quoted(v['command_id'])} device={_quoted(v['device'])} status=\"{v['status'].value}\""
    if v["reason"] is not None:
        attrs += f' reason="{v["reason"].value}"'
    seq = report.seq if report is not None else v["report_seq"]  # (by_seq here, if there is a report)
    if seq is not None:
        attrs += f' report-seq="{seq}"'
    if v["detail"]:
        return f'<outcome xmlns="{NS}"{attrs}><detail>{escape(v["detail"])}</detail></outcome>'
    return f'<outcome xmlns="{NS}"{attrs} />'


def outcome_from_xml(el: ET.Element | None, *, nested: bool = False) -> Outcome:
    el = _expect(el, "outcome")
    data = _fields(Outcome, el.attrib)
    data["detail"] = el.findtext(q("detail"), default="")
    dev = el.find(q("device"))
    if dev is not None:
        data["report"] = report_from_xml(dev)
    first = el.find(q("first"))
    if first is not None:
        if nested:  # one level only: a crafted outcome must not make the reader recurse
            raise PayloadError("invalid outcome: a first outcome inside a first outcome")
        data["first"] = outcome_from_xml(first.find(q("outcome")), nested=True)
    return _validate(Outcome, data, "outcome")


def record_to_xml(record: OutcomeRecord, outcome_el: ET.Element | None = None) -> ET.Element:
    """``outcome_el``: the record's outcome already as an element (the issuer's answer's own)."""
    el = ET.Element(q("outcome-record"), _record_attrs(record))
    el.append(outcome_el if outcome_el is not None else outcome_to_xml(record.outcome))
    return el


def _record_attrs(record: OutcomeRecord) -> dict[str, str]:
    return {"action": record.action.value, "issuer": record.issuer}


def record_json(record: OutcomeRecord, *, by_seq: bool = False) -> str:
    """A record as one item of a batch's JSON array (PROTOCOL.md "Outcome records"): its fields
    by name, those at their default left out; ``by_seq`` as for outcome_to_xml. ASCII only, so
    any text in it is a legal XML character. A device host writes one per command it takes:
    a plain outcome's is written here field by field (pydantic's copy and dump cost 5x more)."""
    outcome = record.outcome
    v = outcome.__dict__
    report = v["report"]
    if v["first"] is not None or (report is not None and not by_seq):
        if report is not None and by_seq:  # (a replay's answer: its first outcome, and the state after)
            outcome = outcome.model_copy(update={"report": None, "report_seq": report.seq})
            record = record.model_copy(update={"outcome": outcome})
        return record.model_dump_json(exclude_defaults=True, ensure_ascii=True)
    text = f'"command_id":{_json_str(v["command_id"])},"device":{_json_str(v["device"])},"status":"{v["status"].value}"'
    if v["reason"] is not None:
        text += f',"reason":"{v["reason"].value}"'
    if v["detail"]:
        text += f',"detail":{_json_str(v["detail"])}'
    seq = report.seq if report is not None else v["report_seq"]
    if seq is not None:
        text += f',"report_seq":{seq}'
    return f'{{"action":"{record.action.value}","issuer":{_json_str(record.issuer)},"outcome":{{{text}}}}}'


def record_from_xml(el: ET.Element | None) -> OutcomeRecord:
    el = _expect(el, "outcome-record")
    data = {**_fields(OutcomeRecord, el.attrib), "outcome": outcome_from_xml(el.find(q("outcome")))}
    return _validate(OutcomeRecord, data, "outcome-record")


RECORDS_MAX = 1000  # records read from one batch (a host sends at most 100: xmpp/component.py)
JSON_NS = "urn:xmpp:json:0"  # XEP-0335: a JSON text in an element
_JSON = f"{{{JSON_NS}}}json"


def records_from_xml(el: ET.Element | None) -> tuple[list[OutcomeRecord], list[PayloadError]]:
    """A batch ``<outcome-records>`` of many identities' records (a device host sends them so,
    from its component's domain): the valid ones, and why each other one was not. The records
    come as a JSON array in an XEP-0335 ``<json/>`` (what a host sends: one text for the server
    to parse, not thousands of elements) or as ``<outcome-record/>`` elements."""
    el = _expect(el, "outcome-records")
    good: list[OutcomeRecord] = []
    bad: list[PayloadError] = []
    seen = 0  # records and children read: a batch of thousands of empty or broken <json/> is bounded too
    too_many = PayloadError(f"invalid outcome-records: more than {RECORDS_MAX}; the rest ignored")
    for child in el:
        items: list[Any]
        if seen >= RECORDS_MAX:
            bad.append(too_many)
            return good, bad
        if child.tag == _JSON:
            why = ""
            try:
                parsed = json.loads(child.text or "")
            except (ValueError, RecursionError) as exc:
                why = f"its JSON does not parse ({exc})"
            else:
                if not isinstance(parsed, list):
                    why = "its JSON is not an array of records"
                elif not parsed:
                    why = "its JSON array holds no record"
            if why:  # (counted as one record read)
                seen += 1
                bad.append(PayloadError(f"invalid outcome-records: {why}"))
                continue
            items = parsed
        else:
            items = [child]
        for item in items:
            if seen >= RECORDS_MAX:
                bad.append(too_many)
                return good, bad
            seen += 1
            try:
                if isinstance(item, ET.Element):
                    good.append(record_from_xml(item))
                elif isinstance(item, dict):
                    good.append(_validate(OutcomeRecord, item, "outcome-record"))
                else:
                    raise PayloadError("invalid outcome-record: not a JSON object")
            except PayloadError as exc:
                bad.append(exc)
    return good, bad


# -- tariffs and health ------------------------------------------------------------------


def tariff_to_xml(tariff: Tariff) -> ET.Element:
    el = ET.Element(q("tariff"), _attrs(tariff))
    for period in tariff.periods:
        ET.SubElement(el, q("period"), _attrs(period))
    return el


def tariff_from_xml(el: ET.Element | None) -> Tariff:
    el = _expect(el, "tariff")
    data = _fields(Tariff, el.attrib)
    data["periods"] = tuple(
        _validate(TariffPeriod, _fields(TariffPeriod, p.attrib), "period") for p in el.findall(q("period"))
    )
    return _validate(Tariff, data, "tariff")


def health_to_xml(health: Health) -> ET.Element:
    el = ET.Element(q("health"), _attrs(health, skip=("reason",)))
    el.text = health.reason or None
    return el


def health_from_xml(el: ET.Element | None) -> Health:
    el = _expect(el, "health")
    return _validate(Health, {**_fields(Health, el.attrib), "reason": (el.text or "").strip()}, "health")
