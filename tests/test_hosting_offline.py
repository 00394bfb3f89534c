"""Messages for a hosted device whose host is down are kept and delivered when it returns, as
Prosody's mod_offline does for an offline c2s device bot (server_config/
mod_gridpresence_hosted_offline.lua): a chat line is answered late by both kinds, with the
server's delay stamp; a signed command that outlives the outage is executed once and its
outcome reaches the waiting issuer, one that lapsed is refused "expired"; a full queue is
answered resource-constraint; what is kept survives a restart of Prosody; iq is not kept. A
command lost with a cut link (unread, or its outcome unwritten) is sent again when the identity
is back on the link's next session (a new resource), carried out once and answered once.

The devices run in this process (as tests/test_hosting_parity.py): a test takes the component
link (or a c2s device's session) down with no reconnect, and brings it back when it chooses.
"""

from __future__ import annotations

import asyncio
import re
import contextlib
import datetime as dt
import os
import random
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from xml.etree import ElementTree as ET
from xml.sax.saxutils import escape

import pytest
import pytest_asyncio
from slixmpp import Message
from slixmpp.exceptions import IqError
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import MatchXPath, StanzaPath

from chatpeer import ChatPeer, chat_peer
from conftest import hosted_fleet, running_grid, until
from gridpresence.config import Fleet, parse_fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.host.grid import Grid
from gridpresence.operator.library import GridOperator
from gridpresence.protocol.codec import outcome_from_xml, q
from gridpresence.protocol.models import Action, Command, DeviceState, Outcome, OutcomeStatus, RejectReason, utcnow
from gridpresence.xmpp.component import NS as COMPONENT_NS, ComponentLink
from gridpresence.xmpp.reconnect import reconnector_of
from gridpresence.xmpp.session import close_session, open_session

pytestmark = pytest.mark.timeout(120)

DELAY = "{urn:xmpp:delay}delay"
PROBE_NS = "urn:gridpresence:test:offline"
CAP = 100  # the module's default per hosted JID
WAIT_S = 12.0  # how long the server waits for a hosted JID after its host returns (300 s by default)
BACKGROUND = tuple(f"o-bg-{i:03d}" for i in range(150))  # more than the server pings at once (128)
HOSTED = ("o-chat", "o-cmd", "o-exp", "o-cap", "o-keep", "o-lost", *BACKGROUND)
C2S = "o-c2s"
FLEET = hosted_fleet([*({"name": n, "kind": "load", "rated_kw": 10} for n in HOSTED),
                      {"name": C2S, "kind": "load", "rated_kw": 10, "hosting": "c2s"}])


@dataclass
class Offline:
    grid: Grid
    fleet: Fleet

    def agent(self, name: str) -> DeviceAgent:
        assert self.grid.bots is not None
        return self.grid.bots.devices[name]

    @property
    def link(self) -> ComponentLink:
        assert self.grid.bots is not None and self.grid.bots.link is not None
        return self.grid.bots.link

    def operator(self, name: str) -> GridOperator:
        return GridOperator.from_connection(self.grid.connection, operator=name, resource=f"o-{os.urandom(3).hex()}")


@pytest_asyncio.fixture(scope="module")
async def offline(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Offline]:
    fleet = parse_fleet(FLEET)
    def wait_less(grid: Grid) -> None:
        grid.server.hosted_offline_wait_s = WAIT_S

    async with running_grid(fleet, tmp_path_factory.mktemp("offline"), prepare=wait_less,
                            only=[d.name for d in fleet.devices], dashboard=False) as grid:
        yield Offline(grid, fleet)


