"""xmpp/dispatch.py: a hosted device's received stanzas go to exactly the handlers slixmpp's own
matching would pick (so the fast way refuses whatever the slow way refused), stanza shape by
stanza shape; the commands of a fan-out are matched from the cache. Seeded, bounded fuzz; no
server needed (the identities are built, never connected)."""

from __future__ import annotations

import copy
import random
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from slixmpp import JID
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchIDSender, StanzaPath

from gridpresence.config import parse_fleet
from gridpresence.host.fleet import FleetBots
from gridpresence.operator.tracker import DeviceView, PresenceTracker
from gridpresence.protocol import DeviceKind
from gridpresence.protocol.codec import command_to_xml
from gridpresence.protocol.models import NS as GRID, Action, Command
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.component import NS, HostedClient
from gridpresence.xmpp import dispatch as dispatch_module
from gridpresence.xmpp.dispatch import ShapeDispatch
from gridpresence.xmpp.session import Endpoint, make_client

CHILDREN = [
    f"<body>{{text}}</body>",
    "<body/>",
    "<subject>s</subject>",
    "<openpgp xmlns='urn:xmpp:openpgp:0'>{text}</openpgp>",
    "<x xmlns='jabber:x:data' type='form'><field var='a'><value>1</value></field></x>",
    "<event xmlns='http://jabber.org/protocol/pubsub#event'><items node='n'><item id='1'/></items></event>",
    "<event xmlns='http://jabber.org/protocol/pubsub#event'><purge node='n'/></event>",
    "<ping xmlns='urn:xmpp:ping'/>",
    "<query xmlns='http://jabber.org/protocol/disco#info'/>",
    "<query xmlns='http://jabber.org/protocol/disco#items'/>",
    "<query xmlns='jabber:iq:version'/>",
    "<command xmlns='http://jabber.org/protocol/commands' node='status' action='execute'/>",
    "<pubsub xmlns='http://jabber.org/protocol/pubsub'><items node='urn:xmpp:openpgp:0:public-keys'/></pubsub>",
    "<pubsub xmlns='http://jabber.org/protocol/pubsub#owner'><configure node='n'/></pubsub>",
    "<error type='cancel'><item-not-found xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error>",
    f"<tariff xmlns='{GRID}'/>",
    f"<firmware xmlns='{GRID}'/>",
    f"<device xmlns='{GRID}' kind='load' state='on'/>",
    "<show>away</show>",
    "<status>{text}</status>",
    "<unknown xmlns='urn:example:x'><deeper><deepest/></deeper></unknown>",
]
TYPES = {"message": [None, "normal", "chat", "headline", "error", "groupchat"],
         "iq": ["get", "set", "result", "error", None],
         "presence": [None, "unavailable", "probe", "subscribe", "error"]}


@pytest.fixture(scope="module")
def hosted(tmp_path_factory: pytest.TempPathFactory) -> HostedClient:
    fleet = parse_fleet({"domain": "localhost", "hosting": "component", "operators": [{"name": "op"}],
                         "devices": [{"name": "h-1", "kind": "load", "rated_kw": 10}]})
    bots = FleetBots(fleet, Endpoint(component_port=1),
                     Secrets(tmp_path_factory.mktemp("dispatch") / "secrets.json"), with_services=False)
    client = bots.devices["h-1"].client
    assert isinstance(client, HostedClient)
    client.init_plugins()
    return client


def stanza_xml(rng: random.Random, ns: str = NS) -> ET.Element:
    kind = rng.choice(list(TYPES))
    typ = rng.choice(TYPES[kind])
    children = "".join(rng.choice(CHILDREN).format(text=rng.choice(["", " ", "hi"]))
                       for _ in range(rng.randint(0, 3)))
    attrs = f" type='{typ}'" if typ else ""
    lang = rng.choice(["", " xml:lang='de'"])
    return ET.fromstring(f"<{kind} xmlns='{ns}' from='op@localhost/x' to='h-1@devices.localhost' "
                         f"id='i{rng.randrange(1000)}'{attrs}{lang}>{children}</{kind}>")


def slow(client: Any, xml: ET.Element) -> list[object]:
    stanza = client._build_stanza(client.incoming_filter(xml))
    return [h for h in client._XMLStream__handlers if h.match(stanza)]  # type: ignore[attr-defined]


def test_fast_dispatch_matches_what_slixmpp_matches(hosted: HostedClient) -> None:
    dispatch = ShapeDispatch(hosted)
    rng = random.Random(1616)
    for _ in range(1500):
        xml = stanza_xml(rng)
        stanza = hosted._build_stanza(hosted.incoming_filter(xml))
        assert dispatch.matching(stanza) == slow(hosted, xml), ET.tostring(xml)
    assert dispatch.fast > 200, "many fuzzed stanzas share a shape with an earlier one"


