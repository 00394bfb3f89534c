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
