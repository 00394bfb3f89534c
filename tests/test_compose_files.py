"""The compose demo's parts that need no Docker engine (tests/test_compose.py runs the stack):
the compose file against the demo fleet and the CLI, the containers' health checks on bad
input, and the provisioning step `init` runs, twice."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gridpresence.config import load_fleet
from gridpresence.gateway.site import load_site
from gridpresence.host import health
from gridpresence.transport.probe import established_to

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
FLEET = load_fleet(ROOT / "bots" / "demo-fleet.toml")
HELD_BACK = {"meter-9"}  # the demo fleet's mail-only meter (README: relay examples) runs in no container


def _cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gridpresence", *args], capture_output=True, text=True, timeout=timeout)


def test_every_device_runs_in_exactly_one_container() -> None:
    named: list[str] = []
    for svc in SERVICES.values():
        cmd = svc.get("command", [])
        if cmd[:2] == ["gridpresence", "bots"]:
            named += cmd[cmd.index("--only") + 1:]
        if cmd[:2] == ["gridpresence", "gateway"]:  # a field site's IEDs, each its own identity
            named += [ied.name for ied in load_site(ROOT / cmd[2].removeprefix("/app/")).ieds]
    devices = {d.name for d in FLEET.devices} | {ied.name for ref in FLEET.sites for ied in load_site(ref.path).ieds}
    parties = {"billing", "watchdog", "console"}
    assert sorted(named) == sorted(set(named)), "a bot in two containers would log in twice"
    assert set(named) == (devices - HELD_BACK) | parties


def test_services_share_one_volume_and_the_server_is_published() -> None:
    for name, svc in SERVICES.items():
        assert "grid-data:/data" in svc["volumes"], name
        assert svc.get("healthcheck", {}).get("disable") or svc["healthcheck"]["test"][:4] == [
            "CMD", "/opt/venv/bin/python", "-m", "gridpresence.host.health"], name
    assert any(p.endswith(":5222") for p in SERVICES["xmpp"]["ports"])
    assert any(p.endswith(":8443") for p in SERVICES["dashboard"]["ports"])
    assert SERVICES["xmpp"]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    assert "scenario" in SERVICES["scenario"]["profiles"]  # one-shot: `up` leaves it out
    assert set(COMPOSE["volumes"]) == {"grid-data"}


def test_the_field_sites_gateway_shares_the_sites_network_and_dials_its_ied_there() -> None:
    gateway, field = SERVICES["gateway"], SERVICES["field-site"]
    assert gateway["network_mode"] == "service:field-site" and "networks" not in gateway
    assert field["command"][:3] == ["gridpresence", "field-sim", gateway["command"][2]]  # one site file
    port = field["healthcheck"]["test"][-1]
    links = [ied.link for ied in load_site(ROOT / gateway["command"][2].removeprefix("/app/")).ieds]
    assert [(link.host, str(link.port)) for link in links] == [("127.0.0.1", port)]
    assert gateway["depends_on"]["field-site"]["condition"] == "service_healthy"


def test_the_field_device_has_no_way_out_but_the_web_gate() -> None:
    assert COMPOSE["networks"]["field"]["internal"] is True
    assert SERVICES["device-far-1"]["networks"] == ["field"]
    gate = SERVICES["web-gate"]
    assert gate["networks"]["field"]["aliases"] == ["xmpp"]  # on `field`, the name parties dial is the gate
    assert gate["command"][-2:] == ["--to", "xmpp-server:5281"]  # which passes the HTTPS (BOSH) port only
    assert "xmpp-server" in SERVICES["xmpp"]["networks"]["grid"]["aliases"]
    on_field = [n for n, svc in SERVICES.items() if "field" in svc.get("networks", [])]
    assert sorted(on_field) == ["device-far-1", "web-gate"]


def test_health_checks_fail_clearly_on_a_missing_or_broken_connection_file(tmp_path: Path) -> None:
    ok, why = health.check("server", tmp_path)
    assert not ok and "not readable" in why and "provisioned" in why
    (tmp_path / "connection.json").write_text('{"server": {"c2s_port": "x"}}')
    assert health.check("bots", tmp_path)[0] is False
    (tmp_path / "connection.json").write_text('{"server": {"c2s_port": 1, "domain": "localhost"}}')
    assert health.check("server", tmp_path) == (False, "no XMPP server answers on port 1")
    assert health.main(["bots", "--data", str(tmp_path)]) == 1
    ok, why = health.check("dashboard", tmp_path, port=1)
    assert not ok and "https://127.0.0.1:1/" in why
    ok, why = health.check("gate", tmp_path, port=1)
    assert not ok and "port 1: no TLS to localhost" in why
    (tmp_path / "connection.json").write_text('{"server": {"c2s_port": 1e999, "domain": "localhost"}}')
    assert health.check("bots", tmp_path)[0] is False  # an infinite port: unreadable, not a crash


def test_health_checks_survive_garbage_connection_files(tmp_path: Path) -> None:
    """Seeded, bounded fuzz of what every check reads first: a clear "unhealthy", never a crash."""
    rng = random.Random(2619)
    pieces = ['{', '}', '"server"', ':', '"c2s_port"', '"domain"', '"bosh_url"', '"https://x:99999/"', '"ca_file"',
              '1', '"x"', 'null', '[', ']', ',', '"https://[::1/"', '-5', '1e999']
    for _ in range(300):
        (tmp_path / "connection.json").write_text("".join(rng.choice(pieces) for _ in range(rng.randrange(0, 14))))
        for what in ("bots", "dashboard", "gate"):
            ok, why = health.check(what, tmp_path, port=1)
            assert ok is False and why


def test_established_to_counts_only_established_connections_to_the_port(tmp_path: Path) -> None:
    table = tmp_path / "tcp"
    header = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
    table.write_text(header
                     + "   0: 0B00007F:AA5B 00000000:0000 0A 00000000:00000000 00:00000000 00000000 0 0 1\n"
                     + "   1: 040011AC:8040 020011AC:1466 01 00000000:00000000 00:00000000 00000000 1 0 2\n"
                     + "   2: 040011AC:8041 020011AC:1466 06 00000000:00000000 00:00000000 00000000 1 0 3\n")
    assert established_to(5222, (table,)) == 1  # 0x1466; LISTEN (0A) and TIME_WAIT (06) do not count
    assert established_to(5223, (table, tmp_path / "absent")) == 0


def test_established_to_survives_garbage_tables(tmp_path: Path) -> None:
    """Seeded, bounded fuzz: a table the kernel never writes is a count, not a crash."""
    rng = random.Random(19)
    alphabet = "0123456789ABCDEF: \n\t01x-"
    table = tmp_path / "tcp"
    for _ in range(300):
        text = "header\n" + "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 200)))
        table.write_text(text)
        try:
            assert established_to(5222, (table,)) >= 0
        except ValueError:
            pytest.fail(f"established_to raised on {text!r}")


def test_provision_only_makes_everything_once_and_keeps_it(tmp_path: Path) -> None:
    data = tmp_path / "grid"
    args = ["up", "--provision-only", "--data", str(data), "--fleet", str(ROOT / "bots" / "demo-fleet.toml"),
            "--bind", "0.0.0.0", "--advertise", "xmpp", "--c2s-port", "5222", "--http-port", "5280",
            "--https-port", "5281"]
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    info = json.loads((data / "connection.json").read_text())
    assert info["server"]["host"] == "xmpp" and info["server"]["c2s_port"] == 5222
    config = (data / "prosody.cfg.lua").read_text()
    assert "interfaces = { \"0.0.0.0\" }" in config
    # HTTPS picks certificates by SNI, strictly: BOSH dialled as https://xmpp:5281 needs the name.
    assert '\thttp_host = "xmpp"' in config and 'gridpresence_bosh_url = "https://xmpp:5281/http-bind"' in config
    assert (data / "certs" / "ca.pem").exists() and (data / "fleet.json").exists()
    assert not (data / "prosody.pid").exists(), "provisioning starts no server"
    # Parties dial `xmpp`: the server's certificate names it (BOSH at https://xmpp:5281 verifies).
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((data / "certs" / "server.pem").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "xmpp" in sans.get_values_for_type(x509.DNSName) and "localhost" in sans.get_values_for_type(x509.DNSName)
    second = _cli(*args)
    assert second.returncode == 0, second.stderr
    assert json.loads((data / "connection.json").read_text())["operators"] == info["operators"]


def test_server_and_scenario_say_what_is_missing(tmp_path: Path) -> None:
    server = _cli("server", "--data", str(tmp_path))
    assert server.returncode == 2 and "provision first" in server.stderr
    scenario = _cli("scenario", "--data", str(tmp_path))
    assert scenario.returncode == 2 and "not found" in scenario.stderr
    bots = _cli("bots", "--data", str(tmp_path))
    assert bots.returncode == 2 and "not found" in bots.stderr


async def test_server_probe_says_no_where_nothing_speaks_xmpp() -> None:
    """The xmpp container's probe (its success is every start of the embedded server)."""
    from gridpresence.transport.probe import serves_xmpp

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 not xmpp\r\n" * 100)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        assert await serves_xmpp("127.0.0.1", port, "localhost", timeout=1.0) is False
    assert await serves_xmpp("127.0.0.1", port, "localhost", timeout=0.5) is False  # closed now


