"""The embedded Prosody, end to end: real process, real TLS, real XMPP clients, no mocks."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import slixmpp
from cryptography import x509

from gridpresence.server import (
    AccountSpec,
    PortInUse,
    ProsodyMissing,
    ProsodyServer,
    RosterEntry,
    ServerError,
    ServerPorts,
    ensure_certificates,
    free_port,
    port_is_free,
    provision,
)
from gridpresence.server.certs import cert_ips
from gridpresence.server.prosody import TEMPLATE_PATH
from gridpresence.server.provision import encode_name, lua_string

DOMAIN = "localhost"
ALICE = AccountSpec(
    "alice",
    "alice-secret",
    # Quotes, backslash and non-ASCII in a name exercise the Lua string writer through Prosody.
    (RosterEntry(f"bob@{DOMAIN}", 'Bob "the" \\ Büilder', ("grid", "feeders")),),
)
BOB = AccountSpec("bob", "bob-secret", (RosterEntry(f"alice@{DOMAIN}", "Alice", ("grid",)),))
LOGIN_TIMEOUT = 10.0


def prosody_pids(config: Path) -> list[str]:
    """Pids of Prosody processes started with `config` (others' servers are none of our business)."""
    found = subprocess.run(["pgrep", "-f", f"prosody --config {config}"], capture_output=True, text=True)
    return found.stdout.split()


@pytest.fixture(scope="module")
async def server(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[ProsodyServer]:
    srv = ProsodyServer(tmp_path_factory.mktemp("prosody"), domain=DOMAIN, component_secret="s3cret")
    provision(srv.storage_path, DOMAIN, [ALICE, BOB])
    async with srv:
        yield srv
    assert not srv.running
    assert prosody_pids(srv.config_path) == []


# --- helpers ----------------------------------------------------------------------------------


async def login(srv: ProsodyServer, user: str, password: str) -> slixmpp.ClientXMPP:
    """A slixmpp client with a live, authenticated session (TLS verified against the CA)."""
    xmpp = slixmpp.ClientXMPP(f"{user}@{srv.domain}/test", password)
    xmpp.ca_certs = str(srv.certs.ca)
    started = first_event(xmpp, "session_start")

    def fail(reason: str) -> None:
        if not started.done():
            started.set_exception(AssertionError(f"{user}: {reason}"))

    xmpp.add_event_handler("failed_all_auth", lambda _: fail("authentication failed"))
    xmpp.add_event_handler("disconnected", lambda _: fail("disconnected before the session started"))
    xmpp.connect(host=srv.connect_host, port=srv.ports.c2s)
    try:
        await asyncio.wait_for(started, LOGIN_TIMEOUT)
    except BaseException:
        xmpp.abort()
        raise
    return xmpp


def first_event(
    client: slixmpp.BaseXMPP, event: str, wanted: Callable[[Any], bool] = lambda _: True
) -> asyncio.Future[Any]:
    """A future resolved with the first `event` payload for which `wanted` is true."""
    future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()

    def handler(payload: Any) -> None:
        if not future.done() and wanted(payload):
            future.set_result(payload)

    client.add_event_handler(event, handler)
    return future


def sent_by(jid: str) -> Callable[[Any], bool]:
    """Stanza filter: from this bare JID."""
    return lambda stanza: stanza["from"].bare == jid


async def logout(*clients: slixmpp.BaseXMPP) -> None:
    await asyncio.gather(*(asyncio.wait_for(c.disconnect(wait=1.0), 5.0) for c in clients))


async def raw_stream(srv: ProsodyServer, send: bytes, until: bytes) -> bytes:
    """Talk unencrypted XMPP on the c2s port; return what arrived up to `until` (or close)."""
    reader, writer = await asyncio.open_connection(srv.connect_host, srv.ports.c2s)
    try:
        writer.write(send)
        received = b""
        async with asyncio.timeout(5.0):
            while until not in received:
                chunk = await reader.read(4096)
                if not chunk:
                    break
                received += chunk
        return received
    finally:
        writer.close()
        await writer.wait_closed()


STREAM_HEADER = (
    f"<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='{DOMAIN}' version='1.0' "
    "xmlns:stream='http://etherx.jabber.org/streams'>"
).encode()


# --- certificates -----------------------------------------------------------------------------


def test_certificates_created_once_and_reissued_per_domain(tmp_path: Path) -> None:
    first = ensure_certificates(tmp_path, "grid.example", ("127.0.0.1", "10.1.2.3"))
    assert (first.key.stat().st_mode & 0o777) == 0o600
    assert ((tmp_path / "ca-key.pem").stat().st_mode & 0o777) == 0o600
    cert = x509.load_pem_x509_certificate(first.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(sans.get_values_for_type(x509.DNSName)) == {"grid.example", "*.grid.example", "localhost"}
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.1.2.3"}
    assert cert.not_valid_after_utc - cert.not_valid_before_utc > dt.timedelta(days=3649)

    before = {p: p.read_bytes() for p in (first.ca, first.cert, first.key)}
    again = ensure_certificates(tmp_path, "grid.example", ("127.0.0.1",))
    assert again == first and {p: p.read_bytes() for p in before} == before  # reused, untouched

    ensure_certificates(tmp_path, "other.example")
    assert first.ca.read_bytes() == before[first.ca]  # CA kept: clients' trust survives
    assert first.cert.read_bytes() != before[first.cert]  # server cert reissued for the new name


async def test_tls_verifies_with_ca_and_hostname(server: ProsodyServer) -> None:
    trusted = ssl.create_default_context(cafile=str(server.certs.ca))
    for name in (DOMAIN, "127.0.0.1"):
        _, writer = await asyncio.open_connection(
            server.connect_host, server.ports.https, ssl=trusted, server_hostname=name
        )
        assert writer.get_extra_info("peercert")["subject"] == ((("commonName", DOMAIN),),)
        writer.close()
        await writer.wait_closed()
    with pytest.raises(ssl.SSLCertVerificationError):  # wrong name (an IP: no SNI), same CA
        await asyncio.open_connection(
            server.connect_host, server.ports.https, ssl=trusted, server_hostname="127.0.0.2"
        )
    with pytest.raises(ssl.SSLCertVerificationError):  # right name, CA not trusted
        await asyncio.open_connection(
            server.connect_host, server.ports.https, ssl=ssl.create_default_context(), server_hostname=DOMAIN
        )


# --- XMPP -------------------------------------------------------------------------------------


async def test_provisioned_roster_presence_and_messages(server: ProsodyServer) -> None:
    alice = await login(server, "alice", ALICE.password)
    bob_seen_by_alice = first_event(alice, "presence_available", sent_by(f"bob@{DOMAIN}"))
    await alice.get_roster()
    alice.send_presence()

    bob = await login(server, "bob", BOB.password)
    alice_seen_by_bob = first_event(bob, "presence_available", sent_by(f"alice@{DOMAIN}"))
    bob.add_event_handler(
        "message", lambda m: bob.send_message(m["from"], "echo: " + m["body"], mtype="chat")
    )
    await bob.get_roster()
    bob.send_presence()
    try:
        # Presence flows both ways only if the provisioned subscriptions are really "both".
        await asyncio.wait_for(asyncio.gather(bob_seen_by_alice, alice_seen_by_bob), 5.0)

        item = alice.client_roster[f"bob@{DOMAIN}"]
        assert item["subscription"] == "both"
        assert item["name"] == ALICE.roster[0].name
        assert set(item["groups"]) == {"grid", "feeders"}

        reply = first_event(alice, "message", sent_by(f"bob@{DOMAIN}"))
        alice.send_message(f"bob@{DOMAIN}", "feeder 7 tripped", mtype="chat")
        assert (await asyncio.wait_for(reply, 5.0))["body"] == "echo: feeder 7 tripped"
    finally:
        await logout(alice, bob)


async def test_reprovisioning_keeps_passwords_working(server: ProsodyServer) -> None:
    provision(server.storage_path, DOMAIN, [ALICE, BOB])  # new salts, same passwords, server running
    await logout(await login(server, "alice", ALICE.password))
    with pytest.raises(AssertionError, match="authentication failed"):
        await login(server, "alice", "not-the-password")


async def test_plaintext_login_refused(server: ProsodyServer) -> None:
    features = await raw_stream(server, STREAM_HEADER, b"</stream:features>")
    assert b"<required" in features.split(b"starttls", 1)[1]  # STARTTLS offered and mandatory
    assert b"PLAIN" not in features and b"<mechanisms" not in features  # no SASL before TLS

    plain = base64.b64encode(b"\0alice\0" + ALICE.password.encode())
    auth = b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>" + plain + b"</auth>"
    answer = await raw_stream(server, STREAM_HEADER + auth, b"</failure>")
    assert b"<encryption-required/>" in answer and b"<success" not in answer


async def test_devices_component_receives_messages(server: ProsodyServer) -> None:
    assert server.component_domain == f"devices.{DOMAIN}"
    component = slixmpp.ComponentXMPP(
        server.component_domain, "s3cret", server.connect_host, server.ports.component
    )
    ready = first_event(component, "session_start")
    received = first_event(component, "message", sent_by(f"alice@{DOMAIN}"))
    component.connect()
    alice = await login(server, "alice", ALICE.password)
    try:
        await asyncio.wait_for(ready, 5.0)
        alice.send_message(f"feeder7@{server.component_domain}", "open breaker", mtype="chat")
        assert (await asyncio.wait_for(received, 5.0))["body"] == "open breaker"
    finally:
        await logout(alice, component)


async def test_bulk_provisioning_1000_accounts(server: ProsodyServer) -> None:
    accounts = [
        AccountSpec(f"dev{i:04d}", f"pw-{i}", (RosterEntry(f"alice@{DOMAIN}", "Alice", ("grid",)),))
        for i in range(1000)
    ]
    started = time.perf_counter()
    provision(server.storage_path, DOMAIN, accounts)
    elapsed = time.perf_counter() - started
    print(f"\nprovisioned {len(accounts)} accounts in {elapsed:.2f} s")
    accounts_dir = server.storage_path / encode_name(DOMAIN) / "accounts"
    assert len(list(accounts_dir.glob("dev*.dat"))) == 1000
    await logout(await login(server, "dev0999", "pw-999"))  # Prosody reads what we wrote


def test_lua_string_round_trips_through_lua(tmp_path: Path) -> None:
    lua = shutil.which("lua5.4") or shutil.which("lua")
    if lua is None:
        pytest.skip("no Lua interpreter (Prosody's lua5.4 dependency) on PATH")
    nasty = 'q"uote\\back\nnl\r\t\x00\x01\x7f]]1ü'
    script = tmp_path / "t.lua"
    script.write_bytes(f"io.write({lua_string(nasty)})".encode())
    assert subprocess.run([lua, str(script)], capture_output=True, check=True).stdout == nasty.encode()


# --- BOSH -------------------------------------------------------------------------------------


async def test_bosh_answers_over_http_and_https(server: ProsodyServer) -> None:
    """BOSH answers on both ports, but offers logins only over HTTPS."""
    body = (
        f"<body rid='1' to='{DOMAIN}' xml:lang='en' wait='10' hold='1' ver='1.6' xmpp:version='1.0' "
        "xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh'/>"
    )
    tls = ssl.create_default_context(cafile=str(server.certs.ca))
    http = f"http://{server.connect_host}:{server.ports.http}/http-bind"
    https = f"https://{DOMAIN}:{server.ports.https}/http-bind"  # hostname checked against the cert
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        for url, ctx, offered in ((http, False, False), (https, tls, True)):
            async with session.get(url, ssl=ctx) as response:
                assert response.status == 200, url
            async with session.post(url, data=body, ssl=ctx) as response:
                text = await response.text()
                assert response.status == 200, url
                assert "sid=" in text, text  # session created
                assert ("SCRAM-SHA-1" in text) is offered and ("<mechanisms" in text) is offered, (url, text)


async def test_sasl_plain_over_plain_http_bosh_is_refused(server: ProsodyServer) -> None:
    """The server itself refuses a password on plain-HTTP BOSH (consider_bosh_secure = false),
    whatever the client does: <auth/> gets <encryption-required/>, never <success/>."""
    http = f"http://{server.connect_host}:{server.ports.http}/http-bind"
    ns = "xmlns='http://jabber.org/protocol/httpbind' xmlns:xmpp='urn:xmpp:xbosh'"
    create = f"<body rid='100' to='{DOMAIN}' wait='5' hold='1' ver='1.6' xmpp:version='1.0' {ns}/>"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        async with session.post(http, data=create) as response:
            text = await response.text()
        sid = text.split("sid='", 1)[1].split("'", 1)[0] if "sid='" in text else text.split('sid="', 1)[1].split('"', 1)[0]
        plain = base64.b64encode(b"\0alice\0" + ALICE.password.encode()).decode()
        auth = (f"<body rid='101' sid='{sid}' {ns}><auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' "
                f"mechanism='PLAIN'>{plain}</auth></body>")
        async with session.post(http, data=auth) as response:
            answer = await response.text()
    assert "encryption-required" in answer and "<success" not in answer, answer


# --- failures and ports ------------------------------------------------------------------------


async def test_port_in_use_names_the_setting(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        taken = squatter.getsockname()[1]
        ports = ServerPorts.choose("127.0.0.1")
        ports.c2s = taken
        srv = ProsodyServer(tmp_path, ports=ports)
        with pytest.raises(PortInUse, match=rf"port {taken} .*c2s") as caught:
            await srv.start()
    assert caught.value.setting == "c2s" and caught.value.port == taken
    assert not srv.running


async def test_missing_binary_says_how_to_install(tmp_path: Path) -> None:
    srv = ProsodyServer(tmp_path, prosody_bin="/nonexistent/bin/prosody")
    with pytest.raises(ProsodyMissing, match="apt-get install prosody"):
        await srv.start()
    assert not srv.running


async def test_early_exit_reports_log_tail(tmp_path: Path) -> None:
    broken = tmp_path / "broken.cfg.lua.tmpl"
    broken.write_text(TEMPLATE_PATH.read_text() + "\nthis is not Lua (\n")
    srv = ProsodyServer(tmp_path / "data", template_path=broken)
    with pytest.raises(ServerError, match=r"(?s)exited with status \d+.*syntax error"):
        await srv.start()
    assert not srv.running
    assert prosody_pids(srv.config_path) == []


async def test_second_server_on_same_data_dir_refused(server: ProsodyServer) -> None:
    twin = ProsodyServer(server.data_dir, domain=DOMAIN, ports=ServerPorts.choose("127.0.0.1"))
    with pytest.raises(ServerError, match="already running"):
        await twin.start()
    assert not twin.running and server.running


def test_ports_persist_between_runs(tmp_path: Path) -> None:
    server = ProsodyServer(tmp_path)
    first = server.ports
    assert not (tmp_path / "ports.json").exists(), "ports are remembered when the config is rendered, not before"
    server.render()
    assert ProsodyServer(tmp_path).ports == first
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first.http))
        squatter.listen(1)
        moved = ProsodyServer(tmp_path)
        moved.render()
    assert moved.ports != first and len(set(vars(moved.ports).values())) == 4
    assert ProsodyServer(tmp_path).ports == moved.ports  # the new choice is what gets remembered


def test_config_is_written_only_when_the_rendering_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = ProsodyServer(tmp_path).render()
    written = config.stat().st_mtime_ns, config.read_text()
    time.sleep(0.01)
    ProsodyServer(tmp_path).render()
    assert (config.stat().st_mtime_ns, config.read_text()) == written, "an unchanged rendering rewrote the file"
    # Another log level changes the rendering: written again, nothing else to keep.
    ProsodyServer(tmp_path, log_level="debug").render()
    assert 'min = "debug"' in config.read_text() and not config.with_name("prosody.cfg.lua.edited").exists()
    # A hand edit is kept aside, with a warning, before the config is rendered again.
    edited = config.read_text() + "\n-- my own setting\nc2s_timeout = 60\n"
    config.write_text(edited)
    ProsodyServer(tmp_path, log_level="debug").render()
    assert config.with_name("prosody.cfg.lua.edited").read_text() == edited
    assert "my own setting" not in config.read_text() and "edited by hand" in caplog.text


async def test_second_server_on_same_data_dir_writes_nothing(server: ProsodyServer) -> None:
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in (server.config_path, server.data_dir / "ports.json")}
    twin = ProsodyServer(server.data_dir, domain=DOMAIN, log_level="debug")  # its rendering would differ
    with pytest.raises(ServerError, match="already running"):
        twin.render()
    with pytest.raises(ServerError, match="already running"):
        await twin.start()
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before} == before


def test_port_helpers() -> None:
    port = free_port()
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen(1)
        assert not port_is_free("127.0.0.1", port)


def test_a_service_certificate_from_the_same_ca_names_its_address(tmp_path: Path) -> None:
    server = ensure_certificates(tmp_path, DOMAIN)
    relay = ensure_certificates(tmp_path, DOMAIN, cert_ips("10.99.0.1"), service="relay")
    assert relay.ca == server.ca and relay.cert.name == "relay.pem" and relay.cert != server.cert
    cert = x509.load_pem_x509_certificate(relay.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "10.99.0.1"}
    assert cert_ips("grid.example") == ["127.0.0.1"]
