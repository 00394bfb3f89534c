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


def test_stanzapath_match_is_slixmpps_own() -> None:
    """The kept split gives slixmpp's own answer for the paths our handlers and slixmpp's plugins
    register, on stanzas with and without the payloads they look for (jabber:client and a
    component stream's namespace)."""
    from xml.etree import ElementTree as ET

    from slixmpp import Iq, Presence
    from slixmpp.xmlstream.matcher.stanzapath import StanzaPath

    from gridpresence.protocol import openpgp  # noqa: F401  (registers <openpgp/>)
    from gridpresence.protocol import stanzas  # noqa: F401  (registers the grid payloads)
    from gridpresence.xmpp.slixfix import stanzapath as fast

    assert StanzaPath.match is fast.match
    paths = ["message/grid_outcome", "message/grid_alarm", "message/openpgp", "message/grid_device", "presence",
             "iq@type=get/ping", "iq@type=set/roster", "iq/disco_info", "message/form", "message/body",
             "message/pubsub_event/items", "message@type=chat/body", "iq@type=get/grid_fleet_health"]
    xml = ["<message xmlns='{ns}'><outcome xmlns='urn:gridpresence:0'/></message>",
           "<message xmlns='{ns}' type='chat'><body>hi</body></message>",
           "<message xmlns='{ns}'><openpgp xmlns='urn:xmpp:openpgp:0'>x</openpgp></message>",
           "<message xmlns='{ns}'><event xmlns='http://jabber.org/protocol/pubsub#event'><items node='n'/></event></message>",
           "<presence xmlns='{ns}'><device xmlns='urn:gridpresence:0'/></presence>",
           "<iq xmlns='{ns}' type='get' id='1'><ping xmlns='urn:xmpp:ping'/></iq>",
           "<iq xmlns='{ns}' type='set' id='2'><query xmlns='jabber:iq:roster'/></iq>",
           "<iq xmlns='{ns}' type='result' id='3'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
           "<message xmlns='{ns}'/>"]
    kinds = {"message": Message, "presence": Presence, "iq": Iq}
    checked = 0
    for ns in ("jabber:client", "jabber:component:accept"):
        for text in xml:
            el = ET.fromstring(text.format(ns=ns))
            stanza = kinds[el.tag.split("}")[1]](xml=el)
            for path in paths:
                matcher = StanzaPath(path)
                for _ in range(2):  # the first fills the kept split, the second uses it
                    assert fast.match(matcher, stanza) == fast._slixmpp_match(matcher, stanza), (path, text, ns)
                    checked += 1
    assert checked == 2 * len(xml) * len(paths) * 2


def test_a_stanza_plugin_registration_in_place_is_skipped_and_any_other_is_slixmpps() -> None:
    from slixmpp.xmlstream import ElementBase, stanzabase

    from gridpresence.xmpp.slixfix import stanzaplugins

    class Parent(ElementBase):
        name, namespace, plugin_attrib = "parent", "urn:test:slixfix", "parent"

    class Child(ElementBase):
        name, namespace, plugin_attrib, plugin_multi_attrib = "child", "urn:test:slixfix", "child", "children"

    class Other(ElementBase):
        name, namespace, plugin_attrib = "other", "urn:test:slixfix2", "child"

    assert stanzabase.register_stanza_plugin is stanzaplugins.register_stanza_plugin
    assert not stanzaplugins.in_place(Parent, Child, iterable=True)
    stanzabase.register_stanza_plugin(Parent, Child, iterable=True)
    multi, maps = Parent.plugin_attrib_map["children"], Parent.plugin_attrib_map
    assert stanzaplugins.in_place(Parent, Child, iterable=True)
    stanzabase.register_stanza_plugin(Parent, Child, iterable=True)  # in place: skipped, nothing rebuilt
    assert Parent.plugin_attrib_map is maps and Parent.plugin_attrib_map["children"] is multi
    stanzabase.register_stanza_plugin(Parent, Other)  # another plugin for the attribute: slixmpp's own
    assert Parent.plugin_attrib_map["child"] is Other and not stanzaplugins.in_place(Parent, Child, iterable=True)
    stanzabase.register_stanza_plugin(Parent, Child, iterable=True)  # and back, again by slixmpp
    assert Parent.plugin_attrib_map["child"] is Child
    parent = Parent()
    parent.append(Child())
    assert len(parent["children"]) == 1

    class Overriding(ElementBase):
        name, namespace, plugin_attrib = "over", "urn:test:slixfix3", "over"
        interfaces, overrides = {"x"}, ["set_x"]

    class Rival(ElementBase):
        name, namespace, plugin_attrib = "rival", "urn:test:slixfix4", "rival"
        interfaces, overrides = {"x"}, ["set_x"]

    assert not stanzaplugins.in_place(Parent, Overriding, overrides=True)
    stanzabase.register_stanza_plugin(Parent, Overriding, overrides=True)
    assert stanzaplugins.in_place(Parent, Overriding, overrides=True)
    stanzabase.register_stanza_plugin(Parent, Rival, overrides=True)  # takes the override over
    assert not stanzaplugins.in_place(Parent, Overriding, overrides=True)
    assert stanzaplugins.in_place(Parent, Overriding)  # still registered, without its override


