"""XML of OpenPGP for XMPP (XEP-0373, XEP-0374 instant messaging): the ``<openpgp/>`` element
a message carries, and the ``<signcrypt/>`` element inside its OpenPGP message.

Written the way Profanity and other OX clients write it: ``<signcrypt>`` in the default
namespace ``urn:xmpp:openpgp:0``, ``<to jid/>``, ``<time stamp/>``, random ``<rpad/>`` (so
the length of the ciphertext does not tell the length of the text) and a ``<payload/>`` of
stanza elements, here one ``<body xmlns='jabber:client'/>``.
"""

from __future__ import annotations

import datetime as dt
import secrets
import string
from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import PayloadError, _validate
from gridpresence.protocol.models import Signcrypt

OX_NS = "urn:xmpp:openpgp:0"
CLIENT_NS = "jabber:client"
# The plain body clients that cannot read OX show instead (XEP-0374 §2.1 suggests one).
FALLBACK_BODY = "This message is encrypted (XEP-0373: OpenPGP for XMPP)."
_PAD_CHARS = string.ascii_letters + string.digits


def ox(name: str) -> str:
    return f"{{{OX_NS}}}{name}"


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
    root = ET.Element("signcrypt", {"xmlns": OX_NS})  # default namespace, as clients write it
    for jid in content.to:
        ET.SubElement(root, "to", {"jid": jid})
    stamp = content.time.astimezone(dt.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")
    ET.SubElement(root, "time", {"stamp": stamp})
    pad = ET.SubElement(root, "rpad")
    pad.text = "".join(secrets.choice(_PAD_CHARS) for _ in range(16 + secrets.randbelow(48)))
    body = ET.SubElement(ET.SubElement(root, "payload"), "body", {"xmlns": CLIENT_NS})
    body.text = content.body
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def signcrypt_from_xml(data: bytes) -> Signcrypt:
    """A decrypted, verified ``<signcrypt/>``; :class:`PayloadError` says what is wrong."""
    try:
        root = ET.fromstring(data)
    except ET.ParseError as exc:
        raise PayloadError(f"the decrypted content is not XML ({exc})") from None
    if root.tag in (ox("sign"), ox("crypt")):
        kind = "signed but not encrypted" if root.tag == ox("sign") else "encrypted but not signed"
        raise PayloadError(f"it is a <{root.tag.split('}')[1]}/> ({kind}); commands need <signcrypt/>")
    if root.tag != ox("signcrypt"):
        raise PayloadError(f"the decrypted content is not <signcrypt xmlns='{OX_NS}'/>")
    stamp = root.find(ox("time"))
    if stamp is None or not stamp.get("stamp"):
        raise PayloadError("<signcrypt/> has no <time stamp=''/>")
    try:
        when = dt.datetime.fromisoformat(stamp.get("stamp", ""))
    except ValueError:
        raise PayloadError(f"<time stamp={stamp.get('stamp', '')[:40]!r}/> is not an XEP-0082 date-time") from None
    payload = root.find(ox("payload"))
    bodies = [] if payload is None else [el for el in payload if el.tag in (f"{{{CLIENT_NS}}}body", "body", ox("body"))]
    if not bodies:
        raise PayloadError("<signcrypt/> has no <payload/> with a chat <body/>")
    return _validate(Signcrypt, {"to": tuple(el.get("jid", "") for el in root.findall(ox("to"))),
                                 "time": when, "body": bodies[0].text or ""}, "<signcrypt/>")
