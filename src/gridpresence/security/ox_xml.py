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
import secrets
import string
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from pydantic import ValidationError

from gridpresence.protocol.models import Signcrypt

NS_OX = "urn:xmpp:openpgp:0"
PUBLIC_KEYS_NODE = f"{NS_OX}:public-keys"  # the metadata node
PUBLIC_KEYS_NOTIFY = f"{PUBLIC_KEYS_NODE}+notify"  # XEP-0163 interest in the metadata node
NS_CLIENT = "jabber:client"
# The plain body a client that cannot read OX shows instead (XEP-0374 §2.1 suggests one).
FALLBACK_BODY = "This message is encrypted (XEP-0373: OpenPGP for XMPP)."
_PAD_CHARS = string.ascii_letters + string.digits
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


# -- OX messages (§3, XEP-0374 chat) ---------------------------------------------------------
# Written the way OX clients (Profanity, Gajim) write them: <signcrypt> in the default namespace,
# <to jid/>, <time stamp/>, random <rpad/> (the ciphertext's length does not tell the text's)
# and a <payload/> of stanza elements, here one <body xmlns='jabber:client'/>.


def openpgp_to_xml(message_b64: str) -> ET.Element:
    """``<openpgp xmlns='urn:xmpp:openpgp:0'>BASE64</openpgp>`` for a message stanza."""
    el = ET.Element(ox("openpgp"))
    el.text = message_b64
    return el


def openpgp_from_message(stanza: ET.Element) -> str | None:
    """The base64 OpenPGP message a message stanza carries, or None if it carries none."""
    el = stanza.find(ox("openpgp"))
    if el is None:
        return None
    return "".join((el.text or "").split())


def signcrypt_to_xml(content: Signcrypt) -> bytes:
    """The plaintext to sign and encrypt (UTF-8), with 16-63 random padding characters."""
    root = ET.Element("signcrypt", {"xmlns": NS_OX})
    for jid in content.to:
        ET.SubElement(root, "to", {"jid": jid})
    ET.SubElement(root, "time", {"stamp": xep82(content.time)})
    ET.SubElement(root, "rpad").text = "".join(secrets.choice(_PAD_CHARS) for _ in range(16 + secrets.randbelow(48)))
    ET.SubElement(ET.SubElement(root, "payload"), "body", {"xmlns": NS_CLIENT}).text = content.body
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def signcrypt_from_xml(data: bytes) -> Signcrypt:
    """A decrypted, verified ``<signcrypt/>`` carrying chat; :class:`OxXmlError` says what is wrong."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise OxXmlError(f"the decrypted content is not XML ({exc})") from None
    if root.tag in (ox("sign"), ox("crypt")):
        kind = "signed but not encrypted" if root.tag == ox("sign") else "encrypted but not signed"
        raise OxXmlError(f"it is a <{root.tag.split('}')[1]}/> ({kind}); commands need <signcrypt/>")
    if root.tag != ox("signcrypt"):
        raise OxXmlError(f"the decrypted content is not <signcrypt xmlns='{NS_OX}'/>")
    stamp = root.find(ox("time"))
    if stamp is None or not stamp.get("stamp"):
        raise OxXmlError("<signcrypt/> has no <time stamp=''/>")
    when = _parse_xep82(stamp.get("stamp", ""))
    payload = root.find(ox("payload"))
    bodies = [] if payload is None else [el for el in payload if el.tag in (f"{{{NS_CLIENT}}}body", ox("body"))]
    if not bodies:
        raise OxXmlError("<signcrypt/> has no <payload/> with a chat <body/>")
    try:
        return Signcrypt(to=tuple(el.get("jid", "") for el in root.findall(ox("to"))), time=when,
                         body=bodies[0].text or "")
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise OxXmlError(f"invalid <signcrypt/>: {problems}") from None
