"""The billing party ([00142], [0093]): sends its tariff, or a real-time price, to the
utility's operators whenever they are present, and to the devices, which rank their faults by
cost per day at that price. It reads the billing part of the meters' encrypted billing reports
([0085]), never their power-quality part.

Devices get it as a message to their bare JID, when billing comes online and at every change:
the server holds it for a device that is offline (mod_offline) and hands it over when the device
logs in. Billing does not follow the devices' presence: that would copy all of the grid's
presence traffic to billing just to learn when to send a rare price change."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from slixmpp import JID, Presence

from gridpresence.operator.issuer import CommandIssuer
from gridpresence.operator.reports import ReportInbox, request_report
from gridpresence.security.reports import ReportReader
from gridpresence.xmpp.party import PartySession
from gridpresence.xmpp.reconnect import SessionChange, SessionEvent, reconnector_of
from gridpresence.xmpp.session import Endpoint, make_client
from gridpresence.config import BillingSpec
from gridpresence.protocol.billing_report import BillingData, PartName
from gridpresence.protocol.codec import tariff_to_xml
from gridpresence.protocol.models import Action, Command, Outcome, Tariff, TariffPeriod
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.signed import sign_payload

log = logging.getLogger(__name__)

IN_FLIGHT_S = 10.0  # a tariff sent this shortly before a lost session may never have left: send again


class BillingAgent(PartySession):
    def __init__(self, spec: BillingSpec, jid: str, password: str, endpoint: Endpoint, operators: Iterable[str],
                 devices: Iterable[str] = (), keys: PartyKeys | None = None, relays: Iterable[str] = ()) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.operators = frozenset(JID(j).bare for j in operators)
        self.devices = tuple(sorted({JID(j).bare for j in devices}))
        self.tariff = spec.tariff()
        self.client = make_client(jid, password, endpoint)
        self.keyring = PepKeyring(self.client, keys)
        # Commands to devices (billing reset) and prices are signed with the billing key.
        self.issuer = CommandIssuer(self.client, self.keyring.secret_key)
        reconnector_of(self.client).on_resume(self._resend)  # presence and prices: _on_session_start
        reconnector_of(self.client).listen(self._on_session_change)
        # (tariff, monotonic time) of the last sending to every device, and when the session was lost.
        self._devices_have: tuple[Tariff, float] | None = None
        self._lost_at: float | None = None
        self._present: set[str] = set()  # operators' full JIDs that have our current tariff
        self.client.add_event_handler("presence", self._on_presence)
        self.client.add_event_handler("session_start", self._on_session_start)
        self._announcing: set[asyncio.Task[None]] = set()
        # Billing reports ([0085]): only with our secret key can we read their billing part.
        self.inbox: ReportInbox | None = None
        if self.keyring.secret_key is not None:
            reader = ReportReader(JID(jid).bare, self.keyring.secret_key, self.keyring, PartName.BILLING)
            self.inbox = ReportInbox(self.client, reader, relays)

    def _on_session_change(self, change: SessionChange) -> None:
        if change.event is SessionEvent.LOST:
            self._lost_at = time.monotonic()

    def _devices_are_current(self) -> bool:
        """After a reconnect: every device has this tariff already (taken, or held for it by the
        server on disk) unless it changed or went out just before the loss (maybe in flight).
        Re-signing it for a whole fleet that just came back only slows the fleet's return."""
        if self._devices_have is None or self._lost_at is None:
            return False
        tariff, sent_at = self._devices_have
        return tariff == self.tariff and self._lost_at - sent_at >= IN_FLIGHT_S

    def _on_session_start(self, _event: object) -> None:
        self.client.send_presence(pstatus="billing")
        if self._devices_are_current():
            log.info("%s: session back; the devices have the current tariff already", self.spec.name)
            return
        # Prices are signed: send them once our key is announced, or devices cannot check them.
        task = asyncio.ensure_future(self._send_devices_when_announced())
        self._announcing.add(task)
        task.add_done_callback(self._announcing.discard)

    async def _resend(self) -> None:
        self.issuer.resend_pending()

    async def _send_devices_when_announced(self) -> None:
        await self.keyring.announced()
        self._send_devices()

    @property
    def reports(self) -> list[BillingData]:
        """Billing parts read so far, oldest first."""
        return [d for d in (self.inbox.received if self.inbox else []) if isinstance(d, BillingData)]

    def request_report(self, meter: str) -> None:
        """Ask a meter (bare JID) for its billing report now."""
        request_report(self.client, meter)

    def _on_presence(self, pres: Presence) -> None:
        sender = pres["from"]
        if sender.bare not in self.operators:
            return
        if pres["type"] == "unavailable":
            self._present.discard(sender.full)
        elif pres["type"] in ("available", *Presence.showtypes) and sender.full not in self._present:
            # The utility just became present: that is when the price goes out ([00142]).
            self._present.add(sender.full)
            self._send(sender.full)

    def _send(self, to: str) -> None:
        msg = self.client.make_message(mto=to, mtype="normal",
                                       mbody=f"tariff from {self.tariff.supplier}: {self.tariff.price_at():.2f} "
                                             f"{self.tariff.currency}/kWh now")
        # Signed for this recipient: devices and operators refuse an unsigned price.
        key = self.issuer.key
        msg.append(sign_payload(tariff_to_xml(self.tariff), JID(to).bare, key) if key else tariff_to_xml(self.tariff))
        msg.send()

    def _send_devices(self) -> None:
        for bare in self.devices:  # held by the server for a device that is offline
            self._send(bare)
        self._devices_have = (self.tariff, time.monotonic())

    def publish(self, tariff: Tariff) -> None:
        """Replace the tariff and send it to every operator present now and to every device."""
        self.tariff = tariff
        for full in sorted(self._present):
            self._send(full)
        self._send_devices()

    def set_price(self, price_per_kwh: float) -> Tariff:
        """A real-time price, valid all day until replaced."""
        tariff = Tariff(supplier=self.spec.supplier, kind="real-time", currency=self.spec.currency,
                        periods=(TariffPeriod(start_hour=0, end_hour=24, price_per_kwh=price_per_kwh),))
        self.publish(tariff)
        return tariff

    async def command(self, device: str, serial: str, action: Action | str, *, args: dict[str, str] | None = None,
                      ttl_s: float = 30.0) -> Outcome:
        """A signed command to a device (bare JID; a device has one session) and its one outcome,
        e.g. ``billing_reset`` to a meter ([0085]: accepted only with the billing party's signature)."""
        cmd = Command.new(action, self.client.boundjid.bare, ttl_s=ttl_s, args=args, serial=serial)
        return await self.issuer.send(cmd, device)