def test_an_operator_session_matches_what_slixmpp_matches() -> None:
    """make_client's streams (every c2s party) dispatch by shape too: same handlers."""
    client = make_client("op@localhost/x", "secret", Endpoint())
    client.register_handler(Callback("grid outcome", StanzaPath("message/grid_outcome"), lambda _s: None))
    dispatch = client._spawn_event.__self__  # type: ignore[attr-defined]
    assert isinstance(dispatch, ShapeDispatch)
    rng = random.Random(1617)
    for _ in range(800):
        xml = stanza_xml(rng, "jabber:client")
        stanza = client._build_stanza(xml)
        assert dispatch.matching(stanza) == slow(client, xml), ET.tostring(xml)  # type: ignore[arg-type]
    assert dispatch.fast > 100


def test_a_fan_out_of_commands_is_matched_from_the_cache(hosted: HostedClient) -> None:
    dispatch = ShapeDispatch(hosted)
    for i in range(50):
        cmd = Command.new(Action.SHED, "op@localhost", ttl_s=30)
        xml = ET.fromstring(f"<message xmlns='{NS}' from='op@localhost/x' to='h-1@devices.localhost' id='m{i}' "
                            "type='normal'/>")
        xml.append(command_to_xml(cmd))
        stanza = hosted._build_stanza(xml)
        matched = dispatch.matching(stanza)
        assert [h.name for h in matched] == ["grid command"]
    assert dispatch.fast == 49


def test_handlers_changing_or_not_by_shape_are_matched_the_slow_way(hosted: HostedClient) -> None:
    dispatch = ShapeDispatch(hosted)
    ping = ET.fromstring(f"<iq xmlns='{NS}' type='get' id='p1' from='op@localhost/x' to='h-1@devices.localhost'>"
                         "<ping xmlns='urn:xmpp:ping'/></iq>")
    # No handler of its own: pings are answered by the link's shared xep_0199 (the link routes them).
    assert [h.name for h in dispatch.matching(hosted._build_stanza(ping))] == []
    # A handler added later is seen at once (the cache is for one list of handlers only).
    extra = Callback("extra ping", StanzaPath("iq/ping"), lambda _s: None)
    hosted.register_handler(extra)
    try:
        assert [h.name for h in dispatch.matching(hosted._build_stanza(ping))] == ["extra ping"]
        # A matcher by id (an iq's answer) is not a matter of shape: every stanza the slow way.
        by_id = Callback("answer", MatchIDSender({"id": "p1", "self": hosted.boundjid, "peer": JID("op@localhost/x")}),
                         lambda _s: None)
        hosted.register_handler(by_id)
        before = dispatch.fast
        for _ in range(3):
            assert dispatch.matching(hosted._build_stanza(ping)) == slow(hosted, ping)
        assert dispatch.fast == before
        hosted.remove_handler("answer")
    finally:
        hosted.remove_handler("extra ping")
    assert [h.name for h in dispatch.matching(hosted._build_stanza(ping))] == []


def test_unhandled_iq_is_refused_by_the_fast_way_too(hosted: HostedClient) -> None:
    """An iq no handler takes gets slixmpp's feature-not-implemented, from the cache as at first."""
    dispatch = ShapeDispatch(hosted)
    answers: list[Any] = []
    hosted.send = lambda data, use_filters=True: answers.append(data)  # type: ignore[method-assign]
    try:
        for i in range(2):
            iq = ET.fromstring(f"<iq xmlns='{NS}' type='get' id='u{i}' from='op@localhost/x' "
                               "to='h-1@devices.localhost'><nothing xmlns='urn:example:none'/></iq>")
            dispatch.spawn(iq)
    finally:
        del hosted.send
    assert dispatch.fast == 1
    assert [(a["id"], a["type"], a["error"]["condition"]) for a in answers] == [
        ("u0", "error", "feature-not-implemented"), ("u1", "error", "feature-not-implemented")]


def test_copies_of_one_stanza_to_many_are_the_same_text_as_each_serialised_alone(hosted: HostedClient) -> None:
    """HostedClient._send_one serialises a broadcast presence once and changes only the root's
    "to" for each subscriber: byte for byte what slixmpp writes for each copy on its own."""
    from slixmpp.xmlstream import tostring

    sent: list[str] = []
    hosted.send_raw = lambda data: sent.append(data)  # type: ignore[method-assign]
    hosted.transport = object()  # type: ignore[assignment]
    try:
        xml = ET.fromstring(f"<presence xmlns='{NS}' from='h-1@devices.localhost'><status>to=\"x\"</status>"
                            f"<device xmlns='{GRID}' kind='load' state='off'/></presence>")
        contacts = ["op@localhost", "watchdog@localhost", "op@localhost/r&'1", "relay@localhost"]
        expected = []
        hosted._last_out = None
        for contact in contacts:
            xml.set("to", contact)
            expected.append(tostring(xml, xmlns=NS, stream=hosted, top_level=True))
            hosted._send_one(xml)
        assert sent == expected and len(set(sent)) == len(contacts)
        xml.set("type", "unavailable")  # another attribute changed: serialised afresh
        hosted._send_one(xml)
        assert 'type="unavailable"' in sent[-1]
    finally:
        hosted.transport = None
        del hosted.send_raw


