"""The CLI as a person uses it: `up` (and its errors), `status`, `watch`, actions, the example
load-shed script and the billing party's price."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from conftest import Env, ROOT, run_cli, run_python, start_up, until
from gridpresence.services.billing import BillingAgent
from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceChange
from gridpresence.cli.common import COMMAND_ACTIONS
from gridpresence.protocol import DeviceState

SMALL_FLEET = """
domain = "localhost"
[[operators]]
name = "olga"
[[billing]]
name = "bill"
[[devices]]
name = "pump"
kind = "load"
rated_kw = 30
[[devices]]
name = "diesel"
kind = "generator"
rated_kw = 60
startup_s = 1
"""


def _conn(env: Env) -> list[str]:
    return ["--connection", str(env.grid.connection_file)]


async def test_status_table_and_json(env: Env) -> None:
    code, out, err = await run_cli("status", *_conn(env))
    assert code == 0, err
    header, *rows = out.splitlines()
    assert header.split()[:3] == ["DEVICE", "KIND", "STATE"]
    assert any(r.split()[:3] == ["gen-2", "generator", "off"] for r in rows)
    code, out, _ = await run_cli("status", "--json", *_conn(env))
    data = json.loads(out)
    by_name = {d["name"]: d for d in data["devices"]}
    assert by_name["load-a"]["kind"] == "load" and by_name["load-a"]["telemetry"]["kw"] > 0
    assert data["price_per_kwh"] in (0.6, 0.8)


async def test_action_commands_print_outcomes(env: Env, alice: GridOperator) -> None:
    code, out, err = await run_cli("shed", "load-i", "load-crit2", "--json", *_conn(env))
    assert code == 1, "one rejection must make the exit code non-zero"
    outcomes = {o["name"]: o for o in json.loads(out)}
    assert outcomes["load-i"]["status"] == "executed"
    assert outcomes["load-crit2"]["status"] == "rejected" and outcomes["load-crit2"]["reason"] == "critical"
    await alice.wait_for(lambda d: d["load-i"].state is DeviceState.OFF, timeout=5)
    code, out, err = await run_cli("restore", "load-i", *_conn(env))
    assert code == 0, err
    assert out.startswith("load-i: executed")


async def test_unknown_device_and_missing_connection_are_clear_errors(env: Env, tmp_path: Path) -> None:
    code, out, err = await run_cli("shed", "no-such-thing", *_conn(env))
    assert code == 2 and "no device named 'no-such-thing'" in err
    code, _, err = await run_cli("status", "--connection", str(tmp_path / "nope.json"))
    assert code == 2 and "gridpresence up" in err
    (tmp_path / "bad.json").write_text("{not json")
    code, _, err = await run_cli("status", "--connection", str(tmp_path / "bad.json"))
    assert code == 2 and "not a valid connection file" in err


async def test_watch_shows_changes_live(env: Env, alice: GridOperator) -> None:
    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(str(exe), "watch", "--json", *_conn(env),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):  # the watch is live once it has printed every device's snapshot
            snapshot = {}
            while len(snapshot) < len(alice.devices):
                line = json.loads(await proc.stdout.readline())  # type: ignore[union-attr]
                assert line["cause"] == "snapshot", line
                snapshot[line["name"]] = line
        assert snapshot["load-j"]["state"] == "on"
        assert (await alice.command("load-j", "shed")).ok
        async with asyncio.timeout(15):
            while True:  # other devices refresh meanwhile; wait for ours
                change = json.loads(await proc.stdout.readline())  # type: ignore[union-attr]
                if change["name"] == "load-j":
                    break
        assert change["state"] == "off" and change["cause"] == "presence"
        assert change["telemetry"]["kw"] == 0
    finally:
        proc.kill()
        await proc.wait()
        await alice.command("load-j", "restore")


WATCH_FLEET = """
domain = "localhost"
[[operators]]
name = "olga"
[[devices]]
name = "idle"
kind = "load"
rated_kw = 20
initial_state = "off"
refresh_s = 1.0
[[devices]]
name = "pump"
kind = "load"
rated_kw = 30
refresh_s = 1.0
"""


async def _watch(conn: list[str], *args: str) -> tuple[asyncio.subprocess.Process, list[str], asyncio.Task[None]]:
    """`gridpresence watch ARGS` started, and every line it prints, as it prints it."""
    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(str(exe), "watch", *args, *conn, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.DEVNULL)
    lines: list[str] = []

    async def read() -> None:
        while line := await proc.stdout.readline():  # type: ignore[union-attr]
            lines.append(line.decode().rstrip("\n"))

    return proc, lines, asyncio.ensure_future(read())


async def test_watch_prints_a_line_only_when_what_it_shows_changed(tmp_path: Path) -> None:
    """Devices refreshing every second with the same state and readings print nothing after the
    snapshot; a shed prints exactly one line, and the refreshes after it none, in text and JSON,
    and with a filter the shed load leaves. The operator's tracker still takes every refresh."""
    from gridpresence.xmpp.session import ConnectionInfo

    fleet = tmp_path / "fleet.toml"
    fleet.write_text(WATCH_FLEET)
    data = tmp_path / "grid"
    conn = ["--connection", str(data / "connection.json")]
    proc, _ = await start_up(data, fleet)
    watches: list[tuple[asyncio.subprocess.Process, list[str], asyncio.Task[None]]] = []
    witness = GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"), resource="witness")
    try:
        await witness.connect()
        refreshes = {"idle": 0, "pump": 0}  # every presence the witness's tracker took, by device

        def count(change: DeviceChange) -> None:
            refreshes[change.current.name] += 1
        witness.tracker.listen(count)
        watches = [await _watch(conn), await _watch(conn, "--json"), await _watch(conn, "--filter", "state=on")]
        text, js, filtered = (w[1] for w in watches)
        await until(lambda: any("Ctrl-C to stop" in ln for ln in text) and any("Ctrl-C to stop" in ln for ln in filtered)
                    and len(js) >= 2, timeout=30, what="the watches to be live")
        live = (len(text), len(js), len(filtered))
        assert any(ln.split()[:3] == ["pump", "load", "on"] for ln in filtered)
        assert not any(ln.startswith("idle") for ln in filtered)  # off: not in the filter's table

        def changes(lines: list[str], since: int, name: str) -> list[str]:
            if lines is js:
                return [ln for ln in lines[since:] if json.loads(ln)["name"] == name]
            return [ln for ln in lines[since:] if ln.split()[1:2] == [name]]

        start = refreshes["idle"]
        await until(lambda: refreshes["idle"] >= start + 3, timeout=15, what="three refreshes of idle")
        code, out, err = await run_cli("shed", "pump", *conn)
        assert code == 0 and "executed" in out, err
        for lines, since in zip((text, js, filtered), live):
            await until(lambda: changes(lines, since, "pump") and "off" in changes(lines, since, "pump")[-1],
                        timeout=10, what="the shed in the watch")
        shed_seen = refreshes["pump"]
        await until(lambda: refreshes["pump"] >= shed_seen + 3, timeout=15, what="three refreshes of the shed pump")
        await asyncio.sleep(0.5)  # the watches have had them too
        for lines, since in zip((text, js, filtered), live):
            assert changes(lines, since, "idle") == [], lines[since:]  # refreshes with nothing new
            pump = changes(lines, since, "pump")
            offs = [ln for ln in pump if (json.loads(ln)["state"] if lines is js else ln.split()[2]) == "off"]
            assert len(offs) == 1 and pump[-1] == offs[0], pump  # the shed, once; its refreshes: nothing
        assert json.loads(changes(js, live[1], "pump")[-1])["cause"] == "presence"
    finally:
        await witness.close()
        for watch, _, reader in watches:
            watch.kill()
            await watch.wait()
            reader.cancel()
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_load_shed_script_skips_critical_and_restricted(env: Env, alice: GridOperator) -> None:
    before = dict(alice.devices)
    code, out, err = await run_python("bots/load_shed.py", "--target-kw", "0", "--json", *_conn(env))
    report = json.loads(out)
    shed = {a["device"] for a in report["actions"] if a["action"] == "shed"}
    assert "load-crit" not in shed and "load-crit" in report["skipped"]
    assert {n for n, v in before.items() if n.startswith("load-") and v.state is DeviceState.ON
            and not v.report.critical} <= shed  # type: ignore[union-attr]
    # Target 0 cannot be met by shedding: it starts a generator that is off.
    assert report["generator_started"] in ("gen-1", "gen-2")
    await alice.wait_for(lambda d: all(d[n].state is DeviceState.OFF for n in shed), timeout=5)
    await alice.command_many(sorted(shed), "restore")
    await alice.wait_for(lambda d: d[report["generator_started"]].state is DeviceState.ON, timeout=10)
    await alice.command(report["generator_started"], "stop")


