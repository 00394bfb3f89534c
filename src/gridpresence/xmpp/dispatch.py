"""Received stanzas to their handlers by their shape, not by matching every handler every time.

slixmpp's ``recv_stanza`` tries every registered handler on every stanza (a hosted device has
~21: disco, ping, PEP, pubsub events, forms, ad-hoc, commands...), about half of a hosted
device's cost of taking a command. Which handlers match depends, for the matchers slixmpp and
this project use (:class:`StanzaPath`, :class:`MatchXPath`), only on the stanza's *shape*: the
tree of its element names, which elements have text (a StanzaPath on a sub-interface such as
``message/body`` asks for one that is not empty), their ``xml:lang`` and the root's ``type``
(the only attribute any handler's path checks). So the handlers matched for the first stanza
of a shape are kept, with the handler list they were matched against, and reused for every
later stanza of that shape while that list is unchanged. A stream with any other kind of matcher
(an iq's answer waits on a matcher by id), attribute checks other than ``type``, or incoming
filters is matched the slow way, stanza by stanza: what runs is always what slixmpp would run.

Presence takers (:meth:`ShapeDispatch.take_presence`): a party that reads the presence of many
contacts itself (an operator's tracker: 10,000 devices' presence at each login) may take a
presence straight from the XML, before slixmpp builds a stanza object and runs its roster's
bookkeeping and its events for it (most of a presence's cost). Only while nothing else could
want it: every handler matched for the stanza's shape is slixmpp's own ``Presence`` callback and
every handler of the presence events is slixmpp's or was declared by the taker (its own, or one
that reads other contacts only; :func:`declare_presence`). Otherwise slixmpp's way, as before.
What a taken presence skips is slixmpp's record of the contact's resources
(``client_roster[jid].resources``), which no tracker's contacts are read from; a hosted identity's
takers (a parent's children: HostedClient.take_contacts) keep that record themselves.

Handler takers (:meth:`ShapeDispatch.take_for`): a handler whose callback can read the XML
itself (an issuer's outcomes: a fan-out of 10,000 brings 10,000) may be given a taker that runs
instead of building the stanza object, only for a stanza whose shape matched that handler
alone (nothing else would have run): it sees what the handler would have seen, and one that
returns False (a case it leaves to the handler) sends the stanza on slixmpp's way.

Streams whose handler lists are alike (the same kinds of handler with the same matchers in the
same order: every hosted identity of a kind, thousands in one process) match a shape alike, so
which of them matched is also kept once per process for each such list: an identity's first
stanza of a shape (its session's probe answers, a first command) is not matched handler by
handler again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from itertools import islice
from typing import Any
from xml.etree import ElementTree as ET

from slixmpp.xmlstream import XMLStream
from slixmpp.xmlstream.handler.base import BaseHandler
from slixmpp.xmlstream.matcher import MatchXPath, StanzaPath

log = logging.getLogger(__name__)

LANG = "{http://www.w3.org/XML/1998/namespace}lang"
MAX_SHAPES = 256  # shapes remembered per stream (a flood of odd shapes only costs the slow way)
MAX_ELEMENTS = 16  # bigger stanzas (forms, PEP items) are rare on the hot path: matched the slow way
MAX_LISTS = 1024  # handler lists whose matches are kept for the whole process

Shape = tuple[Any, ...]
# The events slixmpp fires for an available or unavailable presence (BaseXMPP._handle_presence
# and its roster's handle_available / handle_unavailable).
PRESENCE_EVENTS = ("presence", "presence_available", "presence_unavailable", "presence_away", "presence_chat",
                   "presence_dnd", "presence_xa", "got_online", "got_offline", "changed_status")
HandlerKey = tuple[Any, ...]  # all that a structural handler's matching depends on


def shape_of(xml: ET.Element) -> Shape | None:
    """What handler matching can see of a stanza (its elements in document order, each with its
    number of children: the tree); None if it is too big to be worth it."""
    shape = tuple(islice(((el.tag, bool(el.text) and not el.text.isspace(), el.get(LANG), len(el))  # type: ignore[union-attr]
                          for el in xml.iter()), MAX_ELEMENTS + 1))
    return (xml.get("type"), shape) if len(shape) <= MAX_ELEMENTS else None


def _structural(handler: BaseHandler) -> bool:
    matcher = getattr(handler, "_matcher", None)
    if isinstance(matcher, MatchXPath):
        return True
    if isinstance(matcher, StanzaPath):
        raw = matcher._raw_criteria  # type: ignore[attr-defined]
        steps = raw.split("/") if isinstance(raw, str) else list(raw)
        return all(check.split("=", 1)[0] == "type" for step in steps for check in step.split("@")[1:])
    return False


def _key(handler: BaseHandler) -> HandlerKey | None:
    """What a structural handler's answer for a shape depends on (None: not structural). Its
    matcher's criteria are a path string; any other kind is never shared."""
    matcher = getattr(handler, "_matcher", None)
    criteria = (matcher._raw_criteria if isinstance(matcher, StanzaPath)  # type: ignore[attr-defined]
                else matcher._criteria if isinstance(matcher, MatchXPath) else None)  # type: ignore[attr-defined]
    if not isinstance(criteria, str):
        return None
    key = (type(handler), type(matcher), criteria)
    known = _STRUCTURAL.get(key)
    if known is None:
        known = _STRUCTURAL[key] = _structural(handler)
    return key if known else None


