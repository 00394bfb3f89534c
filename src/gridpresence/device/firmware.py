"""Firmware upgrades by instant message ([00140], [00144]).

Device side, :class:`FirmwareDesk`: an operator carries the in-band image together with the
manufacturer's signed offer for this device (:func:`sign_offer`: a ``firmware_upgrade`` command
naming the image's id, version and sha256, the device's serial bound in). The device checks the
offer like any signed command (signature, manufacturer role, serial, window, not used before),
then the image against it (size, sha256), and applies it if the device is available; a
restricted device answers ``rejected (restricted)``.
Sender side, :class:`FirmwareCampaign`: sends one image to a group of devices, re-sends to a
device that refused while restricted as soon as its presence says it is available again, and
reports every device that has not applied it when the time-out comes as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

from slixmpp import Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.operator.tracker import DeviceChange
from gridpresence.protocol.codec import PayloadError, command_to_xml
from gridpresence.protocol.firmware import (
    FirmwareImage,
    FirmwareReason,
    FirmwareResult,
    FirmwareStatus,
    firmware_from_xml,
    firmware_to_xml,
    result_from_xml,
    result_to_xml,
)
from gridpresence.protocol.models import (
    Action,
    Command,
    DeviceState,
    Outcome,
    OutcomeStatus,
    RejectReason,
    utcnow,
)
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.security.gate import Refusal, open_command
from gridpresence.security.pgp import pgpy
from gridpresence.security.signed import SignatureFailure, key_of, sign_payload

if TYPE_CHECKING:
    from gridpresence.device.agent import DeviceAgent
    from gridpresence.operator.library import GridOperator

log = logging.getLogger(__name__)

FACTORY_VERSION = "1.0.0"


class FirmwareDesk:
    """A device's firmware: the running version and the upgrades it has applied."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.agent = agent
        self.version = FACTORY_VERSION
        self.applied: dict[str, str] = {}  # upgrade id -> version: a resent upgrade is not applied twice
        self._busy: set[asyncio.Task[None]] = set()
        agent.client.register_handler(Callback("grid firmware", StanzaPath("message/grid_firmware"), self._on_firmware))

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
        self.agent.client.plugin["xep_0092"].version = image.version  # what clients see in "version"
        log.info("%s: firmware %s -> %s (%d bytes)", self.agent.spec.name, old, image.version, image.size)
        return self._result(image.id, FirmwareStatus.APPLIED, None, done.detail)


def sign_offer(image: FirmwareImage, device: str, serial: str, issuer: str, key: pgpy.PGPKey,
               ttl_s: float = 3600.0) -> ET.Element:
    """A manufacturer's signed offer of ``image`` to one device (bare JID, serial number)."""
    cmd = Command.new(Action.FIRMWARE_UPGRADE, issuer, ttl_s=ttl_s, serial=serial,
                      args={"firmware-id": image.id, "version": image.version, "sha256": image.sha256})
    return sign_payload(command_to_xml(cmd), device, key, now=cmd.issued)


class FirmwareCampaign:
    """One image to many devices, with one result per device. ``history`` keeps every answer."""

    def __init__(self, grid: GridOperator, names: Iterable[str], image: FirmwareImage,
                 offers: Mapping[str, ET.Element]) -> None:
        self.grid = grid
        self.image = image
        self.offers = dict(offers)  # device name -> the manufacturer's signed offer for it
        self.names = list(dict.fromkeys(names))
        self.by_jid = {grid.device(n).jid: n for n in self.names}  # unknown names fail here, before sending
        self.results: dict[str, FirmwareResult] = {}
        self.history: list[FirmwareResult] = []
        self._waiting_for_answer: set[str] = set()
        self._why: dict[str, str] = {n: "no answer" for n in self.names}
        self._done = asyncio.Event()

    async def run(self, timeout_s: float) -> dict[str, FirmwareResult]:
        handler = f"firmware result {self.image.id}"
        self.grid.client.register_handler(Callback(handler, StanzaPath("message/grid_firmware_result"), self._on_result))
        stop = self.grid.tracker.listen(self._on_change)
        try:
            for name in self.names:
                self._send(name)
            try:
                await asyncio.wait_for(self._done.wait(), timeout_s)
            except asyncio.TimeoutError:
                pass
        finally:
            stop()
            self.grid.client.remove_handler(handler)
        for name in self.names:
            if name not in self.results:
                self.results[name] = FirmwareResult(
                    id=self.image.id, device=self.grid.device(name).jid, status=FirmwareStatus.FAILED,
                    reason=FirmwareReason.TIMEOUT, detail=f"not applied within {timeout_s:g} s: {self._why[name]}"[:300])
        return {n: self.results[n] for n in self.names}

    def _send(self, name: str) -> None:
        view = self.grid.device(name)
        if view.full_jid is None:
            self._why[name] = "the device has no presence"
            return
        msg = self.grid.client.make_message(mto=view.full_jid, mtype="normal")
        msg.append(firmware_to_xml(self.image))
        if name in self.offers:
            msg.append(self.offers[name])
        msg.send()
        self._waiting_for_answer.add(name)

    def _on_result(self, msg: Message) -> None:
        try:
            result = result_from_xml(msg["grid_firmware_result"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid firmware result from %s: %s", msg["from"], exc)
            return
        name = self.by_jid.get(msg["from"].bare)
        if result.id != self.image.id or name is None or name in self.results:
            return
        self.history.append(result)
        self._waiting_for_answer.discard(name)
        if result.reason is FirmwareReason.RESTRICTED:
            self._why[name] = f"restricted ({result.detail})"  # sent again when its presence changes
            return
        self.results[name] = result
        if len(self.results) == len(self.names):
            self._done.set()

    def _on_change(self, change: DeviceChange) -> None:
        name = self.by_jid.get(change.current.jid)
        if name is None or name in self.results or name in self._waiting_for_answer:
            return
        if change.current.present and change.current.state is not DeviceState.RESTRICTED:
            self._send(name)


async def upgrade_firmware(grid: GridOperator, names: Iterable[str], image: FirmwareImage,
                           offers: Mapping[str, ET.Element], timeout_s: float = 60.0) -> dict[str, FirmwareResult]:
    """Send `image` with each device's manufacturer-signed offer (:func:`sign_offer`); one result
    per device (applied, rejected, failed)."""
    return await FirmwareCampaign(grid, names, image, offers).run(timeout_s)
