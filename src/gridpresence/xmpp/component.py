"""Many device identities over one XEP-0114 external component connection.

Prosody routes every stanza for ``*@devices.DOMAIN`` to one component connection and accepts
any ``from`` in that domain, but does for those JIDs none of what it does for user accounts.
:class:`ComponentLink` is that connection; each hosted identity is a :class:`HostedClient`: a
slixmpp stream of its own (its own handlers, plugins, roster, boundjid) without a socket of its
own. What it sends goes out on the link with its own ``from``; what the link receives for its
JID is handed to it. So a device bot and its desks run on it unchanged, and the identity does
itself what the server does for a c2s account (PROTOCOL.md, "Hosted devices"):

* presence fan-out: a broadcast presence is sent to every contact subscribed to it;
* probes: answered with the last broadcast presence, for subscribed contacts only; a probe from
  a JID with no record is ignored (never ``unsubscribed``, which would silently remove an
  operator's subscription after a lost store);
* subscriptions: kept in :class:`HostedStore` (SQLite in the data directory), so they survive a
  restart of the host; at each session the identity learns the presence of the contacts it is
  subscribed to: one probe per contact for the whole link (xmpp/shared_probes.py);
* PEP (XEP-0163) for its own JID, enough for XEP-0373 keys (:class:`HostedPep`);
* disco, ad-hoc, version, ping, caps: one set of slixmpp's plugins per process, on the link
  (:data:`SHARED_PLUGINS`), in component mode, at each identity's bare JID: what slixmpp keeps per
  JID (disco nodes, commands, caps) stays per JID; the iqs they answer go to the link's handlers.

Stanzas between two identities on the same link never leave the process.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import logging
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape as text_escape  # &, < and > only: JSON's quotes stay as they are

from slixmpp import JID, ComponentXMPP, Iq, Message
from slixmpp.basexmpp import BaseXMPP
from slixmpp.jid import InvalidJID
from slixmpp.xmlstream import StanzaBase, tostring
from gridpresence.xmpp.slixfix.escape import escape as xml_escape  # the fast one (slixmpp's own goes char by char)
from slixmpp.xmlstream.matcher import MatchXPath, StanzaPath
from slixmpp.plugins.base import PLUGIN_REGISTRY, load_plugin
from slixmpp.roster import Roster, RosterNode

from gridpresence.xmpp import slixfix  # noqa: F401  (our slixmpp patches)
from gridpresence.xmpp.dispatch import ShapeDispatch
from gridpresence.xmpp.outgoing import filters_sync, may_skip_queue, messages_need_no_filter, presence_texts, run_filters
from gridpresence.protocol import stanzas
from gridpresence.protocol.addressing import ADDRESS_NS
from gridpresence.protocol.codec import BATCH_COMMANDS_MAX, JSON_NS
from gridpresence.xmpp.reconnect import reconnector_of
from gridpresence.xmpp.shared_probes import SharedProbes
from gridpresence.xmpp.handlers import stanza_callback

log = logging.getLogger(__name__)

NS = "jabber:component:accept"
PUBSUB = "http://jabber.org/protocol/pubsub"
PUBSUB_OWNER = "http://jabber.org/protocol/pubsub#owner"
PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
STANZAS = "urn:ietf:params:xml:ns:xmpp-stanzas"
HOSTING_FILE = "hosting.sqlite"  # in the grid's data directory
COMPONENT_SECRET = "devices-component"  # its name in the grid's secrets.json

# Data-only copies the identities send one party (records for the historian) wait this long, or
# until this many, and go as one message from the domain (ComponentLink.send_batched).
BATCH_WAIT_S = 0.05
BATCH_MAX = 100
BRING_UP_BATCH = 20  # identities whose session starts between two turns of the event loop
DRAIN_BATCH = 200  # waiting stanzas (ComponentLink._drain) delivered per turn of the event loop
_PRESENCE = f"{{{NS}}}presence"
_MESSAGE = f"{{{NS}}}message"
_ADDRESSES = f"{{{ADDRESS_NS}}}addresses"
_ADDRESS = f"{{{ADDRESS_NS}}}address"
MULTICAST_MAX = BATCH_COMMANDS_MAX  # identities one multicast message may address: an issuer's batch
_DELIVERED = ("to", "cc", "bcc")  # XEP-0033's address types delivered to (the others only say who)
_IQ = f"{{{NS}}}iq"
COMMANDS_NS = "http://jabber.org/protocol/commands"
# slixmpp plugins every hosted identity uses, enabled once per link (ComponentLink.share_plugin)
# instead of once per identity (a tenth of a hosted identity's start-up, and its memory, each):
# what they keep per JID (disco nodes, commands, caps, versions) is kept per identity's JID.
# xep_0060 is not among them: its events (the keys' announcements) are each identity's own. The
# one setting they keep for all: xep_0131's headers, to which xep_0060 adds SubID (every device
# bot has xep_0060, for its keyring: the same features as with a plugin set each).
SHARED_PLUGINS = frozenset({"xep_0004", "xep_0030", "xep_0050", "xep_0082", "xep_0092", "xep_0115", "xep_0128",
                            "xep_0131", "xep_0199"})
# The requests those plugins answer: an iq get/set for a hosted JID with one of these payloads
# goes to the link's handlers (ComponentLink._spawn_event); every other to the identity's own.
SHARED_IQ_NS = frozenset({"http://jabber.org/protocol/disco#info", "http://jabber.org/protocol/disco#items",
                          COMMANDS_NS, "jabber:iq:version", "urn:xmpp:ping"})
_BROADCAST_TYPES = (None, "unavailable", "away", "chat", "dnd", "xa")  # no type: available
_TO_MARK = "\x01to\x01"  # where each copy's `to` goes in a broadcast serialized once (no JID has it)
_ROSTER_KEYS = ("name", "groups", "from", "to", "pending_in", "pending_out", "whitelisted")


class HostedStore:
    """Who is subscribed to whom, and to which PEP node, for every hosted JID; kept over
    restarts of the host. It is slixmpp's roster back end (``entries``/``load``/``save``).
    Everything is read once into memory; every change is written at once."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path) if path is not None else ":memory:", check_same_thread=False)
        # WAL, no fsync per change: a change lost to a power cut is re-made by the next `up`'s
        # provisioning; one fsync per subscription change would cost 20 ms on this disk.
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._db:
            self._db.execute("CREATE TABLE IF NOT EXISTS roster (owner TEXT, jid TEXT, state TEXT, "
                             "PRIMARY KEY (owner, jid))")
            self._db.execute("CREATE TABLE IF NOT EXISTS pep (owner TEXT, node TEXT, jid TEXT, "
                             "PRIMARY KEY (owner, node, jid))")
        self._roster: dict[str, dict[str, dict[str, Any]]] = {}
        # Thousands of identities have the same few states (an operator, subscribed both ways):
        # each distinct one is held once. A state is never changed in place, only replaced.
        self._states: dict[str, dict[str, Any]] = {}
        for owner, jid, state in self._db.execute("SELECT owner, jid, state FROM roster"):
            self._roster.setdefault(owner, {})[jid] = self._shared(state)
        self._pep: dict[tuple[str, str], set[str]] = {}
        for owner, node, jid in self._db.execute("SELECT owner, node, jid FROM pep"):
            self._pep.setdefault((owner, node), set()).add(jid)

    def _shared(self, state: str) -> dict[str, Any]:
        kept = self._states.get(state)
        if kept is None:
            kept = self._states[state] = json.loads(state)
        return kept

    # -- slixmpp roster back end --------------------------------------------------------

    def entries(self, owner: Any, db_state: Any = None) -> list[str]:
        return list(self._roster.get(str(JID(owner).bare), {}))

    def load(self, owner: Any, jid: Any, db_state: Any = None) -> dict[str, Any] | None:
        return self._roster.get(str(JID(owner).bare), {}).get(str(JID(jid).bare))

    def save(self, owner: Any, jid: Any, state: Any, db_state: Any = None) -> None:
        owner, jid = str(JID(owner).bare), str(JID(jid).bare)
        with self._lock, self._db:
            if state.get("removed"):
                self._roster.get(owner, {}).pop(jid, None)
                self._db.execute("DELETE FROM roster WHERE owner = ? AND jid = ?", (owner, jid))
                return
            kept = {k: state[k] for k in _ROSTER_KEYS if k in state}
            kept["groups"] = list(kept.get("groups") or [])
            if self._roster.get(owner, {}).get(jid) == kept:
                return
            text = json.dumps(kept)
            self._roster.setdefault(owner, {})[jid] = self._shared(text)
            self._db.execute("INSERT OR REPLACE INTO roster VALUES (?, ?, ?)", (owner, jid, text))

    def subscribed_to(self, owner: str, jid: str) -> bool:
        """Whether bare `owner` is subscribed to bare `jid`'s presence ("to" or "both")."""
        state = self._roster.get(owner, {}).get(jid)
        return bool(state and state.get("to"))

    # -- provisioning -------------------------------------------------------------------

    def seed(self, rosters: Mapping[str, Iterable[tuple[str, str, tuple[str, ...]]]]) -> None:
        """Provisioning: each owner and each of its (jid, name, groups) are subscribed both ways
        (as the server's roster of a c2s device is written); contacts not listed are left alone."""
        rows = []
        for owner, contacts in rosters.items():
            owner = JID(owner).bare
            for jid, name, groups in contacts:
                state = json.dumps({"name": name, "groups": list(groups), "from": True, "to": True,
                                    "pending_in": False, "pending_out": False, "whitelisted": False})
                self._roster.setdefault(owner, {})[JID(jid).bare] = self._shared(state)
                rows.append((owner, JID(jid).bare, state))
        with self._lock, self._db:
            self._db.executemany("INSERT OR REPLACE INTO roster VALUES (?, ?, ?)", rows)

    # -- PEP subscriptions --------------------------------------------------------------

    def subscribers(self, owner: str, node: str) -> frozenset[str]:
        return frozenset(self._pep.get((owner, node), ()))

    def subscribe(self, owner: str, node: str, jid: str, on: bool = True) -> None:
        subs = self._pep.setdefault((owner, node), set())
        if (jid in subs) == on:
            return
        with self._lock, self._db:
            if on:
                subs.add(jid)
                self._db.execute("INSERT OR REPLACE INTO pep VALUES (?, ?, ?)", (owner, node, jid))
            else:
                subs.discard(jid)
                self._db.execute("DELETE FROM pep WHERE owner = ? AND node = ? AND jid = ?", (owner, node, jid))

    def close(self) -> None:
        self._db.close()


