"""XEP-0033 extended addressing, as far as the relay needs it: ``ofrom`` names the device a
relayed message speaks for (the relay sends it, the device is its origin)."""

from __future__ import annotations

from xml.etree import ElementTree as ET

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
