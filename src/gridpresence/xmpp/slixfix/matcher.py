"""A stanza-path handler that cannot match is told so at its first element, once.

slixmpp runs every incoming stanza past each of the client's handlers; ``StanzaPath.match``
tries the path twice when it fails (pre-parsed, then re-parsed from the raw string in the
stanza's namespace), and the re-parse dominates. Most tries fail at the first element (a
``message/...`` handler shown a presence), which needs neither: the same test slixmpp's
``StanzaBase.match`` makes first, on both forms of the path, gives the same answer. A fleet of
bots reconnecting at once after a server restart spent a third of its CPU in these rejects.
"""

from __future__ import annotations

from slixmpp.xmlstream.matcher.stanzapath import StanzaPath
from slixmpp.xmlstream.stanzabase import StanzaBase

_slixmpp_match = StanzaPath.match


def _first_tag(path: list[str]) -> str:
    return path[0].split("@", 1)[0]


def _may_match(tag: str, stanza: StanzaBase) -> bool:
    """StanzaBase.match's own first test, for the path's first element."""
    return (tag == stanza.name or tag == f"{{{stanza.namespace}}}{stanza.name}"
            or tag in stanza.loaded_plugins or tag in stanza.plugin_attrib)


def match(self: StanzaPath, stanza: StanzaBase) -> bool:
    cache: dict[str, str] | None = self.__dict__.get("_gp_raw_first")
    if cache is None:
        cache = self.__dict__["_gp_raw_first"] = {}
    raw = cache.get(stanza.namespace)
    if raw is None:  # the raw path's first element as slixmpp parses it for this namespace
        raw = cache[stanza.namespace] = _first_tag(stanza._fix_ns(self._raw_criteria, split=True, propagate_ns=False))
    if not (_may_match(_first_tag(self._criteria), stanza) or _may_match(raw, stanza)):
        return False
    return _slixmpp_match(self, stanza)


StanzaPath.match = match  # type: ignore[method-assign]
