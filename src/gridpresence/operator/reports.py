"""A reader's billing reports as they arrive over XMPP, and asking a meter for one: what the
operator library and the billing party do with reports ([0085])."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from slixmpp import ClientXMPP
from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.protocol.addressing import origin_of
from gridpresence.protocol.billing_report import PartData, billing_report_from_xml, request_to_xml
from gridpresence.protocol.codec import PayloadError
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.parts import BadPart, PartError, PartProblem
from gridpresence.security.reports import ReportReader

log = logging.getLogger(__name__)


class ReportInbox:
    """A reader's billing reports as they arrive on `client`, from the device itself or passed
    on by a relay (XEP-0033 ``ofrom`` names the device). Keeps the opened parts, oldest first;
    a report it cannot open is logged and, when it came straight from its sender, answered with
    an error saying why."""

    def __init__(self, client: ClientXMPP, reader: ReportReader, relays: Iterable[str] = (), keep: int = 1000) -> None:
        self.client = client
        self.reader = reader
        self.relays = frozenset(relays)
        self.keep = keep
        self.received: list[PartData] = []
        self.refused: list[str] = []  # why reports were refused, newest last
        self._arrived = asyncio.Event()
        client.register_handler(Callback("billing report", StanzaPath("message/grid_billing_report"), self._on_report))

    def _on_report(self, msg: StanzaBase) -> None:
        asyncio.ensure_future(self._read_logged(msg))

    async def _read_logged(self, msg: StanzaBase) -> None:
        try:
            await self._read(msg)
        except Exception:  # one bad report must not leave a task failing silently, nor stop the next
            log.exception("%s: billing report from %s could not be handled", self.reader.me, msg["from"])

    async def _read(self, msg: StanzaBase) -> None:
        sender = msg["from"].bare
        try:
            report = billing_report_from_xml(msg["grid_billing_report"].xml)
            origin = origin_of(msg.xml) if sender in self.relays else sender
            if origin != report.device:
                raise BadPart(PartProblem.WRONG_SIGNER, f"report of {report.device} sent by {origin or sender}")
            data = await self.reader.read(report)
        except (PayloadError, PartError, KeyUnavailable) as exc:
            why = f"billing report refused: {exc}"
            log.warning("%s: %s (from %s)", self.reader.me, why, sender)
            self.refused.append(why)
            del self.refused[:-100]
            if sender not in self.relays:
                err = self.client.make_message(mto=msg["from"], mtype="error")
                err["error"]["type"] = "modify"
                err["error"]["condition"] = "not-acceptable"
                err["error"]["text"] = why[:500]
                err.send()
            return
        self.received.append(data)
        del self.received[:-self.keep]
        log.info("%s: %s part of report %s from %s read", self.reader.me, self.reader.part.value, report.id,
                 report.device)
        self._arrived.set()

    async def wait(self, predicate: Callable[[PartData], bool], timeout: float) -> PartData:
        """The first received part (already here or arriving) that `predicate` accepts."""
        async with asyncio.timeout(timeout):
            while True:
                for data in reversed(self.received):
                    if predicate(data):
                        return data
                self._arrived.clear()
                await self._arrived.wait()


def request_report(client: ClientXMPP, device: str) -> None:
    """Ask a metering device for a billing report now (it goes to every reader)."""
    msg = client.make_message(mto=device, mtype="normal")
    msg.append(request_to_xml())
    msg.send()
