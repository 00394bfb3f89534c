"""XEP-0373 (OpenPGP for XMPP) framing, §3: the only place its XML is read or written (the
public-key nodes of §4 are in :mod:`gridpresence.protocol.ox_xml`, whose names this shares).

``<openpgp xmlns='urn:xmpp:openpgp:0'>BASE64</openpgp>`` carries one binary OpenPGP message:

* signed and encrypted, its cleartext a ``<signcrypt/>`` element naming its recipients
  (``<to jid/>``), when it was made (``<time stamp/>``), random padding (``<rpad/>``, hides the
  payload's length) and the ``<payload/>`` (per-party parts: :mod:`gridpresence.security.parts`);
* signed only, its literal data the serialised ``<sign/>`` element with ``<to/>``, ``<time/>``
  and ``<payload/>`` (signed commands, tariffs, firmware offers:
  :mod:`gridpresence.security.signed`). The signature covers those bytes exactly, so no XML
  canonicalisation is needed: the receiver verifies the bytes, then parses them.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

from slixmpp import Message
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.codec import PayloadError, _text
from gridpresence.protocol.ox_xml import NS_OX as OX_NS
from gridpresence.protocol.ox_xml import ox

__all__ = ["OPENPGP_NS", "OX_NS", "SignContent", "Signcrypt", "chat_body", "chat_payload", "element_to_text",
           "openpgp_from_xml", "openpgp_to_xml", "ox", "sign_from_bytes", "sign_to_bytes", "signcrypt_from_bytes",
           "signcrypt_to_bytes"]
OPENPGP_NS = OX_NS
# A sealed part or a signed command is a few hundred bytes, a signed firmware offer or tariff
# under 2 KiB; this bounds what a receiver will even try to decode.
MAX_OPENPGP_BYTES = 64 * 1024
MAX_SIGNED_BYTES = MAX_OPENPGP_BYTES


def openpgp_to_xml(message: bytes) -> ET.Element:
    el = ET.Element(ox("openpgp"))
    el.text = base64.b64encode(message).decode("ascii")
    return el


def openpgp_from_xml(el: ET.Element | None) -> bytes:
    """The binary OpenPGP message an ``<openpgp/>`` element holds; raises :class:`PayloadError`."""
    if el is None or el.tag != ox("openpgp"):
        raise PayloadError(f"expected <openpgp xmlns='{OX_NS}'>")
    text = "".join((el.text or "").split())
    if len(text) > MAX_OPENPGP_BYTES * 4 // 3 + 4:
        raise PayloadError(f"OpenPGP message larger than {MAX_OPENPGP_BYTES} bytes")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise PayloadError("<openpgp/> is not valid base64") from None
    if not data:
        raise PayloadError("<openpgp/> is empty")
    return data


def _time(stamp: ET.Element | None, what: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat((stamp.get("stamp", "") if stamp is not None else "").replace("Z", "+00:00"))
    except ValueError:
        raise PayloadError(f"<{what}/> has no valid <time stamp='…'/> (ISO 8601)") from None
    if when.tzinfo is None:
        raise PayloadError(f"<{what}/> time stamp has no time zone")
    return when


# -- signed and encrypted: <signcrypt/> -------------------------------------------------------


@dataclass(frozen=True)
class Signcrypt:
    """The cleartext of a signed and encrypted OpenPGP message (XEP-0373 §3.1)."""

    to: tuple[str, ...]
    time: dt.datetime
    payload: ET.Element
    # Further payload elements: XEP-0374 chat clients put chat states or receipt requests
    # beside the <body/> (Gajim does); a grid part has none.
    extra: tuple[ET.Element, ...] = ()


def signcrypt_to_bytes(content: Signcrypt) -> bytes:
    el = ET.Element(ox("signcrypt"))
    for jid in content.to:
        ET.SubElement(el, ox("to"), {"jid": jid})
    ET.SubElement(el, ox("time"), {"stamp": _text(content.time)})
    # 0-63 random characters: ciphertexts of the same kind of part do not all have one length.
    ET.SubElement(el, ox("rpad")).text = secrets.token_urlsafe(48)[: secrets.randbelow(64)] or None
    ET.SubElement(el, ox("payload")).append(content.payload)
    return ET.tostring(el, encoding="utf-8")


def _envelope(data: bytes, name: str, what: str) -> tuple[ET.Element, tuple[str, ...]]:
    """The ``<sign/>`` or ``<signcrypt/>`` element in ``data`` and the recipients it names;
    :class:`PayloadError` saying which of the two steps failed."""
    try:
        el = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PayloadError(f"{what} is not well-formed XML: {exc}") from None
    if el.tag != ox(name):
        raise PayloadError(f"{what} is <{el.tag}>, not <{name} xmlns='{OX_NS}'>")
    to = tuple(t.get("jid", "") for t in el.findall(ox("to")))
    if not to or not all(to):
        raise PayloadError(f"<{name}/> names no recipient (<to jid='…'/>)")
    return el, to


def signcrypt_from_bytes(data: bytes) -> Signcrypt:
    el, to = _envelope(data, "signcrypt", "decrypted part")
    stamp = el.find(ox("time"))
    payload = el.find(ox("payload"))
    if stamp is None or payload is None or len(payload) == 0:
        raise PayloadError("<signcrypt/> needs one <time/> and a <payload/> with an element")
    return Signcrypt(to=to, time=_time(stamp, "signcrypt"), payload=payload[0], extra=tuple(payload[1:]))


# -- signed only: <sign/> ---------------------------------------------------------------------


class SignContent(NamedTuple):  # a tuple: a third of a frozen dataclass's making, per command
    """The parsed ``<sign/>`` element: recipients, signing time and the one payload element."""

    to: tuple[str, ...]
    time: dt.datetime
    payload: ET.Element


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def sign_to_bytes(to: str | Sequence[str], time: dt.datetime, payload: ET.Element | str) -> bytes:
    """The ``<sign/>`` element for ``to`` (one bare JID, or several: a batch of commands, each
    for one of them), serialised: the bytes that get signed.

    The envelope is written from a template (ElementTree's serialiser takes ~30 µs for the
    whole, a third of the cost of signing a command); only the payload goes through it, unless
    it comes serialised already (one well-formed element, its namespace declared on it). The
    envelope's namespace has a prefix, so a payload element without a namespace keeps none."""
    inner = payload if isinstance(payload, str) else ET.tostring(payload, encoding="unicode")
    tos = "".join(f"<ox:to jid={quoteattr(t)} />" for t in ((to,) if isinstance(to, str) else to))
    return (f'<ox:sign xmlns:ox="{OX_NS}">{tos}<ox:time stamp="{_stamp(time)}" />'
            f"<ox:payload>{inner}</ox:payload></ox:sign>").encode("utf-8")