@contextlib.asynccontextmanager
async def down(env: Offline, watcher: ChatPeer, *, link: bool = True, c2s: bool = False) -> AsyncIterator[None]:
    """The component link (every hosted identity) and/or the c2s device's session closed, with
    no reconnect until the block ends; on entry the server has told `watcher` they are gone."""
    parties = [*([env.link] if link else []), *([env.agent(C2S).client] if c2s else [])]
    names = [*(HOSTED if link else ()), *((C2S,) if c2s else ())]
    roster = watcher.client.client_roster
    await until(lambda: all(roster[env.fleet.jid(n)].resources for n in names), 10, "every device online at first")
    for party in parties:
        reconnector_of(party).closing = True  # a loss now is ours: no try of its own
        await asyncio.wait_for(party.disconnect(wait=1.0), 3)
    await until(lambda: not any(roster[env.fleet.jid(n)].resources for n in names), 10,
                "the server telling the watcher they are gone")
    try:
        yield
        # What the watcher sent meanwhile has been read by the server before the host returns
        # (its stream is read in order: the answer to this ping comes after all of it).
        ping = watcher.client.make_iq_get(ito=env.fleet.domain)
        ping.append(ET.Element("{urn:xmpp:ping}ping"))
        await ping.send(timeout=10)
    finally:
        for party in parties:
            reconnector_of(party).closing = False
        if link:
            await env.link.start()
        if c2s:
            await open_session(env.agent(C2S).client, env.grid.endpoint)


def delays_seen(agent: DeviceAgent) -> list[ET.Element]:
    """The delay stamps (XEP-0203) on the chat lines the device receives from now on."""
    seen: list[ET.Element] = []
    agent.client.add_event_handler("message", lambda m: seen.extend(m.xml.findall(DELAY)))
    return seen


async def test_a_chat_line_to_an_offline_c2s_and_hosted_device_is_answered_when_each_returns(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "late")
    hosted, c2s = offline.fleet.jid("o-chat"), offline.fleet.jid(C2S)
    stamps = {hosted: delays_seen(offline.agent("o-chat")), c2s: delays_seen(offline.agent(C2S))}
    try:
        async with down(offline, bob, c2s=True):
            sent = utcnow().replace(microsecond=0)
            bob.say(hosted, "status")
            bob.say(c2s, "status")
            await asyncio.sleep(0.5)
            assert bob.replies.empty()  # no answer, and no error: kept
        replies: dict[str, str] = {}
        async with asyncio.timeout(10):
            while len(replies) < 2:  # in whichever order they come back
                msg = await bob.replies.get()
                replies[msg["from"].bare] = msg["body"]
        assert replies[hosted].startswith("o-chat (load)") and replies[c2s].startswith(f"{C2S} (load)"), replies
        # Each was delivered late, stamped by the server that kept it (the recipient's domain).
        for jid, domain in ((hosted, "devices.localhost"), (c2s, "localhost")):
            got = stamps[jid]
            assert len(got) == 1 and got[0].get("from") == domain, [ET.tostring(s) for s in got]
            stamp = dt.datetime.fromisoformat(got[0].get("stamp", "").replace("Z", "+00:00"))
            assert sent - dt.timedelta(seconds=1) <= stamp <= utcnow()
    finally:
        await close_session(bob.client)


