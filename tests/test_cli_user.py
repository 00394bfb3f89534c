"""The CLI in the README's order, as a user meets it: the billing price in `status`, JSON that
carries what the table shows, `read` showing its values, one way to find the grid (and a stopped
grid said at once), argument errors instead of tracebacks, Ctrl-C and closed pipes."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path

import pytest
import pytest_asyncio

from conftest import ROOT, Env, run_cli, running_grid
from gridpresence.operator.library import GridOperator
from gridpresence.words import status_rows_of
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.protocol import DeviceState
from gridpresence.rules.audit_log import AuditJournal, audit_path
from gridpresence.rules.thresholds import Change
from timebase import NOW

# Every device of this grid is present quickly: `connect` must not stop before billing's price.
SMALL = {
    "domain": "localhost",
    "operators": [{"name": "olga"}],
    "billing": [{"name": "bill", "peak_price": 0.8, "off_peak_price": 0.6}],
    "devices": [
        {"name": "pump", "kind": "load", "rated_kw": 30, "utilisation": 0.92},  # high loading: an alarm
        {"name": "tank", "kind": "load", "rated_kw": 20, "critical": True, "critical_hold_s": 120},
        {"name": "diesel", "kind": "generator", "rated_kw": 60, "startup_s": 1},
    ],
}


@pytest_asyncio.fixture(scope="module")
async def small(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    async with running_grid(parse_fleet(SMALL), tmp_path_factory.mktemp("small-grid")) as grid:
        yield grid


def conn(grid: Grid) -> list[str]:
    return ["--connection", str(grid.connection_file)]


async def run_py(*args: str, env_vars: dict[str, str] | None = None, timeout: float = 60.0) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, **(env_vars or {})})
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(), err.decode()


# -- 1. the billing party's price ------------------------------------------------------------


async def test_status_waits_for_the_price_when_every_device_is_present(small: Grid) -> None:
    code, out, err = await run_cli("status", "--json", *conn(small))
    assert code == 0, err
    data = json.loads(out)
    assert {d["name"] for d in data["devices"]} == {"pump", "tank", "diesel"}
    assert data["price_per_kwh"] in (0.6, 0.8) and data["currency"] == "USD", data
    code, out, err = await run_cli("status", *conn(small))
    assert code == 0, err
    assert re.search(r"\nprice now: 0\.[68]0 USD/kWh \(", out), out


async def test_status_summary_is_the_summary_alone_as_text_or_json(small: Grid) -> None:
    code, out, err = await run_cli("status", "--summary", *conn(small))
    assert code == 0, err
    assert len(out.splitlines()) == 1 and out.startswith("3 devices (3 present): "), out
    assert "price now" not in out
    code, out, err = await run_cli("status", "--json", "--summary", "--filter", "kind=load", *conn(small))
    assert code == 0, err
    assert len(out.splitlines()) == 1, out
    data = json.loads(out)
    assert "devices" not in data, data
    assert data["summary"]["devices"] == 2 and data["summary"]["by_kind"] == {"load": 2}, data
    assert data["filter"] == "kind=load"
    assert data["price_per_kwh"] in (0.6, 0.8) and data["currency"] == "USD", data


# -- 2. JSON carries what the table shows; `read` shows its values --------------------------------


async def test_status_json_carries_everything_the_table_shows(small: Grid) -> None:
    op = GridOperator.from_connection(small.connection, resource="restrict")
    await op.connect()
    try:
        refused = await op.command("tank", "shed")  # a critical load: refused, and restricted for a while
        assert refused.reason is not None and refused.reason.value == "critical"
        await op.wait_for(lambda d: d["tank"].state is DeviceState.RESTRICTED, timeout=5)
    finally:
        await op.close()
    code, out, err = await run_cli("status", "--json", *conn(small))
    assert code == 0, err
    devices = {d["name"]: d for d in json.loads(out)["devices"]}
    assert devices["tank"]["critical"] is True and devices["pump"]["critical"] is False
    assert "critical process" in devices["tank"]["restriction"]["text"]
    # The table is made from that JSON alone: what it shows, the JSON has.
    rendered = {r[0]: r for r in status_rows_of(list(devices.values()))[1:]}
    code, out, err = await run_cli("status", *conn(small))
    assert code == 0, err
    shown = {line.split()[0]: line for line in out.splitlines()[1:] if line.strip() and not line.startswith("price")}
    assert shown["tank"].endswith(rendered["tank"][-1]) and "critical" in rendered["tank"][-1]
    assert out.splitlines()[0].split() == status_rows_of([])[0]


# -- 6. acknowledging and judging alarms from the command line -----------------------------------


async def test_signed_ask_passes_where_plain_chat_may_only_look(small: Grid) -> None:
    op = GridOperator.from_connection(small.connection, resource="signed-ask")
    await op.connect()
    try:
        assert (await op.ask("diesel", "start")).startswith("Refused start: an unsigned chat line")
        assert (await op.ask("diesel", "start", signed=True)).startswith("Done: starting")
        await op.wait_for(lambda d: d["diesel"].state is DeviceState.ON, timeout=10)
        assert (await op.ask("diesel", "stop", signed=True)).startswith("Done:")
    finally:
        await op.close()


async def test_ack_and_judge_an_alarm(small: Grid) -> None:
    code, out, err = 1, "", ""
    async with asyncio.timeout(30):  # the pump's high-loading alarm comes soon after it starts
        while code != 0:
            code, out, err = await run_cli("ack", "pump", "--json", *conn(small))
            assert code in (0, 1), err
            if code:
                await asyncio.sleep(1)
    acked = json.loads(out)
    assert acked["done"] and re.match(r"Acknowledged: alarm (\d+) \(high loading\)", acked["reply"]), acked
    alarm = re.match(r"Acknowledged: alarm (\d+)", acked["reply"]).group(1)  # type: ignore[union-attr]
    code, out, err = await run_cli("judge", "pump", alarm, "not-a-fault", *conn(small))
    assert code == 0, err
    assert out.startswith(f"pump: Recorded: alarm {alarm} (high_loading) is not a fault."), out
    code, out, _ = await run_cli("judge", "pump", "999", "fault", *conn(small))
    assert code == 1 and "raised no alarm '999'" in out
    code, _, err = await run_cli("judge", "pump", alarm, "maybe", *conn(small))
    assert code == 2 and "invalid choice: 'maybe'" in err
    code, _, err = await run_cli("ack", "no-such-device", *conn(small))
    assert code == 2 and "no device named 'no-such-device'" in err


async def test_connect_waits_for_the_tariff_bounded(small: Grid) -> None:
    op = GridOperator.from_connection(small.connection, resource="tariff-wait")
    await op.connect(settle_s=0.5)
    try:
        assert op.tariff is not None and op.price_now() in (0.6, 0.8)
    finally:
        await op.close()
    # With the billing party offline, connecting does not wait for a price that will not come.
    billing = small.bots.billing["bill"]  # type: ignore[union-attr]
    await billing.stop()
    try:
        op = GridOperator.from_connection(small.connection, resource="no-billing")
        started = time.monotonic()
        await op.connect(settle_s=1.0, tariff_s=30.0)
        try:
            assert op.tariff is None and time.monotonic() - started < 10
        finally:
            await op.close()
    finally:
        await billing.start()  # the small grid's last test: only so that it stops cleanly



async def test_read_shows_the_values_read(env: Env) -> None:
    code, out, err = await run_cli("read", "gen-1", "meter-1", "--connection", str(env.grid.connection_file))
    assert code == 0, err
    gen, meter = out.splitlines()
    assert gen.startswith("gen-1: executed") and "fuel 100%" in gen and "°C" in gen and "capacity 200.0 kW" in gen
    assert meter.startswith("meter-1: executed") and " kWh" in meter


# -- 3. one way to find the grid; a stopped grid is said at once ---------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stopped(env: Env, tmp_path: Path) -> Path:
    """A copy of the grid's data directory whose connection file names ports nothing listens on."""
    data = tmp_path / "stopped"
    data.mkdir()
    for name in ("fleet.json", "secrets.json"):
        shutil.copy(env.data / name, data / name)
    shutil.copytree(env.data / "keys", data / "keys")
    info = json.loads(env.grid.connection_file.read_text())
    port = _free_port()
    info["server"].update(c2s_port=port, port=port, bosh_url=f"https://127.0.0.1:{_free_port()}/http-bind",
                          web_url=None)
    info["relay"] = info.get("relay") or {"jid": "relay@localhost", "smtp_port": _free_port()}
    (data / "connection.json").write_text(json.dumps(info))
    return data


