"""Every change we make to slixmpp's own behaviour, in one place (written against slixmpp 1.17).

* ``scram``: SCRAM's salted-password step (PBKDF2) through hashlib in C, registered with
  slixmpp's SASL registry; bit-for-bit the same result, ~30 ms less per login.
* ``escape``: the serialiser's XML escaping by ``str.replace`` instead of a per-character
  generator; the same output.
* ``stanzapath``: handlers' StanzaPath matching keeps its path split per namespace instead of
  splitting it again for every stanza; slixmpp's own match on the same list.
* ``api``: the API registry's per-JID and per-node tables made only when a handler goes in
  (two empty ones per operation per stream otherwise), and ``register`` writing in one pass.
* ``coroutines``: ``iscoroutinefunction`` of a function or method read from its code flags, as
  inspect does on 3.11, without inspect's unwrapping (asked at every event, filter and API call).
* ``stanzaplugins``: ``register_stanza_plugin`` skipped when its registration is already in
  place (plugins repeat it for every stream: thousands of times in a host of identities).

Importing this package applies them (``xmpp.session`` does, so every client has them). To drop
one, delete its module and its import here: behaviour stays the same, only slower. On a new
slixmpp, run ``tests/test_slixfix.py``: it checks each patch still gives slixmpp's own result.
May import: nothing else of gridpresence.
"""

from gridpresence.xmpp.slixfix import api, coroutines, escape, scram, stanzapath, stanzaplugins  # noqa: F401  (applied on import)
