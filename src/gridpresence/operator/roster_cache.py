"""The operator's roster kept between logins, so a returning operator is not sent 10,000 items.

XEP-0237 roster versioning: the client names the version of the roster it holds in its roster
get; Prosody (mod_roster) answers with an empty result when that is the server's version, and
with the whole roster (and its new version) when anything changed or the client names none. So
the roster is kept in a JSON file beside the operator's key (``NAME.roster.json``), with its
version, as slixmpp's roster back end (``entries``/``load``/``save``/``version``/``set_version``),
so pushes while online keep it current too. :func:`fetch_roster` is the login's roster get: a
whole roster in the answer replaces the kept one (slixmpp's own handling adds and updates items
but never drops one the answer lacks, so a device removed while the operator was away would
stay), taken straight from the XML. Every change is written at the end of the loop turn that
made it, atomically (a new file renamed over the old): one write for a whole roster. A file that
cannot be read is ignored: the server then sends the whole roster, as for a first login.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any, cast
from xml.etree import ElementTree as ET

from slixmpp import JID, ClientXMPP
from slixmpp.jid import InvalidJID
from slixmpp.types import RosterState

log = logging.getLogger(__name__)

ROSTER_NS = "jabber:iq:roster"
_ITEM, _GROUP = f"{{{ROSTER_NS}}}item", f"{{{ROSTER_NS}}}group"
_SUBSCRIPTIONS = ("none", "to", "from", "both")
ROSTER_SUFFIX = ".roster.json"
_KEYS = ("name", "groups", "from", "to", "pending_in", "pending_out", "whitelisted")
FORMAT = 1


def roster_file_beside(key_file: str | Path | None, name: str) -> Path | None:
    """``DIR/NAME.sec.asc`` -> ``DIR/NAME.roster.json``; no key file, no kept roster."""
    return Path(key_file).with_name(f"{name}{ROSTER_SUFFIX}") if key_file else None


class KeptRoster:
    """One account's roster and its XEP-0237 version, in a file (slixmpp's roster back end)."""

    def __init__(self, path: Path, owner: str) -> None:
        self.path = Path(path)
        self.owner = JID(owner).bare
        self._version = ""
        self._items: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning("%s: kept roster unreadable (%s); the server sends the whole roster", self.path, exc)
            return
        if not (isinstance(data, dict) and data.get("format") == FORMAT and data.get("owner") == self.owner
                and isinstance(data.get("version"), str) and isinstance(data.get("items"), dict)):
            log.warning("%s: not a kept roster of %s; the server sends the whole roster", self.path, self.owner)
            return
        items: dict[str, dict[str, Any]] = {}
        for jid, state in data["items"].items():
            if not (isinstance(state, dict) and isinstance(state.get("groups"), list)
                    and all(isinstance(state.get(k), bool) for k in _KEYS[2:])):
                log.warning("%s: item %r malformed; the server sends the whole roster", self.path, jid)
                return
            items[jid] = {"name": str(state.get("name") or ""), "groups": [str(g) for g in state["groups"]],
                          **{k: state[k] for k in _KEYS[2:]}}
        self._version, self._items = data["version"], items

    # -- slixmpp's roster back end ------------------------------------------------------

    def entries(self, owner: Any, db_state: Any = None) -> list[str]:
        return list(self._items) if JID(owner).bare == self.owner else []

    def load(self, owner: Any, jid: Any, db_state: Any = None) -> RosterState | None:
        item = self._items.get(JID(jid).bare) if JID(owner).bare == self.owner else None
        return cast("RosterState | None", item)  # the keys kept (_KEYS): those slixmpp's RosterItem.load reads

    def save(self, owner: Any, jid: Any, state: Any, db_state: Any = None) -> None:
        if JID(owner).bare != self.owner:
            return
        jid = JID(jid).bare
        if state.get("removed"):
            if self._items.pop(jid, None) is not None:
                self._changed()
            return
        kept = {k: state.get(k) for k in _KEYS}
        kept["name"] = kept["name"] or ""
        kept["groups"] = list(kept["groups"] or [])
        if self._items.get(jid) != kept:
            self._items[jid] = kept
            self._changed()

    def version(self, owner: Any) -> str:
        return self._version if JID(owner).bare == self.owner else ""

    def set_version(self, owner: Any, version: str) -> None:
        if JID(owner).bare == self.owner and version != self._version:
            self._version = version
            self._changed()

    def replace(self, items: dict[str, dict[str, Any]], version: str) -> None:
        """A whole roster from the server: it is the roster now (one write)."""
        self._items = {jid: {"name": st["name"], "groups": list(st["groups"]),
                             **{k: bool(st.get(k, False)) for k in _KEYS[2:]}} for jid, st in items.items()}
        self._version = version
        self._changed()

    # -- the file ----------------------------------------------------------------------

    def _changed(self) -> None:
        if self._dirty:
            return
        self._dirty = True
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (read back in a script): write now
            self.flush()

    def flush(self) -> None:
        """Write the roster now (normally done at the end of the turn that changed it)."""
        if not self._dirty:
            return
        self._dirty = False
        data = {"format": FORMAT, "owner": self.owner, "version": self._version, "items": self._items}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data, separators=(",", ":")), encoding="utf-8")
            os.replace(tmp, self.path)  # another process of the operator reads the old or the new, whole
        except OSError as exc:
            log.warning("%s: roster not kept (%s); the next login gets the whole roster", self.path, exc)
            tmp.unlink(missing_ok=True)


async def fetch_roster(client: ClientXMPP, kept: KeptRoster | None, timeout: float = 60.0) -> int | None:
    """The roster get of a login (or a return): with the kept roster's version when the server
    offers XEP-0237, the answer taken straight from its XML into ``client.client_roster``.
    slixmpp's own handling makes a stanza object and sets each field through the roster item
    of each of 10,000 items (about a third of a 10,000-device login's CPU in the library).
    Returns how many items the server sent; None when it said the kept roster is current."""
    node = client.client_roster
    versioned = "rosterver" in client.features
    iq = client.make_iq_get()
    ask = ET.SubElement(iq.xml, f"{{{ROSTER_NS}}}query")
    if versioned and kept is not None and kept.version(kept.owner):
        ask.set("ver", kept.version(kept.owner))
    answer = await iq.send(timeout=timeout)
    query = answer.xml.find(f"{{{ROSTER_NS}}}query")
    if query is None:
        if versioned and kept is not None and kept.version(kept.owner):
            return None  # the kept roster is the server's
        query = ET.Element(f"{{{ROSTER_NS}}}query")  # an empty roster
    items: dict[str, dict[str, Any]] = {}
    for item in query.iter(_ITEM):
        sub = item.get("subscription") or "none"
        try:
            jid = JID(item.get("jid") or "").bare
        except InvalidJID:
            log.warning("roster item with an invalid JID ignored: %r", item.get("jid"))
            continue
        if not jid or sub not in _SUBSCRIPTIONS:
            continue
        old = items.get(jid) or (kept.load(kept.owner, jid) if kept is not None else None) or {}
        items[jid] = {"name": item.get("name") or "", "groups": [g.text or "" for g in item.iter(_GROUP)],
                      "from": sub in ("from", "both"), "to": sub in ("to", "both"),
                      "pending_out": item.get("ask") == "subscribe",
                      "pending_in": bool(old.get("pending_in")), "whitelisted": bool(old.get("whitelisted"))}
    version = query.get("ver") or "" if versioned else ""
    for jid in [j for j in node if j not in items]:  # slixmpp's own way never drops one
        del node[jid]
    if kept is not None:
        kept.replace(items, version)  # before the items below are made: they load from it
    for jid, state in items.items():
        if node.has_jid(jid):
            existing = node[jid]
            for key in ("name", "groups", "from", "to", "pending_out"):
                if existing[key] != state[key]:
                    existing[key] = state[key]
        else:
            node.add(jid, name=state["name"], groups=state["groups"], afrom=state["from"], ato=state["to"],
                     pending_in=state["pending_in"], pending_out=state["pending_out"],
                     whitelisted=state["whitelisted"])
    if kept is None:
        node.version = version
    return len(items)
