"""XEP-0033 extended addressing: ``ofrom`` names the device a relayed message speaks for (the
relay sends it, the device is its origin); ``to`` addresses the devices of a host a batch of
commands is multicast to (xmpp/component.py)."""

from __future__ import annotations

from collections.abc import Sequence
from xml.etree import ElementTree as ET
from xml.sax.saxutils import quoteattr

ADDRESS_NS = "http://jabber.org/protocol/address"


def add_origin(stanza: ET.Element, device: str) -> None:
    addresses = ET.SubElement(stanza, f"{{{ADDRESS_NS}}}addresses")
    ET.SubElement(addresses, f"{{{ADDRESS_NS}}}address", {"type": "ofrom", "jid": device})


def origin_of(stanza: ET.Element) -> str | None:
    """The device a relayed stanza speaks for (``ofrom``), or None."""
    for address in stanza.iter(f"{{{ADDRESS_NS}}}address"):
        if address.get("type") == "ofrom" and address.get("jid"):
            return address.get("jid")
    return None


def addresses_to_xml(devices: Sequence[str]) -> ET.Element:
    """``<addresses/>`` naming each of ``devices`` as a ``to`` (what addresses_text writes)."""
    addresses = ET.Element(f"{{{ADDRESS_NS}}}addresses")
    for device in devices:
        ET.SubElement(addresses, f"{{{ADDRESS_NS}}}address", {"type": "to", "jid": device})
    return addresses


def addresses_text(devices: Sequence[str]) -> str:
    """``<addresses/>`` naming each of ``devices`` as a ``to``, serialised (a batch's hundred)."""
    each = "".join(f"<address type='to' jid={quoteattr(d)}/>" for d in devices)
    return f"<addresses xmlns='{ADDRESS_NS}'>{each}</addresses>"
