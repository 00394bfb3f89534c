"""Public keys over PEP (XEP-0373 §4), pinned on first use: the :class:`KeyLookup` of a party.

Each party announces its own key at every session start: the key in its data node
``urn:xmpp:openpgp:0:public-keys:<FPR>``, then its fingerprint in the metadata node, both
with the ``open`` access model so every party (and any OX chat client) may read them. A party
whose metadata already lists its key announces nothing (one IQ instead of three at login).

Looking up another party reads its metadata node, then the announced key's data node, and
checks that the key is what was announced and names that party (``xmpp:`` user id). The first
key seen for a JID is pinned (:class:`PinStore`); a different one later raises
:class:`KeyChanged` with a loud warning and the pinned key stays in force. After a lookup the
keyring subscribes to the party's metadata node, so a key announced later is checked at once.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from xml.etree import ElementTree as ET

from slixmpp import JID, ClientXMPP, Message
from slixmpp.exceptions import IqError, IqTimeout

from gridpresence.security.keyring import KeyChanged, KeyUnavailable
from gridpresence.security.keys import (
    KEYS_DIR,
    KeyFileError,
    PublicPart,
    fingerprint,
    load_secret,
    parse_key,
    public_part,
    xmpp_uid,
)
from gridpresence.protocol.ox_xml import (
    PUBLIC_KEYS_NODE,
    PUBLIC_KEYS_NOTIFY,
    KeyAnnouncement,
    OxXmlError,
    key_node,
    metadata_from_xml,
    metadata_to_xml,
    pubkey_from_xml,
    pubkey_to_xml,
    xep82,
)
from gridpresence.security.pgp import pgpy
from gridpresence.security.pins import PinStore, PinVerdict

log = logging.getLogger(__name__)

PUBLISH_OPTIONS = "http://jabber.org/protocol/pubsub#publish-options"
NODE_CONFIG = "http://jabber.org/protocol/pubsub#node_config"
PUBSUB_EVENT = "http://jabber.org/protocol/pubsub#event"
KEYS_EVENT = "ox_public_keys"  # slixmpp event prefix for metadata-node notifications
PINS_DIR = "pins"
VOUCHED_DIR = "vouched"

# Vouched keys parsed once per process (path, size, mtime -> key): a host of thousands of
# devices shares the few issuers' keys instead of parsing them once per device (~5 ms each).
_VOUCHED: dict[tuple[Path, int, int], tuple[str, pgpy.PGPKey]] = {}

# Subscriptions to a vouched issuer's key announcements in flight per process (event loop):
# a first shed to 10,000 hosted devices began 10,000 at once, a storm of iqs in front of the
# commands and their outcomes at the server (2,471 of 10,000 commands expired behind it once).
# They follow in the background at this pace; a key is verified from the vouched copy meanwhile.
WATCH_IN_FLIGHT = 32
_WATCH_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = weakref.WeakKeyDictionary()


def _watch_slot() -> asyncio.Semaphore:
    loop = asyncio.get_running_loop()
    slot = _WATCH_SLOTS.get(loop)
    if slot is None:
        slot = _WATCH_SLOTS[loop] = asyncio.Semaphore(WATCH_IN_FLIGHT)
    return slot


def vouch(directory: Path, jid: str, key: pgpy.PGPKey) -> None:
    """Hand ``key`` (its public part) over for ``jid`` at provisioning (see ``PartyKeys.vouched_dir``)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{JID(jid).bare}.pub"
    data = bytes(key.pubkey if not key.is_public else key)
    if not path.exists() or path.read_bytes() != data:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)


def _vouched_key(directory: Path, bare: str) -> tuple[str, pgpy.PGPKey] | None:
    """(fingerprint, key) handed over for ``bare``, or None (none, or unusable: logged)."""
    path = directory / f"{bare}.pub"
    try:
        stat = path.stat()
    except OSError:
        return None
    slot = (path, stat.st_size, stat.st_mtime_ns)
    entry = _VOUCHED.get(slot)
    if entry is None:
        try:
            key = parse_key(path.read_bytes(), what=str(path))
            fpr = fingerprint(key)
            if len(fpr) != 40 or not all(c in "0123456789ABCDEFabcdef" for c in fpr):
                raise KeyFileError(f"not an OpenPGP key (fingerprint {fpr!r})")
            entry = (fpr, key)
        except Exception as exc:  # pgpy half-parses some garbage and fails later, in any way
            log.warning("vouched key %s unusable (%s); asking the party instead", path, exc)
            return None
        _VOUCHED[slot] = entry
    return entry