# The one shape sign_to_bytes writes around a command without args (a shed, a restore: what a
# device reads most), in printable ASCII with nothing to unescape or normalise in any value
# (no ``"&<>``, tab or newline): read without a parser, the same element as expat's — its
# tag, its attributes in order, no text, no children (tests/test_signing_units.py fuzzes the
# two against each other). Anything else, however slightly different, goes to the parser.
_VALUE = rb"[ !#-%'-;=?-~]"
_SIGNED_COMMAND = re.compile(
    rb'<ox:sign xmlns:ox="urn:xmpp:openpgp:0"><ox:to jid="(' + _VALUE + rb'+)" /><ox:time stamp="(' + _VALUE
    + rb'+)" /><ox:payload><command xmlns="urn:gridpresence:0"((?: [a-z][a-z-]{0,31}="' + _VALUE
    + rb'*")*) ?/></ox:payload></ox:sign>')
_ATTR = re.compile(rb' ([a-z][a-z-]{0,31})="(' + _VALUE + rb'*)"')
_COMMAND_TAG = "{urn:gridpresence:0}command"


def _signed_command(data: bytes) -> SignContent | None:
    """The template's reading of ``data``, or None: the parser's to read."""
    found = _SIGNED_COMMAND.fullmatch(data)
    if found is None:
        return None
    pairs = _ATTR.findall(found[3])
    attrib = {name.decode("ascii"): value.decode("ascii") for name, value in pairs}
    if len(attrib) != len(pairs) or any(name.startswith("xml") for name in attrib):
        return None  # a repeated attribute (not well-formed) or a reserved name: the parser says
    try:
        when = _time(ET.Element("time", {"stamp": found[2].decode("ascii")}), "sign")
    except PayloadError:
        return None  # the parser words the refusal
    return SignContent(to=(found[1].decode("ascii"),), time=when, payload=ET.Element(_COMMAND_TAG, attrib))


def sign_from_bytes(data: bytes) -> SignContent:
    """Parse signed ``<sign/>`` bytes; raises :class:`PayloadError` naming what is wrong."""
    if len(data) > MAX_SIGNED_BYTES:
        raise PayloadError(f"signed content larger than {MAX_SIGNED_BYTES} bytes")
    fast = _signed_command(data)
    if fast is not None:
        return fast
    return parse_sign(data)


def parse_sign(data: bytes) -> SignContent:
    """:func:`sign_from_bytes` through the XML parser, whatever the shape (the reference)."""
    if len(data) > MAX_SIGNED_BYTES:
        raise PayloadError(f"signed content larger than {MAX_SIGNED_BYTES} bytes")
    sign, to = _envelope(data, "sign", "signed content")
    payload = sign.find(ox("payload"))
    if payload is None or len(payload) != 1:
        raise PayloadError("<sign/> must hold exactly one element in <payload/>")
    return SignContent(to=to, time=_time(sign.find(ox("time")), "sign"), payload=payload[0])


def element_to_text(el: ET.Element) -> str:
    """An element as stored or mailed verbatim (the relay's queue, a grid mail)."""
    return ET.tostring(el, encoding="unicode")


class OpenPGPElement(ElementBase):
    """``<openpgp/>`` in a message, for slixmpp handlers (``StanzaPath('message/openpgp')``)."""

    name = "openpgp"
    namespace = OX_NS
    plugin_attrib = "openpgp"


register_stanza_plugin(Message, OpenPGPElement)


# -- XEP-0374 chat: the payload is a message's <body/> ---------------------------------------

CLIENT_NS = "jabber:client"
# The plain body a client that cannot read OX shows instead (XEP-0374 §2.1 suggests one).
FALLBACK_BODY = "This message is encrypted (XEP-0373: OpenPGP for XMPP)."


def chat_payload(text: str) -> ET.Element:
    el = ET.Element(f"{{{CLIENT_NS}}}body")
    el.text = text
    return el


def chat_body(content: Signcrypt) -> str:
    """The text of the chat ``<body xmlns='jabber:client'/>`` among the payload elements."""
    for el in (content.payload, *content.extra):
        if el.tag == f"{{{CLIENT_NS}}}body":
            return el.text or ""
    raise PayloadError(f"the signed payload holds no chat <body xmlns='{CLIENT_NS}'/>")
