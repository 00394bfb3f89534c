"""A manufacturer's signed firmware offer ([00140]): what the manufacturer signs and the device
checks, bound to one device's JID and serial number."""

from __future__ import annotations

from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import command_to_xml
from gridpresence.protocol.firmware import FirmwareImage
from gridpresence.protocol.models import Action, Command
from gridpresence.security.pgp import pgpy
from gridpresence.security.signed import sign_payload


def sign_offer(image: FirmwareImage, device: str, serial: str, issuer: str, key: pgpy.PGPKey,
               ttl_s: float = 3600.0) -> ET.Element:
    """A manufacturer's signed offer of ``image`` to one device (bare JID, serial number)."""
    cmd = Command.new(Action.FIRMWARE_UPGRADE, issuer, ttl_s=ttl_s, serial=serial,
                      args={"firmware-id": image.id, "version": image.version, "sha256": image.sha256})
    return sign_payload(command_to_xml(cmd), device, key, now=cmd.issued)
