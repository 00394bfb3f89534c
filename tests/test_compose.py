"""The docker-compose demo, built and run for real (docker-compose.yml, Dockerfile).

A Docker engine is started by hand (tests/dockerlab.py: no systemd, no registry, the host
firewall left alone); the image is built from this checkout; the stack comes up, is waited on
until every party is healthy, plays the scenario in its one-shot container, has a device
container killed and started again, and goes down leaving no container, network or volume.
Skipped, saying why, only when no Docker engine can run on this machine.

Run alone: ``.venv/bin/python -m pytest -q -p no:cacheprovider tests/test_compose.py -s``
(-s prints the figures: build times, image size, time from `up` to healthy).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import dockerlab
from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol.models import HealthStatus
from gridpresence.transport.probe import serves_xmpp
from gridpresence.xmpp.session import ConnectionInfo

pytestmark = pytest.mark.timeout(900)  # a cold run builds the base image and the grid's image

# The services `up` starts and keeps running (init and scenario are one-shot).
LONG_RUNNING = ("xmpp", "relay", "billing", "watchdog", "console", "devices", "device-load-2", "dashboard",
                "web-gate", "device-far-1", "field-site", "gateway")
FIELD_IED = "field-pump-1"  # bots/demo-site.toml's Modbus controller: the field-site container, the gateway's identity
LONE_DEVICE = "load-2"  # runs in the device-load-2 container
FIELD_DEVICE = "far-1"  # runs in device-far-1, on the `field` network: out only through the web gate
HEALTHY_WITHIN_S = 240.0  # a loaded CI machine of 2 cores starts 10 Python processes


_V2: dict[str, bool] = {}  # whether `docker compose` (v2) answers, asked once


def _compose_cli(engine: dockerlab.Engine) -> tuple[str, ...]:
    """Compose v2 (`docker compose`) where the plugin is installed, else v1 (`docker-compose`,
    Debian bookworm's); asked once."""
    if "v2" not in _V2:
        _V2["v2"] = engine.run(dockerlab.DOCKER, "compose", "version", check=False).returncode == 0
    return (dockerlab.DOCKER, "compose") if _V2["v2"] else ("docker-compose",)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    engine: dockerlab.Engine
    project: str
    xmpp_port: int
    dashboard_port: int = field(default_factory=_free_port)
    figures: dict[str, str] = field(default_factory=dict)

    def compose(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return self.engine.run(*self.command(*args), check=check, timeout=timeout)

    def command(self, *args: str) -> list[str]:
        """The compose command line (setting this stack's published ports in the engine's env)."""
        self.engine.env.update(GRIDPRESENCE_XMPP_PORT=str(self.xmpp_port),
                               GRIDPRESENCE_DASHBOARD_PORT=str(self.dashboard_port))
        return [*_compose_cli(self.engine), "-p", self.project, "-f", str(dockerlab.REPO / "docker-compose.yml"), *args]

    # Looking containers up and into them goes through `docker` itself: compose v1 is a Python
    # program whose every start costs a second or more on a loaded machine.
    def _label(self, service: str | None = None) -> list[str]:
        found = ["--filter", f"label=com.docker.compose.project={self.project}"]
        return found + (["--filter", f"label=com.docker.compose.service={service}"] if service else [])

    def container(self, service: str) -> str:
        ids = self.engine.docker("ps", "-q", *self._label(service)).stdout.split()
        return ids[0] if ids else ""

    def states(self) -> dict[str, str]:
        """Each running service's health ("healthy", "starting", ...; "running" without a check)."""
        ids = self.engine.docker("ps", "-q", *self._label()).stdout.split()
        if not ids:
            return {}
        fmt = ('{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}} '
               '{{if .State.Health}}{{.State.Health.Status}}{{end}}')
        out = self.engine.docker("inspect", "--format", fmt, *ids, check=False).stdout
        return {f[0]: f[-1] for f in (line.split() for line in out.splitlines()) if len(f) >= 2}

    def health(self, service: str) -> str:
        return self.states().get(service, "absent")

    def wait_healthy(self, services: tuple[str, ...], timeout: float = HEALTHY_WITHIN_S) -> float:
        started = time.monotonic()
        while True:
            found = self.states()
            states = {s: found.get(s, "absent") for s in services}
            if all(v == "healthy" for v in states.values()):
                return time.monotonic() - started
            if time.monotonic() - started > timeout:
                logs = self.compose("logs", "--tail", "20", check=False).stdout
                pytest.fail(f"not healthy within {timeout:g} s: {states}\n{logs[-4000:]}")
            time.sleep(1.0)

    def exec(self, service: str, *cmd: str) -> subprocess.CompletedProcess[str]:
        """`compose exec -T SERVICE CMD...`, by way of `docker exec`."""
        cid = self.container(service)
        assert cid, f"{service} is not running"
        return self.engine.docker("exec", cid, *cmd, timeout=120)

    def file(self, path: str) -> str:
        return self.exec("xmpp", "cat", path).stdout

    def host_connection(self, tmp: Path) -> ConnectionInfo:
        """The connection file as a person on the host uses it: the published port and the
        grid's CA copied out of the volume."""
        data = json.loads(self.file("/data/connection.json"))
        ca = tmp / "ca.pem"
        ca.write_text(self.file("/data/certs/ca.pem"))
        data["server"].update(host="127.0.0.1", c2s_port=self.xmpp_port, ca_file=str(ca), bosh_url=None, web_url=None)
        data["relay"] = None
        for op in data["operators"]:
            key = tmp / f"{op['name']}.asc"
            key.write_text(self.file(op["key_file"]))
            op["key_file"] = str(key)
        return ConnectionInfo.model_validate(data)

    def leftovers(self) -> list[str]:
        label = f"label=com.docker.compose.project={self.project}"
        found = []
        for kind in (["ps", "-aq"], ["network", "ls", "-q"], ["volume", "ls", "-q"]):
            found += self.engine.docker(*kind, "--filter", label).stdout.split()
        return found


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if shutil.which("docker-compose") is None and shutil.which("docker") is None:
        pytest.skip("Docker is not installed (apt-get install docker.io docker-compose)")
    host_before = dockerlab.host_network_state()
    try:
        engine = dockerlab.start_engine()
    except dockerlab.EngineUnavailable as exc:
        pytest.skip(f"no Docker engine can start on this machine: {exc}")
    stack = Stack(engine, project=f"{dockerlab.PREFIX}{os.getpid()}", xmpp_port=_free_port())
    try:
        t0 = time.monotonic()
        how = dockerlab.ensure_base_image(engine)
        stack.figures["base image"] = f"{how} in {time.monotonic() - t0:.1f} s"
        stack.figures["build (layer cache warm)"] = f"{dockerlab.build_image(engine):.1f} s"
        size = engine.docker("image", "inspect", "--format", "{{.Size}}", dockerlab.IMAGE).stdout.strip()
        stack.figures["image size"] = f"{int(size) / 1e6:.0f} MB"
        t0 = time.monotonic()
        stack.compose("up", "-d", "--no-build")
        stack.figures["up to healthy"] = f"{time.monotonic() - t0 + stack.wait_healthy(LONG_RUNNING):.1f} s"
        yield stack
    finally:
        stack.compose("down", "-v", "--remove-orphans", check=False)
        try:
            assert stack.leftovers() == [], "compose down -v left containers, networks or volumes behind"
        finally:
            dockerlab.stop_engine(engine)
            print("\ncompose figures: " + "; ".join(f"{k}: {v}" for k, v in stack.figures.items()), flush=True)
            assert dockerlab.mounts_left() == [], "the engine's mounts outlived it"
            assert dockerlab.host_network_state() == host_before, "the host's forwarding or firewall changed"


def test_every_party_healthy_and_the_server_reachable_from_the_host(stack: Stack) -> None:
    for service in LONG_RUNNING:
        assert stack.health(service) == "healthy", service
    # One process per party: each service is a container of its own.
    assert len({stack.container(s) for s in LONG_RUNNING}) == len(LONG_RUNNING)
    assert asyncio.run(serves_xmpp("127.0.0.1", stack.xmpp_port, "localhost")), "published XMPP port answers"
    # Parties inside dial the server by its service name; the init step wrote it so.
    inside = json.loads(stack.file("/data/connection.json"))
    assert inside["server"]["host"] == "xmpp" and inside["relay"]["smtp_host"] == "relay"
    # A party inside checks the relay's STARTTLS certificate against the grid's CA and its name.
    starttls = ("import smtplib, ssl; s = smtplib.SMTP('relay', 2525, timeout=20); "
                "s.starttls(context=ssl.create_default_context(cafile='/data/certs/ca.pem')); print('relay tls ok')")
    assert "relay tls ok" in stack.exec("billing", "/opt/venv/bin/python", "-c", starttls).stdout
    # Non-root everywhere: Prosody and the bots (and the init process above them) run as `grid`.
    for service in ("xmpp", "devices"):
        uids = stack.exec(service, "sh", "-c", "grep -h ^Uid: /proc/[0-9]*/status").stdout.split()
        assert uids and "0" not in uids, (service, uids)


async def _operator_sees(info: ConnectionInfo, predicate: Callable[[Mapping[str, DeviceView]], bool],
                         timeout: float) -> dict[str, dict[str, Any]]:
    async with GridOperator.from_connection(info, resource="compose-test") as op:
        await op.wait_for(predicate, timeout=timeout)
        return {n: v.as_dict() for n, v in op.devices.items()}


def test_scenario_container_plays_the_demo(stack: Stack) -> None:
    run = stack.compose("run", "--rm", "scenario", timeout=300, check=False)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-3000:]
    assert "billing sent its tariff" in out
    assert "a critical load: it refuses and goes restricted" in out
    assert "start gen-" in out and "after the script" in out
    assert "Traceback" not in out + run.stderr


def test_killed_device_container_is_a_presence_error_and_recovers(stack: Stack, tmp_path: Path) -> None:
    info = stack.host_connection(tmp_path)  # a person on the host, over TLS with the grid's CA
    seen = asyncio.run(_operator_sees(info, lambda d: LONE_DEVICE in d and d[LONE_DEVICE].present, 30))
    assert len(seen) >= 13 and seen[LONE_DEVICE]["health"] == HealthStatus.OK.value

    async def kill_then_restart() -> tuple[dict[str, Any], dict[str, Any]]:
        async with GridOperator.from_connection(info, resource="compose-kill") as op:
            await op.wait_for(lambda d: LONE_DEVICE in d and d[LONE_DEVICE].present, timeout=30)
            # far-1 and meter-9 are held back in the demo fleet (never started): not our concern.
            running = {n for n, v in op.devices.items() if v.present and n != LONE_DEVICE}
            await asyncio.to_thread(stack.engine.docker, "kill", stack.container("device-load-2"))
            await op.wait_for(lambda d: d[LONE_DEVICE].health is HealthStatus.PRESENCE_ERROR, timeout=60)
            down = op.devices[LONE_DEVICE].as_dict()
            others = [n for n in running if op.devices[n].health is HealthStatus.PRESENCE_ERROR]
            assert others == [], "only the killed container's device is in error"
            await asyncio.to_thread(stack.compose, "start", "device-load-2")
            await op.wait_for(lambda d: d[LONE_DEVICE].present and d[LONE_DEVICE].health is HealthStatus.OK,
                              timeout=90)
            return down, op.devices[LONE_DEVICE].as_dict()

    down, back = asyncio.run(kill_then_restart())
    assert down["state"] == "presence-error" and "without a goodbye" in down["health_reason"]
    assert back["state"] in ("on", "off", "restricted") and back["health"] == "ok"
    stack.wait_healthy(("device-load-2",), timeout=60)


def test_second_up_reuses_the_volume(stack: Stack) -> None:
    before = json.loads(stack.file("/data/connection.json"))
    run = stack.compose("up", "--no-build", "--no-deps", "init")  # the one-shot step, as a second `up` runs it
    assert "nothing changed" in run.stdout + run.stderr
    after = json.loads(stack.file("/data/connection.json"))
    assert after["operators"] == before["operators"], "accounts and passwords kept"
    assert stack.file("/data/certs/ca.pem").startswith("-----BEGIN CERTIFICATE-----")


@pytest.mark.parametrize("service", ["xmpp", "dashboard"])
def test_port_conflict_is_a_clear_error(stack: Stack, service: str) -> None:
    """A second grid whose published port (XMPP or dashboard) is the running one's."""
    other = Stack(stack.engine, project=f"{stack.project}x", xmpp_port=_free_port())
    if service == "xmpp":
        other.xmpp_port = stack.xmpp_port
    else:
        other.dashboard_port = stack.dashboard_port
    try:
        run = other.compose("up", "-d", "--no-build", "--no-deps", service, check=False, timeout=120)
        text = (run.stdout + run.stderr).lower()
        assert run.returncode != 0
        assert "already" in text and ("allocated" in text or "in use" in text), text[-2000:]
    finally:
        other.compose("down", "-v", check=False)
    assert other.leftovers() == []


def test_dashboard_answers_from_the_host_with_the_grids_devices(stack: Stack, tmp_path: Path) -> None:
    """The published dashboard port, as a person's browser on the host uses it: HTTPS checked
    against the grid's CA, an operator's login, then the live snapshot the page shows."""
    import aiohttp
    import ssl

    info = stack.host_connection(tmp_path)
    assert info.server.ca_file is not None
    tls = ssl.create_default_context(cafile=str(info.server.ca_file))
    url = f"https://localhost:{stack.dashboard_port}/"  # the certificate names the grid's domain, localhost
    operator = info.operators[0]

    async def visit() -> tuple[int, str, dict[str, Any]]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            async with http.post(url + "login", ssl=tls, data={"operator": operator.name, "password": operator.password},
                                 allow_redirects=False) as r:
                assert r.status == 303, await r.text()
            async with http.get(url, ssl=tls) as r:
                status, page = r.status, await r.text()
            # Trends come from the store the console container's historian writes in the volume.
            async with http.get(url + "api/history?device=load-1&minutes=10", ssl=tls) as r:
                trend = await r.json()
                assert r.status == 200 and isinstance(trend["points"], list) and trend["device"] == "load-1", trend
            async with http.get(url + "events", ssl=tls) as stream:
                async for line in stream.content:
                    if line.startswith(b"data: "):
                        snap: dict[str, Any] = json.loads(line[6:])
                        if sum(d["present"] for d in snap["devices"]) >= 12:  # the sessions' presence has arrived
                            return status, page, snap
            raise AssertionError("the event stream ended")

    status, page, snap = asyncio.run(asyncio.wait_for(visit(), 90))
    assert status == 200 and "<html" in page.lower()
    names = {d["name"] for d in snap["devices"]}
    assert {"load-1", LONE_DEVICE, FIELD_DEVICE, "gen-1", "main-breaker"} <= names
    assert snap["operator"] == operator.name
    assert next(d for d in snap["devices"] if d["name"] == LONE_DEVICE)["present"]


def test_relay_queues_for_a_stopped_device_container_and_delivers_when_it_starts(stack: Stack) -> None:
    """The scenario's relay step, played from the scenario container: `docker stop` the device's
    container, the command is queued at the relay (by SMTP inside the compose network), the
    container starts again, the relay delivers, and the device's outcome reaches the issuer."""
    import queue
    import threading

    stack.compose("stop", "device-load-2", timeout=60)
    proc = subprocess.Popen(stack.command("run", "--rm", "-T", "scenario", "gridpresence", "scenario", "--data", "/data",
                                          "--queue-for", LONE_DEVICE, "--ttl", "240", "--timeout", "60"),
                            env=stack.engine.env, cwd=dockerlab.REPO, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    out: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while not any("is queued at the relay" in line for line in out):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            assert line is not None, "the relay step ended before queueing:\n" + "".join(out)
            out.append(line)
        assert any(f"{LONE_DEVICE}: queued" in line for line in out), "".join(out)
        stack.compose("start", "device-load-2", timeout=60)
        assert proc.wait(timeout=150) == 0, "".join(out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        out.append(line)
    text = "".join(out)
    after = text.split("is queued at the relay", 1)[1]
    assert f"{LONE_DEVICE}: executed" in after, text
    assert "Traceback" not in text
    stack.wait_healthy(("device-load-2",), timeout=60)


def test_field_device_behind_the_web_gate_gets_unsolicited_commands_over_bosh(stack: Stack, tmp_path: Path) -> None:
    """far-1's network has no route to the grid: the XMPP port is closed to it (on `field`,
    `xmpp` is the gate, which passes only the HTTPS/BOSH port) and the server's own address is
    unreachable; it is on the grid all the same, over BOSH, and obeys a command it did not ask for."""
    probe = ("import socket, sys\n"
             "def reach(host, port):\n"
             "    try:\n"
             "        socket.create_connection((host, port), timeout=3).close(); return 'open'\n"
             "    except OSError as exc:\n"
             "        return type(exc).__name__\n"
             "print(' '.join(reach(h, int(p)) for h, p in (a.split(':') for a in sys.argv[1:])))\n")
    server_ip = stack.engine.docker(
        "inspect", "--format", "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}",
        stack.container("xmpp")).stdout.split()[0]
    seen = stack.exec("device-far-1", "/opt/venv/bin/python", "-c", probe,
                      "xmpp:5222", "xmpp:5281", f"{server_ip}:5222", f"{server_ip}:5281").stdout.split()
    assert seen[0] != "open" and seen[1] == "open", seen  # the gate: web port only
    assert seen[2] != "open" and seen[3] != "open", seen  # no route to the server itself

    info = stack.host_connection(tmp_path)

    async def command_it() -> tuple[str | None, Any]:
        from gridpresence.protocol.models import Action, DeviceState

        async with GridOperator.from_connection(info, resource="compose-field") as op:
            await op.wait_for(lambda d: FIELD_DEVICE in d and d[FIELD_DEVICE].present, timeout=60)
            transport = op.devices[FIELD_DEVICE].transport
            action = Action.RESTORE if op.devices[FIELD_DEVICE].state is DeviceState.OFF else Action.SHED
            return transport, await op.command(FIELD_DEVICE, action)

    transport, outcome = asyncio.run(command_it())
    assert transport == "bosh"
    assert outcome.ok and outcome.report is not None and outcome.report.transport == "bosh", outcome


def test_field_ied_behind_the_gateway_container_is_online_and_obeys_commands(stack: Stack, tmp_path: Path) -> None:
    """The field site's pump controller speaks Modbus only; the gateway container reads it and is
    its identity: present with its readings, and a shed and a restore reach its coil and are read
    back (the outcome carries the state the IED reports)."""
    info = stack.host_connection(tmp_path)

    async def shed_and_restore() -> tuple[Any, Any, Any]:
        from gridpresence.protocol.models import Action, DeviceState

        async with GridOperator.from_connection(info, resource="compose-gateway") as op:
            await op.wait_for(lambda d: FIELD_IED in d and d[FIELD_IED].present
                              and d[FIELD_IED].state is DeviceState.ON, timeout=90)
            view = op.devices[FIELD_IED].as_dict()
            shed = await op.command(FIELD_IED, Action.SHED)
            restore = await op.command(FIELD_IED, Action.RESTORE)
            return view, shed, restore

    view, shed, restore = asyncio.run(shed_and_restore())
    assert view["health"] == HealthStatus.OK.value and view["telemetry"], view
    assert shed.ok and shed.report is not None and shed.report.state.value == "off", shed
    assert restore.ok and restore.report is not None and restore.report.state.value == "on", restore


def test_missing_volume_is_a_clear_error(stack: Stack) -> None:
    """A party started on a volume no `init` has filled (a fresh project, or one `down -v`
    emptied): it says what is missing and how to make it, no traceback."""
    other = Stack(stack.engine, project=f"{stack.project}v", xmpp_port=_free_port())
    try:
        run = other.compose("run", "--rm", "--no-deps", "-T", "scenario", check=False, timeout=120)
        text = run.stdout + run.stderr
        assert run.returncode != 0
        assert "/data/connection.json: not found" in text and "docker compose up" in text, text[-2000:]
        assert "Traceback" not in text
    finally:
        other.compose("down", "-v", check=False)
    assert other.leftovers() == []
