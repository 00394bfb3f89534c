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

The splits are kept once per process, by path and namespace, not per handler: a host of
thousands of identities registers the same few dozen paths on every one of them (~10 KiB each).
slixmpp only reads these lists (``match`` slices them), so sharing them changes nothing.
"""

from __future__ import annotations

from slixmpp.xmlstream.matcher.stanzapath import StanzaPath
from slixmpp.xmlstream.stanzabase import StanzaBase, fix_ns

_SPLITS: dict[tuple[str, str], list[str]] = {}  # (path, namespace) -> fix_ns's split of it


def _split(raw: str, namespace: str) -> list[str]:
    """What ``fix_ns(raw, split=True, propagate_ns=False, default_ns=namespace)`` gives."""
    key = (raw, namespace)
    split = _SPLITS.get(key)
    if split is None:
        split = _SPLITS[key] = fix_ns(raw, split=True, propagate_ns=False, default_ns=namespace)  # type: ignore[assignment]
    return split  # type: ignore[return-value]


def __init__(self: StanzaPath, criteria: str) -> None:
    self._criteria = _split(criteria, "jabber:client")
    self._raw_criteria = criteria


def match(self: StanzaPath, stanza: StanzaBase) -> bool:
    if stanza.match(self._criteria):
        return True
    raw = _split(self._raw_criteria, stanza.namespace)
    if raw == self._criteria:
        return False  # the second try would be the first again
    return stanza.match(raw)  # type: ignore[arg-type]


_slixmpp_match = StanzaPath.match
StanzaPath.__init__ = __init__  # type: ignore[method-assign]
StanzaPath.match = match  # type: ignore[method-assign]
