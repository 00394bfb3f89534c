"""``iscoroutinefunction`` for plain functions and methods straight from the code flags.

slixmpp asks ``inspect.iscoroutinefunction`` of every handler at every event, of every filter
for every stanza sent, and of every API handler at every call: ~80 times per hosted identity's
start, each through inspect's unwrapping. For a function or a bound method the answer is the
coroutine flag of its code, which is all inspect reads for them on Python 3.11; anything else
(a partial, a callable object) still goes to inspect. Python 3.12 added a marker inspect checks
first (``markcoroutinefunction``): there, nothing is changed.
"""

from __future__ import annotations

import importlib
import inspect
from types import FunctionType, MethodType
from typing import Any

_inspect = inspect.iscoroutinefunction
# slixmpp's modules that bound inspect's function at import.
_USERS = ("slixmpp.xmlstream.xmlstream", "slixmpp.api", "slixmpp.stanza.iq", "slixmpp.clientxmpp",
          "slixmpp.xmlstream.handler.coroutine_callback", "slixmpp.plugins.xep_0050.adhoc")


def iscoroutinefunction(obj: Any) -> bool:
    func = obj.__func__ if type(obj) is MethodType else obj
    if type(func) is FunctionType:
        return bool(func.__code__.co_flags & inspect.CO_COROUTINE)
    return _inspect(obj)


if not hasattr(inspect, "markcoroutinefunction"):
    for _name in _USERS:
        _module = importlib.import_module(_name)
        if getattr(_module, "iscoroutinefunction", None) is _inspect:
            _module.iscoroutinefunction = iscoroutinefunction  # type: ignore[attr-defined]
