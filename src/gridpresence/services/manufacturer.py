"""A device manufacturer on the grid network: it holds the key that firmware offers are signed
with, keeps that key announced to the devices, and signs an offer of an image for each device
(:func:`gridpresence.device.firmware.sign_offer`) that operators then carry with the image."""

from __future__ import annotations

import logging
from xml.etree import ElementTree as ET

from gridpresence.security.firmware import sign_offer
from gridpresence.xmpp.party import PartySession
from gridpresence.xmpp.session import Endpoint, make_client
from gridpresence.config import ManufacturerSpec
from gridpresence.protocol.firmware import FirmwareImage
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring

log = logging.getLogger(__name__)


class ManufacturerAgent(PartySession):
    def __init__(self, spec: ManufacturerSpec, jid: str, password: str, endpoint: Endpoint,
                 keys: PartyKeys | None = None) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.client = make_client(jid, password, endpoint)
        self.keyring = PepKeyring(self.client, keys)  # announces the key devices check offers with
        self.client.add_event_handler("session_start", lambda _e: self.client.send_presence(pstatus="manufacturer"))

    def offer(self, image: FirmwareImage, device: str, serial: str, ttl_s: float = 3600.0) -> ET.Element:
        """This manufacturer's signed offer of ``image`` to one device (bare JID and serial)."""
        key = self.keyring.secret_key
        if key is None:
            raise RuntimeError(f"{self.jid} holds no OpenPGP key: it cannot sign firmware offers")
        return sign_offer(image, device, serial, self.jid, key, ttl_s=ttl_s)
