"""The billing party's price on a device: the tariff or real-time price its faults are ranked at
(cost per day = excess kWh x this price). Only the fleet's billing parties may set it; it comes
as a message, held by the server while the device is offline (services/billing.py)."""

from __future__ import annotations

import asyncio
import logging

from slixmpp import JID, Message
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.security.tariff import TariffRefused, tariff_from_billing
from gridpresence.protocol.models import Tariff
from gridpresence.device.host import DeviceHost
from gridpresence.xmpp.handlers import stanza_callback


log = logging.getLogger(__name__)


class PriceFeed:
    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.billing = frozenset(JID(j).bare for j in agent.setup.billing)
        self.tariff: Tariff | None = agent.setup.tariff  # the fleet file's tariff until the billing party sends its own
        self._from_billing = False
        self._busy: set[asyncio.Task[None]] = set()
        agent.client.register_handler(stanza_callback("grid tariff", StanzaPath("message/grid_tariff"), self.on_tariff))

    def price(self) -> float:
        """The price per kWh now (0 before any tariff is known: nothing is costly then)."""
        return self.tariff.price_at() if self.tariff is not None else 0.0

    def on_tariff(self, msg: Message) -> None:
        # Async: the billing party's key may have to be fetched first (prices are rare).
        task = asyncio.ensure_future(self.take(msg))
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)

    async def take(self, msg: Message) -> None:
        """Take a tariff from a billing party, signed with its key; refuse anyone else's or an
        unsigned one, drop an invalid one, each with the reason to the sender. The one place a
        price enters a device."""
        try:
            tariff = await tariff_from_billing(msg, self.billing.__contains__, self.agent.keyring, self.agent.security)
        except TariffRefused as exc:
            log.warning("%s: tariff from %s refused: %s", self.agent.spec.name, msg["from"], exc)
            self._refuse(msg, exc)
            return
        if self._from_billing and self.tariff is not None and tariff.issued < self.tariff.issued:
            log.info("%s: ignored a tariff issued before the one in force", self.agent.spec.name)
            return  # an older one held for us while offline, arriving late
        self.tariff, self._from_billing = tariff, True
        log.info("%s: price now %.4f %s/kWh from %s", self.agent.spec.name, self.price(), tariff.currency,
                 msg["from"].bare)

    def _refuse(self, msg: Message, exc: TariffRefused) -> None:
        if not self.agent.client.is_connected():
            return
        err = self.agent.client.make_message(mto=msg["from"], mtype="error")
        err["id"] = msg["id"]
        err["error"]["type"] = "auth" if exc.condition == "not-authorized" else "modify"
        err["error"]["condition"] = exc.condition
        err["error"]["text"] = str(exc)[:500]
        err.send()

    def close(self) -> None:
        for task in self._busy:
            task.cancel()
