"""slixmpp's ``Callback``, typed for handlers of the stanza class their matcher picks.

slixmpp types every handler as taking ``StanzaBase``; a handler of ``message/...`` is given a
``Message`` (the stream builds each stanza as its registered class), so it may say so. The one
cast for that is here, not an ignore at each registration.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar, cast

from slixmpp.xmlstream import StanzaBase
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher.base import MatcherBase

S = TypeVar("S", bound=StanzaBase)


def stanza_callback(name: str, matcher: MatcherBase, handler: Callable[[S], object], *,
                    once: bool = False, instream: bool = False) -> Callback:
    """A ``Callback`` named ``name`` running ``handler`` on what ``matcher`` matches; the
    handler may take the class of the stanzas the matcher can match (Message, Iq...)."""
    return Callback(name, matcher, cast(Callable[[StanzaBase], Any], handler), once=once, instream=instream)