class _LinkTransport:
    """What a hosted identity's stream writes to: the link's socket, whichever it is now.
    Writes made in one turn of the event loop go out as one (a state change fans out to a
    handful of subscribers, and a login's probes are answered by thousands of identities: one
    send call each would cost the host and the server a system call per stanza)."""

    def __init__(self, link: ComponentLink) -> None:
        self.link = link

    def write(self, data: bytes) -> None:
        self.link.write_soon(data)

    def close(self) -> None:  # the identity leaves; the link stays
        pass

    abort = close

    def get_extra_info(self, _name: str, default: Any = None) -> Any:
        return default


class ComponentLink(ComponentXMPP):
    """The one connection of ``devices.DOMAIN`` to the server, and the identities it hosts.
    It reconnects by the grid's policy (xmpp/reconnect.py); the identities come and go with it."""

    def __init__(self, domain: str, secret: str, host: str, port: int, store: HostedStore) -> None:
        super().__init__(domain, secret, host, port)
        stanzas.register()
        self.store = store
        self.clients: dict[str, HostedClient] = {}
        self.online = False
        # The resource of this link session, new at each (_on_session_start): the identities'
        # presence comes from NAME@DOMAIN/resource, so an operator sees a link's return as a new
        # session of each, as a c2s bot's new login, and sends its unanswered commands again.
        self.session_resource = ""
        self._bringing_up: asyncio.Task[None] | None = None
        self._out: list[bytes] = []  # identities' stanzas waiting for the end of this loop turn
        self._backlog: deque[tuple[HostedClient, ET.Element]] = deque()  # stanzas waiting behind probe answers
        self._batches: dict[tuple[str, str], list[str]] = {}  # (to, container tag) -> items, serialised
        self._batch_timer: asyncio.TimerHandle | None = None
        self.probes = SharedProbes(self)  # one probe per contact, its answer to every subscriber
        # When the server last sent anything (xmpp/reconnect.py pings only after keepalive_s of
        # silence, as for a c2s client): a server busy answering a 10,000-device operator login
        # sends us its probes but answered the link's every-5-s ping late, and the link, with
        # every identity on it, was dropped and brought up again in the middle of it.
        self.last_heard = time.monotonic()
        self._shared_config: dict[str, dict[str, Any]] = {}  # shared plugin -> its configuration
        # Each shared plugin's disco writes at a session's bind, noted once (_binds_of).
        self._binds: dict[str, list[tuple[str, str | None, Any]]] = {}
        self.versions: dict[str, str] = {}  # bare JID -> its own software version (set_software_version)
        self.share_plugin("xep_0030")
        self.share_plugin("xep_0199")
        self.add_event_handler("session_start", self._on_session_start)
        self.add_event_handler("disconnected", self._on_disconnected)
        reconnector_of(self)  # type: ignore[arg-type]  # (a component session comes back like any party's)

    @property
    def domain(self) -> str:
        return str(self.boundjid.bare)

    # -- writing --------------------------------------------------------------------------

    def write_soon(self, data: bytes) -> None:
        """An identity's stanza: out at the end of this turn of the event loop, with every
        other one queued in it, in one write. Thousands of session starts or a fan-out make
        thousands of stanzas a turn: one system call (and one read by the server) for all of
        them instead of one each. The order of the stanzas is kept."""
        if self.transport is None:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if data and self.transport is not None:
            self.transport.write(data)

    def send_batched(self, to: str, container: str, item_json: str) -> None:
        """``item_json``, data only an identity sends ``to`` (an outcome record for the historian,
        as JSON), in one message from the domain itself with the others sent to ``to`` within
        BATCH_WAIT_S (at most BATCH_MAX in one): ``<message from='devices.DOMAIN'><container>
        <json xmlns='urn:xmpp:json:0'>[items]</json></container></message>`` (XEP-0335). A shed
        of 10,000 so costs the server ~100 stanzas to route (and to keep offline for a recorder
        that is away) instead of 10,000, and each one text to parse, not 100 elements. The domain
        may speak for every identity on it: the server lets this connection send from any of
        them anyway; each item names its identity. Lost with the link, as a stanza not yet
        written is."""
        if self.transport is None:
            return
        items = self._batches.setdefault((to, container), [])
        items.append(item_json)
        if len(items) >= BATCH_MAX:
            self._send_batch(to, container)
        elif self._batch_timer is None:
            self._batch_timer = asyncio.get_running_loop().call_later(BATCH_WAIT_S, self.flush_batches)

    def flush_batches(self) -> None:
        """Everything send_batched holds, out now (also before the link closes)."""
        if self._batch_timer is not None:
            self._batch_timer.cancel()
            self._batch_timer = None
        for to, container in list(self._batches):
            self._send_batch(to, container)

    def _send_batch(self, to: str, container: str) -> None:
        items = self._batches.pop((to, container), [])
        if not items or self.transport is None:
            return
        ns, _, name = container[1:].partition("}")
        self.write_soon(f"<message from='{xml_escape(self.domain)}' to='{xml_escape(to)}' type='normal' "
                        f"id='{uuid.uuid4().hex}'><{name} xmlns='{xml_escape(ns)}'><json xmlns='{JSON_NS}'>"
                        f"{text_escape('[' + ','.join(items) + ']')}</json></{name}></message>".encode())

    def data_received(self, data: bytes | str) -> None:
        self.last_heard = time.monotonic()  # any byte proves the server alive: no ping needed
        super().data_received(data)

    def send_raw(self, data: str | bytes) -> None:
        self._flush()  # the link's own (a bounce, the stream's end) after what identities queued
        super().send_raw(data)

    # -- the plugins every identity shares ----------------------------------------------

    def share_plugin(self, name: str, config: Mapping[str, Any] | None = None) -> None:
        """Enable the shared plugin ``name`` on the link (once: later calls must ask for the same
        configuration, or none: every identity of the process is answered by the one instance)."""
        if name not in SHARED_PLUGINS:
            raise ValueError(f"{name} is not a plugin hosted identities share")
        wanted = dict(config or {})
        if name in self._shared_config:
            if wanted and wanted != self._shared_config[name]:
                raise ValueError(f"{name} is shared by every hosted identity; configured as "
                                 f"{self._shared_config[name]}, asked for {wanted}")
            return
        self._shared_config[name] = wanted
        self.register_plugin(name, wanted)
        for dep in self.plugin[name].dependencies:
            if dep in SHARED_PLUGINS and dep not in self._shared_config:
                self._shared_config[dep] = {}
        if name == "xep_0115":
            # Its caps go on the identities' presence (device/adhoc.py stamps them), not on the
            # link's; and no one's caps are queried (a storm of disco requests for nothing).
            self.remove_handler("Entity Capabilities")
            self.del_filter("out", self.plugin[name]._filter_add_caps)
        if name == "xep_0092":  # each identity's own version (set_software_version)
            self.remove_handler("Software Version")
            self.register_handler(stanza_callback("Software Version", StanzaPath("iq@type=get/software_version"),
                                                  self._answer_version))

    def _answer_version(self, iq: Iq) -> None:
        plugin = self.plugin["xep_0092"]
        version = self.versions.get(iq["to"].bare)
        if version is None:
            plugin._handle_version(iq)
            return
        reply = iq.reply()
        reply["software_version"]["name"] = plugin.software_name
        reply["software_version"]["version"] = version
        reply["software_version"]["os"] = plugin.os
        reply.send()

    def _binds_of(self, name: str) -> list[tuple[str, str | None, Any]]:
        """What the shared plugin ``name``'s session_bind writes into disco (features, the
        commands node's items), noted once by running slixmpp's own session_bind with the disco
        API's handlers taking notes instead of writing; replayed at each identity's JID
        (bind_shared), as the plugin's own instance on the identity's stream would write them."""
        binds = self._binds.get(name)
        if binds is None:
            binds = []
            table = self.api._handlers.get("xep_0030", {})
            kept = {op: entry["global"] for op, entry in table.items()}

            def noting(op: str) -> Callable[..., None]:
                def note(_jid: Any, node: str | None, _ifrom: Any, args: Any) -> None:
                    binds.append((op, node, args))
                return note

            try:
                for op, entry in table.items():
                    entry["global"] = noting(op)
                self.plugin[name].session_bind(self.boundjid.full)
            finally:
                for op, handler in kept.items():
                    table[op]["global"] = handler
            self._binds[name] = binds
        return binds

    def forget_binds(self) -> None:
        """The shared plugins' binds noted so far, to be noted again at the next bind."""
        self._binds.clear()

    def bind_shared(self, hosted: HostedClient, names: Iterable[str]) -> None:
        """The disco writes of the shared plugins' session_bind, at ``hosted``'s JID: straight
        into the static disco store (its API's default handlers, which is all they would reach)."""
        static, jid = self.plugin["xep_0030"].static, hosted.boundjid.full
        for name in names:
            for op, node, args in self._binds_of(name):
                getattr(static, op)(jid, node, None, args)

    def client(self, jid: str) -> HostedClient:
        """A new identity on this link (log it in with its ``connect``, as any client)."""
        bare = JID(jid).bare
        if JID(bare).domain != self.domain:
            raise ValueError(f"{jid} is not in the component's domain {self.domain}")
        if bare in self.clients:
            raise ValueError(f"{bare} is hosted twice")
        hosted = HostedClient(self, bare)
        self.clients[bare] = hosted
        return hosted

    async def start(self, timeout: float = 20.0) -> None:
        """Connect and authenticate (XEP-0114 handshake)."""
        started = asyncio.get_running_loop().create_future()

        def ok(_e: object) -> None:
            if not started.done():
                started.set_result(None)

        def refused(err: Any) -> None:
            if not started.done():
                started.set_exception(ConnectionError(f"component {self.domain} refused: {err['condition']}"))

        self.add_event_handler("session_start", ok, disposable=True)
        self.add_event_handler("stream_error", refused, disposable=True)
        self.connect()
        try:
            await asyncio.wait_for(started, timeout)
        except (TimeoutError, ConnectionError):
            self.cancel_connection_attempt()
            self.abort()
            raise

    async def stop(self) -> None:
        self.flush_batches()
        reconnector_of(self).close()  # type: ignore[arg-type]
        self.cancel_connection_attempt()
        try:
            await asyncio.wait_for(self.disconnect(wait=2.0), 3.0)
        except (TimeoutError, ConnectionError):
            self.abort()
        self.store.close()

    def _on_session_start(self, _e: object) -> None:
        self.session_resource = uuid.uuid4().hex[:12]
        self.online = True
        self.plugin["xep_0030"].add_feature(ADDRESS_NS, jid=self.boundjid)  # (_multicast)
        if self._bringing_up is None or self._bringing_up.done():
            self._bringing_up = asyncio.ensure_future(self._bring_up())

    async def _bring_up(self) -> None:
        """After a reconnect, every identity's session again: a few at a time, so thousands of
        session starts do not hold the event loop (and the link's own traffic) for seconds."""
        for i, hosted in enumerate(list(self.clients.values())):
            if not self.online:
                return
            if hosted.wants_session:
                hosted._session_up()
            if i % BRING_UP_BATCH == BRING_UP_BATCH - 1:
                await asyncio.sleep(0)

    def _on_disconnected(self, reason: object) -> None:
        self.online = False
        self._out.clear()  # never into the next connection before its handshake
        self._backlog.clear()  # for sessions that end now
        self._batches.clear()
        self.probes.reset()
        for hosted in list(self.clients.values()):
            hosted._session_down(reason)

    # -- routing ------------------------------------------------------------------------

    def _spawn_event(self, xml: ET.Element) -> None:
        """Each stanza to its identity, by bare ``to``; the domain's own to the link itself."""
        if self.probes.take(xml):  # an answer to a probe the link shares (xmpp/shared_probes.py)
            return
        try:
            to = JID(xml.get("to") or "")
        except InvalidJID:
            self._bounce(xml, "jid-malformed")
            return
        if not to.user:  # the handshake, stream errors, and stanzas for devices.DOMAIN itself
            addresses = xml.find(_ADDRESSES) if xml.tag == _MESSAGE and to.domain == self.domain else None
            if addresses is not None and any(a.get("type") in _DELIVERED for a in addresses):
                self._multicast(xml, addresses)
                return
            super()._spawn_event(xml)
            return
        self._to_identity(to, xml)

    def _to_identity(self, to: JID, xml: ET.Element) -> None:
        hosted = self.clients.get(to.bare) if to.domain == self.domain else None
        if hosted is None or not hosted.is_connected():
            self._bounce(xml, "service-unavailable")
            return
        xml.set("to", to.bare)  # identities answer at their bare JID, whatever resource was asked
        if xml.tag == _PRESENCE and xml.get("type") == "probe":
            hosted.deliver(xml)  # the server's part, answered at once (HostedClient._answer_probe)
            return
        if self._backlog or xml.tag == _PRESENCE:
            # An operator's login sends its presence to every identity and only then its probes
            # (Prosody's mod_presence): 10,000 presences through slixmpp ahead of the answers
            # the operator waits for. So the presence waits for the answers: taken a batch per
            # loop turn; what follows a waiting presence waits behind it, in order.
            if not self._backlog:
                asyncio.get_running_loop().call_soon(self._drain)
            self._backlog.append((hosted, xml))
            return
        self._hand_over(hosted, xml)

    def _multicast(self, xml: ET.Element, addresses: ET.Element) -> None:
        """XEP-0033 for this domain's own identities (the domain's disco names the feature): a
        copy of the message to each one it addresses (``to``, ``cc``, ``bcc``, not yet
        delivered), as if sent to it alone — a fan-out's batch of signed commands is one stanza
        through the server instead of one per device (PROTOCOL.md, "Commands in batches"). The
        copies share the message's children (the devices only read them: a batch's signature
        is opened and checked once, security/signed.py) and leave ``<addresses/>`` out (a bcc
        stays hidden; nothing is multicast twice). An identity not hosted or not online here
        answers as to a message of its own (service-unavailable, from it); an address on
        another domain, or none left to deliver to: the whole message is refused (bad-request);
        more than MULTICAST_MAX (an issuer's batch at most: no stanza is made a thousand), too
        (not-acceptable)."""
        seen: set[str] = set()
        targets: list[JID] = []
        problem = ""
        for address in addresses:
            if address.tag != _ADDRESS or address.get("type") not in _DELIVERED or address.get("delivered") == "true":
                continue
            try:
                jid = JID(address.get("jid") or "")
            except InvalidJID:
                problem = f"address {address.get('jid', '')[:100]!r} is not a JID"
                break
            if jid.domain != self.domain or not jid.user:
                problem = f"{jid.bare[:100]} is not an identity of {self.domain}"
                break
            if jid.bare not in seen:
                seen.add(jid.bare)
                targets.append(jid)
        condition = "bad-request"
        if not problem and not targets:
            problem = "no address to deliver to"
        elif not problem and len(targets) > MULTICAST_MAX:
            problem, condition = f"more than {MULTICAST_MAX} addresses", "not-acceptable"
        if problem:
            log.warning("%s: multicast from %s refused: %s", self.domain, xml.get("from"), problem)
            self._bounce(xml, condition, problem)
            return
        children = [child for child in xml if child is not addresses]
        attrib = dict(xml.attrib)
        for jid in targets:
            attrib["to"] = jid.bare
            piece = ET.Element(xml.tag, attrib)
            piece.extend(children)
            self._to_identity(jid, piece)

    def _hand_over(self, hosted: HostedClient, xml: ET.Element) -> None:
        """A stanza for ``hosted``: to its own stream, or, if the shared plugins answer it, to the
        link's handlers (dropped, as the identity's own stream drops it, if its session ended)."""
        if xml.tag == _IQ and xml.get("type") in ("get", "set") and len(xml):
            if hosted.transport is None:
                return
            if self._shared_iq(hosted.boundjid.bare, xml):
                return
        hosted.deliver(xml)

    def _shared_iq(self, bare: str, xml: ET.Element) -> bool:
        """An iq for a hosted identity that the shared plugins answer: to the link's handlers
        (ComponentXMPP's own dispatch, at the identity's JID). An ad-hoc session goes on only at
        the identity that began it (the plugin's sessions are the process's, not per identity:
        another identity answers as for a session it does not know)."""
        payload = xml[0]
        ns = payload.tag[1:].partition("}")[0]
        if ns not in SHARED_IQ_NS:
            return False
        if ns == COMMANDS_NS and (sid := payload.get("sessionid")):
            session = self.plugin["xep_0050"].sessions.get(sid) if "xep_0050" in self.plugin else None
            if session is not None and session["to"].bare != bare:
                self._bounce(xml, "item-not-found")
                return True
        super()._spawn_event(xml)
        return True

    def _drain(self) -> None:
        backlog = self._backlog
        for _ in range(min(DRAIN_BATCH, len(backlog))):
            hosted, xml = backlog.popleft()
            self._hand_over(hosted, xml)  # (it drops a stanza whose session has ended meanwhile)
        if backlog:
            asyncio.get_running_loop().call_soon(self._drain)

    def deliver_local(self, xml: ET.Element) -> bool:
        """A stanza from one identity to another on this link: handed over in the process."""
        to = xml.get("to") or ""
        bare = to.split("/", 1)[0]
        hosted = self.clients.get(bare)
        if hosted is None or not hosted.is_connected():
            return False
        piece = copy.deepcopy(xml)
        piece.set("to", bare)
        asyncio.get_running_loop().call_soon(self._hand_over, hosted, piece)
        return True

    def _bounce(self, xml: ET.Element, condition: str, text: str = "") -> None:
        """An error back to the sender, as a server does for an unknown account (never for an
        error or a presence: no loops, and presence to no one is dropped)."""
        kind, typ = xml.tag.rpartition("}")[2], xml.get("type")
        if kind not in ("message", "iq") or typ in ("error", "result") or not xml.get("from"):
            return
        reply = ET.Element(f"{{{NS}}}{kind}", {"type": "error", "from": xml.get("to") or self.domain,
                                               "to": xml.get("from") or ""})
        if xml.get("id"):
            reply.set("id", xml.get("id") or "")
        err = ET.SubElement(reply, f"{{{NS}}}error", {"type": "cancel"})
        ET.SubElement(err, f"{{{STANZAS}}}{condition}")
        if text:
            ET.SubElement(err, f"{{{STANZAS}}}text").text = text
        if self.transport is not None:
            self.send_raw(tostring(reply, xmlns=NS, stream=self, top_level=True))