def test_dashboard_alone_serves_its_page_and_passes_its_health_check(tmp_path: Path) -> None:
    """`gridpresence dashboard` (the dashboard container's command) on a provisioned volume:
    HTTPS from the grid's CA, its login page answers before any grid session is needed."""
    import socket
    import time

    data = tmp_path / "grid"
    made = _cli("up", "--provision-only", "--data", str(data), "--fleet", str(ROOT / "bots" / "demo-fleet.toml"))
    assert made.returncode == 0, made.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gridpresence", "dashboard", "--data", str(data), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not (got := health.check("dashboard", data, port))[0]:
            assert proc.poll() is None and time.monotonic() < deadline, (got, proc.stderr.read() if proc.stderr else "")
            time.sleep(0.3)
        assert got == (True, f"https://127.0.0.1:{port}/: HTTP 200")
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0 and f"dashboard up: https://127.0.0.1:{port}/" in out, err
    assert (data / "certs" / "dashboard.pem").exists()
    unknown = _cli("scenario", "--data", str(data), "--queue-for", "no-such-device")
    assert unknown.returncode == 2 and "no device named 'no-such-device'" in unknown.stderr


def test_dashboard_and_relay_step_say_what_is_missing(tmp_path: Path) -> None:
    dash = _cli("dashboard", "--data", str(tmp_path))
    assert dash.returncode == 2 and "not found" in dash.stderr and "Traceback" not in dash.stderr
    port = _cli("dashboard", "--data", str(tmp_path), "--port", "70000")
    assert port.returncode == 2 and "--port" in port.stderr
    step = _cli("scenario", "--data", str(tmp_path), "--queue-for", "load-2", "--ttl", "0")
    assert step.returncode == 2 and "--ttl" in step.stderr