# Per process: each handler key's structural verdict; per list of handler keys, what matched
# each shape (the positions in the list, slixmpp's order).
_STRUCTURAL: dict[HandlerKey, bool] = {}
_SHARED: dict[tuple[Any, ...], dict[Shape, tuple[Shape, tuple[int, ...]]]] = {}


def install(stream: XMLStream) -> ShapeDispatch:
    """Every stanza ``stream`` receives from now on is dispatched by shape."""
    dispatch = ShapeDispatch(stream)
    stream._spawn_event = dispatch.spawn  # type: ignore[method-assign]  # (data_received calls it)
    stream.shape_dispatch = dispatch  # type: ignore[attr-defined]  # (presence takers find it here)
    return dispatch


def declare_presence(stream: Any, *handlers: Any) -> None:
    """Presence-event handlers of ``stream`` that read only contacts a presence taker never takes
    (an operator's, the parent's presence): they leave a taker free to take the rest."""
    dispatch = getattr(stream, "shape_dispatch", None)
    if dispatch is not None:
        dispatch.declare(*handlers)


class ShapeDispatch:
    """:meth:`spawn` is ``stream._spawn_event`` with handler matching kept per shape."""

    def __init__(self, stream: XMLStream) -> None:
        self.stream = stream
        self._handlers: list[BaseHandler] = stream._XMLStream__handlers  # type: ignore[attr-defined]
        self._in_filters: list[Any] = stream._XMLStream__filters["in"]  # type: ignore[attr-defined]
        self._snapshot: tuple[BaseHandler, ...] = ()
        self._cacheable = False
        self._matched: dict[Shape, list[BaseHandler]] = {}
        # What streams with this handler list matched: the shape (the one copy of it that every
        # such stream's _matched is keyed by: thousands of identities, each its own, added up) and
        # the handlers' positions.
        self._shared: dict[Shape, tuple[Shape, tuple[int, ...]]] = {}
        self.fast = 0  # stanzas dispatched from the cache (tests and benchmarks read it)
        self.shared = 0  # ... from what another stream with the same handler list matched
        self._takers: list[Callable[[ET.Element], bool]] = []
        self._declared: set[Any] = set()  # presence-event handlers that need nothing a taker takes
        self._events: dict[str, list[tuple[Any, bool]]] = stream._XMLStream__event_handlers  # type: ignore[attr-defined]
        self._presence_tag = f"{{{stream.default_ns}}}presence"
        self.taken = 0  # presences a taker took (tests and benchmarks read it)
        self._for: dict[BaseHandler, Callable[[ET.Element], bool]] = {}  # handler -> its taker
        self.taken_for = 0  # stanzas a handler's taker took (tests and benchmarks read it)

    def take_for(self, handler: BaseHandler, taker: Callable[[ET.Element], bool]) -> None:
        """``taker(xml)`` runs instead of ``handler`` (a registered, lasting handler) for each
        stanza only it matches, before any stanza object is built; True: taken, as the handler
        would have; False: the stanza goes slixmpp's way (so to the handler) after all."""
        if getattr(handler, "_once", False):
            raise ValueError("a handler that runs once cannot have a taker")
        self._for[handler] = taker

    def _taker_for(self, shape: Shape | None) -> Callable[[ET.Element], bool] | None:
        if shape is None or not self._cacheable or tuple(self._handlers) != self._snapshot:
            return None
        matched = self._matched.get(shape)  # a shape not seen yet goes the slow way, which learns it
        return self._for.get(matched[0]) if matched is not None and len(matched) == 1 else None

    def take_presence(self, taker: Callable[[ET.Element], bool], *handlers: Any) -> None:
        """``taker(xml)`` sees each received presence first (while nothing else could want it,
        see the module's text) and returns True when it took it: slixmpp then never sees it.
        ``handlers``: presence-event handlers of the taker's party that need no presence it
        takes (its own slow-way handler, one that reads other contacts)."""
        self._takers.append(taker)
        self.declare(*handlers)

    def declare(self, *handlers: Any) -> None:
        """Presence-event handlers that need no presence a taker takes."""
        self._declared.update(handlers)

    def _takeable(self, xml: ET.Element) -> bool:
        if not self._cacheable or tuple(self._handlers) != self._snapshot:
            return False
        shape = shape_of(xml)
        matched = self._matched.get(shape) if shape is not None else None
        if matched is None or len(matched) != 1 or matched[0].name != "Presence":
            return False  # a shape not seen yet (the slow way learns it) or other handlers want it
        declared, events = self._declared, self._events
        for name in PRESENCE_EVENTS:
            for handler, _once in events.get(name, ()):
                if handler not in declared and not getattr(handler, "__module__", "").startswith("slixmpp."):
                    return False
        return True

    def spawn(self, xml: ET.Element) -> None:
        stream = self.stream
        if self._in_filters:
            XMLStream._spawn_event(stream, xml)  # slixmpp's own way, filters and all
            return
        xml = stream.incoming_filter(xml)
        if self._takers and xml.tag == self._presence_tag and self._takeable(xml):
            for take in self._takers:
                if take(xml):
                    self.taken += 1
                    return
        shape = None
        if self._for and xml.tag != self._presence_tag:
            shape = shape_of(xml)
            taker = self._taker_for(shape)
            if taker is not None:
                try:
                    took = taker(xml)
                except Exception:  # as slixmpp's run would: logged, the stream goes on
                    log.exception("a stanza taker failed on %s", xml.tag)
                    took = True  # (the handler would have failed alike: not run twice)
                if took:
                    self.taken_for += 1
                    return
        try:
            stanza = stream._build_stanza(xml)
        except Exception as exc:
            log.exception("Unable to parse stanza: %s,\n%s", exc, xml)
            return
        handlers = self._handlers
        matched = self.matching(stanza, shape)
        # As slixmpp's recv_stanza from here on.
        for handler in matched:
            handler.prerun(stanza)
            try:
                handler.run(stanza)
            except Exception as e:
                stanza.exception(e)
            if handler.check_delete() and handler in handlers:
                handlers.remove(handler)
        if not matched:
            stanza.unhandled()

    def matching(self, stanza: Any, shape: Shape | None = None) -> list[BaseHandler]:
        """The handlers slixmpp would run for ``stanza``, in its order (``shape``: its shape,
        if the caller worked it out already)."""
        xml = stanza.xml
        handlers = self._handlers
        if len(handlers) != len(self._snapshot) or tuple(handlers) != self._snapshot:
            self._snapshot = tuple(handlers)
            keys: tuple[Any, ...] = tuple(_key(h) for h in handlers)
            self._cacheable = None not in keys
            keys = (type(self.stream), self.stream.default_ns, *keys)  # which stanza classes it builds
            self._matched.clear()
            self._shared = {}
            if self._cacheable:
                if keys not in _SHARED and len(_SHARED) >= MAX_LISTS:
                    _SHARED.clear()
                self._shared = _SHARED.setdefault(keys, {})
        if shape is None:
            shape = shape_of(xml) if self._cacheable else None
        elif not self._cacheable:
            shape = None
        matched = self._matched.get(shape) if shape is not None else None
        if matched is None:
            known = self._shared.get(shape) if shape is not None else None
            if known is None:
                positions = tuple(i for i, h in enumerate(handlers) if h.match(stanza))
                if shape is not None:
                    if len(self._shared) >= MAX_SHAPES:
                        self._shared.clear()
                    self._shared[shape] = (shape, positions)
            else:
                shape, positions = known
                self.shared += 1
            matched = [handlers[i] for i in positions]
            if shape is not None:
                if len(self._matched) >= MAX_SHAPES:
                    self._matched.clear()
                self._matched[shape] = matched
        else:
            self.fast += 1
        return matched