async def test_a_command_outliving_the_outage_runs_once_one_that_lapsed_is_refused_expired(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "cmd-watch")
    async with offline.operator("alice") as alice:
        outcomes: list[tuple[str, Outcome]] = []
        alice.client.register_handler(Callback(
            "outcomes seen", StanzaPath("message/grid_outcome"),
            lambda m: outcomes.append((m["from"].bare, outcome_from_xml(m["grid_outcome"].xml)))))
        await alice.wait_for(lambda d: d["o-cmd"].present and d["o-exp"].present, timeout=10)
        lasting = Command.new(Action.SHED, alice.jid, serial=alice.serial_of(alice.devices["o-cmd"]), ttl_s=30)
        lapsing = Command.new(Action.SHED, alice.jid, serial=alice.serial_of(alice.devices["o-exp"]), ttl_s=1.0)
        cmd_jid, exp_jid = offline.fleet.jid("o-cmd"), offline.fleet.jid("o-exp")
        async with down(offline, bob):
            waiting = asyncio.ensure_future(alice.send_command(lasting, cmd_jid))
            late = asyncio.ensure_future(alice.send_command(lapsing, exp_jid))
            # The issuer gives the lapsed one up by itself; the other is still waited for.
            assert (await asyncio.wait_for(late, 5)).status is OutcomeStatus.EXPIRED
            assert not waiting.done()
        final = await asyncio.wait_for(waiting, 15)
        assert final.status is OutcomeStatus.EXECUTED, final.summary()
        assert final.report is not None and final.report.state is DeviceState.OFF
        # The device refused the lapsed one itself, and it did not act on it.
        await until(lambda: any(j == exp_jid and o.command_id == lapsing.id for j, o in outcomes), 10,
                    "o-exp's answer to the lapsed command")
        answer = next(o for j, o in outcomes if j == exp_jid and o.command_id == lapsing.id)
        assert answer.status is OutcomeStatus.EXPIRED
        assert offline.agent("o-exp").sim.state is DeviceState.ON
        await asyncio.sleep(0.5)  # any second copy (the issuer's resend to the new session) answered
        ran = [o for j, o in outcomes if o.command_id == lasting.id and o.status is OutcomeStatus.EXECUTED]
        assert len(ran) == 1, outcomes
        assert (await alice.command("o-cmd", Action.RESTORE)).ok
    await close_session(bob.client)


