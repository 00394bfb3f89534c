"""Standard XMPP on device bots, driven the way Gajim drives them: disco#info, disco#items on the
commands node, execute, submit the form; plus caps in presence, software version and ping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from slixmpp import ClientXMPP, Presence
from slixmpp.exceptions import IqError

from conftest import Env
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session, make_client, open_session
from gridpresence.protocol import DeviceState
from gridpresence.protocol.alarm import AlarmKind

COMMANDS = "http://jabber.org/protocol/commands"


class Gajim:
    """What a desktop client does with ad-hoc commands, with slixmpp's own plugins."""

    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.caps: dict[str, str] = {}
        self.vers: dict[str, list[str]] = {}  # bare JID -> the caps versions its presence carried, in order
        self.stamps = 0  # the most caps elements one presence carried
        client.add_event_handler("presence_available", self._on_presence)

    def _on_presence(self, pres: Presence) -> None:
        if pres.xml.find("{http://jabber.org/protocol/caps}c") is not None:
            self.caps[pres["from"].bare] = pres["caps"]["node"]
            self.vers.setdefault(pres["from"].bare, []).append(pres["caps"]["ver"])
            self.stamps = max(self.stamps, len(pres.xml.findall("{http://jabber.org/protocol/caps}c")))

    async def execute(self, to: str, node: str) -> Any:
        iq = self.client.make_iq_set(ito=to)
        iq["command"]["node"] = node
        iq["command"]["action"] = "execute"
        return await iq.send(timeout=5)

    async def submit(self, to: str, first: Any, values: dict[str, str]) -> Any:
        iq = self.client.make_iq_set(ito=to)
        iq["command"]["node"] = first["command"]["node"]
        iq["command"]["sessionid"] = first["command"]["sessionid"]
        iq["command"]["action"] = "complete"
        form = self.client.plugin["xep_0004"].make_form(ftype="submit")
        for var, value in values.items():
            form.add_field(var=var, value=value)
        iq["command"].append(form)
        return await iq.send(timeout=5)


async def _gajim(env: Env, name: str) -> Gajim:
    client = make_client(f"{env.fleet.jid(name)}/gajim", env.grid.secrets.password(name), env.grid.endpoint,
                         plugins=("xep_0004", "xep_0050", "xep_0092"))
    gajim = Gajim(client)
    await open_session(client, env.grid.endpoint)
    await client.get_roster()
    client.send_presence()
    return gajim


@pytest_asyncio.fixture
async def gajim(env: Env) -> AsyncIterator[Gajim]:
    g = await _gajim(env, "bob")
    yield g
    await close_session(g.client)


def full(alice: GridOperator, name: str) -> str:
    jid = alice.devices[name].full_jid
    assert jid is not None
    return jid


async def test_disco_caps_version_ping(gajim: Gajim, alice: GridOperator) -> None:
    to = full(alice, "load-j")
    info = await gajim.client.plugin["xep_0030"].get_info(jid=to, timeout=5)
    features = set(info["disco_info"]["features"])
    assert {COMMANDS, "jabber:iq:version", "urn:xmpp:ping", "http://jabber.org/protocol/caps"} <= features
    items = await gajim.client.plugin["xep_0030"].get_items(jid=to, node=COMMANDS, timeout=5)
    nodes = {node: name for _jid, node, name in items["disco_items"]["items"]}
    assert nodes == {"status": "Status", "run": "Run a command", "ack-alarm": "Acknowledge an alarm",
                     "judge-alarm": "Judge an alarm"}
    assert {jid for jid, _node, _name in items["disco_items"]["items"]} == {to}
    for node, name in (("status", "Status"), ("judge-alarm", "Judge an alarm")):  # each command's own node
        at = await gajim.client.plugin["xep_0030"].get_info(jid=to, node=node, timeout=5)
        assert at["disco_info"]["identities"] == {("automation", "command-node", None, name)}
    version = await gajim.client.plugin["xep_0092"].get_version(to, timeout=5)
    assert version["software_version"]["name"] == "gridpresence device"
    assert await gajim.client.plugin["xep_0199"].ping(to, timeout=5) >= 0
    async with asyncio.timeout(5):  # a device's presence carries its caps
        while "load-j@localhost" not in gajim.caps:
            await asyncio.sleep(0.1)
    assert gajim.caps["load-j@localhost"] == "urn:gridpresence:caps"
    # The version checks out as a client verifies it (XEP-0115 §5.4): the hash of the device's
    # disco#info, which the caps node answers too; every presence of the session carried it.
    gajim.client.register_plugin("xep_0115")
    ver = gajim.client.plugin["xep_0115"].generate_verstring(info["disco_info"], "sha-1")
    assert set(gajim.vers["load-j@localhost"]) == {ver} and gajim.stamps == 1
    at_node = await gajim.client.plugin["xep_0030"].get_info(jid=to, node=f"urn:gridpresence:caps#{ver}", timeout=5)
    assert set(at_node["disco_info"]["features"]) == features