async def test_api_tables_made_when_a_handler_goes_in_and_answers_as_slixmpps() -> None:
    from slixmpp import ComponentXMPP

    from gridpresence.xmpp.slixfix import api

    xmpp = ComponentXMPP("c.example", "secret", "127.0.0.1", 1)
    reg = xmpp.api
    reg.register(lambda jid, node, ifrom, args: "global", "t", "op", default=True)
    entry = reg._handlers["t"]["op"]
    assert entry["jid"] is api._NONE and entry["node"] is api._NONE
    assert await reg.run("t", "op", "a@c.example") == "global"
    reg.register(lambda jid, node, ifrom, args: "for a", "t", "op", jid="a@c.example")
    reg.register(lambda jid, node, ifrom, args: "for a/n", "t", "op", jid="a@c.example", node="n")
    assert await reg.run("t", "op", "a@c.example") == "for a" and await reg.run("t", "op", "a@c.example", "n") == "for a/n"
    assert await reg.run("t", "op", "b@c.example") == "global"
    reg.restore_default("t", "op", "a@c.example")  # slixmpp's: the default handler for that JID
    assert await reg.run("t", "op", "a@c.example") == "global"
    reg._setup("t", "other")  # a new operation's entry: shared tables again
    assert reg._handlers["t"]["other"]["jid"] is api._NONE


async def test_api_register_writes_what_slixmpps_writes() -> None:
    """Seeded sequences of registrations (global, per JID, per node, default or not, handler or
    None) leave the same tables, and the same answers, as slixmpp's own register."""
    from slixmpp import ComponentXMPP
    from slixmpp.api import APIRegistry

    from gridpresence.xmpp.slixfix import api

    class Slixmpps(APIRegistry):
        _setup = api._slixmpp_setup
        register = api._slixmpp_register

    def plain(reg: APIRegistry) -> tuple[object, object]:
        tables = {c: {o: {k: (dict(v) if k != "global" else v) for k, v in e.items()} for o, e in ops.items()}
                  for c, ops in reg._handlers.items()}
        return tables, reg._handler_defaults

    xmpp = ComponentXMPP("c.example", "secret", "127.0.0.1", 1)
    handlers = [lambda jid, node, ifrom, args, i=i: i for i in range(4)]
    rng = random.Random(1616)
    for _ in range(200):
        ours, theirs = APIRegistry(xmpp), Slixmpps(xmpp)
        assert type(ours).register is api.register
        for _ in range(rng.randint(1, 12)):
            args = (rng.choice([*handlers, None]), rng.choice(["a", "b"]), rng.choice(["op", "other"]),
                    rng.choice([None, "x@c.example", "y@c.example"]), rng.choice([None, "n"]), rng.random() < 0.5)
            if args[0] is None and args[3] is None and args[4] is None:
                continue  # slixmpp's own KeyError either way (it looks the default up by op alone)
            ours.register(*args)
            theirs.register(*args)
            assert plain(ours) == plain(theirs), args
        for ctype, ops in theirs._handlers.items():
            for op in ops:
                for jid, node in ((None, None), ("x@c.example", None), ("x@c.example", "n"), ("z@c.example", "n")):
                    assert await ours.run(ctype, op, jid, node) == await theirs.run(ctype, op, jid, node)


def test_iscoroutinefunction_gives_inspects_answer() -> None:
    import functools
    import inspect

    from slixmpp.xmlstream import xmlstream

    from gridpresence.xmpp.slixfix import coroutines

    async def coro() -> None: ...

    def plain() -> None: ...

    class Thing:
        async def method(self) -> None: ...

        def sync(self) -> None: ...

        async def __call__(self) -> None: ...

    thing = Thing()
    for obj in (coro, plain, thing.method, thing.sync, Thing.method, functools.partial(coro), thing, len, None, lambda: 0):
        assert coroutines.iscoroutinefunction(obj) == inspect.iscoroutinefunction(obj), obj
    if not hasattr(inspect, "markcoroutinefunction"):
        assert xmlstream.iscoroutinefunction is coroutines.iscoroutinefunction