class _OwnRoster(Roster):
    """A hosted identity's roster: its own node, and no one else's kept. slixmpp's presence
    handler asks for the sender's node (``roster[sender].ignore_updates``), and a Roster makes,
    loads from the back end and keeps a node for any JID asked: every identity held a copy of
    each contact's whole roster (a master's fifty devices in each of its fifty devices), a
    third of a hosting process's memory. A node asked for another JID is a fresh empty one,
    as slixmpp's would be without a back end, and is not kept."""

    def __getitem__(self, key: Any) -> RosterNode:
        bare = self.xmpp.boundjid.bare if key is None else (key if isinstance(key, JID) else JID(key)).bare
        if bare in self._rosters or bare == self.xmpp.boundjid.bare:
            return super().__getitem__(key)
        return RosterNode(self.xmpp, bare)


class HostedClient(ComponentXMPP):
    """One hosted identity: the members of a GridClient that a party uses (connect, handlers,
    plugins, make_*/send, roster, boundjid, is_connected), over the link."""

    def __init__(self, link: ComponentLink, jid: str) -> None:
        # ComponentXMPP's own set-up, but with the link's TLS context: slixmpp would build one per
        # stream from the system's CA store (0.13 s each), for a port that has no TLS anyway.
        BaseXMPP.__init__(self, jid, NS, ssl_context=link.ssl_context)
        self.enable_starttls = False
        self.enable_plaintext = True
        self.is_component = True
        self.sessionstarted = False
        self.server_host, self.server_port, self.secret = link.server_host, link.server_port, ""
        self.plugin_config, self.plugin_whitelist = {}, []
        self.add_event_handler("presence_probe", self._handle_probe)
        # slixmpp's roster notes every presence sent as each contact's "last status" (a walk of
        # the roster per broadcast) for re-sending on a subscription's approval, which a hosted
        # identity never does (auto_authorize is off; provisioning subscribes).
        self.del_filter("out", self.roster._save_last_status)
        self.roster = _OwnRoster(self)
        self.del_filter("out", self.roster._save_last_status)
        self.roster.add(self.boundjid)
        self.add_event_handler("presence", self._contact_online)
        self.add_event_handler("presence_unavailable", self._contact_offline)  # after the roster's own
        self.add_event_handler("session_end", lambda _e: self._offline.clear())  # unknown again: told
        self.link = link
        self.transport_name: str | None = None
        self.last_error: str | None = None
        self.wants_session = False
        self.whitespace_keepalive = False  # the link keeps the connection alive
        # The last broadcast presence (the answer to later probes): its serialization, `to` marked
        # (_TO_MARK), and its element (None until needed when the presence was written as text).
        self._last_text = ""
        self._last_broadcast: ET.Element | None = None
        self._me_text = ("", "")  # our broadcast presence's `from`, and it escaped
        self._offline: set[str] = set()  # contacts known to be offline this session (_contact_presence)
        self.roster.set_backend(link.store)  # type: ignore[arg-type]
        self.client_roster = self.roster[self.boundjid]
        # As make_client's: only provisioned contacts see the identity (ad-hoc requests refused).
        self.auto_authorize = False
        self.auto_subscribe = False
        self._bound_shared: list[str] = []  # shared plugins whose binds this session has (bind_shared)
        for name in ("xep_0030", "xep_0199"):
            self.register_plugin(name)
        follower = reconnector_of(self)  # type: ignore[arg-type]
        follower.quiet = True  # its sessions follow the link's: the link says it, and the link pings
        # the server (10,000 identities each pinging a silent server would be a storm of their own).
        follower.policy = dataclasses.replace(follower.policy, keepalive_s=0.0, login_timeout_s=0.0)
        self.add_filter("out_sync", self._route)
        self.add_event_handler("session_start", self._probe_contacts)
        self.own_pep = HostedPep(self)  # its PEP service (its own key is announced straight into it)

    # -- plugins: the link's shared ones, and its own ---------------------------------------

    def register_plugin(self, plugin: str, pconfig: dict[str, Any] | None = None, module: Any = None) -> None:
        """As slixmpp's, but a plugin of SHARED_PLUGINS is the link's one instance (enabled
        there once); any other is the identity's own, on its stream, with the shared ones it
        depends on taken from the link."""
        if plugin in SHARED_PLUGINS:
            self.link.share_plugin(plugin, pconfig)
            self._take_shared(plugin)
            return
        if not self.plugin.registered(plugin):
            load_plugin(plugin, module)
        for dep in PLUGIN_REGISTRY[plugin].dependencies:
            if dep in SHARED_PLUGINS:
                self.register_plugin(dep)
        super().register_plugin(plugin, pconfig, module)
        self.link.forget_binds()  # it may change what a shared one writes (xep_0060: xep_0131's SubID)

    def _take_shared(self, name: str) -> None:
        """The link's shared plugin ``name`` and the shared ones it depends on, in this stream's
        plugin table (as enabled: no identity has a plugin it did not ask for), and, in a
        session already bound, their disco writes at our JID (slixmpp's plugin does that when
        enabled after the bind)."""
        manager, link_plugins, wanted = self.plugin, self.link.plugin, [name]
        while wanted:
            name = wanted.pop()
            if name in SHARED_PLUGINS and name not in manager._enabled:
                plugin = link_plugins[name]
                manager._plugins[name] = plugin
                manager._enabled.add(name)
                wanted.extend(plugin.dependencies)
        if self.session_bind_event.is_set():
            self._bind_shared()

    def _bind_shared(self) -> None:
        new = [name for name in self.plugin if name in SHARED_PLUGINS and name not in self._bound_shared]
        self.link.bind_shared(self, new)
        self._bound_shared.extend(new)

    def set_software_version(self, version: str) -> None:
        """What this identity answers to a software version request (XEP-0092)."""
        self.link.versions[self.boundjid.bare] = version

    # -- a session over the link ----------------------------------------------------------

    def connect(self, host: str | None = None, port: int | None = None) -> asyncio.Future[Any]:
        """Log in: with the link online, the session starts at once; else when it is back."""
        self.wants_session = True
        self.init_plugins()
        done: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        if self.link.online and not self.is_connected():
            asyncio.get_running_loop().call_soon(self._session_up)
        return done

    def _session_up(self) -> None:
        if not self.wants_session or self.is_connected() or not self.link.online:
            return
        self.transport = _LinkTransport(self.link)  # type: ignore[assignment]
        self.transport_name = "component"
        if self._run_out_filters is None or self._run_out_filters.done():
            self._run_out_filters = asyncio.ensure_future(self.run_filters())
        self.session_bind_event.set()
        self.sessionstarted = True
        self._bound_shared.clear()  # each session binds again, as each plugin's own would
        self._bind_shared()
        self.event("session_bind", self.boundjid)
        self.event("session_start")

    def _session_down(self, reason: object) -> None:
        if self.transport is None:
            return
        self.transport = None
        self.transport_name = None
        self.sessionstarted = False
        self._reset_sendq()
        self.event("session_end")
        self._set_disconnected_future()
        self.event("disconnected", reason)

    def disconnect(self, wait: float | int = 2.0, reason: str | None = None,
                   ignore_send_queue: bool = False) -> asyncio.Future[Any]:
        """Leave: what is queued (the goodbye presence) goes out first."""
        self.wants_session = False

        async def leave() -> None:
            if not ignore_send_queue and self.transport is not None:
                try:
                    await asyncio.wait_for(self.waiting_queue.join(), wait)
                except TimeoutError:
                    pass
            self._session_down(reason)
            if self._run_out_filters is not None:
                self._run_out_filters.cancel()

        return asyncio.ensure_future(leave())

    def abort(self) -> None:
        self.wants_session = False
        self._session_down("aborted")

    @property
    def shape_dispatch(self) -> ShapeDispatch:
        """This identity's dispatch (xmpp/dispatch.py), made when first needed, not in __init__:
        only identities that receive, or take presence, need one."""
        dispatch = self.__dict__.get("_dispatch")
        if dispatch is None:
            dispatch = self._dispatch = ShapeDispatch(self)
        return dispatch

    def deliver(self, xml: ET.Element) -> None:
        """A stanza for this identity (from the link, or from another identity)."""
        if self.transport is None:
            return
        try:
            if xml.tag == _PRESENCE and xml.get("type") == "probe":
                self._answer_probe(xml.get("from") or "")  # the server's job: no stanza object, no handlers
                return
            self.shape_dispatch.spawn(xml)  # slixmpp's _spawn_event, with handler matching kept per shape
        except Exception:  # one bad stanza must not reach the link's reader
            log.exception("%s: stanza dropped", self.boundjid.bare)

    def send(self, data: StanzaBase | str, use_filters: bool = True, *,
             leave_out: frozenset[str] = frozenset()) -> None:
        """As slixmpp's, but a stanza goes out at once when nothing waits in the send queue and
        only synchronous filters apply (_route is one): the queue's task wakes up once per
        stanza otherwise, for each of thousands of identities, and the order stays the same.
        ``leave_out``: broadcast_change's, on the fast path only (the queue's way sends to all)."""
        if not use_filters or not isinstance(data, StanzaBase) or not may_skip_queue(self) or not filters_sync(self):
            super().send(data, use_filters)
            return
        try:
            stanza = run_filters(self, data, stop_at=self._route)
            if stanza is not None:
                self._route(stanza, leave_out)  # the last filter: it sends the stanza itself
        except Exception:  # as the queue's task: a faulty stanza is logged, the sender goes on
            log.error("Exception raised in send:", exc_info=True)

    def send_payload(self, to: str, payload: ET.Element | None, mtype: str = "normal", text: str = "") -> None:
        """A message of one data payload (a device's outcome) to ``to``: as send's fast path
        sends it, but without a stanza object, its plugins or a run of the outgoing filters
        (they stamp presence only), a tenth of a command's cost on the host. ``text``: the
        payload already serialised (slixmpp's ``tostring``), written as it is; ``payload`` None:
        made from it where an element is needed. While anything waits in the send queue, it goes
        the usual way, behind it."""
        attrs = {"type": mtype, "to": str(to), "id": self.new_id(), "from": self.boundjid.full}
        if payload is None and not (text and may_skip_queue(self) and messages_need_no_filter(self, self._route)
                                    and attrs["to"].partition("/")[0].rpartition("@")[2] != self.link.domain):
            payload = ET.fromstring(text)
        if not may_skip_queue(self) or not messages_need_no_filter(self, self._route):
            xml = ET.Element(f"{{{NS}}}message", attrs)
            xml.append(payload)
            self.send(Message(self, xml))
            return
        if text and attrs["to"].partition("/")[0].rpartition("@")[2] != self.link.domain:
            head = "".join(f" {k}='{xml_escape(v)}'" for k, v in attrs.items())
            self.send_raw(f"<message{head}>{text}</message>")
            return
        xml = ET.Element(f"{{{NS}}}message", attrs)
        xml.append(payload)
        self._send_one(xml)

    def broadcast_change(self, pres: StanzaBase, leave_out: frozenset[str]) -> None:
        """Send the broadcast presence ``pres`` as a change of what the identity says (not of
        whether it is there, nor a refresh): the subscribers in ``leave_out`` (bare JIDs that need
        only availability and refreshes: the watchdog, the relay) are not sent it (PROTOCOL.md,
        "Who gets which presence"). The fan-out is ours, not the server's, so this costs nothing:
        each subscriber left out is one stanza fewer through the server. If the stanza must wait
        its turn in the send queue, it goes to every subscriber, as any broadcast."""
        self.send(pres, leave_out=leave_out)

    def broadcast_presence(self, payload_tag: str, payload_text: str, *, show: str | None = None,
                           status: str | None = None, ptype: str | None = None,
                           leave_out: frozenset[str] = frozenset(), answer: tuple[str, str] | None = None) -> bool:
        """A broadcast presence of ``show``, ``status`` and one payload (``payload_text``, its
        namespace declared; ``payload_tag``, its qualified tag), ``ptype`` None (available) or
        "unavailable": the same presence (as parsed XML) as send's fast path writes for the
        stanza ``make_presence(...)`` with the payload appended (tests/test_presence_text.py), and
        to the same contacts (``leave_out``: broadcast_change's), but written as text: no stanza
        object, no run of the outgoing filters (each one's text half writes what it would
        append: xmpp/outgoing.py presence_texts) and no serialiser, a quarter of a command's cost
        on the host. False, having sent nothing, when that cannot be: a filter without a text
        half is installed, or something waits in the send queue (the caller sends the stanza).
        ``answer``: (a bare JID :meth:`reaches`, an element serialised): in that contact's copy
        only, after the payload (a command's outcome, PROTOCOL.md "Answered in presence"); the
        other copies and later probes' answers are the presence without it."""
        if not may_skip_queue(self):
            return False
        stamps = presence_texts(self, self._route)
        if stamps is None:
            return False
        me = f"{self.boundjid.bare}/{self.link.session_resource}"
        if self._me_text[0] != me:  # once per session: the same for every presence
            self._me_text = (me, xml_escape(me))
        parts = [f'<presence from="{self._me_text[1]}" to="{_TO_MARK}" type="{ptype}">' if ptype else
                 f'<presence from="{self._me_text[1]}" to="{_TO_MARK}">']
        if show:
            parts.append(f"<show>{show}</show>")
        if status:
            parts.append(f"<status>{xml_escape(status)}</status>")
        parts.append(payload_text)
        parts.extend(stamp(ptype, payload_tag) for stamp in stamps)
        parts.append("</presence>")
        self._broadcast_text("".join(parts), None, leave_out, answer)
        return True

    def reaches(self, bare: str, leave_out: frozenset[str] = frozenset()) -> bool:
        """Whether a broadcast with ``leave_out`` is sent to ``bare`` (a contact subscribed to
        us, not known to be offline nor left out), over the server (not an identity on the link)."""
        item = self.client_roster._jids.get(bare)  # bare JID -> RosterItem
        return (item is not None and bool(item._state["from"]) and bare not in self._offline
                and bare not in leave_out and bare.rpartition("@")[2] != self.link.domain)

    def send_each(self, stanza: StanzaBase, tos: Iterable[str]) -> None:
        """``stanza`` (with no ``to``) to each of ``tos``, as sending a copy to each would: the
        outgoing filters run once and the text is made once, as for a broadcast (a branch
        meter's re-sum goes to its telemetry audience this way: a copy and a filter pass per
        recipient cost the host more than the re-sum itself)."""
        tos = list(tos)
        if not tos:
            return
        if not may_skip_queue(self) or not filters_sync(self):
            for to in tos:  # the queue's way, one copy each
                piece = stanza.__copy__()
                piece["to"] = to
                piece.send()
            return
        try:
            out = run_filters(self, stanza, stop_at=self._route)  # _route's work done here per recipient
            if out is None:
                return
            xml = self._stamp_from(out)
            xml.set("to", _TO_MARK)
            text = tostring(xml, xmlns=NS, stream=self, top_level=True)
            del xml.attrib["to"]
            for to in tos:
                self._send_text(to, xml, text)
        except Exception:  # as send: a faulty stanza is logged, the sender goes on
            log.error("Exception raised in send_each:", exc_info=True)

    # -- what the server does for a c2s account -------------------------------------------

    def _route(self, stanza: StanzaBase, leave_out: frozenset[str] = frozenset()) -> StanzaBase | None:
        """Last outgoing step: our ``from`` on everything (on presence, with the link session's
        resource: ComponentLink.session_resource); a broadcast presence fanned out to the subscribers
        (but ``leave_out``: broadcast_change's); a stanza for an identity on this link handed over
        in the process."""
        xml = self._stamp_from(stanza)
        if xml.tag == _PRESENCE and xml.get("type") in _BROADCAST_TYPES and "to" not in xml.attrib:
            self._broadcast(xml, leave_out)
            return None
        if xml.get("to"):
            self._send_one(xml)
        else:  # for "the server" of a hosted JID: there is none (and the component's domain is not it)
            log.debug("%s: stanza without a recipient not sent: %s", self.boundjid.bare, stanza)
        return None

    def _stamp_from(self, stanza: StanzaBase) -> ET.Element:
        """Our ``from`` on an outgoing stanza; on an available or unavailable presence, with the
        link session's resource (ComponentLink.session_resource)."""
        if not stanza["from"]:
            stanza["from"] = self.boundjid
        xml = stanza.xml
        if xml.tag == _PRESENCE and xml.get("type") in _BROADCAST_TYPES:
            xml.set("from", f"{self.boundjid.bare}/{self.link.session_resource}")
        return xml

    def _broadcast(self, xml: ET.Element, leave_out: frozenset[str] = frozenset()) -> None:
        """A broadcast presence to every subscriber not known to be offline nor in ``leave_out``
        (as a server sends a c2s account's presence to its contacts' sessions only). Serialized once: each copy is
        the same text but for its ``to``. Its text is kept as the answer to later probes; during the
        fan-out the element is the sent stanza's own (slixmpp builds a new one per send; nothing
        changes it after)."""
        xml.set("to", _TO_MARK)
        text = tostring(xml, xmlns=NS, stream=self, top_level=True)
        del xml.attrib["to"]
        self._broadcast_text(text, xml, leave_out)

    def _broadcast_text(self, text: str, xml: ET.Element | None, leave_out: frozenset[str],
                        answer: tuple[str, str] | None = None) -> None:
        """_broadcast's fan-out of ``text`` (``to`` marked); ``xml``: its element, if made;
        ``answer``: broadcast_presence's (to a contact over the server: text only)."""
        self._last_text, self._last_broadcast = text, xml
        skip = self._offline | leave_out if leave_out else self._offline
        told, extra = answer if answer is not None else ("", "")
        for contact in self.subscribers():
            if contact in skip:
                continue
            if contact == told:  # (the text ends "</presence>")
                self._send_text(contact, None, f"{text[:-11]}{extra}</presence>")
            else:
                self._send_text(contact, xml, text)
        # Only the text is kept for later probes: an element kept per identity, thousands of
        # them, costs more than parsing one again for a probe from a contact in this process.
        self._last_broadcast = None

    def _last_element(self) -> ET.Element:
        """The last broadcast's element (no ``to``), parsed from its text if it was written so."""
        if self._last_broadcast is None:
            wrapped = ET.fromstring(f"<w xmlns='{NS}'>{self._last_text.replace(_TO_MARK, '', 1)}</w>")
            self._last_broadcast = wrapped[0]
            del self._last_broadcast.attrib["to"]
        return self._last_broadcast

    def _send_text(self, to: str, xml: ET.Element | None, text: str) -> None:
        """``xml`` to ``to`` (a bare or full JID), ``text`` its serialization with ``to`` marked
        (``xml`` None: the last broadcast, written as text)."""
        if to.partition("/")[0].rpartition("@")[2] == self.link.domain:
            piece = copy.copy(xml if xml is not None else self._last_element())  # deliver_local copies it deep
            piece.set("to", to)
            if self.link.deliver_local(piece):
                return
        if self.transport is not None:
            self.send_raw(text.replace(_TO_MARK, xml_escape(to), 1))

    def _send_one(self, xml: ET.Element) -> None:
        to = xml.get("to") or ""
        if to.partition("/")[0].rpartition("@")[2] == self.link.domain and self.link.deliver_local(xml):
            return
        if self.transport is not None:
            self.send_raw(tostring(xml, xmlns=NS, stream=self, top_level=True))

    def subscribers(self) -> list[str]:
        """Contacts that see this identity's presence (subscription from or both). Read from
        the roster node's items as they are: its ``[jid]`` makes a JID of each key, once per
        contact per broadcast."""
        items: dict[str, Any] = self.client_roster._jids  # bare JID -> RosterItem
        return [jid for jid, item in items.items() if item._state["from"]]

    def _contact_online(self, pres: Any) -> None:
        """Who of the contacts is offline, from their own presence (a contact subscribed both
        ways sends it to us; the server answers our probe for one offline with ``unavailable``).
        Only a contact known to be offline this session is left out of a broadcast: one not heard
        of yet gets it, and a probe from one (its login) counts as online."""
        if pres.xml.get("type") is None:
            self._offline.discard(pres["from"].bare)

    def _contact_offline(self, pres: Any) -> None:
        sender = pres["from"].bare
        if sender not in self.client_roster:
            return
        item = self.client_roster[sender]  # slixmpp makes an item for any sender: a contact is subscribed
        if item["from"] and item["to"] and not item.resources:
            self._offline.add(sender)

    # -- contacts' presence taken from the XML (a parent's children) -------------------------

    def take_contacts(self, jids: Iterable[str], intake: Callable[[str, ET.Element], None], *handlers: Any) -> None:
        """``intake(bare, xml)`` gets each available or unavailable presence of ``jids`` (bare)
        straight from the XML, before slixmpp builds a stanza object (xmpp/dispatch.py's presence
        takers): a parent re-summing its children, thousands of presences a minute in one process.
        While anything else could want the presence, slixmpp's way runs instead, and with it the
        party's slow-way handler, which must come to the same ``intake``. ``handlers``: the
        presence-event handlers that need no presence of ``jids`` (its slow-way handler, those
        reading other contacts only). The intakes of a JID run in the order taken, as the event
        handlers do; around them, what slixmpp's roster and this client do with a contact's
        presence (:meth:`_contact_presence`)."""
        intakes: dict[str, list[Callable[[str, ET.Element], None]]] | None = self.__dict__.get("_intakes")
        if intakes is None:
            intakes = self._intakes = {}
            self.shape_dispatch.take_presence(self._take_contact, self._contact_online, self._contact_offline)
        for jid in jids:
            intakes.setdefault(jid, []).append(intake)
        self.shape_dispatch.declare(*handlers)

    def _take_contact(self, xml: ET.Element) -> bool:
        sender = xml.get("from") or ""
        bare, _, resource = sender.partition("/")
        intakes = self._intakes.get(bare)
        ptype = xml.get("type")
        if intakes is None or ptype not in (None, "unavailable"):
            return False
        if resource:  # (a hosted child's presence is from its bare JID; a c2s one's has a resource)
            try:
                JID(sender)
            except InvalidJID:
                return False  # slixmpp's way: it logs and drops it
        if ptype is None:
            self._offline.discard(bare)  # _contact_online: before the intakes, as its handler is
        for intake in intakes:
            try:
                intake(bare, xml)
            except Exception:  # as slixmpp's events: one failing handler does not stop the others
                log.exception("%s: presence of %s: handler failed", self.boundjid.bare, bare)
        self._contact_presence(bare, resource, xml)
        return True

    def _contact_presence(self, bare: str, resource: str, xml: ET.Element) -> None:
        """What slixmpp's roster (RosterItem.handle_available / handle_unavailable) and
        :meth:`_contact_offline` keep of a contact's presence, for one a taker took: its
        resources (show, status, priority) and whether it is known offline. Not its events
        (got_online, changed_status...): a taker takes only while none has a handler of ours."""
        item = self.client_roster[bare]
        resources = item.resources
        if xml.get("type") is None:
            ns = xml.tag[1:].partition("}")[0]
            try:
                priority = int(xml.findtext(f"{{{ns}}}priority") or 0)
            except ValueError:
                priority = 0  # as slixmpp reads one that is not a number
            resources.setdefault(resource, {}).update(
                {"status": xml.findtext(f"{{{ns}}}status") or "", "show": xml.findtext(f"{{{ns}}}show") or "",
                 "priority": priority})
            return
        resources.pop(resource, None)
        if item["from"] and item["to"] and not resources:
            self._offline.add(bare)

    def _handle_probe(self, pres: Any) -> None:
        self._answer_probe(pres.xml.get("from") or "")

    def _answer_probe(self, sender: str) -> None:
        """Answer a probe with the last broadcast presence, for a subscribed contact only. As
        for a c2s account, the server's work: the device's own handlers never see the probe
        (they would read it as presence: a branch meter, as its child gone)."""
        try:
            asker = JID(sender)
        except InvalidJID:
            return
        bare = asker.bare
        if bare not in self.client_roster or not self.client_roster[bare]["from"]:
            log.info("%s: probe from %s, which has no subscription on record: not answered", self.boundjid.bare,
                     bare)
            return
        self._offline.discard(bare)  # it is logging in: our next broadcasts are for it too
        if not self._last_text:
            self.make_presence(ptype="unavailable", pto=asker).send()
            return
        self._send_text(asker.full, self._last_broadcast, self._last_text)

    def _probe_contacts(self, _e: object) -> None:
        """Ask for the presence of the contacts we are subscribed to, as a server does for a
        c2s account at its login. A contact outside the link's domain is probed once for every
        identity on the link (xmpp/shared_probes.py); one on the link answers in the process.
        Written as they go out (no stanza object, no trip through the send queue and its
        filters, which have nothing to add to a probe)."""
        bare, domain = self.boundjid.bare, self.link.domain
        for jid in list(self.client_roster):
            if not self.client_roster[jid]["to"]:
                continue
            if str(jid).rpartition("@")[2] != domain:
                self.link.probes.ask(self, str(jid))
            else:
                self._send_one(ET.Element(f"{{{NS}}}presence", {"type": "probe", "to": jid, "from": bare}))