@runtime_checkable
class OwnPep(Protocol):
    """A party's own PEP service living in the same process (a hosted identity's): its key is
    announced by writing the items there, as its publish iqs would."""

    def last_item(self, node: str) -> ET.Element | None: ...

    def put(self, node: str, item_id: str | None, payload: ET.Element | None) -> str: ...


@dataclass(frozen=True)
class PartyKeys:
    """Where one party keeps its secret key and the fingerprints it pinned.

    ``secret_file`` None: the party can look keys up but has no key of its own to announce
    or sign with. ``pins_file`` None: pins live in memory only (forgotten at exit)."""

    secret_file: Path | None = None
    pins_file: Path | None = None
    # Public keys handed over at provisioning, one ``BARE-JID.pub`` each: a pinned party's key
    # is taken from here, when its fingerprint is the pin, without asking the party's PEP node.
    vouched_dir: Path | None = None

    @classmethod
    def in_data_dir(cls, data_dir: Path, name: str) -> PartyKeys:
        """A bot of the grid in ``data_dir``: ``keys/NAME.sec.asc``, ``pins/NAME.json`` and the
        issuers' public keys in ``pins/vouched/``."""
        pins = Path(data_dir) / PINS_DIR
        return cls(Path(data_dir) / KEYS_DIR / f"{name}.sec.asc", pins / f"{name}.json", pins / VOUCHED_DIR)

    @classmethod
    def beside(cls, key_file: str | Path | None, name: str) -> PartyKeys:
        """A person's key file from the connection file; the pins go next to it."""
        if key_file is None:
            return cls()
        path = Path(key_file)
        return cls(path, path.with_name(f"{name}.pins.json"))