async def test_every_command_says_at_once_that_the_grid_is_not_running(stopped: Path) -> None:
    port = json.loads((stopped / "connection.json").read_text())["server"]["c2s_port"]
    by_env = {"GRIDPRESENCE_CONNECTION": str(stopped / "connection.json")}
    commands = [["status"], ["watch"], ["alarms"], ["shed", "load-a"], ["read", "load-a"], ["alert", "load-a"],
                ["quality", "meter-1"], ["rules", "revert", "load-a", "1"], ["ack", "load-a", "1"],
                ["keys", "repin", "--as", "alice", "bob@localhost"], ["mail-device", "mailer-1", "--commission"]]
    slots = asyncio.Semaphore(2)  # two cores: each run's own time must stay short

    async def timed(run: Awaitable[tuple[int, str, str]]) -> tuple[int, str, str]:
        async with slots:
            started = time.monotonic()
            code, out, err = await run
            assert time.monotonic() - started < 12, f"took {time.monotonic() - started:.0f} s (a login waits 20 s): {err}"
            return code, out, err

    results = await asyncio.gather(*(timed(run_cli(*args, env_vars=by_env)) for args in commands),
                                   timed(run_py("bots/load_shed.py", "--target-kw", "10", env_vars=by_env)))
    for code, out, err in results:
        assert code == 2 and f"the grid at 127.0.0.1:{port} is not running (connection refused)" in err, (out, err)
        assert "Traceback" not in err


