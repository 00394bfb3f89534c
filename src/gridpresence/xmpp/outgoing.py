"""Outgoing filters run past slixmpp's send queue: the one place for the rule.

slixmpp sends every stanza through a queue whose task runs the stream's outgoing filters
("out", then "out_sync", then "out_sce") and serialises it. Thousands of hosted identities and a
fan-out of thousands of commands skip the queue's wake-up per stanza (and, for data-only
messages, the stanza object) while that changes nothing: the session is up, nothing waits in
the queue (the order is kept), and every filter is synchronous — or, for a path that runs no
filter at all, every filter touches presence only.
"""

from __future__ import annotations

from collections.abc import Callable
from inspect import iscoroutinefunction
from typing import Any, TypeVar

from slixmpp.xmlstream import StanzaBase, XMLStream

F = TypeVar("F", bound=Callable[..., Any])
MODES = ("out", "out_sync", "out_sce")  # in the order the send queue's task runs them
# slixmpp's own presence-only filter: its roster keeps the last presence sent.
_SLIXMPP_PRESENCE_ONLY = ("slixmpp.roster.",)


def presence_only(filter_: F) -> F:
    """Mark an outgoing filter that changes presence stanzas only (caps, branch totals): a
    message written past the queue without running it misses nothing."""
    filter_.presence_only = True  # type: ignore[attr-defined]
    return filter_


# What a presence stamp's text half is given: the presence's ``type`` attribute (None: available)
# and the qualified tag of its payload (None: none); it returns the text of what the filter would
# append (namespaces declared on it), "" for nothing.
PresenceText = Callable[[str | None, str | None], str]


def presence_stamp(text_method: str) -> Callable[[F], F]:
    """Mark an outgoing filter that only appends to presence (caps, branch totals) and whose
    owner can also write what it appends as text: its method ``text_method`` (a
    :data:`PresenceText`). A presence written as text (no stanza object, no filter run) is
    allowed only when every filter has one (:func:`presence_texts`)."""
    def mark(filter_: F) -> F:
        filter_.presence_text = text_method  # type: ignore[attr-defined]
        return presence_only(filter_)
    return mark


def presence_texts(stream: XMLStream, *also: Any) -> list[PresenceText] | None:
    """The text halves of every outgoing filter (but ``also``: the caller's own last step and
    filters it knows leave presence alone), in the order the send queue's task runs them; None
    if any other filter is installed (it could change a presence: the stanza's way then)."""
    out: list[PresenceText] = []
    for mode in MODES:
        for f in _filters(stream)[mode]:
            if f in also:
                continue
            name = getattr(f, "presence_text", None)
            owner = getattr(f, "__self__", None)
            if name is None or owner is None:
                return None
            out.append(getattr(owner, name))
    return out


def _filters(stream: XMLStream) -> dict[str, list[Callable[[StanzaBase], StanzaBase | None]]]:
    return stream._XMLStream__filters  # type: ignore[attr-defined,no-any-return]


def _is_presence_only(filter_: Any) -> bool:
    return bool(getattr(filter_, "presence_only", False)) or \
        getattr(filter_, "__module__", "").startswith(_SLIXMPP_PRESENCE_ONLY)


def may_skip_queue(stream: XMLStream) -> bool:
    """The session is up and nothing waits in the send queue: a stanza written now is in order."""
    return (stream.transport is not None and bool(getattr(stream, "_session_started", False))
            and stream.waiting_queue.empty())


def filters_sync(stream: XMLStream) -> bool:
    """Every outgoing filter can run here, synchronously, as the queue's task would."""
    return not any(iscoroutinefunction(f) for mode in MODES for f in _filters(stream)[mode])


def messages_need_no_filter(stream: XMLStream, *also: Any) -> bool:
    """No outgoing filter but presence-only ones (and ``also``: the caller's own last step)
    would see a message: one may be written without running them."""
    return all(_is_presence_only(f) or f in also for mode in MODES for f in _filters(stream)[mode])


def run_filters(stream: XMLStream, stanza: StanzaBase, stop_at: Any = None) -> StanzaBase | None:
    """The outgoing filters on ``stanza``, as the send queue's task runs them, up to (not
    including) ``stop_at``; None if one dropped it. Call only when :func:`filters_sync`."""
    out = stanza
    for mode in MODES:
        for step in _filters(stream)[mode]:
            if step == stop_at:
                return out
            kept: StanzaBase | None = step(out)
            if kept is None:
                return None
            out = kept
    return out