class PepKeyring:
    """One party's view of everyone's keys, and its own key's announcement, over one client."""

    def __init__(self, client: ClientXMPP, keys: PartyKeys | None = None) -> None:
        keys = keys or PartyKeys()
        self.client = client
        self.pins = PinStore(keys.pins_file)
        self.secret_file = keys.secret_file
        self.vouched_dir = keys.vouched_dir
        self.warnings: list[KeyChanged] = []  # every key change seen, oldest first
        self._keys: dict[str, tuple[str, pgpy.PGPKey]] = {}  # bare JID -> (fingerprint, pinned key)
        self._fetching: dict[str, asyncio.Task[pgpy.PGPKey]] = {}
        self._watched: set[str] = set()  # metadata nodes we subscribed to
        self._watching: set[asyncio.Task[None]] = set()  # subscriptions begun for vouched keys
        self._secret: pgpy.PGPKey | None = None
        self._announcing: asyncio.Task[bool] | None = None
        for name in ("xep_0004", "xep_0060"):
            if name not in client.plugin:
                client.register_plugin(name)
        self._pubsub: Any = client.plugin["xep_0060"]
        self._pubsub.map_node_event(PUBLIC_KEYS_NODE, KEYS_EVENT)
        # At its own JID (what None means to a client of its own): a hosted identity's disco
        # plugin is shared by every identity of its process (xmpp/component.py).
        client.plugin["xep_0030"].add_feature(PUBLIC_KEYS_NOTIFY, jid=client.boundjid)
        client.add_event_handler(f"{KEYS_EVENT}_publish", self._on_announcement)
        client.add_event_handler("session_start", self._on_session_start)

    # -- own key ----------------------------------------------------------------------

    @property
    def secret_key(self) -> pgpy.PGPKey | None:
        """This party's secret key (loaded once), or None when it has none: it cannot sign."""
        if self._secret is None and self.secret_file is not None:
            try:
                self._secret = load_secret(self.secret_file)
            except KeyFileError as exc:
                log.warning("%s: no OpenPGP secret key (%s): read-only, cannot sign", self.jid, exc)
                self.secret_file = None
        return self._secret

    @property
    def jid(self) -> str:
        return str(self.client.boundjid.bare)

    def _on_session_start(self, _event: object) -> None:
        # A fetch begun on a lost session waits for answers that will never come: callers from
        # now on start their own on this session (the old one's waiters time out as before).
        self._fetching.clear()
        # Subscriptions to others' metadata need no renewal: PEP keeps bare-JID subscribers.
        if self._secret is not None or self.secret_file is not None:
            self._announcing = asyncio.ensure_future(self._announce_logged())

    async def announced(self, timeout: float = 10.0) -> bool:
        """Wait for this session's announcement of our key; False if there is none or it failed."""
        if self._announcing is None:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(self._announcing), timeout)
        except TimeoutError:
            return False

    async def _announce_logged(self) -> bool:
        try:
            # The secret key itself is parsed only when first used to sign or decrypt.
            if self._secret is not None:
                part = PublicPart.of(self._secret)
            else:
                assert self.secret_file is not None
                part = public_part(self.secret_file)
        except KeyFileError as exc:
            log.warning("%s: no OpenPGP secret key (%s): read-only, cannot sign", self.jid, exc)
            self.secret_file = None
            return False
        try:
            await self.publish_part(part)
            return True
        except (IqError, IqTimeout) as exc:
            log.warning("%s: could not announce its OpenPGP key: %s", self.jid, _why(exc))
            return False
        except Exception:  # e.g. the stream closed meanwhile: the next session tries again
            log.exception("%s: announcing its OpenPGP key failed", self.jid)
            return False

    async def publish(self, secret_key: pgpy.PGPKey, timeout: float = 10.0) -> bool:
        """Announce our public key as XEP-0373 §4.1-4.2 says; False when already announced."""
        return await self.publish_part(PublicPart.of(secret_key), timeout)

    async def publish_part(self, part: PublicPart, timeout: float = 10.0) -> bool:
        """:meth:`publish` for a key's public part (security/keys.py: no parse of the key)."""
        fpr, created = part.fingerprint, part.created
        own = self._own_pep()
        if own is not None:
            return self._publish_own(own, part)
        try:
            current = await self._metadata(self.jid, timeout)
        except KeyUnavailable:
            current = []
        if any(a.fingerprint == fpr for a in current):
            return False
        # The key first: the metadata may only name keys one can fetch (§4.2).
        await self._publish_open(key_node(fpr), xep82(created), pubkey_to_xml(part.data, created), timeout)
        await self._publish_open(PUBLIC_KEYS_NODE, None, metadata_to_xml([KeyAnnouncement(fpr, created)]), timeout)
        log.info("%s: announced OpenPGP key %s over PEP", self.jid, fpr)
        return True

    def _own_pep(self) -> OwnPep | None:
        own = getattr(self.client, "own_pep", None)
        return own if isinstance(own, OwnPep) else None

    def _publish_own(self, own: OwnPep, part: PublicPart) -> bool:
        """The same announcement, written straight into a PEP service in this process (a hosted
        identity's, xmpp/component.py): no iq round trips to ourselves, the same nodes, items and
        notifications for everyone else. Its nodes are always open."""
        fpr, created = part.fingerprint, part.created
        try:
            current = metadata_from_xml(own.last_item(PUBLIC_KEYS_NODE))
        except OxXmlError:
            current = []
        if any(a.fingerprint == fpr for a in current):
            return False
        own.put(key_node(fpr), xep82(created), pubkey_to_xml(part.data, created))
        own.put(PUBLIC_KEYS_NODE, None, metadata_to_xml([KeyAnnouncement(fpr, created)]))
        log.debug("%s: announced OpenPGP key %s in its own PEP service", self.jid, fpr)
        return True

    async def _publish_open(self, node: str, item_id: str | None, payload: ET.Element, timeout: float) -> None:
        """Publish with access model ``open``; a node made earlier with another model is
        reconfigured once (Prosody treats publish-options as preconditions)."""
        options = self._form(PUBLISH_OPTIONS, "submit")
        try:
            await self._pubsub.publish(self.jid, node, id=item_id, payload=payload, options=options, timeout=timeout)
        except IqError as exc:
            if exc.iq["error"]["condition"] != "conflict":
                raise
            config = self._form(NODE_CONFIG, "submit")
            await self._pubsub.set_node_config(self.jid, node, config, timeout=timeout)
            await self._pubsub.publish(self.jid, node, id=item_id, payload=payload,
                                       options=self._form(PUBLISH_OPTIONS, "submit"), timeout=timeout)

    def _form(self, form_type: str, ftype: str) -> Any:
        form = self.client.plugin["xep_0004"].make_form(ftype=ftype)
        form.add_field(var="FORM_TYPE", ftype="hidden", value=form_type)
        form.add_field(var="pubsub#access_model", value="open")
        return form

    # -- other parties' keys ----------------------------------------------------------

    def cached(self, jid: str) -> pgpy.PGPKey | None:
        bare = JID(jid).bare
        entry = self._keys.get(bare)
        if entry is None:
            return None
        if entry[0] != self.pins.pinned(bare):  # re-pinned meanwhile (`gridpresence keys repin`)
            del self._keys[bare]
            return None
        return entry[1]

    async def key_for(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
        bare = JID(jid).bare
        key = self.cached(bare) or self._vouched(bare)
        if key is not None:
            return key
        task = self._fetching.get(bare)
        if task is None:  # concurrent callers share one fetch
            task = asyncio.ensure_future(self._fetch(bare, timeout))
            self._fetching[bare] = task
            task.add_done_callback(lambda t: self._fetch_done(bare, t))
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            raise KeyUnavailable(bare, f"no answer within {timeout:.1f} s") from None

    def _vouched(self, bare: str) -> pgpy.PGPKey | None:
        """The key handed over at provisioning, if it is the pinned one: a thousand devices
        commanded for the first time verify at once, instead of each asking the issuer's PEP
        node in the same second (a storm that timed out 999 of 1,000 on a loaded machine). Its
        announcements are still followed, so a changed key is noticed as for a fetched one."""
        pinned = self.pins.pinned(bare)
        if self.vouched_dir is None or pinned is None:
            return None
        entry = _vouched_key(self.vouched_dir, bare)
        if entry is None or entry[0] != pinned:
            return None
        key = entry[1]
        self._keys[bare] = (pinned, key)
        if self.client.is_connected():
            watching = asyncio.ensure_future(self._watch_paced(bare))
            self._watching.add(watching)
            watching.add_done_callback(self._watching.discard)
        return key

    def _fetch_done(self, bare: str, task: asyncio.Task[pgpy.PGPKey]) -> None:
        if self._fetching.get(bare) is task:  # not a newer fetch, begun on a later session
            del self._fetching[bare]
        if not task.cancelled():
            task.exception()  # retrieved here too: every waiter may have timed out already

    async def _fetch(self, bare: str, timeout: float) -> pgpy.PGPKey:
        announced = await self._metadata(bare, timeout)
        if not announced:
            raise KeyUnavailable(bare, "no key published (empty public-keys list)")
        pinned = self.pins.pinned(bare)
        # Several keys may be announced (OX clients): the pinned one if listed, else the newest.
        chosen = next((a for a in announced if a.fingerprint == pinned), announced[0])
        key = await self._key(bare, chosen.fingerprint, timeout)
        self._accept(bare, key, chosen.fingerprint, raise_on_change=True)
        await self._watch(bare)  # from here on, a newly announced key is checked at once
        return key

    def _accept(self, bare: str, key: pgpy.PGPKey | None, fpr: str, *, raise_on_change: bool) -> None:
        """Pin on first use; a different key is refused and remembered as a warning."""
        verdict = self.pins.check(bare, fpr)
        if verdict is PinVerdict.CHANGED:
            change = KeyChanged(bare, self.pins.pinned(bare) or "?", fpr)
            if not any(w.jid == bare and w.offered == fpr for w in self.warnings):
                self.warnings.append(change)
            if raise_on_change:
                raise change
            return
        if key is not None:
            self._keys[bare] = (fpr, key)

    async def _metadata(self, bare: str, timeout: float) -> list[KeyAnnouncement]:
        item = await self._last_item(bare, PUBLIC_KEYS_NODE, timeout, "public-keys list")
        try:
            return metadata_from_xml(item)
        except OxXmlError as exc:
            raise KeyUnavailable(bare, f"unreadable public-keys list: {exc}") from None

    async def _key(self, bare: str, fpr: str, timeout: float) -> pgpy.PGPKey:
        item = await self._last_item(bare, key_node(fpr), timeout, f"key {fpr}")
        try:
            key = parse_key(pubkey_from_xml(item), what=f"published key {fpr}")
        except (OxXmlError, KeyFileError) as exc:
            raise KeyUnavailable(bare, f"unusable data in key node {fpr}: {exc}") from None
        key = key.pubkey if not key.is_public else key  # never keep secret material someone leaked
        if fingerprint(key) != fpr:
            raise KeyUnavailable(bare, f"fingerprint mismatch: announced {fpr}, key node holds {fingerprint(key)}")
        if not any(uid.name == xmpp_uid(bare) for uid in key.userids):
            uids = ", ".join(str(uid.name) for uid in key.userids) or "none"
            raise KeyUnavailable(bare, f"key {fpr} is not for {bare}: user ids {uids}, need {xmpp_uid(bare)}")
        return key

    async def _last_item(self, bare: str, node: str, timeout: float, what: str) -> ET.Element | None:
        """The payload of the newest item of ``node`` at ``bare``'s PEP service."""
        try:
            iq = await self._pubsub.get_items(bare, node, max_items=1, timeout=timeout)
        except IqTimeout:
            raise KeyUnavailable(bare, f"no answer for its {what} within {timeout:.1f} s") from None
        except IqError as exc:
            condition = exc.iq["error"]["condition"]
            if condition == "item-not-found":
                raise KeyUnavailable(bare, f"no key published ({what}: item-not-found)") from None
            raise KeyUnavailable(bare, f"cannot read its {what}: {_why(exc)}") from None
        items = list(iq["pubsub"]["items"])
        if not items:
            raise KeyUnavailable(bare, f"no key published ({what} is empty)")
        payload: ET.Element | None = items[-1]["payload"]
        return payload

    # -- later announcements ----------------------------------------------------------

    async def _watch_paced(self, bare: str) -> None:
        """:meth:`_watch` in its turn among the process's (WATCH_IN_FLIGHT at a time)."""
        if bare in self._watched:
            return
        async with _watch_slot():
            await self._watch(bare)

    async def _watch(self, bare: str) -> None:
        """Subscribe to ``bare``'s metadata node (XEP-0060 §6.1), so a new key is noticed."""
        if bare in self._watched:
            return
        self._watched.add(bare)
        try:
            await self._pubsub.subscribe(bare, PUBLIC_KEYS_NODE, timeout=10)
        except (IqError, IqTimeout) as exc:
            log.info("%s: cannot follow key announcements of %s: %s", self.jid, bare, _why(exc))

    def _on_announcement(self, msg: Message) -> None:
        bare = msg["from"].bare
        if bare == self.jid or self.pins.pinned(bare) is None:
            return  # our own node, or a party we never looked up
        for item in msg["pubsub_event"]["items"].xml.findall(f"{{{PUBSUB_EVENT}}}item"):
            try:
                announced = metadata_from_xml(next(iter(item), None))
            except OxXmlError:
                # §4.5: notifications may come without payload; read the node instead.
                asyncio.ensure_future(self._recheck(bare))
                continue
            self._check_announced(bare, announced)

    async def _recheck(self, bare: str) -> None:
        try:
            self._check_announced(bare, await self._metadata(bare, 10.0))
        except KeyUnavailable as exc:
            log.warning("%s: key announcement of %s unreadable: %s", self.jid, bare, exc.reason)

    def _check_announced(self, bare: str, announced: list[KeyAnnouncement]) -> None:
        pinned = self.pins.pinned(bare)
        if not announced or any(a.fingerprint == pinned for a in announced):
            return
        self._accept(bare, None, announced[0].fingerprint, raise_on_change=False)

    def repin(self, jid: str, key: pgpy.PGPKey) -> str | None:
        """Accept ``key`` for ``jid`` deliberately (a rotated key); returns the old fingerprint."""
        bare = JID(jid).bare
        old = self.pins.pinned(bare)
        self.pins.repin(bare, fingerprint(key))
        self._keys[bare] = (fingerprint(key), key)
        self.warnings = [w for w in self.warnings if w.jid != bare]
        return old

    async def fetch_announced(self, jid: str, timeout: float = 5.0) -> pgpy.PGPKey:
        """The key ``jid`` announces now, checked but NOT pinned (for a deliberate re-pin)."""
        bare = JID(jid).bare
        announced = await self._metadata(bare, timeout)
        if not announced:
            raise KeyUnavailable(bare, "no key published (empty public-keys list)")
        return await self._key(bare, announced[0].fingerprint, timeout)


def _why(exc: IqError | IqTimeout) -> str:
    if isinstance(exc, IqTimeout):
        return "no answer"
    err = exc.iq["error"]
    return f"{err['condition']}" + (f" ({err['text']})" if err["text"] else "")