async def test_status_and_shed_through_forms(gajim: Gajim, alice: GridOperator) -> None:
    to = full(alice, "load-j")
    status = await gajim.execute(to, "status")
    assert status["command"]["status"] == "completed"
    values = status["command"]["form"].get_values()
    assert values["state"] == "on" and float(values["kw"]) > 0
    assert status["command"]["notes"][0][1].startswith("load-j (load) is on")

    form = await gajim.execute(to, "run")
    assert form["command"]["status"] == "executing" and "complete" in form["command"]["actions"]
    options = [o["value"] for o in form["command"]["form"].get_fields()["action"]["options"]]
    assert options == ["restore", "shed"]
    done = await gajim.submit(to, form, {"action": "shed"})
    assert done["command"]["status"] == "completed"
    result = done["command"]["form"].get_values()
    assert result["outcome"] == "executed" and result["state"] == "off"
    assert done["command"]["notes"][0] == ("info", done["command"]["notes"][0][1])
    assert done["command"]["notes"][0][1].startswith("Done: load shed.")
    await alice.wait_for(lambda d: d["load-j"].state is DeviceState.OFF, timeout=5)
    again = await gajim.submit(to, await gajim.execute(to, "run"), {"action": "restore"})
    assert again["command"]["form"].get_values()["outcome"] == "executed"
    await alice.wait_for(lambda d: d["load-j"].state is DeviceState.ON, timeout=5)


async def test_bad_form_input_and_unauthorised(env: Env, gajim: Gajim, alice: GridOperator) -> None:
    to = full(alice, "load-j")
    bad = await gajim.submit(to, await gajim.execute(to, "run"), {"action": "explode"})
    assert bad["command"]["status"] == "completed"
    assert bad["command"]["notes"][0][0] == "error" and "unknown action 'explode'" in bad["command"]["notes"][0][1]
    crit = full(alice, "load-crit3")
    with pytest.raises(IqError) as err:
        await gajim.execute(full(alice, "gen-2"), "nonexistent")
    assert err.value.condition == "item-not-found"
    stranger = await _gajim(env, "billing")
    try:
        with pytest.raises(IqError) as refused:
            await stranger.execute(crit, "run")
        assert refused.value.condition == "forbidden" and "not authorised" in refused.value.text
    finally:
        await close_session(stranger.client)
    assert (await gajim.execute(to, "status"))["command"]["form"].get_values()["state"] == "on"


async def test_acknowledge_alarm_through_form(env: Env, gajim: Gajim, alice: GridOperator) -> None:
    assert env.grid.bots is not None
    device = env.grid.bots.devices["hot-breaker"]
    to = full(alice, "hot-breaker")
    alarm = device.alarms.raise_alarm(AlarmKind.BREAKER_TRIPPED, 0.0, 0.0)
    form = await gajim.execute(to, "ack-alarm")
    options = {o["value"] for o in form["command"]["form"].get_fields()["alarm"]["options"]}
    assert alarm.id in options and "all" in options
    done = await gajim.submit(to, form, {"alarm": alarm.id})
    assert done["command"]["notes"][0][1] == f"Acknowledged: alarm {alarm.id} (breaker tripped)."
    assert alarm.id not in device.alarms.open
    empty = await gajim.execute(to, "ack-alarm")
    assert empty["command"]["status"] == "completed" and "no open alarms" in empty["command"]["notes"][0][1]


# -- the device's BARE JID, as Gajim and poezio address it (XEP-0050 §2.2) ------------------
# Both send exactly these stanzas, with a resource-less `to`, and take only an answer whose
# `from` is that bare JID (slixmpp's iq.send matches the sender the same way).


async def _bare_items(gajim: Gajim, bare: str) -> Any:
    iq = gajim.client.make_iq_get(ito=bare, queryxmlns="http://jabber.org/protocol/disco#items")
    iq["disco_items"]["node"] = COMMANDS
    return await iq.send(timeout=5)