def set_software_version(client: Any, version: str) -> None:
    """What ``client`` answers to a software version request (XEP-0092) from now on: a hosted
    identity's own (its plugin is its link's, shared), any other client's plugin's."""
    if isinstance(client, HostedClient):
        client.set_software_version(version)
    else:
        client.plugin["xep_0092"].version = version


class HostedPep:
    """The PEP service (XEP-0163) of one hosted JID, as much of XEP-0060 as XEP-0373 uses:
    items (newest kept per node), publish by the owner (open access), subscribe/unsubscribe
    (kept in the store), owner configure (accepted), and event notifications to subscribers."""

    def __init__(self, client: HostedClient) -> None:
        self.client = client
        self.owner = str(client.boundjid.bare)
        self.nodes: dict[str, tuple[str, ET.Element | None]] = {}  # node -> (item id, payload)
        client.register_handler(stanza_callback("hosted pep", MatchXPath(f"{{{NS}}}iq/{{{PUBSUB}}}pubsub"),
                                                self._on_iq))
        client.register_handler(stanza_callback("hosted pep owner",
                                                MatchXPath(f"{{{NS}}}iq/{{{PUBSUB_OWNER}}}pubsub"), self._on_owner))
        client.add_event_handler("session_bind", self._identity)

    def _identity(self, _e: object) -> None:
        disco = self.client.plugin["xep_0030"] if "xep_0030" in self.client.plugin else None
        if disco is not None:
            disco.add_identity(category="pubsub", itype="pep", jid=self.client.boundjid)

    def _on_owner(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return
        if iq["from"].bare != self.owner:
            self._error(iq, "forbidden", "auth")
            return
        iq.reply(clear=True).send()  # node configuration: every node here is open already

    def _on_iq(self, iq: Iq) -> None:
        if iq["type"] not in ("get", "set"):
            return  # the answers to our own requests go to their waiters
        ps = iq.xml.find(f"{{{PUBSUB}}}pubsub")
        assert ps is not None
        try:
            if iq["type"] == "get" and (items := ps.find(f"{{{PUBSUB}}}items")) is not None:
                self._items(iq, items)
            elif iq["type"] == "set" and (pub := ps.find(f"{{{PUBSUB}}}publish")) is not None:
                self._publish(iq, pub)
            elif iq["type"] == "set" and (sub := ps.find(f"{{{PUBSUB}}}subscribe")) is not None:
                self._subscribe(iq, sub, True)
            elif iq["type"] == "set" and (sub := ps.find(f"{{{PUBSUB}}}unsubscribe")) is not None:
                self._subscribe(iq, sub, False)
            else:
                self._error(iq, "feature-not-implemented")
        except ValueError as exc:
            self._error(iq, "bad-request", "modify", str(exc))

    def _items(self, iq: Iq, items: ET.Element) -> None:
        node = items.get("node") or ""
        if node not in self.nodes:
            self._error(iq, "item-not-found")
            return
        item_id, payload = self.nodes[node]
        reply = iq.reply(clear=True)
        out = ET.SubElement(ET.SubElement(reply.xml, f"{{{PUBSUB}}}pubsub"), f"{{{PUBSUB}}}items", {"node": node})
        item = ET.SubElement(out, f"{{{PUBSUB}}}item", {"id": item_id})
        if payload is not None:
            item.append(copy.deepcopy(payload))
        reply.send()

    def _publish(self, iq: Iq, pub: ET.Element) -> None:
        if iq["from"].bare != self.owner:
            self._error(iq, "forbidden", "auth")
            return
        node = pub.get("node") or ""
        if not node:
            raise ValueError("publish without a node")
        item = pub.find(f"{{{PUBSUB}}}item")
        payload = next(iter(item), None) if item is not None else None
        # Stored first, answered, then notified: the order a server keeps.
        item_id, notify = self._store(node, item.get("id") if item is not None else None, payload)
        reply = iq.reply(clear=True)
        out = ET.SubElement(ET.SubElement(reply.xml, f"{{{PUBSUB}}}pubsub"), f"{{{PUBSUB}}}publish", {"node": node})
        ET.SubElement(out, f"{{{PUBSUB}}}item", {"id": item_id})
        reply.send()
        notify()

    # -- the owner's own publishing, in the process (security/pep_keyring.py's OwnPep) ----

    def last_item(self, node: str) -> ET.Element | None:
        """The payload of ``node``'s item (None: no item, or an item without payload)."""
        entry = self.nodes.get(node)
        return entry[1] if entry is not None else None

    def put(self, node: str, item_id: str | None, payload: ET.Element | None) -> str:
        """Publish as the owner without a round trip through the stream: what anyone sees is
        what an owner's publish iq makes (the item stored, the subscribers notified)."""
        item_id, notify = self._store(node, item_id, payload)
        notify()
        return item_id

    def _store(self, node: str, item_id: str | None, payload: ET.Element | None) -> tuple[str, Callable[[], None]]:
        """Keep the item (newest only); returns its id and what notifies the subscribers."""
        item_id = item_id or uuid.uuid4().hex
        kept = copy.deepcopy(payload) if payload is not None else None
        self.nodes[node] = (item_id, kept)

        def notify() -> None:
            for jid in self.client.link.store.subscribers(self.owner, node):
                msg = self.client.make_message(mto=jid, mtype="headline")
                items = ET.SubElement(ET.SubElement(msg.xml, f"{{{PUBSUB_EVENT}}}event"),
                                      f"{{{PUBSUB_EVENT}}}items", {"node": node})
                event_item = ET.SubElement(items, f"{{{PUBSUB_EVENT}}}item", {"id": item_id})
                if kept is not None:
                    event_item.append(copy.deepcopy(kept))
                msg.send()

        return item_id, notify

    def _subscribe(self, iq: Iq, sub: ET.Element, on: bool) -> None:
        node, jid = sub.get("node") or "", sub.get("jid") or ""
        try:
            wanted = JID(jid).bare
        except InvalidJID:
            raise ValueError(f"invalid jid {jid!r}") from None
        if not node:
            raise ValueError("subscription without a node")
        if wanted != iq["from"].bare:
            self._error(iq, "bad-request", "modify", "one may only subscribe oneself")
            return
        self.client.link.store.subscribe(self.owner, node, wanted, on)
        reply = iq.reply(clear=True)
        if on:
            ps = ET.SubElement(reply.xml, f"{{{PUBSUB}}}pubsub")
            ET.SubElement(ps, f"{{{PUBSUB}}}subscription", {"node": node, "jid": wanted, "subscription": "subscribed"})
        reply.send()

    def _error(self, iq: Iq, condition: str, etype: str = "cancel", text: str = "") -> None:
        err = iq.reply(clear=True)
        err["type"] = "error"
        err["error"]["condition"] = condition
        err["error"]["type"] = etype
        if text:
            err["error"]["text"] = text[:200]
        err.send()
