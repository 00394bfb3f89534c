"""Figure 16 of [00137], end to end on a real Prosody: presence, shed, critical refusal,
generator start-up, and a device that dies without a goodbye."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import signal
import sys

import pytest
from conftest import Env, run_cli
from collections.abc import Mapping

from gridpresence.operator import library as operator_module
from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol import Action, DeviceState, HealthStatus, OutcomeStatus, RejectReason
from gridpresence.protocol.models import utcnow


async def test_utility_sees_load_on_and_generator_off(alice: GridOperator) -> None:
    devices = alice.devices
    assert devices["load-a"].state is DeviceState.ON
    assert devices["load-a"].report is not None and devices["load-a"].report.telemetry.kw > 0
    assert devices["gen-2"].state is DeviceState.OFF
    assert devices["gen-2"].report is not None and devices["gen-2"].report.telemetry.fuel_pct > 0
    assert devices["breaker-1"].report.telemetry.breaker.value == "closed"  # type: ignore[union-attr]


async def test_shed_load_outcome_then_presence_off(alice: GridOperator) -> None:
    outcome = await alice.command("load-b", Action.SHED)
    assert outcome.status is OutcomeStatus.EXECUTED
    assert outcome.report is not None and outcome.report.state is DeviceState.OFF
    # The device publishes before it answers, so the view is already off.
    assert alice.devices["load-b"].state is DeviceState.OFF
    assert alice.devices["load-b"].report.telemetry.kw == 0.0  # type: ignore[union-attr]
    again = await alice.command("load-b", Action.RESTORE)
    assert again.ok and alice.devices["load-b"].state is DeviceState.ON


async def test_fan_out_in_batches_answers_every_device_and_cancels_cleanly(alice: GridOperator,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """command_many sends its commands a batch at a time (the first go out while the rest are
    being signed); every device still gets one and each outcome lands under its own name."""
    monkeypatch.setattr(operator_module, "FAN_OUT_BATCH", 2)
    names = sorted(n for n, view in alice.devices.items() if view.present)
    assert len(names) > 4  # several batches
    outcomes = await alice.command_many(names, Action.READ)
    assert list(outcomes) == names
    for name, outcome in outcomes.items():
        assert outcome.status is OutcomeStatus.EXECUTED, (name, outcome)
        assert outcome.device == alice.devices[name].jid
    # Cancelled between two batches: the commands it had started are cancelled with it.
    fan_out = asyncio.ensure_future(alice.command_many(names, Action.READ))
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert not fan_out.done()
    # Each device's command runs in a task of its own, in the fan-out's window (library.FAN_OUT_WINDOW).
    started = [t for t in asyncio.all_tasks() if t.get_coro().__qualname__ == "GridOperator.command_many.<locals>.one"]
    assert started, "the first batch is under way"
    fan_out.cancel()
    with pytest.raises(asyncio.CancelledError):
        await fan_out
    await asyncio.gather(*started, return_exceptions=True)
    assert all(t.cancelled() for t in started)
    assert alice.issuer.pending == {}


async def test_other_operator_sees_the_change(env: Env, alice: GridOperator) -> None:
    async with env.operator("bob", resource="observer") as bob:
        assert bob.devices["load-c"].state is DeviceState.ON
        assert (await alice.command("load-c", Action.SHED)).ok
        await bob.wait_for(lambda d: d["load-c"].state is DeviceState.OFF, timeout=5)
        await alice.command("load-c", Action.RESTORE)


async def test_critical_load_rejects_shed_and_goes_restricted(env: Env, alice: GridOperator) -> None:
    outcome = await alice.command("load-crit", Action.SHED)
    assert outcome.status is OutcomeStatus.REJECTED
    assert outcome.reason is RejectReason.CRITICAL
    view = alice.devices["load-crit"]
    assert view.state is DeviceState.RESTRICTED
    assert view.report is not None and view.report.restriction is not None
    assert "critical" in view.report.restriction.note
    assert view.report.restriction.until is not None
    assert view.report.telemetry.kw > 0  # still drawing: it was not shed
    # While restricted it refuses everything but read.
    assert (await alice.command("load-crit", Action.RESTORE)).reason is RejectReason.RESTRICTED
    read = await alice.command("load-crit", Action.READ)
    assert read.ok and read.report is not None and read.report.telemetry.load_pct is not None


async def test_generator_start_restricted_rejects_stop_then_on(alice: GridOperator) -> None:
    started = await alice.command("gen-1", Action.START)
    assert started.ok
    assert alice.devices["gen-1"].state is DeviceState.RESTRICTED
    assert alice.devices["gen-1"].report.restriction.note == "starting"  # type: ignore[union-attr]
    stop = await alice.command("gen-1", Action.STOP)
    assert stop.status is OutcomeStatus.REJECTED and stop.reason is RejectReason.RESTRICTED
    await alice.wait_for(lambda d: d["gen-1"].state is DeviceState.ON, timeout=8)
    assert alice.devices["gen-1"].report.telemetry.kw > 0  # type: ignore[union-attr]
    assert (await alice.command("gen-1", Action.STOP)).ok
    assert alice.devices["gen-1"].state is DeviceState.OFF


async def test_breaker_open_close_and_unsupported(alice: GridOperator) -> None:
    opened = await alice.command("breaker-1", Action.OPEN)
    assert opened.ok and opened.report.telemetry.breaker.value == "open"  # type: ignore[union-attr]
    assert alice.devices["breaker-1"].state is DeviceState.OFF
    assert (await alice.command("breaker-1", Action.CLOSE)).ok
    shed = await alice.command("breaker-1", Action.SHED)
    assert shed.reason is RejectReason.NOT_SUPPORTED
    assert (await alice.command("meter-1", Action.START)).reason is RejectReason.NOT_SUPPORTED


async def test_set_time_and_read(alice: GridOperator) -> None:
    ok = await alice.command("meter-1", Action.SET_TIME, args={"time": (utcnow() + dt.timedelta(days=400)).isoformat()})
    assert ok.ok and "offset" in ok.detail
    bad = await alice.command("meter-1", Action.SET_TIME, args={"time": "tomorrow"})
    assert bad.reason is RejectReason.INVALID_ARGUMENTS
    read = await alice.command("meter-1", Action.READ)
    assert read.ok and read.report is not None and read.report.telemetry.energy_kwh is not None


async def test_master_sums_its_branches(alice: GridOperator) -> None:
    """A branch meter reports the sum of its loads' presence, to within the publish deadband."""
    from gridpresence.device.agent import LOAD_DEADBAND_PCT

    def consistent(d: Mapping[str, DeviceView]) -> bool:
        branch = d["branch-a"].report
        loads = sum(d[f"load-{c}"].report.telemetry.kw or 0 for c in "abcde")  # type: ignore[union-attr]
        slack = LOAD_DEADBAND_PCT / 100 * 400 + 0.01
        return branch is not None and abs((branch.telemetry.kw or 0) - loads) <= slack

    await alice.wait_for(consistent, timeout=5)
    assert (await alice.command("load-a", Action.SHED)).ok  # 50 kW out of branch A
    await alice.wait_for(lambda d: d["load-a"].state is DeviceState.OFF and consistent(d), timeout=5)
    assert (await alice.command("load-a", Action.RESTORE)).ok
    await alice.wait_for(lambda d: d["load-a"].state is DeviceState.ON and consistent(d), timeout=5)
    master = alice.devices["master"].report
    assert master is not None and master.telemetry.kw is not None and master.telemetry.kw > 0


