"""The billing party ([00142], [0093]): sends its tariff, or a real-time price, to the
utility's operators whenever they are present, and to the devices, which rank their faults by
cost per day at that price. It reads the billing part of the meters' encrypted billing reports
([0085]), never their power-quality part.

Devices get it as a message to their bare JID, when billing comes online and at every change:
the server holds it for a device that is offline (mod_offline) and hands it over when the device
logs in. Billing does not follow the devices' presence: that would copy all of the grid's
presence traffic to billing just to learn when to send a rare price change."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from slixmpp import JID, Message, Presence

from gridpresence.agents.reports import ReportInbox, ReportReader, request_report
from gridpresence.agents.session import Endpoint, close_session, make_client, open_session
from gridpresence.config import BillingSpec
from gridpresence.protocol.billing_report import BillingData, PartName
from gridpresence.protocol.codec import PayloadError, tariff_from_xml, tariff_to_xml
from gridpresence.protocol.models import Tariff, TariffPeriod
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring

log = logging.getLogger(__name__)


def tariff_from_spec(spec: BillingSpec) -> Tariff:
    """Peak price between the peak hours, off-peak otherwise ([0093]: $0.80 6-18 h, $0.60)."""
    peak = TariffPeriod(start_hour=spec.peak_start_hour, end_hour=spec.peak_end_hour, price_per_kwh=spec.peak_price)
    off = TariffPeriod(start_hour=spec.peak_end_hour % 24, end_hour=spec.peak_start_hour or 24,
                       price_per_kwh=spec.off_peak_price)
    return Tariff(supplier=spec.supplier, currency=spec.currency, periods=(peak, off))


class TariffRefused(ValueError):
    """A ``<tariff>`` that is not taken; `condition` is the stanza error the sender gets."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition


def tariff_from_billing(msg: Message, is_billing: Callable[[str], bool]) -> Tariff:
    """The one gate for a price message, on every receiving side: a billing party's, and valid.
    (A signature check belongs here too: it then covers operators and devices alike.)"""
    sender = msg["from"].bare
    if not is_billing(sender):
        raise TariffRefused("not-authorized", f"{sender} is not a billing party; only the billing party sets prices")
    try:
        return tariff_from_xml(msg["grid_tariff"].xml)
    except PayloadError as exc:
        raise TariffRefused("bad-request", str(exc)) from None


class BillingAgent:
    def __init__(self, spec: BillingSpec, jid: str, password: str, endpoint: Endpoint, operators: Iterable[str],
                 devices: Iterable[str] = (), keys: PartyKeys | None = None, relays: Iterable[str] = ()) -> None:
        self.spec = spec
        self.endpoint = endpoint
        self.operators = frozenset(JID(j).bare for j in operators)
        self.devices = tuple(sorted({JID(j).bare for j in devices}))
        self.tariff = tariff_from_spec(spec)
        self.client = make_client(jid, password, endpoint)
        self.keyring = PepKeyring(self.client, keys)
        self._present: set[str] = set()  # operators' full JIDs that have our current tariff
        self.client.add_event_handler("presence", self._on_presence)
        self.client.add_event_handler("session_start", self._on_session_start)
        # Billing reports ([0085]): only with our secret key can we read their billing part.
        self.inbox: ReportInbox | None = None
        if self.keyring.secret_key is not None:
            reader = ReportReader(JID(jid).bare, self.keyring.secret_key, self.keyring, PartName.BILLING)
            self.inbox = ReportInbox(self.client, reader, relays)

    def _on_session_start(self, _event: object) -> None:
        self.client.send_presence(pstatus="billing")
        self._send_devices()

    @property
    def reports(self) -> list[BillingData]:
        """Billing parts read so far, oldest first."""
        return [d for d in (self.inbox.received if self.inbox else []) if isinstance(d, BillingData)]

    def request_report(self, meter: str) -> None:
        """Ask a meter (bare JID) for its billing report now."""
        request_report(self.client, meter)

    async def start(self, timeout: float = 20.0) -> None:
        """Log in and announce our key (XEP-0373) before anyone is told we are here."""
        await self.login(timeout)
        await self.keyring.announced()

    async def login(self, timeout: float = 20.0) -> None:
        """Log in; the key is announced meanwhile (:meth:`start` waits for that too)."""
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

    def _send_devices(self) -> None:
        for bare in self.devices:  # held by the server for a device that is offline
            self._send(bare)

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