async def test_web_gate_passes_its_one_port_both_ways() -> None:
    from gridpresence.transport import forward

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1024):
            writer.write(data.upper())
            await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(echo, "127.0.0.1", 0)
    up_port = upstream.sockets[0].getsockname()[1]
    gate = await forward.serve(("127.0.0.1", 0), ("127.0.0.1", up_port))
    gate_port = gate.sockets[0].getsockname()[1]
    async with upstream, gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", gate_port)
        writer.write(b"x" * 200_000)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(200_000), 10)
        assert got == b"X" * 200_000
        writer.close()
    # Upstream gone: the gate closes the connection instead of hanging or dying.
    gate = await forward.serve(("127.0.0.1", 0), ("127.0.0.1", up_port))
    async with gate:
        reader, writer = await asyncio.open_connection("127.0.0.1", gate.sockets[0].getsockname()[1])
        assert await asyncio.wait_for(reader.read(10), 15) == b""
        writer.close()


def test_web_gate_addresses_are_checked_clearly() -> None:
    """Seeded, bounded fuzz of the gate's one input: HOST:PORT or an argparse error, never a crash."""
    import argparse

    from gridpresence.transport.forward import address

    assert address("xmpp-server:5281") == ("xmpp-server", 5281) and address("[::1]:80") == ("[::1]", 80)
    rng = random.Random(1919)
    alphabet = "ab:1-9 0[]x\n\t.%65536"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 16)))
        try:
            host, port = address(text)
        except argparse.ArgumentTypeError as exc:
            assert repr(text) in str(exc)
        else:
            assert host and 1 <= port <= 65535
    bad = _cli("-v", "dashboard", "--help")  # a sanity check that the command is registered
    assert bad.returncode == 0 and "--advertise" in bad.stdout
    gate = subprocess.run([sys.executable, "-m", "gridpresence.transport.forward", "--listen", "nope", "--to", "x:1"],
                          capture_output=True, text=True, timeout=30)
    assert gate.returncode == 2 and "must be HOST:PORT" in gate.stderr
