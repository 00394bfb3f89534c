"""BOSH against the real embedded Prosody: fallback, commands, status, XEP-0198 resumption."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from gridpresence.device.agent import DeviceAgent
from gridpresence.host.fleet import device_agent
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import Endpoint, SessionError, close_session, make_client, open_session
from gridpresence.protocol.models import Action, DeviceState, OutcomeStatus, RejectReason
from gridpresence.server import free_port
from gridpresence.server.certs import ensure_certificates
from gridpresence.transport.policy import ConnectionPolicy, discover_bosh_url
from conftest import Env, run_cli


def _device(env: Env, name: str, endpoint: Endpoint) -> DeviceAgent:
    return device_agent(env.fleet, name, endpoint, env.grid.secrets.password(name), PartyKeys.in_data_dir(env.data, name))


async def test_connection_file_gives_an_https_bosh_url(env: Env) -> None:
    url = env.grid.connection.server.bosh_url
    assert url is not None and url.startswith("https://") and url.endswith("/http-bind")


async def test_device_falls_back_to_bosh_and_obeys_an_unsolicited_shed(env: Env, alice: GridOperator) -> None:
    # Nothing listens on this port: the XMPP port "refuses", only HTTPS gets through.
    blocked = env.grid.endpoint.model_copy(update={"c2s_port": free_port()})
    device = _device(env, "remote-1", blocked)
    started = time.monotonic()
    await device.start()
    try:
        assert device.client.transport_name == "bosh"
        assert time.monotonic() - started < 5
        await alice.wait_for(lambda d: d["remote-1"].present and d["remote-1"].transport == "bosh", timeout=10)
        assert alice.devices["remote-1"].state is DeviceState.ON
        outcome = await alice.command("remote-1", Action.SHED)
        assert outcome.status is OutcomeStatus.EXECUTED and outcome.report is not None
        assert outcome.report.state is DeviceState.OFF and outcome.report.transport == "bosh"
        await alice.wait_for(lambda d: d["remote-1"].state is DeviceState.OFF, timeout=5)
        # The shed above was signed and verified over BOSH; the same account without its key is refused.
        key, alice.issuer.key = alice.issuer.key, None
        try:
            refused = await alice.command("remote-1", Action.RESTORE)
        finally:
            alice.issuer.key = key
        assert refused.reason is RejectReason.UNSIGNED and alice.devices["remote-1"].state is DeviceState.OFF
        code, out, err = await run_cli("status", "--connection", str(env.grid.connection_file))
        assert code == 0, err
        header, *rows = out.splitlines()
        assert "TRANSPORT" in header.split()
        row = next(r.split() for r in rows if r.startswith("remote-1 "))
        assert row[3] == "bosh"
        tcp_row = next(r.split() for r in rows if r.startswith("load-a "))
        assert tcp_row[3] == "tcp"
    finally:
        await device.stop()


async def test_reconnect_follows_the_policy_and_returns_to_tcp(env: Env) -> None:
    """On BOSH, the client keeps checking the XMPP port and moves back once it answers."""
    policy = ConnectionPolicy(tcp_timeout_s=1.0, tcp_retry_s=0.5)
    ep = env.grid.endpoint
    acc = env.grid.connection.operator("bob")
    client = make_client(f"{acc.jid}/retry", acc.password, ep, policy=policy)
    # First the XMPP port is wrong (blocked), so the session comes up over BOSH ...
    client.connect(ep.host, free_port())
    await asyncio.wait_for(client.wait_until("session_start", 10), 12)
    assert client.transport_name == "bosh"
    # ... then "the firewall opens": the address the probe checks is the real port.
    client.custom_address = (ep.host, ep.c2s_port)
    await asyncio.wait_for(client.wait_until("session_start", 10), 12)
    assert client.transport_name == "tcp"
    await close_session(client)


async def test_stream_management_acks_over_bosh_and_survives_a_cut(env: Env, alice: GridOperator) -> None:
    ep = env.grid.endpoint
    acc = env.grid.connection.operator("bob")
    client = make_client(f"{acc.jid}/sm", acc.password, ep, plugins=("xep_0198",),
                         policy=ConnectionPolicy(use_tcp=False))
    sm = client.plugin["xep_0198"]
    enabled = asyncio.ensure_future(client.wait_until("sm_enabled", 10))
    await open_session(client, ep)
    await enabled
    assert client.transport_name == "bosh" and sm.sm_id
    seen_by_alice: list[str] = []
    alice.client.add_event_handler("message", lambda m: seen_by_alice.append(m["body"]))
    client.send_message(mto=alice.client.boundjid.full, mbody="ack me")
    async with asyncio.timeout(5):
        while "ack me" not in seen_by_alice:
            await asyncio.sleep(0.05)
    sm.request_ack()  # <r/> over BOSH; the server's <a h='...'/> comes back in a response body
    async with asyncio.timeout(5):
        while sm.last_ack < sm.seq:
            await asyncio.sleep(0.05)
    assert sm.seq >= 1 and not sm.unacked_queue
    # A stanza is on its way when the network breaks: no terminate reaches the server.
    client.send_message(mto=alice.client.boundjid.full, mbody="in flight")
    for _ in range(3):
        await asyncio.sleep(0)
    assert client.bosh is not None
    client.bosh.abort()
    restarted = asyncio.ensure_future(client.wait_until("session_start", 15))
    client.connect(ep.host, ep.c2s_port)
    await restarted  # a fresh session: Prosody 0.12 cannot resume onto BOSH
    assert client.transport_name == "bosh"
    async with asyncio.timeout(10):
        while "in flight" not in seen_by_alice:
            await asyncio.sleep(0.05)
    await close_session(client)


async def test_host_meta_announces_the_bosh_endpoint(env: Env) -> None:
    """XEP-0156: a client that knows only the server's web address finds BOSH there."""
    from gridpresence.transport.tls import tls_context

    server = env.grid.server
    found = await discover_bosh_url(f"https://{server.connect_host}:{server.ports.https}",
                                    tls_context(server.certs.ca))
    assert found == server.bosh_url
    # A client that knows only the web origin finds BOSH there and logs in over it.
    acc = env.grid.connection.operator("bob")
    client = make_client(f"{acc.jid}/discovered", acc.password,
                         env.grid.endpoint.model_copy(update={"bosh_url": None}),
                         policy=ConnectionPolicy(use_tcp=False))
    assert client.bosh_url is None and client.web_url == server.web_url
    await open_session(client, env.grid.endpoint)
    assert client.transport_name == "bosh" and client.bosh_url == server.bosh_url
    await close_session(client)



