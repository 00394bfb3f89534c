"""Hosted identities share one set of slixmpp's plugins per process (xmpp/component.py,
SHARED_PLUGINS): what each identity's disco says must be what slixmpp's own plugins, one set per
stream, would have written for its JID. Seeded: random plugin sets, orders and identities,
against a stream that registers the same plugins the ordinary way. (tests/test_hosting_parity.py
and tests/test_adhoc.py ask a real server's hosted identities the same questions as c2s bots.)"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Iterator
from typing import Any
from xml.etree import ElementTree as ET

import pytest
from slixmpp import JID
from slixmpp.basexmpp import BaseXMPP

from gridpresence.xmpp.component import (COMMANDS_NS, NS, SHARED_PLUGINS, ComponentLink, HostedClient, HostedStore,
                                         set_software_version)

DOMAIN = "devices.test"
# What the device bots register (device/adhoc.py, security/pep_keyring.py), with configurations.
# Every one has xep_0060 (its keyring): the shared xep_0131 lists the SubID header it adds.
CHOICES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("xep_0004", {}), ("xep_0050", {}), ("xep_0092", {"software_name": "gridpresence device", "version": "9"}),
    ("xep_0115", {"caps_node": "urn:gridpresence:caps"}), ("xep_0128", {}), ("xep_0131", {}),
)
KEYRING = ("xep_0060", {})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    yield loop
    asyncio.set_event_loop(None)
    loop.close()


def _link() -> ComponentLink:
    return ComponentLink(DOMAIN, "secret", "127.0.0.1", 1, HostedStore(None))


def _own(jid: str, plugins: list[tuple[str, dict[str, Any]]], link: ComponentLink) -> BaseXMPP:
    """A stream of its own, in component mode, with its own plugins: slixmpp's way, the reference."""
    stream = BaseXMPP(jid, NS, ssl_context=link.ssl_context)  # (one TLS context: 0.2 s each)
    stream.is_component = True
    for name in ("xep_0030", "xep_0199"):  # what every HostedClient registers
        stream.register_plugin(name)
    for name, config in plugins:
        stream.register_plugin(name, dict(config))
    stream.session_bind_event.set()
    stream.event("session_bind", stream.boundjid)
    return stream


def _disco(stream: Any, jid: str) -> dict[str, tuple[frozenset[str], frozenset[Any], frozenset[Any]]]:
    """Every disco node kept for ``jid``: features, identities, items."""
    static = stream.plugin["xep_0030"].static
    return {node: (frozenset(kept["info"]["features"]), frozenset(kept["info"]["identities"]),
                   frozenset(kept["items"]["items"]))
            for (owner, node, _ifrom), kept in static.nodes.items() if owner == jid}


def _bound(hosted: HostedClient) -> None:
    """The disco part of a session's start (HostedClient._session_up, without the link)."""
    hosted.session_bind_event.set()
    hosted._bound_shared.clear()
    hosted._bind_shared()


def test_shared_disco_is_what_own_plugins_write(loop: asyncio.AbstractEventLoop) -> None:
    """One link for every round: an identity has the plugins it asked for, not every one the
    link shares for others."""
    rng = random.Random(16)
    link = _link()
    for _ in range(12):
        plugins = rng.sample(CHOICES, rng.randint(0, len(CHOICES)))
        plugins.insert(rng.randint(0, len(plugins)), KEYRING)
        names = [f"d{rng.randrange(10_000)}-{i}@{DOMAIN}" for i in range(rng.randint(1, 4))]
        hosted = [link.client(name) for name in names]
        for client in hosted:
            for name, config in plugins:
                client.register_plugin(name, dict(config))
        for client in hosted:
            _bound(client)
        for name, client in zip(names, hosted):
            want = _disco(_own(name, plugins, link), name)
            assert _disco(link, name) == want, (plugins, name)
            assert want  # there is something to compare: at least disco#info and ping
            # The plugins are the link's one instance; xep_0060 is each identity's own.
            for plugin in client.plugin:
                shared = client.plugin[plugin] is link.plugin.get(plugin, None)
                assert shared == (plugin in SHARED_PLUGINS), plugin
                assert (client.plugin[plugin].xmpp is client) == (plugin not in SHARED_PLUGINS)


