"""One presence probe per contact per component link, not one per hosted identity.

A c2s account's server probes its contacts at login; a hosted identity does it itself
(xmpp/component.py). Ten thousand identities subscribed to the same four contacts (operators,
watchdog, relay, console) made 40,000 probes and as many answers at start, all alike. Here the
link probes each contact once, from one identity holding the subscription ("to" in
HostedStore), and hands the answer to every identity with that subscription, as if the server
had answered each (Prosody answers a probe only for a subscribed prober, with the same
presence to every subscriber).

* The probe goes from ``prober@devices.DOMAIN/<PROBE_RESOURCE>``: Prosody answers to the full
  JID of the probe (mod_presence), broadcasts go to bare JIDs, so an answer is told apart from
  a broadcast that crosses it.
* Each answer stanza goes to every identity that asked since the probe went out (its session
  up, the subscription still on record), addressed to its bare JID.
* What the contact broadcasts later still reaches every identity from the server, one copy
  each. The copies to the prober also keep the link's view of the contact up to date, which is
  handed to an identity whose session starts after the answer (no new probe).
* ``unsubscribed`` to the prober (the server has no subscription for it) is the prober's alone:
  the view is dropped and, if identities still wait, the next of them that holds the
  subscription probes.
Everything is forgotten when the link goes down (the next session probes again).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from xml.etree import ElementTree as ET

if TYPE_CHECKING:
    from gridpresence.xmpp.component import ComponentLink, HostedClient

log = logging.getLogger(__name__)

NS = "jabber:component:accept"
PRESENCE = f"{{{NS}}}presence"
PROBE_RESOURCE = "gridpresence-probe"
_AVAILABLE = ("", "available", None)


@dataclass
class _Contact:
    """What the link knows of one contact's presence in this link session."""

    jid: str
    prober: str  # bare JID of the identity whose subscription the probe used
    resource: str  # the probe's resource: answers come to prober/resource
    answered: bool = False
    # The contact's available resources as the server last told the prober: full JID -> presence.
    view: dict[str, ET.Element] = field(default_factory=dict)
    askers: list[str] = field(default_factory=list)  # identities that get the answer stanzas
    failed: set[str] = field(default_factory=set)  # probers the server said unsubscribed to


class SharedProbes:
    """The link's probes and what they told, per contact (see the module's text)."""

    def __init__(self, link: ComponentLink) -> None:
        self.link = link
        self._contacts: dict[str, _Contact] = {}
        self._rounds = itertools.count()
        self.sent = 0  # probes written in this process (for tests and benchmarks)

    # -- a session starts ---------------------------------------------------------------

    def ask(self, hosted: HostedClient, contact: str) -> None:
        """`hosted`'s session started and it is subscribed to `contact`: its presence, from the
        answer on its way, from what the link knows, or from a new probe."""
        known = self._contacts.get(contact)
        if known is None:
            self._probe(contact, hosted.boundjid.bare, [hosted.boundjid.bare])
            return
        known.askers.append(hosted.boundjid.bare)  # later stanzas of the answer go to it too
        if known.answered:  # after this turn's stanzas are read: what the view says then
            asyncio.get_running_loop().call_soon(self._tell, known, hosted.boundjid.bare)

    def _probe(self, contact: str, prober: str, askers: list[str], failed: set[str] | None = None) -> None:
        entry = _Contact(contact, prober, f"{PROBE_RESOURCE}-{next(self._rounds)}", askers=askers,
                         failed=failed or set())
        self._contacts[contact] = entry
        self.sent += 1
        self.link.write_soon(f"<presence xmlns='{NS}' type='probe' to='{_attr(contact)}' "
                             f"from='{_attr(prober)}/{entry.resource}'/>".encode())

    def _tell(self, entry: _Contact, asker: str) -> None:
        """The view of the contact to one identity, as a probe answer (unavailable if none)."""
        if self._contacts.get(entry.jid) is not entry or not self._subscribed(asker, entry.jid):
            return
        if not entry.view:
            self._give(ET.Element(PRESENCE, {"type": "unavailable", "from": entry.jid}), asker)
        for pres in list(entry.view.values()):
            self._give(pres, asker)

    # -- stanzas from the server ----------------------------------------------------------

    def take(self, xml: ET.Element) -> bool:
        """Every stanza the link receives, before it is routed: True when it was an answer to a
        shared probe (handed to the identities that asked); a presence to a prober updates the
        view and goes on as usual."""
        if xml.tag != PRESENCE or not self._contacts:
            return False
        sender = (xml.get("from") or "").split("/", 1)[0]
        entry = self._contacts.get(sender)
        if entry is None:
            return False
        to, _, resource = (xml.get("to") or "").partition("/")
        if to != entry.prober:
            return False
        if resource == entry.resource:
            self._answer(entry, xml)
            return True
        if not resource:
            self._observe(entry, xml)
        return False

    def _answer(self, entry: _Contact, xml: ET.Element) -> None:
        typ = xml.get("type")
        if typ in _AVAILABLE or typ == "unavailable":
            self._observe(entry, xml)
            entry.answered = True
            for asker in entry.askers:
                if self._subscribed(asker, entry.jid):
                    self._give(xml, asker)
            return
        # An error (no such contact, its server unreachable): the prober's own, as before.
        log.info("probe of %s from %s answered %s", entry.jid, entry.prober, typ)
        self._give(xml, entry.prober)
        if self._contacts.get(entry.jid) is entry and not entry.answered:
            del self._contacts[entry.jid]

    def _observe(self, entry: _Contact, xml: ET.Element) -> None:
        typ, sender = xml.get("type"), xml.get("from") or ""
        if typ in _AVAILABLE:
            kept = copy.deepcopy(xml)
            kept.attrib.pop("to", None)
            entry.view[sender] = kept
        elif typ == "unavailable":
            if "/" in sender:
                entry.view.pop(sender, None)
            else:
                entry.view.clear()
        elif typ in ("unsubscribed", "unsubscribe"):
            # The server stops telling the prober: this view is no longer kept up to date.
            self._drop(entry)

    def _drop(self, entry: _Contact) -> None:
        if self._contacts.get(entry.jid) is not entry:
            return
        del self._contacts[entry.jid]
        if entry.answered:
            return
        failed = entry.failed | {entry.prober}
        waiting = [a for a in entry.askers if a not in failed]

        def again() -> None:  # after the prober's roster has taken the unsubscription in
            if entry.jid in self._contacts:
                return
            holders = [a for a in waiting if self._subscribed(a, entry.jid)]
            if holders:
                self._probe(entry.jid, holders[0], waiting, failed)

        asyncio.get_running_loop().call_soon(again)

    def reset(self) -> None:
        """The link is down: nothing known is current any more."""
        self._contacts.clear()

    # -- helpers ------------------------------------------------------------------------

    def _subscribed(self, owner: str, contact: str) -> bool:
        hosted = self.link.clients.get(owner)
        if hosted is None or not hosted.is_connected():
            return False
        return self.link.store.subscribed_to(owner, contact)

    def _give(self, xml: ET.Element, owner: str) -> None:
        piece = copy.deepcopy(xml)
        piece.set("to", owner)
        self.link._spawn_event(piece)  # routed as the server's own answer to `owner` would be


def _attr(value: str) -> str:
    return value.replace("&", "&amp;").replace("'", "&apos;").replace("<", "&lt;")