async def test_command_list_and_multi_step_form_at_the_bare_jid(gajim: Gajim, alice: GridOperator) -> None:
    bare = "load-i@localhost"
    items = await _bare_items(gajim, bare)
    assert items["from"].full == bare  # the answer of the JID the client asked, not of a resource
    nodes = {node for _jid, node, _name in items["disco_items"]["items"]}
    assert {"status", "run", "ack-alarm", "judge-alarm"} <= nodes
    info = await gajim.client.plugin["xep_0030"].get_info(jid=bare, node=COMMANDS, timeout=5)
    assert info["from"].full == bare

    status = await gajim.execute(bare, "status")
    assert status["from"].full == bare and status["command"]["status"] == "completed"
    assert status["command"]["form"].get_values()["state"] == "on"

    form = await gajim.execute(bare, "run")  # step one: the form
    assert form["from"].full == bare and form["command"]["status"] == "executing"
    done = await gajim.submit(bare, form, {"action": "shed"})  # step two, same session, via the bare JID
    assert done["from"].full == bare and done["command"]["form"].get_values()["outcome"] == "executed"
    await alice.wait_for(lambda d: d["load-i"].state is DeviceState.OFF, timeout=5)
    back = await gajim.submit(bare, await gajim.execute(bare, "run"), {"action": "restore"})
    assert back["command"]["form"].get_values()["outcome"] == "executed"
    await alice.wait_for(lambda d: d["load-i"].state is DeviceState.ON, timeout=5)


async def test_bare_jid_commands_keep_authorisation_and_errors(env: Env, gajim: Gajim) -> None:
    with pytest.raises(IqError) as missing:
        await gajim.execute("gen-2@localhost", "nonexistent")
    assert missing.value.condition == "item-not-found" and missing.value.iq["from"].full == "gen-2@localhost"
    stranger = await _gajim(env, "billing")  # the device still sees who asks: not an operator
    try:
        with pytest.raises(IqError) as refused:
            await stranger.execute("load-crit3@localhost", "run")
        assert refused.value.condition == "forbidden" and "not authorised" in refused.value.text
    finally:
        await close_session(stranger.client)
    with pytest.raises(IqError) as offline:  # a device account with no resource online
        await _bare_items(gajim, "victim-2@localhost")
    assert offline.value.condition == "service-unavailable"
    with pytest.raises(IqError) as offline_exec:
        await gajim.execute("victim-2@localhost", "status")
    assert offline_exec.value.condition == "service-unavailable"


def test_caps_hashed_once_per_session_and_again_when_the_info_changes(tmp_path: Any, monkeypatch: Any) -> None:
    """The same session's same disco info is not hashed twice; a feature added (or removed) is
    hashed again, and every version is slixmpp's own hash of the info (no server needed)."""
    from gridpresence.config import parse_fleet
    from gridpresence.device.adhoc import AdhocDesk
    from gridpresence.host.fleet import FleetBots
    from gridpresence.server.accounts import Secrets
    from gridpresence.xmpp.session import Endpoint

    fleet = parse_fleet({"domain": "localhost", "hosting": "component", "operators": [{"name": "op"}],
                         "devices": [{"name": "h-1", "kind": "load", "rated_kw": 10}]})
    bots = FleetBots(fleet, Endpoint(component_port=1), Secrets(tmp_path / "secrets.json"), with_services=False)
    agent = bots.devices["h-1"]
    desk, client = agent.desk(AdhocDesk), agent.client
    caps, static = client.plugin["xep_0115"], client.plugin["xep_0030"].static
    hashed: list[str] = []
    slixmpps = caps.generate_verstring

    def counted(info: Any, hash_name: str) -> str:
        hashed.append(slixmpps(info, hash_name))
        return hashed[-1]

    monkeypatch.setattr(caps, "generate_verstring", counted)
    jid = client.boundjid.full

    def own_hash() -> str:
        return slixmpps(client.plugin["xep_0030"]._fix_default_info(static.get_info(jid, None, None, None)), "sha-1")

    first = desk._update_caps()
    assert first == own_hash() and len(hashed) == 1
    assert desk._update_caps() == first and len(hashed) == 1  # same session, same info: not hashed again
    info = static.add_node(jid)["info"]
    assert info.add_feature("urn:example:new")
    second = desk._update_caps()
    assert second != first and second == own_hash() and len(hashed) == 2
    info.del_feature("urn:example:new")
    assert desk._update_caps() == first == own_hash() and len(hashed) == 3
