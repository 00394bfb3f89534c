"""Firmware upgrades by instant message ([00140], [00144]).

Device side, :class:`FirmwareDesk`: an operator's in-band image is checked (size, sha256) and
applied if the device is available; a restricted device answers ``rejected (restricted)``.
Sender side, :class:`FirmwareCampaign`: sends one image to a group of devices, re-sends to a
device that refused while restricted as soon as its presence says it is available again, and
reports every device that has not applied it when the time-out comes as failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from slixmpp import Message
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.agents.tracker import DeviceChange
from gridpresence.protocol.codec import PayloadError
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
from gridpresence.protocol.models import DeviceState

if TYPE_CHECKING:
    from gridpresence.agents.device import DeviceAgent
    from gridpresence.agents.operator import GridOperator

log = logging.getLogger(__name__)

FACTORY_VERSION = "1.0.0"


class FirmwareDesk:
    """A device's firmware: the running version and the upgrades it has applied."""

    def __init__(self, agent: DeviceAgent) -> None:
        self.agent = agent
        self.version = FACTORY_VERSION
        self.applied: dict[str, str] = {}  # upgrade id -> version: a resent upgrade is not applied twice
        agent.client.register_handler(Callback("grid firmware", StanzaPath("message/grid_firmware"), self._on_firmware))

    def _on_firmware(self, msg: Message) -> None:
        el = msg["grid_firmware"].xml
        try:
            result = self.receive(msg["from"].bare, el)
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

    def receive(self, sender: str, el: object) -> FirmwareResult:
        upgrade_id = getattr(el, "get")("id")
        if sender not in self.agent.operators:
            log.warning("%s: firmware from %s refused: not authorised", self.agent.spec.name, sender)
            return self._result(upgrade_id, FirmwareStatus.REJECTED, FirmwareReason.NOT_AUTHORISED,
                                f"{sender} may not upgrade this device")
        try:
            image = firmware_from_xml(el)  # type: ignore[arg-type]
        except PayloadError as exc:
            return self._result(upgrade_id, FirmwareStatus.FAILED, FirmwareReason.BAD_IMAGE, str(exc))
        if image.id in self.applied:
            return self._result(image.id, FirmwareStatus.APPLIED, None, f"already applied ({self.applied[image.id]})")
        sim = self.agent.sim
        if sim.state is DeviceState.RESTRICTED and sim.restriction is not None:
            return self._result(image.id, FirmwareStatus.REJECTED, FirmwareReason.RESTRICTED,
                                f"not now: {sim.restriction.note}")
        old, self.version = self.version, image.version
        self.applied[image.id] = image.version
        self.agent.client.plugin["xep_0092"].version = image.version  # what clients see in "version"
        log.info("%s: firmware %s -> %s (%d bytes)", self.agent.spec.name, old, image.version, image.size)
        return self._result(image.id, FirmwareStatus.APPLIED, None, f"firmware {old} -> {image.version}")


class FirmwareCampaign:
    """One image to many devices, with one result per device. ``history`` keeps every answer."""

    def __init__(self, grid: GridOperator, names: Iterable[str], image: FirmwareImage) -> None:
        self.grid = grid
        self.image = image
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


async def upgrade_firmware(grid: GridOperator, names: Iterable[str], data: bytes, version: str,
                           timeout_s: float = 60.0) -> dict[str, FirmwareResult]:
    """Send firmware `data` as `version` to devices; one result per device (applied, rejected, failed)."""
    return await FirmwareCampaign(grid, names, FirmwareImage.new(data, version)).run(timeout_s)
