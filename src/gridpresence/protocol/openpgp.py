"""XML of XEP-0373 §3 (OpenPGP for XMPP), the framing of signed grid payloads:

``<openpgp xmlns='urn:xmpp:openpgp:0'>BASE64</openpgp>`` in a message, BASE64 being an OpenPGP
signed message whose literal data is the serialised

``<sign xmlns='urn:xmpp:openpgp:0'><to jid='DEVICE'/><time stamp='…'/><payload>…</payload></sign>``.

The signature covers those bytes exactly, so no XML canonicalisation is needed: the receiver
verifies the bytes, then parses them. This module only reads and writes the XML;
:mod:`gridpresence.security.signed` makes and checks the OpenPGP part.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.codec import PayloadError

OPENPGP_NS = "urn:xmpp:openpgp:0"
# A signed command is a few hundred bytes, a signed firmware offer or tariff under 2 KiB; the
# limit only keeps a hostile sender from making a device parse megabytes.
MAX_SIGNED_BYTES = 64 * 1024


def _q(name: str) -> str:
    return f"{{{OPENPGP_NS}}}{name}"


@dataclass(frozen=True)
class SignContent:
    """The parsed ``<sign/>`` element: recipients, signing time and the one payload element."""

    to: tuple[str, ...]
    time: dt.datetime
    payload: ET.Element


def openpgp_to_xml(message: bytes) -> ET.Element:
    el = ET.Element(_q("openpgp"))
    el.text = base64.b64encode(message).decode("ascii")
    return el


def openpgp_from_xml(el: ET.Element | None) -> bytes:
    """The OpenPGP message an ``<openpgp/>`` element carries; raises :class:`PayloadError`."""
    if el is None or el.tag != _q("openpgp"):
        raise PayloadError(f"expected <openpgp xmlns='{OPENPGP_NS}'>")
    text = (el.text or "").strip()
    if len(text) > MAX_SIGNED_BYTES * 4 // 3 + 4:
        raise PayloadError(f"signed message larger than {MAX_SIGNED_BYTES} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("<openpgp/> does not hold valid base64") from None


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def sign_to_bytes(to: str, time: dt.datetime, payload: ET.Element) -> bytes:
    """The ``<sign/>`` element for one recipient, serialised: the bytes that get signed."""
    sign = ET.Element(_q("sign"))
    ET.SubElement(sign, _q("to"), {"jid": to})
    ET.SubElement(sign, _q("time"), {"stamp": _stamp(time)})
    ET.SubElement(sign, _q("payload")).append(payload)
    return ET.tostring(sign, encoding="utf-8", xml_declaration=False)


def sign_from_bytes(data: bytes) -> SignContent:
    """Parse signed ``<sign/>`` bytes; raises :class:`PayloadError` naming what is wrong."""
    if len(data) > MAX_SIGNED_BYTES:
        raise PayloadError(f"signed content larger than {MAX_SIGNED_BYTES} bytes")
    try:
        sign = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PayloadError(f"signed content is not well-formed XML: {exc}") from None
    if sign.tag != _q("sign"):
        raise PayloadError(f"signed content is <{sign.tag}>, expected <sign xmlns='{OPENPGP_NS}'>")
    to = tuple(t.get("jid", "") for t in sign.findall(_q("to")))
    if not to or not all(to):
        raise PayloadError("<sign/> names no recipient (<to jid='…'/>)")
    stamp = sign.find(_q("time"))
    try:
        time = dt.datetime.fromisoformat((stamp.get("stamp") if stamp is not None else "") or "")
    except ValueError:
        raise PayloadError("<sign/> has no valid <time stamp='…'/>") from None
    if time.tzinfo is None:
        raise PayloadError("<sign/> time stamp has no time zone")
    payload = sign.find(_q("payload"))
    if payload is None or len(payload) != 1:
        raise PayloadError("<sign/> must hold exactly one element in <payload/>")
    return SignContent(to=to, time=time, payload=payload[0])


def element_to_text(el: ET.Element) -> str:
    """An element as stored or mailed verbatim (the relay's queue, a grid mail)."""
    return ET.tostring(el, encoding="unicode")


class OpenPGPElement(ElementBase):
    name = "openpgp"
    namespace = OPENPGP_NS
    plugin_attrib = "openpgp"


register_stanza_plugin(Message, OpenPGPElement)
