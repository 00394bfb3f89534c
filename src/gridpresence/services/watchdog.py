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
from gridpresence.protocol.paging import PagingError, parse_page_request, select_page
from gridpresence.protocol.stanzas import FLEET_HEALTH_PAGE
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
        # Most healths in one answer: FLEET_HEALTH_PAGE (tests lower it with the server's stanza limit).
        self.page_size = FLEET_HEALTH_PAGE
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
        """One page of the fleet's health (XEP-0059), devices in the order of their bare JIDs:
        the whole fleet in one stanza would pass the server's stanza size limit, and the server
        would close our stream."""
        if iq["from"].bare not in self.operators:
            _refuse(iq, "auth", "forbidden", "fleet health is for the utility's operators")
            return
        query = iq["grid_fleet_health"]
        try:
            want = parse_page_request(query.xml, self.page_size)
        except PagingError as exc:
            log.info("fleet health query from %s refused: %s", iq["from"], exc)
            _refuse(iq, "modify", "bad-request", f"fleet-health paging: {exc}")
            return
        keys = sorted(self.tracker.views)
        start, stop = select_page(keys, want)
        reply = iq.reply()
        container = reply.enable("grid_fleet_health")
        for health in self.tracker.health(keys[start:stop]):
            container.xml.append(health_to_xml(health))
        rsm = container["rsm"]
        if stop > start:
            rsm["first"] = keys[start]
            rsm["first_index"] = str(start)
            rsm["last"] = keys[stop - 1]
        rsm["count"] = str(len(keys))
        reply.send()


def _refuse(iq: Iq, kind: str, condition: str, text: str) -> None:
    err = iq.reply()
    err["type"] = "error"
    err["error"]["type"] = kind
    err["error"]["condition"] = condition
    err["error"]["text"] = text
    err.send()
