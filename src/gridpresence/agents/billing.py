"""The billing party ([00142], [0093]): sends its tariff, or a real-time price, to the
utility's operators whenever they are present."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from slixmpp import JID, Presence

from gridpresence.agents.issuer import CommandIssuer
from gridpresence.agents.session import Endpoint, close_session, make_client, open_session
from gridpresence.config import BillingSpec
from gridpresence.protocol.codec import tariff_to_xml
from gridpresence.protocol.models import Action, Command, Outcome, Tariff, TariffPeriod
from gridpresence.security.pgp import pgpy

log = logging.getLogger(__name__)


def tariff_from_spec(spec: BillingSpec) -> Tariff:
    """Peak price between the peak hours, off-peak otherwise ([0093]: $0.80 6-18 h, $0.60)."""
    peak = TariffPeriod(start_hour=spec.peak_start_hour, end_hour=spec.peak_end_hour, price_per_kwh=spec.peak_price)
    off = TariffPeriod(start_hour=spec.peak_end_hour % 24, end_hour=spec.peak_start_hour or 24,
                       price_per_kwh=spec.off_peak_price)
    return Tariff(supplier=spec.supplier, currency=spec.currency, periods=(peak, off))


class BillingAgent:
    def __init__(self, spec: BillingSpec, jid: str, password: str, endpoint: Endpoint, operators: Iterable[str],
                 key: pgpy.PGPKey | None = None) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.operators = frozenset(JID(j).bare for j in operators)
        self.tariff = tariff_from_spec(spec)
        self.client = make_client(jid, password, endpoint)
        # Commands to devices (billing reset, tariff, price) are signed with the billing key.
        self.issuer = CommandIssuer(self.client, key)
        self._present: set[str] = set()  # operators' full JIDs that have our current tariff
        self.client.add_event_handler("presence", self._on_presence)
        self.client.add_event_handler("session_start", lambda _e: self.client.send_presence(pstatus="billing"))

    async def start(self, timeout: float = 20.0) -> None:
        await open_session(self.client, self.endpoint, timeout)

    async def stop(self) -> None:
        await close_session(self.client)

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
        msg.append(tariff_to_xml(self.tariff))
        msg.send()

    def publish(self, tariff: Tariff) -> None:
        """Replace the tariff and send it to every operator present now."""
        self.tariff = tariff
        for full in sorted(self._present):
            self._send(full)

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