async def test_bosh_trusts_only_the_embedded_ca(env: Env, tmp_path: Path) -> None:
    """HTTPS to BOSH is verified: a client that trusts another CA gets no session, and says why."""
    stranger = ensure_certificates(tmp_path / "other-ca", "localhost")
    acc = env.grid.connection.operator("bob")
    endpoint = env.grid.endpoint.model_copy(update={"ca_file": stranger.ca})
    client = make_client(f"{acc.jid}/untrusting", acc.password, endpoint, policy=ConnectionPolicy(use_tcp=False))
    with pytest.raises(SessionError, match="certificate verify failed"):
        await open_session(client, endpoint, timeout=4)
    assert client.transport_name is None


async def test_plain_http_bosh_is_served_but_never_carries_a_login(env: Env) -> None:
    """mod_bosh answers on the HTTP port too, but a grid client sends no credentials over it."""
    server = env.grid.server
    http_url = f"http://{server.connect_host}:{server.ports.http}/http-bind"
    create = ("<body xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh' rid='1000' "
              "to='localhost' wait='5' hold='1' ver='1.6' xmpp:version='1.0'/>")
    async with aiohttp.ClientSession() as http, http.post(http_url, data=create) as resp:
        assert resp.status == 200
        assert b"sid=" in await resp.read()
    acc = env.grid.connection.operator("bob")
    endpoint = env.grid.endpoint.model_copy(update={"bosh_url": http_url})
    client = make_client(f"{acc.jid}/plain", acc.password, endpoint, policy=ConnectionPolicy(use_tcp=False))
    started = time.monotonic()
    with pytest.raises(SessionError, match="login refused .*plain HTTP: credentials are only sent over HTTPS"):
        await open_session(client, endpoint, timeout=6)
    assert time.monotonic() - started < 3  # refused at once, not timed out


async def test_wrong_password_over_bosh_is_refused_clearly(env: Env) -> None:
    ep = env.grid.endpoint
    blocked = ep.model_copy(update={"c2s_port": free_port()})  # fall back first, then fail the login
    client = make_client("bob@localhost/wrong", "not-the-password", blocked, policy=ConnectionPolicy(tcp_timeout_s=1))
    with pytest.raises(SessionError, match=r"login refused \(wrong password or no such account\)"):
        await open_session(client, blocked, timeout=8)
