"""Firmware upgrades by instant message ([00140], [00144]), the device's side.

An operator carries the in-band image together with the manufacturer's signed offer for this
device (``security.firmware.sign_offer``: a ``firmware_upgrade`` command naming the image's id,
version and sha256, the device's serial bound in). The device checks the offer like any signed
command (signature, manufacturer role, serial, window, not used before), then the image against
it (size, sha256), and applies it if the device is available; a restricted device answers
``rejected (restricted)``. The sender's side is ``operator.firmware``.
"""

from __future__ import annotations

import asyncio
import logging
from xml.etree import ElementTree as ET

from slixmpp import Message
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.firmware import (
    FirmwareReason,
    FirmwareResult,
    FirmwareStatus,
    firmware_from_xml,
    result_to_xml,
)
from gridpresence.protocol.models import (
    Command,
    DeviceState,
    Outcome,
    OutcomeStatus,
    RejectReason,
    utcnow,
)
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.security.gate import Refusal, open_command
from gridpresence.security.signed import SignatureFailure, key_of
from gridpresence.device.host import DeviceHost
from gridpresence.xmpp.handlers import stanza_callback
from gridpresence.xmpp.component import set_software_version


log = logging.getLogger(__name__)

FACTORY_VERSION = "1.0.0"


class FirmwareDesk:
    """A device's firmware: the running version and the upgrades it has applied."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.version = FACTORY_VERSION
        self.applied: dict[str, str] = {}  # upgrade id -> version: a resent upgrade is not applied twice
        self._busy: set[asyncio.Task[None]] = set()
        agent.client.register_handler(stanza_callback("grid firmware", StanzaPath("message/grid_firmware"),
                                                      self._on_firmware))


    def close(self) -> None:
        for task in self._busy:
            task.cancel()

    def _on_firmware(self, msg: Message) -> None:
        # Async: the offer's signer key may have to be fetched first (firmware is rare, never hot).
        task = asyncio.ensure_future(self._handle(msg))
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)

    async def _handle(self, msg: Message) -> None:
        el = msg["grid_firmware"].xml
        try:
            result = await self.receive(msg["from"].bare, el, msg.xml.find(f"{{{OPENPGP_NS}}}openpgp"))
        except Exception:  # no image may end the device
            log.exception("%s: firmware upgrade failed", self.agent.spec.name)
            result = self._result(el.get("id"), FirmwareStatus.FAILED, FirmwareReason.BAD_IMAGE, "internal error")
        reply = self.agent.client.make_message(mto=msg["from"], mtype="normal")
        reply.append(result_to_xml(result))
        reply.send()

    def _result(self, upgrade_id: str | None, status: FirmwareStatus, reason: FirmwareReason | None,
                detail: str) -> FirmwareResult:
        return FirmwareResult(id=(upgrade_id or "unknown")[:64], device=self.agent.jid, status=status, reason=reason,
                              version=self.version, detail=detail[:300])

    async def _offer(self, sender: str, offer_el: ET.Element | None) -> Command:
        """The manufacturer's signed offer, checked like any signed command; raises Refusal."""
        if offer_el is None:
            raise Refusal(RejectReason.UNSIGNED, "no manufacturer-signed offer came with the image")
        signed = open_command(offer_el)
        self.agent.gate.may_issue(signed)
        try:
            key = await key_of(signed.command.issuer, self.agent.keyring)
        except SignatureFailure as exc:
            raise Refusal(exc.reason, exc.detail, signed.command.id) from None
        return self.agent.gate.check(sender, signed, key, utcnow(), carriers=self.agent.operators)

    async def receive(self, sender: str, el: ET.Element, offer_el: ET.Element | None = None) -> FirmwareResult:
        upgrade_id = el.get("id")
        if sender not in self.agent.operators:
            log.warning("%s: firmware from %s refused: not authorised", self.agent.spec.name, sender)
            return self._result(upgrade_id, FirmwareStatus.REJECTED, FirmwareReason.NOT_AUTHORISED,
                                f"{sender} may not upgrade this device")
        try:
            offer = await self._offer(sender, offer_el)
        except Refusal as refusal:
            log.warning("%s: firmware offer refused (%s): %s", self.agent.spec.name, refusal.reason.value,
                        refusal.detail)
            return self._result(upgrade_id, FirmwareStatus.REJECTED, FirmwareReason.NOT_AUTHORISED,
                                f"{refusal.reason.value}: {refusal.detail}")
        try:
            image = firmware_from_xml(el)
        except PayloadError as exc:
            return self._result(upgrade_id, FirmwareStatus.FAILED, FirmwareReason.BAD_IMAGE, str(exc))
        wanted = {"firmware-id": image.id, "version": image.version, "sha256": image.sha256}
        if any(offer.args.get(k) != v for k, v in wanted.items()):
            return self._result(image.id, FirmwareStatus.REJECTED, FirmwareReason.NOT_AUTHORISED,
                                "the manufacturer's offer is for another image (id, version or sha256 differ)")
        if image.id in self.applied or self.agent.replay.seen(offer.issuer, offer.id) is not None:
            return self._result(image.id, FirmwareStatus.APPLIED, None,
                                f"already applied ({self.applied.get(image.id, image.version)})")
        if offer.is_expired(utcnow()):
            return self._result(image.id, FirmwareStatus.REJECTED, FirmwareReason.NOT_AUTHORISED,
                                "the manufacturer's offer has expired")
        sim = self.agent.sim
        if sim.state is DeviceState.RESTRICTED and sim.restriction is not None:
            return self._result(image.id, FirmwareStatus.REJECTED, FirmwareReason.RESTRICTED,
                                f"not now: {sim.restriction.note}")
        old, self.version = self.version, image.version
        self.applied[image.id] = image.version
        done = Outcome(command_id=offer.id, device=self.agent.jid, status=OutcomeStatus.EXECUTED,
                       detail=f"firmware {old} -> {image.version}")
        forget_at = offer.expires.timestamp() + self.agent.security.clock_skew_s
        self.agent.replay.record(offer.issuer, offer.id, forget_at, done)  # the offer is used up
        set_software_version(self.agent.client, image.version)  # what clients see in "version"
        log.info("%s: firmware %s -> %s (%d bytes)", self.agent.spec.name, old, image.version, image.size)
        return self._result(image.id, FirmwareStatus.APPLIED, None, done.detail)
