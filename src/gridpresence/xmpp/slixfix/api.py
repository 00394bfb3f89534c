"""The API registry's per-JID and per-node handler tables made only when one is registered.

Every stream has its own registry (slixmpp/api.py), and every operation of every plugin gets
two empty tables there, almost always left empty: ~60 operations per stream, ~4 KiB per hosted
identity in a host of thousands. Until a handler for a JID or a node is registered, both are
one shared read-only empty table; lookups (``run``) read them as before, and ``register`` (the
only writer, ``unregister`` and ``restore_default`` included) gives the operation its own first.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any

from slixmpp.api import APIRegistry

_NONE: Any = MappingProxyType({})  # "no handler for any JID (node)", shared by every operation
_slixmpp_register = APIRegistry.register


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
    table = "node" if node is not None else "jid" if jid is not None else None  # where slixmpp writes it
    if table is not None and entry[table] is _NONE:
        entry[table] = {}
    _slixmpp_register(self, handler, ctype, op, jid, node, default)


APIRegistry._setup = _setup  # type: ignore[method-assign]
APIRegistry.register = register  # type: ignore[method-assign]
