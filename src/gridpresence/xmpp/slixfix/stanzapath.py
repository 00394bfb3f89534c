"""StanzaPath matching without re-parsing its path, nor matching twice, for every stanza.

slixmpp matches every received stanza against every registered handler (an operator's session
has ~25), and a StanzaPath that does not match tries twice: once with its path split at
construction (namespace ``jabber:client``), once with the raw string, which
``ElementBase.match`` splits again with ``fix_ns`` in the stanza's namespace — ~100,000 splits
in a fan-out to 1,000 devices. The split depends only on the path and the namespace, so it is
kept per namespace here; and where it is the very list the first try used (every stanza of a
client stream), the second try would repeat the first (match is a pure function of stanza and
list), so its answer is already known. Otherwise slixmpp's own ``ElementBase.match`` runs on
the list it would have built: every result is slixmpp's.
"""

from __future__ import annotations

from slixmpp.xmlstream.matcher.stanzapath import StanzaPath
from slixmpp.xmlstream.stanzabase import StanzaBase, fix_ns

_CACHE = "_gridpresence_raw_by_ns"


def match(self: StanzaPath, stanza: StanzaBase) -> bool:
    if stanza.match(self._criteria):
        return True
    by_ns: dict[str, list[str]] | None = self.__dict__.get(_CACHE)
    if by_ns is None:
        by_ns = self.__dict__[_CACHE] = {}
    raw = by_ns.get(stanza.namespace)
    if raw is None:  # what ElementBase._fix_ns(raw, split=True, propagate_ns=False) gives
        raw = by_ns[stanza.namespace] = fix_ns(self._raw_criteria, split=True, propagate_ns=False,  # type: ignore[assignment]
                                               default_ns=stanza.namespace)
    if raw == self._criteria:
        return False  # the second try would be the first again
    return stanza.match(raw)  # type: ignore[arg-type]


_slixmpp_match = StanzaPath.match
StanzaPath.match = match  # type: ignore[method-assign]