def test_a_hosted_identity_sends_at_once_through_the_same_filters(hosted: HostedClient) -> None:
    """HostedClient.send: with an empty send queue and only synchronous filters, a stanza goes out
    at once, through every filter the queue's task would run (_route sets our "from")."""
    sent: list[str] = []
    hosted.send_raw = lambda data: sent.append(data if isinstance(data, str) else data.decode())  # type: ignore[method-assign]
    hosted.transport = object()  # type: ignore[assignment]
    hosted._session_started = True
    try:
        hosted.make_message(mto="op@localhost", mbody="hello", mtype="chat").send()
        assert len(sent) == 1 and 'from="h-1@devices.localhost"' in sent[0] and "<body>hello</body>" in sent[0]
        assert hosted.waiting_queue.empty()
        hosted._session_started = False  # no session: slixmpp's own way (held back until there is one)
        hosted.make_message(mto="op@localhost", mbody="later", mtype="chat").send()
        assert len(sent) == 1
    finally:
        hosted._session_started = False
        hosted.transport = None
        del hosted.send_raw


async def test_a_trackers_device_presence_is_taken_fast_unless_another_handler_wants_it() -> None:
    """An operator's tracker takes its devices' presence straight from the XML (xmpp/dispatch.py
    presence takers): the same view as slixmpp's way; a handler of the party's own on the
    presence events sends every presence the slow way again, and it sees each."""
    client = make_client("op@localhost/x", "secret", Endpoint())
    tracker = PresenceTracker(client)
    dispatch = client.shape_dispatch  # type: ignore[attr-defined]
    jids = [f"d-{i:02d}@devices.localhost" for i in range(40)]
    for jid in jids:
        tracker.views[jid] = DeviceView(name=jid.split("@")[0], jid=jid, kind=DeviceKind.LOAD)

    def gone(jid: str) -> ET.Element:
        return ET.fromstring(f"<presence xmlns='jabber:client' from='{jid}/r' to='op@localhost/x' type='unavailable'>"
                             "<status>cut</status></presence>")

    for jid in jids[:20]:
        client._spawn_event(gone(jid))  # type: ignore[attr-defined]
    assert dispatch.taken == 19  # the first of its shape went slixmpp's way (which learns the shape)
    assert all(tracker.views[j].health_reason == "offline when the watch began" for j in jids[:20])
    seen: list[str] = []
    client.add_event_handler("presence", lambda pres: seen.append(pres["from"].bare))
    for jid in jids[20:]:
        client._spawn_event(gone(jid))  # type: ignore[attr-defined]
    assert dispatch.taken == 19 and seen == jids[20:]  # another handler: all the slow way, all seen
    assert all(tracker.views[j].health_reason == "offline when the watch began" for j in jids[20:])
    # Not a tracked device: never taken.
    client.del_event_handler("presence", client._XMLStream__event_handlers["presence"][-1][0])  # type: ignore[attr-defined]
    client._spawn_event(gone("stranger@localhost"))  # type: ignore[attr-defined]
    client._spawn_event(gone(jids[0]))  # type: ignore[attr-defined]
    assert dispatch.taken == 20


def test_identities_alike_share_what_matched_and_match_as_slixmpp(tmp_path: Any) -> None:
    """Hosted identities with the same handler list reuse one another's matches (a stanza shape
    new to this one is not matched handler by handler again), and still get slixmpp's answer;
    one whose list differs is matched on its own."""
    fleet = parse_fleet({"domain": "localhost", "hosting": "component", "operators": [{"name": "op"}],
                         "devices": [{"name": f"h-{i}", "kind": "load", "rated_kw": 10} for i in range(3)]})
    bots = FleetBots(fleet, Endpoint(component_port=1), Secrets(tmp_path / "secrets.json"), with_services=False)
    first, second, odd = (bots.devices[f"h-{i}"].client for i in range(3))
    odd.register_handler(Callback("odd ping", StanzaPath("iq/ping"), lambda _s: None))
    dispatch_module._SHARED.clear()  # what earlier tests' identities matched
    rng = random.Random(1618)
    samples = [stanza_xml(rng) for _ in range(200)]  # fewer shapes than MAX_SHAPES: none forgotten
    shapes = 0
    kept: dict[Any, list[Any]] = {}  # each stream's _matched keys (its shapes, as kept)
    for client in (first, second, odd):
        dispatch = ShapeDispatch(client)
        for xml in (copy.deepcopy(x) for x in samples):
            stanza = client._build_stanza(client.incoming_filter(xml))
            assert dispatch.matching(stanza) == slow(client, xml), ET.tostring(xml)
        kept[client] = list(dispatch._matched)
        if client is first:
            shapes = len(dispatch._matched)  # the shapes it matched itself, handler by handler
            assert shapes > 10 and dispatch.shared == 0
        elif client is second:
            assert dispatch.shared == shapes, "every shape the first identity matched"
            # Its shapes are the first's own objects: thousands of identities keep one copy.
            assert {id(k) for k in kept[client]} == {id(k) for k in kept[first]}
        else:
            assert dispatch.shared == 0, "no other stream with this handler list matched these shapes before"