async def test_presence_is_refreshed_every_interval_without_changes(alice: GridOperator) -> None:
    seqs: list[int] = []
    stop = alice.tracker.listen(lambda c: c.current.name == "pulse-meter" and c.current.report
                                and seqs.append(c.current.report.seq))
    try:
        await asyncio.sleep(3.6)  # refresh_s = 1
    finally:
        stop()
    assert len(seqs) >= 3 and seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert alice.devices["pulse-meter"].health is HealthStatus.OK


# -- presence error -------------------------------------------------------------------------


def _fresh_and_on(view: DeviceView) -> bool:
    # Present and healthy: a stale "on" from before an earlier kill does not count.
    return view.present and view.health is HealthStatus.OK and view.state is DeviceState.ON


async def _start_apart(env: Env, name: str) -> asyncio.subprocess.Process:
    exe = os.path.join(os.path.dirname(sys.executable), "gridpresence")
    return await asyncio.create_subprocess_exec(
        exe, "bots", "--data", str(env.data), "--only", name,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)


async def test_device_killed_without_goodbye_is_presence_error(env: Env, alice: GridOperator) -> None:
    proc = await _start_apart(env, "victim-1")
    try:
        await alice.wait_for(lambda d: _fresh_and_on(d["victim-1"]), timeout=20)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await alice.wait_for(lambda d: d["victim-1"].health is HealthStatus.PRESENCE_ERROR, timeout=10)
        view = alice.devices["victim-1"]
        assert view.label == "presence-error" and "without a goodbye" in view.health_reason
        # An operator who connects afterwards learns it from the watchdog service, via the CLI.
        code, out, err = await run_cli("status", "--json", "--connection", str(env.grid.connection_file))
        assert code == 0, err
        listed = {d["name"]: d for d in json.loads(out)["devices"]}
        assert listed["victim-1"]["state"] == "presence-error"
        assert listed["load-a"]["state"] in ("on", "off")
        # A command to it is undeliverable, not silently lost.
        outcome = await alice.command("victim-1", Action.SHED)
        assert outcome.status is OutcomeStatus.UNDELIVERABLE
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_frozen_device_is_pinged_then_flagged_then_recovers(env: Env, alice: GridOperator) -> None:
    proc = await _start_apart(env, "victim-2")
    try:
        await alice.wait_for(lambda d: _fresh_and_on(d["victim-2"]), timeout=20)
        proc.send_signal(signal.SIGSTOP)  # TCP stays open: only the missing refresh can tell
        await alice.wait_for(lambda d: d["victim-2"].health is HealthStatus.PRESENCE_ERROR, timeout=15)
        reason = alice.devices["victim-2"].health_reason
        assert "no presence refresh" in reason and "ping" in reason
        proc.send_signal(signal.SIGCONT)
        await alice.wait_for(lambda d: d["victim-2"].health is HealthStatus.OK, timeout=15)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 10)


async def test_device_goodbye_is_gone_not_error(env: Env, alice: GridOperator) -> None:
    proc = await _start_apart(env, "victim-1")
    try:
        await alice.wait_for(lambda d: _fresh_and_on(d["victim-1"]), timeout=20)
        proc.send_signal(signal.SIGTERM)  # a clean stop says goodbye
        _, err = await asyncio.wait_for(proc.communicate(), 10)
        assert proc.returncode == 0 and b"Traceback" not in err, err.decode(errors="replace")
        await alice.wait_for(lambda d: d["victim-1"].health is HealthStatus.GONE, timeout=10)
        assert alice.devices["victim-1"].label == "gone"
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
