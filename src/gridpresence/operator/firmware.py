"""Firmware upgrades by instant message ([00140], [00144]), the sender's side.

:class:`FirmwareCampaign` sends one image to a group of devices with each device's
manufacturer-signed offer (``security.firmware.sign_offer``), re-sends to a device that refused
while restricted as soon as its presence says it is available again, and reports every device
that has not applied it when the time-out comes as failed. The device's side is
``device.firmware``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping
from xml.etree import ElementTree as ET

from slixmpp import Message
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceChange
from gridpresence.protocol.codec import PayloadError
from gridpresence.protocol.firmware import (
    FirmwareImage,
    FirmwareReason,
    FirmwareResult,
    FirmwareStatus,
    firmware_to_xml,
    result_from_xml,
)
from gridpresence.protocol.models import DeviceState
from gridpresence.xmpp.handlers import stanza_callback

log = logging.getLogger(__name__)


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
        self.grid.client.register_handler(stanza_callback(handler, StanzaPath("message/grid_firmware_result"),
                                                          self._on_result))
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