@pytest.mark.parametrize("lost", ["command", "outcome"])
async def test_a_command_lost_with_a_cut_link_is_sent_again_to_the_new_session_and_runs_once(
        offline: Offline, monkeypatch: pytest.MonkeyPatch, lost: str) -> None:
    """The host's socket is closed with a command in flight: unread (the server had written it
    to the old connection, so it keeps nothing), or carried out with its outcome not written
    yet. The link comes back on a session of its own, each identity's presence from a new
    resource: the operator sees a new session of the device, as for a c2s device's new login
    (tests/test_chaos.py), and sends the command still waiting again. The device carries it out
    once (a copy of one it had is answered from its replay memory); one outcome reaches the
    operator."""
    name = "o-lost"
    agent, link = offline.agent(name), offline.link
    carried_out: list[str] = []
    execute = agent.execute

    async def counted(cmd: Command, now: dt.datetime, *rest: str | None) -> Outcome:
        carried_out.append(cmd.id)
        return await execute(cmd, now, *rest)

    monkeypatch.setattr(agent, "execute", counted)
    cut: list[bytes] = []
    read, write = link.data_received, link.write_soon

    def cut_before_the_device_reads_it(data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if not cut and b"<openpgp" in raw and f"{agent.jid}/".encode() in raw:  # Prosody's quotes are single
            cut.append(raw)
            link.abort()  # as a crash: the socket closes with the command in its buffer
            return
        read(data)

    def cut_before_the_outcome_is_written(data: bytes) -> None:
        if not cut and b"<outcome " in data and re.search(rb"""from=["']""" + re.escape(agent.jid.encode()), data):
            cut.append(data)
            link.abort()  # the outcome goes with the socket
            return
        write(data)

    monkeypatch.setattr("gridpresence.xmpp.reconnect.backoff_delay", lambda *_a, **_k: 0.5)
    async with offline.operator("alice") as alice:
        outcomes: list[Outcome] = []
        alice.client.register_handler(Callback(
            "outcomes seen", StanzaPath("message/grid_outcome"),
            lambda m: m["from"].bare == agent.jid and outcomes.append(outcome_from_xml(m["grid_outcome"].xml))))
        # ... and those in the presence of the change (PROTOCOL.md, "Answered in presence").
        alice.client.add_event_handler("presence", lambda p: p["from"].bare == agent.jid and outcomes.extend(
            outcome_from_xml(el) for el in p.xml.findall(q("outcome"))))
        await alice.wait_for(lambda d: d[name].present, timeout=10)
        before = alice.devices[name].full_jid
        assert before == f"{agent.jid}/{link.session_resource}", before  # its presence names the link's session
        if lost == "command":
            monkeypatch.setattr(link, "data_received", cut_before_the_device_reads_it)
        else:
            monkeypatch.setattr(link, "write_soon", cut_before_the_outcome_is_written)
        outcome = await asyncio.wait_for(alice.command(name, Action.SHED), 20)
        assert cut, "the link was never cut"
        assert outcome.status is OutcomeStatus.EXECUTED, outcome.summary()
        assert outcome.report is not None and outcome.report.state is DeviceState.OFF
        after = alice.devices[name].full_jid
        assert after == f"{agent.jid}/{link.session_resource}" and after != before
        await asyncio.sleep(0.5)  # any further copy answered by now
        assert carried_out == [outcome.command_id]
        # The one outcome sent: the first (the copy's was the only one), or the copy's "replayed".
        answered_again = "answered again: the device had this command already" in outcome.detail
        assert answered_again is (lost == "outcome"), outcome.detail
        reason = RejectReason.REPLAYED if lost == "outcome" else None
        assert [(o.command_id, o.reason) for o in outcomes] == [(outcome.command_id, reason)]
        monkeypatch.setattr(link, "data_received", read)
        monkeypatch.setattr(link, "write_soon", write)
        assert (await alice.command(name, Action.RESTORE)).ok
    await until(lambda: all(offline.agent(n).client.is_connected() for n in HOSTED), 10, "every hosted identity back")


async def test_over_the_cap_the_sender_is_told_and_the_rest_arrive_in_order(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "cap")
    jid = offline.fleet.jid("o-cap")
    got: list[int] = []
    offline.agent("o-cap").client.register_handler(Callback(
        "probe", MatchXPath(f"{{{COMPONENT_NS}}}message/{{{PROBE_NS}}}n"),
        lambda m: got.append(int(m.xml.find(f"{{{PROBE_NS}}}n").get("i")))))  # type: ignore[union-attr]
    refused: list[str] = []
    bob.client.add_event_handler("message_error", lambda m: refused.append(m["error"]["condition"]))
    try:
        async with down(offline, bob):
            for i in range(CAP + 3):
                bob.client.send_raw(f"<message to='{jid}' type='normal'><n xmlns='{PROBE_NS}' i='{i}'/></message>")
            await until(lambda: len(refused) == 3, 5, "the three over the cap refused")
            assert refused == ["resource-constraint"] * 3
        await until(lambda: len(got) == CAP, 10, f"the {CAP} kept messages at o-cap")
        assert got == list(range(CAP))
        # Delivered and deleted: a second return of the host brings nothing again.
        async with down(offline, bob):
            pass
        await asyncio.sleep(1.0)
        assert len(got) == CAP
    finally:
        await close_session(bob.client)


async def test_a_fan_out_during_the_outage_reaches_every_identity_once_back(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "fan")
    got: dict[str, int] = {}

    def count(name: str) -> Callable[[Message], None]:
        return lambda _m: got.__setitem__(name, got.get(name, 0) + 1)

    for name in BACKGROUND:
        offline.agent(name).client.register_handler(Callback(
            "fan", MatchXPath(f"{{{COMPONENT_NS}}}message/{{{PROBE_NS}}}fan"), count(name)))
    try:
        async with down(offline, bob):
            for name in BACKGROUND:
                bob.client.send_raw(f"<message to='{offline.fleet.jid(name)}'><fan xmlns='{PROBE_NS}'/></message>")
            await asyncio.sleep(0.5)
        await until(lambda: len(got) == len(BACKGROUND), 20, "every identity's kept message")  # ~3 s
        await asyncio.sleep(0.5)
        assert set(got.values()) == {1}
    finally:
        await close_session(bob.client)


async def test_an_iq_to_a_hosted_device_whose_host_is_down_is_answered_an_error_not_kept(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "iq")
    try:
        async with down(offline, bob):
            iq = bob.client.make_iq_get(queryxmlns="urn:xmpp:ping", ito=offline.fleet.jid("o-chat"))
            with pytest.raises(IqError) as refused:
                await iq.send(timeout=5)
            # mod_component's answer for a component that is not there, as before this module.
            assert refused.value.iq["error"]["condition"] == "remote-server-timeout"
    finally:
        await close_session(bob.client)


async def test_kept_messages_survive_a_restart_of_prosody(offline: Offline) -> None:
    bob = await chat_peer(offline, "bob", "keep")
    jid = offline.fleet.jid("o-keep")
    try:
        async with down(offline, bob):
            bob.say(jid, "status")
            store = offline.grid.server.storage_path
            kept = await until(lambda: next(store.glob("devices*localhost/gridpresence*offline/o*keep.list"), None),
                               5, "o-keep's kept message on disk")
            restarts = len(offline.grid.server_restarts)
            os.kill(int(offline.grid.server.pidfile_path.read_text()), signal.SIGKILL)
            await until(lambda: len(offline.grid.server_restarts) > restarts, 20, "Prosody restarted")
            await until(lambda: reconnector_of(bob.client).online.is_set(), 20, "bob back on the new server")
        reply = await bob.reply_from(jid, timeout=15)
        assert reply["body"].startswith("o-keep (load)")
        await until(lambda: not kept.exists() or not kept.read_text().strip(), 5, "the kept message deleted")
    finally:
        await close_session(bob.client)


def kept_files(env: Offline, node: str) -> list[str]:
    return [p.name for p in env.grid.server.storage_path.glob("devices*localhost/gridpresence*offline/*.list")
            if p.read_text().strip() and p.name.replace("%2d", "-") == f"{node}.list"]


async def test_fuzzed_messages_while_the_host_is_down_leave_everything_serving(offline: Offline) -> None:
    """Seeded junk of every message type to a hosted JID (any resource) and to one no one
    hosts: groupchat is refused at once, the rest kept; the host returns and answers; what was
    kept for the JID no one hosts goes back to the sender as service-unavailable after the wait."""
    rng = random.Random(1616)
    bob = await chat_peer(offline, "bob", "fuzz")
    errors: list[tuple[str, str]] = []
    bob.client.add_event_handler("message_error", lambda m: errors.append((m["from"].bare, m["error"]["condition"])))
    hosted, nobody = offline.fleet.jid("o-chat"), "nobody@devices.localhost"
    groupchats = kept_for_nobody = 0
    try:
        async with down(offline, bob):
            for _ in range(60):
                kind = rng.choice(["chat", "normal", None, "headline", "error", "groupchat"])
                junk = escape("".join(rng.choice("abc<>&'\" \u00e9\U0001f600") for _ in range(rng.randint(0, 30))))
                to = rng.choice([hosted, hosted + "/x", hosted + "/" + "r" * 50, nobody, nobody + "/y"])
                inner = rng.choice([f"<body>{junk}</body>", f"<x xmlns='urn:fuzz'>{junk}</x>", ""])
                typed = f" type='{kind}'" if kind else ""
                bob.client.send_raw(f"<message to='{to}'{typed}>{inner}</message>")
                groupchats += kind == "groupchat"
                kept_for_nobody += to.startswith(nobody) and kind not in ("groupchat", "headline", "error")
            await until(lambda: len(errors) == groupchats, 5, "each groupchat refused at once")
            assert {c for _j, c in errors} <= {"service-unavailable"}, errors
            assert kept_files(offline, "nobody"), "the messages for nobody kept meanwhile"
        assert kept_for_nobody > 0 and groupchats > 0
        async with asyncio.timeout(10):  # the host serves (after answering what fuzz it was kept)
            bob.say(hosted, "status")
            while not (await bob.replies.get())["body"].startswith("o-chat (load)"):
                pass
        await until(lambda: len(errors) == groupchats + kept_for_nobody, WAIT_S + 10,
                    "what was kept for nobody returned to its sender")
        assert all(c == "service-unavailable" for _j, c in errors), errors
        assert {j for j, _c in errors[groupchats:]} == {nobody}
        assert not kept_files(offline, "nobody")
    finally:
        await close_session(bob.client)