def test_a_second_session_binds_as_the_first(loop: asyncio.AbstractEventLoop) -> None:
    """The commands node's items are emptied at each bind (xep_0050's own session_bind), and
    the features are there again, as a stream's own plugins would leave them."""
    link = _link()
    client = link.client(f"a@{DOMAIN}")
    for name, config in CHOICES:
        client.register_plugin(name, dict(config))
    _bound(client)
    static = link.plugin["xep_0030"].static
    static.add_node(client.boundjid.full, COMMANDS_NS)["items"].add_item(client.boundjid.full, node="status")
    _bound(client)
    assert _disco(link, client.boundjid.full) == _disco(_own(client.boundjid.full, list(CHOICES), link),
                                                        client.boundjid.full)


def test_a_plugin_enabled_after_the_bind_writes_at_once(loop: asyncio.AbstractEventLoop) -> None:
    link = _link()
    client = link.client(f"late@{DOMAIN}")
    _bound(client)
    client.register_plugin("xep_0050")
    features = _disco(link, client.boundjid.full)[""][0]
    assert COMMANDS_NS in features


def test_shared_plugin_configured_otherwise_is_refused(loop: asyncio.AbstractEventLoop) -> None:
    link = _link()
    link.client(f"a@{DOMAIN}").register_plugin("xep_0092", {"software_name": "x", "version": "1"})
    link.client(f"b@{DOMAIN}").register_plugin("xep_0092", {"software_name": "x", "version": "1"})
    with pytest.raises(ValueError, match="shared"):
        link.client(f"c@{DOMAIN}").register_plugin("xep_0092", {"software_name": "y", "version": "2"})


def test_each_identity_keeps_its_own_version(loop: asyncio.AbstractEventLoop) -> None:
    link = _link()
    a, b = link.client(f"a@{DOMAIN}"), link.client(f"b@{DOMAIN}")
    for client in (a, b):
        client.register_plugin("xep_0092", {"software_name": "dev", "version": "1.0"})
    set_software_version(a, "2.0")
    assert link.versions == {f"a@{DOMAIN}": "2.0"}
    assert link.plugin["xep_0092"].version == "1.0"  # b and every other identity: as configured


def test_an_adhoc_session_goes_on_only_at_its_identity(loop: asyncio.AbstractEventLoop) -> None:
    link = _link()
    link.client(f"a@{DOMAIN}").register_plugin("xep_0050")
    link.plugin["xep_0050"].sessions["s1"] = {"to": JID(f"a@{DOMAIN}")}
    bounced: list[tuple[str, str]] = []
    link._bounce = lambda xml, condition: bounced.append((xml.get("id") or "", condition))  # type: ignore[method-assign]

    def iq(to: str) -> ET.Element:
        xml = ET.Element(f"{{{NS}}}iq", {"type": "set", "id": "q1", "to": to, "from": "op@test/x"})
        ET.SubElement(xml, f"{{{COMMANDS_NS}}}command", {"node": "run", "sessionid": "s1", "action": "next"})
        return xml

    assert link._shared_iq(f"b@{DOMAIN}", iq(f"b@{DOMAIN}"))
    assert bounced == [("q1", "item-not-found")]
    other = ET.Element(f"{{{NS}}}iq", {"type": "get", "id": "q2", "to": f"a@{DOMAIN}"})
    ET.SubElement(other, "{http://jabber.org/protocol/pubsub}pubsub")
    assert not link._shared_iq(f"a@{DOMAIN}", other)  # the identity's own (its PEP service)


def test_a_shared_request_waiting_behind_presence_keeps_its_place(loop: asyncio.AbstractEventLoop) -> None:
    """What follows a waiting presence waits behind it (ComponentLink._spawn_event), shared
    requests too; one for an identity whose session ended meanwhile is dropped."""
    link = _link()
    a = link.client(f"a@{DOMAIN}")
    order: list[str] = []
    a.deliver = lambda xml: order.append(xml.tag.rpartition("}")[2])  # type: ignore[method-assign]
    link._shared_iq = lambda bare, xml: order.append("shared") or True  # type: ignore[method-assign,func-returns-value]
    a.transport = object()  # type: ignore[assignment]  (its session: up)
    link._backlog.append((a, ET.Element(f"{{{NS}}}presence", {"from": "op@test/x", "to": a.boundjid.bare})))
    ping = ET.Element(f"{{{NS}}}iq", {"type": "get", "id": "p", "from": "op@test/x", "to": a.boundjid.bare})
    ET.SubElement(ping, "{urn:xmpp:ping}ping")
    link._backlog.append((a, ping))
    link._drain()
    assert order == ["presence", "shared"]
    a.transport = None
    link._backlog.append((a, copy.deepcopy(ping)))
    link._drain()
    assert order == ["presence", "shared"]
