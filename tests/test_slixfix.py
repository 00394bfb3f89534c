"""Each of our slixmpp patches (gridpresence.xmpp.slixfix) gives slixmpp's own result: run these
first on a new slixmpp. The escaping gives the same bytes as slixmpp's character-by-character
escaping for every kind of text; SCRAM's C PBKDF2 the same Hi() as slixmpp's loop."""

from __future__ import annotations

import importlib
import random

from slixmpp import Message

from gridpresence.xmpp.slixfix import escape as fast_escape

serialiser = importlib.import_module("slixmpp.xmlstream.tostring")


def test_slixmpp_serialises_with_the_fast_escape() -> None:
    assert serialiser.escape is fast_escape.escape
    msg = Message()
    msg["body"] = "shed <all> & 'then' \"restore\""
    msg["to"] = "a@b/c'd"
    wire = str(msg)
    assert "<body>shed &lt;all&gt; &amp; &apos;then&apos; &quot;restore&quot;</body>" in wire
    assert 'to="a@b/c&apos;d"' in wire


def test_same_output_as_slixmpps_own_escape() -> None:
    rng = random.Random(7)
    alphabet = "ab &<>'\";amp&amp;\u00e9\u20ac\n]]>"
    texts = ["", "&amp;", "]]>", "plain base64+/=="] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(3000)]
    for text in texts:
        assert fast_escape.escape(text) == fast_escape._slixmpp_escape(text), text
        assert fast_escape.escape(text, True) == fast_escape._slixmpp_escape(text, True), text


def test_fast_scram_matches_slixmpp_scram() -> None:
    """The C PBKDF2 we register for logins gives slixmpp's own Hi() result, byte for byte."""
    import hashlib

    from slixmpp.util.sasl.client import MECHANISMS
    from slixmpp.util.sasl.mechanisms import SCRAM

    from gridpresence.xmpp.slixfix.scram import FastSCRAM

    assert MECHANISMS["SCRAM-SHA-1"] is FastSCRAM
    for hash_fn, password in ((hashlib.sha1, "pässword"), (hashlib.sha256, "x" * 40)):
        ours, theirs = FastSCRAM.__new__(FastSCRAM), SCRAM.__new__(SCRAM)
        ours.hash = theirs.hash = hash_fn
        assert ours.Hi(password, b"salt-1", 4096) == SCRAM.Hi(theirs, password, b"salt-1", 4096)


def test_fast_stanza_path_matches_as_slixmpp_does() -> None:
    """The early reject gives slixmpp's own answer for every handler path on every kind of
    stanza (ours and slixmpp's registered paths, with attributes and plugins)."""
    from slixmpp import Iq, Presence
    from slixmpp.plugins.xep_0199 import Ping
    from slixmpp.xmlstream import register_stanza_plugin
    from slixmpp.xmlstream.matcher.stanzapath import StanzaPath

    from gridpresence.protocol import stanzas
    from gridpresence.xmpp.slixfix import matcher

    stanzas.register()
    register_stanza_plugin(Iq, Ping)
    assert StanzaPath.match is matcher.match
    paths = ["message/grid_command", "message/openpgp", "message/grid_tariff", "presence", "iq@type=get/ping",
             "iq@type=set/command", "message@type=error", "presence@type=unavailable", "message/body",
             "iq/disco_info", "message/pubsub_event/items", "{jabber:client}message", "iq@type=result"]
    msg = Message()
    msg["body"] = "x"
    err = Message()
    err["type"] = "error"
    ping = Iq()
    ping["type"] = "get"
    ping.enable("ping")
    gone = Presence()
    gone["type"] = "unavailable"
    samples = [msg, err, ping, gone, Presence(), Iq()]
    for path in paths:
        ours = StanzaPath(path)
        for stanza in samples:
            assert ours.match(stanza) == matcher._slixmpp_match(ours, stanza), (path, stanza)
    assert StanzaPath("presence").match(gone) and not StanzaPath("message/body").match(gone)