async def test_grid_found_through_the_environment_by_keys_and_rules_audit(stopped: Path) -> None:
    at = NOW - dt.timedelta(days=3)
    AuditJournal(audit_path(stopped, "load-a")).append(
        Change(id=1, device="load-a", rule="high_loading", param="high_loading", old=80, new=88, by="alice", at=at,
               why="test entry"))
    by_env = {"GRIDPRESENCE_CONNECTION": str(stopped / "connection.json")}
    code, out, err = await run_cli("rules", "audit", "--json", env_vars=by_env)
    assert code == 0, err
    assert [c["why"] for c in json.loads(out)] == ["test entry"]
    (stopped / "keys" / "bob.sec.asc").rename(stopped / "bob.away")
    code, out, err = await run_cli("keys", "--json", env_vars=by_env)
    assert code == 0, err
    assert "alice" in json.loads(out)["parties"] and "bob" not in json.loads(out)["parties"]


# -- 4. numbers out of range are argument errors ---------------------------------------------------


@pytest.mark.parametrize("args, option", [
    (["shed", "load-a", "--ttl", "0"], "--ttl"),
    (["shed", "load-a", "--ttl", "-5"], "--ttl"),
    (["read", "load-a", "--until-available", "-1"], "--until-available"),
    (["shed", "load-a", "--settle", "nan"], "--settle"),
    (["watch", "--count", "-1"], "--count"),
    (["alarms", "--count", "2.5"], "--count"),
    (["alert", "load-a", "--timeout", "0"], "--timeout"),
    (["quality", "meter-1", "--timeout", "inf"], "--timeout"),
    (["mail-device", "meter-9", "--count", "-3"], "--count"),
    (["rules", "revert", "load-a", "0"], "CHANGE"),
])
async def test_numeric_arguments_are_checked(args: list[str], option: str) -> None:
    code, out, err = await run_cli(*args, "--connection", "/nonexistent/connection.json")
    assert code == 2 and f"argument {option}: must be" in err and "Traceback" not in err, err


async def test_a_device_name_after_filter_says_where_names_go(small: Grid) -> None:
    code, out, err = await run_cli("read", "--filter", "kind=load", "pump", *conn(small))
    assert code == 2 and out == "" and "Traceback" not in err, err
    assert "argument --filter: filter 'pump': expected KEY=VALUE" in err, err
    assert "device names go before --filter" in err, err
    code, out, err = await run_cli("read", "pump", "--filter", "kind=load", *conn(small))  # as the hint says
    assert code == 0 and "pump: executed" in out, (out, err)
    code, _, err = await run_cli("read", "--filter", "kind=lod", *conn(small))
    assert code == 2 and "kind 'lod' is not one of" in err and "device names go" not in err, err


async def test_load_shed_numbers_are_checked() -> None:
    for args, option in ((["--target-kw", "-1"], "--target-kw"), (["--target-kw", "1", "--price-limit", "x"],
                                                                  "--price-limit")):
        code, _, err = await run_py("bots/load_shed.py", *args)
        assert code == 2 and f"argument {option}: must be" in err, err


# -- 5. Ctrl-C and a closed pipe ------------------------------------------------------------------


@pytest.mark.parametrize("command", ["watch", "alarms"])
async def test_ctrl_c_ends_a_watch_with_exit_0(env: Env, command: str) -> None:
    exe = Path(sys.executable).with_name("gridpresence")
    proc = await asyncio.create_subprocess_exec(str(exe), command, "--connection", str(env.grid.connection_file),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(30):  # both say when they are live ("-- watching", "-- alarms to")
            while b"Ctrl-C to stop" not in await proc.stdout.readline():  # type: ignore[union-attr]
                pass
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and b"Traceback" not in err, err.decode()


async def test_status_into_a_closed_pipe_exits_quietly(env: Env) -> None:
    exe = Path(sys.executable).with_name("gridpresence")
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`head`) is already gone
    try:
        proc = await asyncio.create_subprocess_exec(str(exe), "status", "--connection", str(env.grid.connection_file),
                                                    stdout=write_end, stderr=asyncio.subprocess.PIPE)
    finally:
        os.close(write_end)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert proc.returncode == 1
