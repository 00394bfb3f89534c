"""XML of OpenPGP for XMPP (XEP-0373): the one place its elements are read and written.

Public keys are announced over PEP in two nodes (§4): a data node per key,
``urn:xmpp:openpgp:0:public-keys:<FPR>``, whose item holds ``<pubkey><data>`` with the
Base64 of the binary (not armored) key, and the metadata node ``urn:xmpp:openpgp:0:public-keys``
listing the announced fingerprints. Signed and encrypted content elements (``<openpgp>``,
``<sign>``, ``<signcrypt>``) belong here too.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from dataclasses import dataclass
from xml.etree import ElementTree as ET

NS_OX = "urn:xmpp:openpgp:0"
PUBLIC_KEYS_NODE = f"{NS_OX}:public-keys"  # the metadata node
PUBLIC_KEYS_NOTIFY = f"{PUBLIC_KEYS_NODE}+notify"  # XEP-0163 interest in the metadata node
_FPR = re.compile(r"^[0-9A-F]{40}$")


class OxXmlError(ValueError):
    """An XEP-0373 element that is missing, malformed or holds something other than a key."""


def ox(name: str) -> str:
    """Qualified element name in the XEP-0373 namespace."""
    return f"{{{NS_OX}}}{name}"


def key_node(fpr: str) -> str:
    """The data node of the key with v4 fingerprint ``fpr`` (40 upper-case hex digits)."""
    return f"{PUBLIC_KEYS_NODE}:{fpr}"


def xep82(when: dt.datetime) -> str:
    """XEP-0082 DateTime in UTC, whole seconds (OpenPGP times have no fractions)."""
    return when.astimezone(dt.timezone.utc).replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _parse_xep82(text: str) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise OxXmlError(f"date {text[:40]!r} is not an XEP-0082 DateTime") from None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


@dataclass(frozen=True)
class KeyAnnouncement:
    """One ``<pubkey-metadata/>``: a key its owner announces, and when it was published."""

    fingerprint: str
    date: dt.datetime


def pubkey_to_xml(key_bytes: bytes, date: dt.datetime) -> ET.Element:
    """``<pubkey date=...><data>BASE64</data></pubkey>`` for a binary OpenPGP public key."""
    el = ET.Element(ox("pubkey"), {"date": xep82(date)})
    ET.SubElement(el, ox("data")).text = base64.b64encode(key_bytes).decode("ascii")
    return el


def pubkey_from_xml(el: ET.Element | None) -> bytes:
    """The binary key in a ``<pubkey/>`` (whitespace in the Base64 is allowed, as in §4.1's example)."""
    if el is None or el.tag != ox("pubkey"):
        raise OxXmlError("the item holds no <pubkey xmlns='urn:xmpp:openpgp:0'/>")
    data = el.find(ox("data"))
    if data is None or not (data.text or "").strip():
        raise OxXmlError("<pubkey/> has no <data/>")
    try:
        blob = base64.b64decode("".join(data.text.split()), validate=True)  # type: ignore[union-attr]
    except (binascii.Error, ValueError):
        raise OxXmlError("<data/> is not Base64") from None
    if not blob:
        raise OxXmlError("<data/> is empty")
    return blob


def metadata_to_xml(announced: list[KeyAnnouncement]) -> ET.Element:
    """``<public-keys-list>`` with one ``<pubkey-metadata/>`` per key (no fingerprint twice)."""
    el = ET.Element(ox("public-keys-list"))
    seen: set[str] = set()
    for a in announced:
        if a.fingerprint not in seen:
            seen.add(a.fingerprint)
            ET.SubElement(el, ox("pubkey-metadata"), {"v4-fingerprint": a.fingerprint, "date": xep82(a.date)})
    return el


def metadata_from_xml(el: ET.Element | None) -> list[KeyAnnouncement]:
    """The announced keys, newest first; entries with a bad fingerprint or date are an error."""
    if el is None or el.tag != ox("public-keys-list"):
        raise OxXmlError("the item holds no <public-keys-list xmlns='urn:xmpp:openpgp:0'/>")
    out: list[KeyAnnouncement] = []
    for meta in el.findall(ox("pubkey-metadata")):
        fpr = (meta.get("v4-fingerprint") or "").strip().upper()
        if not _FPR.match(fpr):
            raise OxXmlError(f"v4-fingerprint {fpr[:60]!r} is not 40 hex digits")
        out.append(KeyAnnouncement(fpr, _parse_xep82(meta.get("date") or "")))
    out.sort(key=lambda a: a.date, reverse=True)
    return out