async def test_price_above_limit_makes_the_script_shed(env: Env, alice: GridOperator) -> None:
    billing: BillingAgent = env.grid.bots.billing["billing"]  # type: ignore[union-attr]
    original = billing.tariff
    try:
        # The script connects as a new operator resource: billing sends it the price on presence.
        billing.set_price(0.95)
        code, out, err = await run_python("bots/load_shed.py", "--target-kw", "100000", "--price-limit", "0.9",
                                          "--json", *_conn(env))
        report = json.loads(out)
        assert report["price"] == 0.95 and report["target_kw"] == 0.0
        shed = [a["device"] for a in report["actions"] if a["action"] == "shed"]
        assert shed, out
        await alice.command_many(shed, "restore")
        if report["generator_started"]:
            await alice.wait_for(lambda d: d[report["generator_started"]].state is DeviceState.ON, timeout=10)
            await alice.command(report["generator_started"], "stop")
        billing.set_price(0.5)
        code, out, _ = await run_python("bots/load_shed.py", "--target-kw", "100000", "--price-limit", "0.9",
                                        "--json", *_conn(env))
        assert json.loads(out)["actions"] == []
    finally:
        billing.publish(original)


async def test_operator_receives_tariff_when_present(env: Env, alice: GridOperator) -> None:
    tariff = await alice.wait_tariff(timeout=5)
    assert tariff.supplier == "utility-supply" and tariff.kind == "tariff"
    assert {p.price_per_kwh for p in tariff.periods} == {0.6, 0.8}
    assert alice.price_now() in {p.price_per_kwh for p in tariff.periods}


