"""The narrated demo played by ``gridpresence demo``: figure 16 of [00137] on the demo fleet."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from gridpresence.gateway.fleet import with_sites
from gridpresence.operator.library import GridOperator
from gridpresence.words import outcome_line, status_rows, table
from gridpresence.config import Fleet
from gridpresence.xmpp.session import ConnectionInfo, SessionError
from gridpresence.protocol.models import Action, DeviceState, OutcomeStatus

SCRIPT_TARGET_KW = 150.0
LOAD_SHED_SCRIPT = Path(__file__).resolve().parents[3] / "bots" / "load_shed.py"  # the checkout's bots/


def say(text: str) -> None:
    print(f"\n== {text}", flush=True)


async def run_scenario(info: ConnectionInfo, fleet: Fleet, connection_file: Path) -> None:
    """Played on a grid this process hosts (`demo`) or on one running elsewhere (`scenario`)."""
    async with GridOperator.from_connection(info, resource="demo") as op:
        say("the utility sees every device's rich presence")
        print(table(status_rows(dict(op.devices))), flush=True)
        tariff = await op.wait_tariff(timeout=5)
        say(f"billing sent its tariff: {op.price_now():.2f} {tariff.currency}/kWh now")

        loads = [v.name for v in op.devices.values() if v.kind and v.kind.value == "load" and v.state is DeviceState.ON
                 and v.report and not v.report.critical]
        critical = [v.name for v in op.devices.values() if v.report and v.report.critical]
        if loads:
            say(f"shed {loads[0]}, a load that is on")
            print(outcome_line(loads[0], await op.command(loads[0], Action.SHED)), flush=True)
        if critical:
            say(f"shed {critical[0]}, a critical load: it refuses and goes restricted")
            print(outcome_line(critical[0], await op.command(critical[0], Action.SHED)), flush=True)
        gens = [v.name for v in op.devices.values() if v.kind and v.kind.value == "generator" and v.state is DeviceState.OFF]
        if gens:
            gen = gens[0]
            say(f"start {gen}: restricted while starting, refuses stop, then on")
            print(outcome_line(gen, await op.command(gen, Action.START)), flush=True)
            print(outcome_line(gen, await op.command(gen, Action.STOP)), flush=True)
            startup = fleet.device(gen).startup_s
            await op.wait_for(lambda d: d[gen].state is DeviceState.ON, timeout=startup + 10)
            report = op.devices[gen].report
            print(f"{gen}: {report.status_text() if report else '?'}", flush=True)
        field = [n for n in with_sites(fleet)[1] if n in op.devices and op.devices[n].present]
        if field:  # a real protocol stack under the same commands: the coil written, then read back
            say(f"shed and restore {field[0]}, a Modbus IED behind the field gateway")
            print(outcome_line(field[0], await op.command(field[0], Action.SHED)), flush=True)
            print(outcome_line(field[0], await op.command(field[0], Action.RESTORE)), flush=True)

    say(f"the example load-shed script: shed to {SCRIPT_TARGET_KW:.0f} kW net, start a generator if that is not enough")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(LOAD_SHED_SCRIPT), "--target-kw", str(SCRIPT_TARGET_KW),
        "--connection", str(connection_file))
    await proc.wait()

    async with GridOperator.from_connection(info, resource="demo") as op:
        say("after the script")
        print(table(status_rows(dict(op.devices))), flush=True)
    say(f"log in with any XMPP client as {info.operators[0].jid} on {info.server.host}:{info.server.c2s_port} "
        f"(password in {connection_file}) to watch the devices")


async def run_relay_step(info: ConnectionInfo, device: str, ttl_s: float, away_timeout_s: float = 120.0) -> bool:
    """The demo's store-and-forward step, for a device whose process (container) is stopped: a
    command is queued at the relay, delivered when the device comes back, and the device's own
    outcome reaches this issuer. True when the command was executed."""
    if info.relay is None:
        raise SessionError("the connection file names no relay: start one (`gridpresence relay`) first")
    async with GridOperator.from_connection(info, resource="demo-relay") as op:
        say(f"relay: waiting for {device} to have no presence (stop its container or process)")
        try:
            await op.wait_for(lambda d: device in d and not d[device].present, timeout=away_timeout_s)
        except TimeoutError:
            raise SessionError(f"{device} still has presence after {away_timeout_s:g} s: stop it first") from None
        # Whatever it was last seen doing, the opposite: an action the device will execute.
        action = Action.RESTORE if op.devices[device].state is DeviceState.OFF else Action.SHED
        queued = await op.command(device, action, ttl_s=ttl_s)
        print(outcome_line(device, queued), flush=True)
        if queued.status is not OutcomeStatus.QUEUED:
            return queued.ok
        say(f"{action.value} {device} is queued at the relay: start {device} again to have it delivered")
        final = await op.final_outcome(queued)
        print(outcome_line(device, final), flush=True)
        return final.status is OutcomeStatus.EXECUTED
