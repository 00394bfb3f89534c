"""XEP-0059 Result Set Management over items sorted by a stable key (a device's bare JID): what
a request's ``<set/>`` asks for, read strictly, and which slice of the sorted keys answers it.

The result's ``<set/>`` itself is written with slixmpp's stanza (``query["rsm"]``, registered by
:mod:`gridpresence.protocol.stanzas`); here is only what needs no stream.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from xml.etree import ElementTree as ET

from slixmpp.plugins.xep_0059.stanza import Set

RSM_NS: str = Set.namespace
_ASKABLE = ("max", "after", "before", "index")  # what a request's <set/> may hold
_MAX_DIGITS = 9  # a longer number is absurd anyway: capped, never converted


class PagingError(ValueError):
    """A ``<set/>`` that cannot be honoured; the message says why (sent back as bad-request text)."""


@dataclass(frozen=True)
class PageRequest:
    """One page asked for: at most ``max`` items (0: the count only, XEP-0059 §2.7), after the
    key ``after``, before the key ``before`` ("" : the last page) or from position ``index``;
    none of the three: the first page."""

    max: int
    after: str | None = None
    before: str | None = None
    index: int | None = None


def _number(name: str, text: str, cap: int | None) -> int:
    if not text or not (text.isascii() and text.isdigit()):
        raise PagingError(f"<{name}/> must be a whole number, not {text[:40]!r}")
    if len(text) > _MAX_DIGITS:
        if cap is None:
            raise PagingError(f"<{name}/> is too large ({len(text)} digits)")
        return cap
    value = int(text)
    return value if cap is None else min(value, cap)


def parse_page_request(query: ET.Element, page_size: int) -> PageRequest:
    """The page that ``query`` (the element holding the ``<set/>``) asks for; a query without
    ``<set/>`` (an older client) asks for the first page. ``max`` is capped at ``page_size``.
    Raises PagingError for a ``<set/>`` that is not a well-formed request."""
    sets = query.findall(f"{{{RSM_NS}}}set")
    if not sets:
        return PageRequest(max=page_size)
    if len(sets) > 1:
        raise PagingError("more than one <set/>")
    given: dict[str, str] = {}
    for child in sets[0]:
        tag = child.tag if isinstance(child.tag, str) else ""
        ns, _, local = tag[1:].partition("}") if tag.startswith("{") else ("", "", tag)
        if ns != RSM_NS or local not in _ASKABLE:
            raise PagingError(f"a request's <set/> holds only <{'/>, <'.join(_ASKABLE)}/>, not <{(local or tag)[:60]}/>")
        if local in given:
            raise PagingError(f"<{local}/> given twice")
        if len(child):
            raise PagingError(f"<{local}/> holds elements; it holds text only")
        given[local] = (child.text or "").strip()
    if (sets[0].text or "").strip():
        raise PagingError("<set/> holds text; it holds elements only")
    if "max" not in given:
        size = page_size
    else:
        size = _number("max", given["max"], page_size)
    if len({"after", "before", "index"} & given.keys()) > 1:
        raise PagingError("<after/>, <before/> and <index/> exclude each other")
    if "after" in given and not given["after"]:
        raise PagingError("<after/> names no item")
    index = _number("index", given["index"], None) if "index" in given else None
    return PageRequest(max=size, after=given.get("after"), before=given.get("before"), index=index)


def select_page(keys: Sequence[str], want: PageRequest) -> tuple[int, int]:
    """The slice ``keys[start:stop]`` answering ``want``; ``keys`` sorted, each once.

    An ``after`` or ``before`` key not among ``keys`` (a device that left the roster between
    two pages) still has its place in the order, and the page starts or ends there: paging
    goes on instead of failing with item-not-found (XEP-0059's SHOULD), nothing is skipped."""
    n = len(keys)
    if want.index is not None:
        start = min(want.index, n)
        return start, min(start + want.max, n)
    if want.before is not None:
        stop = n if want.before == "" else bisect.bisect_left(keys, want.before)
        return max(0, stop - want.max), stop
    start = 0 if want.after is None else bisect.bisect_right(keys, want.after)
    return start, min(start + want.max, n)
