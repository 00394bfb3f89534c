"""The API registry's per-JID and per-node handler tables made only when one is registered.

Every stream has its own registry (slixmpp/api.py), and every operation of every plugin gets
two empty tables there, almost always left empty: ~60 operations per stream, ~4 KiB per hosted
identity in a host of thousands. Until a handler for a JID or a node is registered, both are
one shared read-only empty table; lookups (``run``) read them as before, and ``register`` (the
only writer, ``unregister`` and ``restore_default`` included) gives the operation its own first.

``register`` also writes its table in one pass: slixmpp's goes through its own ``_setup`` three
times (register, register_default) for each of the ~30 default handlers every stream's plugins
register (a hosted identity's start). What it writes is slixmpp's, table for table; the one
case slixmpp handles otherwise (no handler, for every JID: its own default back) is slixmpp's.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from slixmpp.api import APIRegistry

_NONE: Any = MappingProxyType({})  # "no handler for any JID (node)", shared by every operation
_slixmpp_register = APIRegistry.register
_slixmpp_setup = APIRegistry._setup


def _setup(self: APIRegistry, ctype: str, op: str) -> None:
    self.settings.setdefault(ctype, {})
    self._handler_defaults.setdefault(ctype, {})
    ops = self._handlers.setdefault(ctype, {})
    if op not in ops:
        ops[op] = {"global": None, "jid": _NONE, "node": _NONE}


def register(self: APIRegistry, handler: Any, ctype: str, op: str, jid: Any = None, node: Any = None,
             default: bool = False) -> None:
    self._setup(ctype, op)
    entry = self._handlers[ctype][op]
    if node is None and jid is None:
        if handler is None:  # slixmpp's own lookup of the default
            _slixmpp_register(self, handler, ctype, op, jid, node, default)
            return
        entry["global"] = handler
    else:
        name, key = ("jid", jid) if node is None else ("node", (jid, node))  # where slixmpp writes it
        table = entry[name]
        if table is _NONE:
            table = entry[name] = {}
        table[key] = handler
    if default:
        self._handler_defaults[ctype][op] = handler


APIRegistry._setup = _setup  # type: ignore[method-assign]
APIRegistry.register = register  # type: ignore[method-assign]