# -- `gridpresence up` ------------------------------------------------------------------------


def _prosody_running(data: Path) -> bool:
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "prosody" in cmd and str(data) in cmd:
                return True
    return False


async def test_up_runs_reuses_accounts_and_stops_cleanly(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    data = tmp_path / "grid"
    proc, banner = await start_up(data, fleet)
    try:
        conn = json.loads((data / "connection.json").read_text())
        assert conn["server"]["port"] == conn["server"]["c2s_port"] and conn["operators"][0]["jid"] == "olga@localhost"
        assert conn["operators"][0]["password"] in banner
        code, out, err = await run_cli("status", "--json", "--connection", str(data / "connection.json"))
        assert code == 0, err
        assert {d["name"]: d["state"] for d in json.loads(out)["devices"]} == {"pump": "on", "diesel": "off"}
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    assert not _prosody_running(data), "Ctrl-C left Prosody running"
    # Second run on the same directory: same accounts, same passwords, same port.
    proc, _ = await start_up(data, fleet)
    try:
        conn2 = json.loads((data / "connection.json").read_text())
        assert conn2["operators"] == conn["operators"] and conn2["server"]["c2s_port"] == conn["server"]["c2s_port"]
        code, out, err = await run_cli("shed", "pump", "--connection", str(data / "connection.json"))
        assert code == 0 and "executed" in out, err
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_up_errors_are_clear(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET.replace("rated_kw = 30", "rated_kw = -5"))
    code, _, err = await run_cli("up", "--data", str(tmp_path / "a"), "--fleet", str(fleet))
    assert code == 2 and "devices[0] (pump).rated_kw: Input should be greater than 0" in err

    fleet.write_text(SMALL_FLEET)
    code, _, err = await run_cli("up", "--data", str(tmp_path / "b"), "--fleet", str(fleet), "--prosody",
                                 "/nonexistent/prosody")
    assert code == 2 and "apt-get install prosody" in err and "--prosody /path/to/prosody" in err

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_cli("up", "--data", str(tmp_path / "c"), "--fleet", str(fleet), "--c2s-port", str(port))
    assert code == 2 and str(port) in err and "c2s" in err


@pytest.mark.parametrize("text, field", [
    ("[[operators]]\nname='x'\n", "devices"),
    (SMALL_FLEET.replace('kind = "load"', 'kind = "toaster"'), "devices[0] (pump).kind"),
    (SMALL_FLEET.replace('name = "pump"', 'name = "Pump!"'), "devices[0] ('Pump!').name"),
    (SMALL_FLEET + '[[devices]]\nname = "x"\nkind = "load"\nrated_kw = 1\nparent = "nowhere"\n', "parent"),
    (SMALL_FLEET + '[[devices]]\nname = "pump"\nkind = "load"\nrated_kw = 1\n', "used twice"),
    (SMALL_FLEET + "colour = 'red'\n", "colour"),
    ("this is not toml", "not valid TOML"),
])
async def test_fleet_file_errors_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    from gridpresence.config import FleetError, load_fleet

    path = tmp_path / "f.toml"
    path.write_text(text)
    with pytest.raises(FleetError, match=re.escape(field)):
        load_fleet(path)


def test_demo_fleet_has_what_the_issue_asks() -> None:
    from gridpresence.config import load_fleet
    from gridpresence.protocol import DeviceKind

    fleet = load_fleet(ROOT / "bots" / "demo-fleet.toml")
    kinds = [d.kind for d in fleet.devices]
    assert len(fleet.operators) >= 2 and len(fleet.billing) >= 1
    masters = [d for d in fleet.devices if d.kind is DeviceKind.MASTER]
    assert len(masters) == 1 and len(fleet.children(masters[0].name)) >= 2
    assert kinds.count(DeviceKind.LOAD) >= 6 and sum(d.critical for d in fleet.devices) >= 1
    assert kinds.count(DeviceKind.GENERATOR) >= 2 and kinds.count(DeviceKind.METER) >= 2
    assert kinds.count(DeviceKind.BREAKER) >= 1


def _readme_device_names() -> set[str]:
    """Device names the README's shell examples pass to gridpresence (actions, --without, --only)."""
    device_commands = {*COMMAND_ACTIONS, "set-time", "alert", "quality", "mail-device"}
    names: set[str] = set()
    for block in re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in block.splitlines():
            words = line.split("#", 1)[0].split()
            if len(words) < 2 or words[0] != "gridpresence":
                continue
            taking = words[1] in device_commands
            for word in words[2:]:
                if word.startswith("-"):
                    taking = word in ("--without", "--only")
                elif taking and re.fullmatch(r"[a-z][a-z0-9-]*", word):
                    names.add(word)
    return names


def test_readme_examples_name_devices_of_the_demo_fleet() -> None:
    from gridpresence.config import load_fleet

    fleet = {d.name for d in load_fleet(ROOT / "bots" / "demo-fleet.toml").devices}
    # An example may bring its own fleet or site file (the gateway's): the names it declares count.
    declared = {name for block in re.findall(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
                for name in re.findall(r'^name = "([^"]+)"', block, re.M)}
    named = _readme_device_names()
    assert {"far-1", "meter-9", "meter-1", "load-1"} <= named  # the parser finds the examples
    assert named - fleet - declared == set(), "README examples name devices neither the demo fleet nor the README declares"


def _digests(data: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((data / name).read_bytes(), (data / name).stat().st_mtime_ns)
            for name in ("ports.json", "prosody.cfg.lua", "connection.json", "secrets.json", "fleet.json")}


async def test_up_twice_refuses_before_writing_anything(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    data = tmp_path / "grid"
    proc, _ = await start_up(data, fleet)
    try:
        before = _digests(data)
        code, out, err = await run_cli("up", "--data", str(data), "--fleet", str(fleet))
        assert code == 2 and "already running" in err and "Traceback" not in err, err
        assert _digests(data) == before, "the refused `up` rewrote files of the running grid"
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    # A plain restart leaves the rendered config alone (same text: not written again).
    proc, _ = await start_up(data, fleet)
    try:
        assert _digests(data)["prosody.cfg.lua"] == before["prosody.cfg.lua"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_up_without_holds_bots_back_and_log_level_reaches_both_logs(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    data = tmp_path / "grid"
    code, _, err = await run_cli("up", "--data", str(data), "--fleet", str(fleet), "--without", "diesel", "boiler")
    assert code == 2 and "'boiler'" in err and "no such device" in err and "Traceback" not in err, err
    assert not (data / "prosody").exists(), "an unknown name must stop `up` before anything is made"
    proc, banner = await start_up(data, fleet, "--without", "diesel", "--log-level", "debug")
    try:
        assert "1 device bots" in banner
        conn = ["--connection", str(data / "connection.json")]
        code, out, err = await run_cli("status", "--json", *conn)
        states = {d["name"]: d for d in json.loads(out)["devices"]}
        assert states["pump"]["state"] == "on" and states["diesel"]["state"] != "off", states["diesel"]
        assert 'levels = { min = "debug" }' in (data / "prosody.cfg.lua").read_text()
        # The held-back device has its account: run apart, it comes online.
        bots = await asyncio.create_subprocess_exec(str(Path(sys.executable).with_name("gridpresence")), "bots",
                                                    "--data", str(data), "--only", "diesel",
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            async with asyncio.timeout(30):
                assert b"running diesel" in await bots.stdout.readline()  # type: ignore[union-attr]
            code, out, err = await run_cli("alert", "diesel", "--timeout", "10", *conn)
            assert code == 0 and "diesel: available" in out, out + err
        finally:
            bots.send_signal(signal.SIGINT)
            await asyncio.wait_for(bots.wait(), 20)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err_bytes = await asyncio.wait_for(proc.communicate(), 20)
    assert " DEBUG " in err_bytes.decode(), "--log-level debug must reach our own logging"


@pytest.mark.parametrize("delay", [0.1, 0.4, 1.0, 2.0, 3.0, 4.5])
async def test_ctrl_c_during_start_up_is_quiet_and_leaves_no_prosody(tmp_path: Path, delay: float) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(SMALL_FLEET)
    data = tmp_path / "grid"
    exe = Path(sys.executable).with_name("gridpresence")
    # `delay` counts from when the interpreter is up and our code runs: before that (a bare
    # `python -c pass` takes this long on this machine now) Python's own start-up is all there is.
    started = time.monotonic()
    bare = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await bare.wait()
    interpreter_s = time.monotonic() - started
    proc = await asyncio.create_subprocess_exec(str(exe), "up", "--data", str(data), "--fleet", str(fleet),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(interpreter_s + delay)
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert "Traceback" not in err.decode() and "KeyboardInterrupt" not in err.decode(), err.decode()
    assert proc.returncode in (0, 2, 130)
    assert not _prosody_running(data), "Ctrl-C during start-up left Prosody running"


@pytest.mark.parametrize("make, message", [
    (lambda p: p.mkdir(), "cannot read the fleet file: Is a directory"),
    (lambda p: p.write_bytes(b"\xff\xfe"), "not a text file in UTF-8"),
    (lambda p: p.write_text(SMALL_FLEET.replace('name = "pump"', 'name = "pump"\ndisplay_name = "a\\u0000b"')),
     "devices[0] (pump).display_name: must not contain control characters"),
    (lambda p: p.write_text(SMALL_FLEET.replace('domain = "localhost"', 'domain = "a..b"')), "domain: must be a host name"),
])
async def test_up_with_a_bad_fleet_file_exits_2_with_the_message(tmp_path: Path, make, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.toml"
    make(bad)
    code, out, err = await run_cli("up", "--data", str(tmp_path / "grid"), "--fleet", str(bad))
    assert code == 2 and f"error: {bad}: " in err and message in err, err
    assert "Traceback" not in err and not (tmp_path / "grid").exists()
