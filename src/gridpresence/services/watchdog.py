"""The presence watchdog service ([00135], [00136]): watches every device all the time, so an
operator who logs in later still learns which devices vanished without a goodbye."""

from __future__ import annotations

import logging
from collections.abc import Iterable

from slixmpp import JID, Iq
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.xmpp.party import PartySession
from gridpresence.xmpp.reconnect import reconnector_of
from gridpresence.xmpp.session import Endpoint, make_client
from gridpresence.operator.tracker import PresenceTracker
from gridpresence.protocol.codec import health_to_xml
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.xmpp.handlers import stanza_callback

log = logging.getLogger(__name__)


class WatchdogAgent(PartySession):
    def __init__(self, jid: str, password: str, endpoint: Endpoint, operators: Iterable[str], grace_s: float = 15.0,
                 keys: PartyKeys | None = None) -> None:
        self.endpoint = endpoint
        self.operators = frozenset(JID(j).bare for j in operators)
        self.client = make_client(jid, password, endpoint)
        self.keyring = PepKeyring(self.client, keys)
        self.tracker = PresenceTracker(self.client, grace_s=grace_s)
        self.client.register_handler(
            stanza_callback("fleet health", StanzaPath("iq@type=get/grid_fleet_health"), self._on_query)
        )
        reconnector_of(self.client).on_resume(self._arrive)

    async def login(self, timeout: float = 20.0) -> None:
        await super().login(timeout)
        await self._arrive()
        self.tracker.start_watchdog()

    async def _arrive(self) -> None:
        """At login and after every reconnect: the roster, then our presence (which brings theirs)."""
        await self.client.get_roster()
        self.tracker.load_roster()
        self.client.send_presence(pstatus="presence watchdog")

    async def stop(self) -> None:
        self.tracker.stop_watchdog()
        await super().stop()

    def _on_query(self, iq: Iq) -> None:
        if iq["from"].bare not in self.operators:
            err = iq.reply()
            err["type"] = "error"
            err["error"]["type"] = "auth"
            err["error"]["condition"] = "forbidden"
            err["error"]["text"] = "fleet health is for the utility's operators"
            err.send()
            return
        reply = iq.reply()
        container = reply.enable("grid_fleet_health")
        for health in self.tracker.health():
            container.xml.append(health_to_xml(health))
        reply.send()
