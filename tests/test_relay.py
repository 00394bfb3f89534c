"""The email store-and-forward relay, run as its own process (`gridpresence relay`) against the
session's Prosody: routing by presence, expiry, sender screening, mail-only devices, group
commands and alerts, and durability across kill -9."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import random
import shutil
import signal
import smtplib
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio
from conftest import Env, hosted_fleet, run_cli, running_grid, start_up, until

from gridpresence.operator.availability import command_group, wait_available
from gridpresence.config import fleet_toml, parse_fleet
from gridpresence.host.fleet import device_agent
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import ConnectionInfo, RelayEndpoint
from gridpresence.transport.tls import tls_context
from gridpresence.protocol.models import Action, Command, DeviceState, Outcome, OutcomeStatus, RejectReason
from gridpresence.protocol.codec import command_to_xml, outcome_to_xml
from gridpresence.protocol.openpgp import element_to_text
from gridpresence.security.reports import ReportReader
from gridpresence.protocol.billing_report import PartName, billing_report_from_xml
from gridpresence.transport.mail import MailTLSError, SignedCommand, build_mail, open_smtp
from gridpresence.operator.relay_route import RelayRoute
from gridpresence.services.relay.commissioning import commission, readers_keys
from gridpresence.security.parts import NotForYou
from gridpresence.server.certs import ensure_certificates
from gridpresence.services.relay.mail_device import MailDevice
from gridpresence.services.relay.queue import CommandQueue
from gridpresence.services.relay.service import RelayService
from gridpresence.security.signed import sign_payload
from gridpresence.server.ports import free_port

COPIED = ("connection.json", "secrets.json", "fleet.json")


class RelayProcess:
    """`gridpresence relay` as a child process, so kill -9 is real."""

    def __init__(self, data: Path, queue: Path, port: int, bind: str = "127.0.0.1") -> None:
        self.data, self.queue, self.port, self.bind = data, queue, port, bind
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        exe = Path(sys.executable).with_name("gridpresence")
        self.proc = await asyncio.create_subprocess_exec(
            str(exe), "relay", "--data", str(self.data), "--queue", str(self.queue), "--smtp-port", str(self.port),
            "--bind", self.bind,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)  # type: ignore[union-attr]
        if not line.startswith(b"relay up"):
            err = await self.proc.stderr.read()  # type: ignore[union-attr]
            raise AssertionError(f"relay did not start: {line!r} {err.decode()[-2000:]}")

    async def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(self.proc.wait(), 20)


_commissioned: set[str] = set()


async def commission_once(env: Env, name: str) -> None:
    """A mail-only device is commissioned once: its key announced over PEP, its readers' keys kept."""
    if name in _commissioned:
        return
    spec = env.fleet.device(name)
    async with env.operator("alice", resource=f"announce-{os.urandom(3).hex()}"):
        pass  # alice has announced her key over PEP: the device can seal the power-quality part to her
    found = await commission(name, env.fleet.jid(name), env.grid.secrets.password(name), env.grid.endpoint,
                             PartyKeys.in_data_dir(env.data, name), env.fleet.report_audience(spec).everyone)
    assert {"billing@localhost", "alice@localhost"} <= set(found)
    _commissioned.add(name)


@pytest_asyncio.fixture
async def grid_dir(env: Env, tmp_path: Path) -> Path:
    """A copy of the grid's connection, secrets, fleet and keys, so each relay has its own files."""
    await commission_once(env, "mailer-1")
    data = tmp_path / "grid"
    data.mkdir()
    for name in COPIED:
        shutil.copy(env.data / name, data / name)
    shutil.copytree(env.data / "keys", data / "keys")
    return data


@pytest_asyncio.fixture
async def relay(grid_dir: Path, tmp_path: Path) -> AsyncIterator[RelayProcess]:
    proc = RelayProcess(grid_dir, tmp_path / "queue.sqlite3", free_port())
    await proc.start()
    try:
        yield proc
    finally:
        await proc.stop()


def operator(grid_dir: Path, name: str = "alice") -> GridOperator:
    info = ConnectionInfo.load(grid_dir / "connection.json")
    assert info.relay is not None  # the relay published itself
    return GridOperator.from_connection(info, operator=name, resource=f"relay-test-{os.urandom(3).hex()}")


@pytest_asyncio.fixture
async def op(relay: RelayProcess) -> AsyncIterator[GridOperator]:
    grid = operator(relay.data)
    await grid.connect()
    try:
        yield grid
    finally:
        await grid.close()


class CountedDevice:
    """A device bot that counts how often each command id took effect."""

    def __init__(self, env: Env, name: str) -> None:
        self.agent = device_agent(env.fleet, name, env.grid.endpoint, env.grid.secrets.password(name),
                                  PartyKeys.in_data_dir(env.data, name))
        self.executions: Counter[str] = Counter()
        run = self.agent.execute

        def counted(cmd: Command, now, *rest):  # type: ignore[no-untyped-def]
            self.executions[cmd.id] += 1
            return run(cmd, now, *rest)

        self.agent.execute = counted  # type: ignore[method-assign]

    async def __aenter__(self) -> CountedDevice:
        await self.agent.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.agent.stop()


# -- routing by presence ----------------------------------------------------------------


async def test_command_to_absent_device_is_queued_then_executed_on_return(env: Env, op: GridOperator) -> None:
    assert not op.devices["far-1"].present
    queued = await op.command("far-1", Action.SHED, ttl_s=60)
    assert queued.status is OutcomeStatus.QUEUED and "relay" in queued.detail
    second = await op.command("far-1", Action.READ, ttl_s=60)
    assert second.status is OutcomeStatus.QUEUED
    async with CountedDevice(env, "far-1") as dev:
        final = await op.final_outcome(queued)
        assert final.status is OutcomeStatus.EXECUTED, final.summary()
        assert final.report is not None and final.report.state is DeviceState.OFF
        read = await op.final_outcome(second)
        assert read.ok and read.report is not None and read.report.state is DeviceState.OFF  # in order: after the shed
        assert dev.executions == Counter({queued.command_id: 1, second.command_id: 1})
        # Present now: commands go straight over XMPP again.
        await op.wait_for(lambda d: d["far-1"].present, timeout=5)
        assert (await op.command("far-1", Action.RESTORE)).ok


async def test_command_expires_when_device_does_not_return(env: Env, op: GridOperator) -> None:
    queued = await op.command("far-2", Action.SHED, ttl_s=1.5)
    assert queued.status is OutcomeStatus.QUEUED
    final = await op.final_outcome(queued)
    assert final.status is OutcomeStatus.EXPIRED
    assert "no presence" in final.detail  # the relay's verdict, not the library's own time-out
    async with CountedDevice(env, "far-2") as dev:  # it comes back too late: nothing happens
        await op.wait_for(lambda d: d["far-2"].present, timeout=5)
        await asyncio.sleep(0.5)
        assert not dev.executions
        assert op.devices["far-2"].state is DeviceState.ON


async def test_cli_prints_queued_and_waits_for_final(env: Env, relay: RelayProcess) -> None:
    conn = ["--connection", str(relay.data / "connection.json")]
    code, out, err = await run_cli("read", "far-3", *conn, "--ttl", "2")
    assert code == 0, err
    assert "far-3: queued" in out
    code, out, _ = await run_cli("shed", "far-3", *conn, "--ttl", "1.5", "--wait")
    assert code == 1 and "far-3: expired" in out
    # A group: the available member acts now, the absent one is retried until the time-out.
    code, out, _ = await run_cli("read", "load-j", "far-3", *conn, "--until-available", "1.5")
    assert code == 1 and "load-j: executed" in out and "far-3: expired" in out, out


async def test_relay_down_means_undeliverable_not_lost(relay: RelayProcess, op: GridOperator) -> None:
    await relay.stop()
    outcome = await op.command("far-2", Action.SHED)
    assert outcome.status is OutcomeStatus.UNDELIVERABLE and "unreachable" in outcome.detail


# -- duplicates ------------------------------------------------------------------------------


async def test_same_mail_twice_and_an_xmpp_copy_take_effect_once(env: Env, relay: RelayProcess,
                                                                 op: GridOperator) -> None:
    assert op.relay is not None
    cmd = Command.new(Action.READ, op.jid, ttl_s=60)
    first = await op.queue_command(cmd, "far-4@localhost")
    assert first.status is OutcomeStatus.QUEUED
    mail = build_mail(cmd, op.jid, ["far-4@localhost"])
    with open_smtp(op.relay.relay.smtp_host, op.relay.relay.smtp_port, tls_context(env.grid.server.certs.ca)) as smtp:
        smtp.send_message(mail, from_addr=op.jid, to_addrs=["far-4@localhost"])  # the same mail again: accepted
    async with CountedDevice(env, "far-4") as dev:
        final = await op.final_outcome(first)
        assert final.ok
        await op.wait_for(lambda d: d["far-4"].present, timeout=5)
        # The issuer also sends its copy over XMPP now that the device is back.
        copy = await op.send_command(cmd, op.devices["far-4"].full_jid or "")
        assert copy.ok
        await asyncio.sleep(0.3)
        assert dev.executions == Counter({cmd.id: 1})
    queue = CommandQueue(relay.queue)
    assert queue.counts() == {"closed": 1}
    queue.close()



# -- screening ------------------------------------------------------------------------------


async def test_relay_refuses_unknown_senders_recipients_big_and_bad_mail(env: Env, relay: RelayProcess,
                                                                         op: GridOperator) -> None:
    cmd = Command.new(Action.SHED, "alice@localhost", ttl_s=60)
    good = build_mail(cmd, "alice@localhost", ["far-1@localhost"])
    with open_smtp("127.0.0.1", relay.port, tls_context(env.grid.server.certs.ca)) as smtp:
        smtp.ehlo()
        code, _ = smtp.mail("mallory@example.com")
        assert code == 553
        smtp.rset()
        assert smtp.mail("alice@localhost")[0] == 250
        assert smtp.rcpt("nobody@localhost")[0] == 550
        smtp.rset()
        with pytest.raises(smtplib.SMTPSenderRefused) as big:  # announced too big with SIZE=
            smtp.sendmail("alice@localhost", ["far-1@localhost"], b"x" * 300_000)
        assert big.value.smtp_code == 552
        with pytest.raises(smtplib.SMTPDataError) as bad:
            smtp.sendmail("alice@localhost", ["far-1@localhost"], b"Subject: shed it\r\n\r\nplease\r\n")
        assert bad.value.smtp_code == 554
        with pytest.raises(smtplib.SMTPDataError) as forged:  # a device may not mail commands
            smtp.send_message(build_mail(cmd, "far-2@localhost", ["far-1@localhost"]), from_addr="far-2@localhost",
                              to_addrs=["far-1@localhost"])
        assert forged.value.smtp_code == 550
        with pytest.raises(smtplib.SMTPDataError) as other:  # nor an operator as someone else
            smtp.send_message(build_mail(cmd, "bob@localhost", ["far-1@localhost"]), from_addr="bob@localhost",
                              to_addrs=["far-1@localhost"])
        assert other.value.smtp_code == 550
        # The relay is still up and takes good mail.
        smtp.send_message(good, from_addr="alice@localhost", to_addrs=["far-1@localhost"])
    # Over XMPP, an operator cannot pass off an outcome as a device's.
    forged = op.client.make_message(mto="relay@localhost/relay", mtype="normal")
    forged.append(outcome_to_xml(Outcome(command_id=cmd.id, device="far-1@localhost", status=OutcomeStatus.EXECUTED)))
    forged.send()
    garbage = op.client.make_message(mto="relay@localhost/relay", mtype="normal")
    garbage.append(ET.fromstring("<outcome xmlns='urn:gridpresence:0' command='x' status='melted'/>"))
    garbage.send()
    await op.client.plugin["xep_0199"].send_ping("relay@localhost/relay", timeout=5)  # it is still answering
    queue = CommandQueue(relay.queue)
    assert queue.counts() == {"queued": 1}  # only the good mail was stored, and it is still open
    queue.close()
    # An operator's command the relay refuses ends "undeliverable" with the relay's reply.
    assert op.relay is not None
    foreign = Command.new(Action.SHED, "alice@localhost", ttl_s=60)
    refused = await op.queue_command(foreign, "nobody@localhost")
    assert refused.status is OutcomeStatus.UNDELIVERABLE and "550" in refused.detail


# -- the reverse way ------------------------------------------------------------------------


async def test_mail_only_device_reaches_operators(env: Env, relay: RelayProcess) -> None:
    info = ConnectionInfo.load(relay.data / "connection.json")
    assert info.relay is not None
    async with operator(relay.data, "alice") as alice, operator(relay.data, "bob") as bob:
        assert alice.devices["mailer-1"].report is None
        code, out, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--count", "1")
        assert code == 0, err
        assert "mailer-1: mailed" in out
        for grid in (alice, bob):
            await grid.wait_for(lambda d: d["mailer-1"].report is not None, timeout=5)
            view = grid.devices["mailer-1"]
            assert view.label == "on" and "mail" in view.health_reason and not view.present
            assert view.report is not None and view.report.telemetry.kw is not None
        # A device may only answer for itself, and only devices push data.
        device = MailDevice(env.fleet.device("mailer-1"), "mailer-1@localhost", info.relay,
                            secret=env.grid.keys.secret("mailer-1"))
        forged = Outcome(command_id="c-1", device="far-1@localhost", status=OutcomeStatus.EXECUTED)
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await device.push_outcome(forged)
        assert refused.value.smtp_code == 550
        device.close()
        impostor = MailDevice(env.fleet.device("mailer-1"), "alice@localhost", info.relay)
        with pytest.raises(smtplib.SMTPDataError):
            await impostor.push_report()
        impostor.close()


async def test_mailed_outcome_reaches_the_issuer(env: Env, relay: RelayProcess) -> None:
    """The upstream half of [00118]: a device that can only send mail answers a relayed
    command by mail, and the relay hands that outcome to the command's issuer over XMPP."""
    info = ConnectionInfo.load(relay.data / "connection.json")
    assert info.relay is not None
    async with operator(relay.data, "alice") as alice:
        queued = await alice.command("mailer-1", "read", ttl_s=30)
        assert queued.status is OutcomeStatus.QUEUED
        device = MailDevice(env.fleet.device("mailer-1"), "mailer-1@localhost", info.relay,
                            secret=env.grid.keys.secret("mailer-1"))
        try:
            answer = Outcome(command_id=queued.command_id, device="mailer-1@localhost",
                             status=OutcomeStatus.EXECUTED, detail="read by mail", report=device.report())
            await device.push_outcome(answer)
        finally:
            device.close()
        final = await asyncio.wait_for(alice.final_outcome(queued), 15)
        assert final.status is OutcomeStatus.EXECUTED and final.detail == "read by mail"
        assert final.report is not None and final.report.telemetry.kw is not None


# -- alerts, pre-stored messages, group commands -------------------------------------------------


async def test_group_command_retries_absent_and_restricted_members(env: Env, op: GridOperator) -> None:
    # relay-crit refuses a shed and stays restricted; far-3 is absent; load-j is available.
    group = ["load-j", "far-3", "relay-crit"]
    crit = await op.command("relay-crit", Action.SHED)
    assert crit.reason is RejectReason.CRITICAL and op.devices["relay-crit"].state is DeviceState.RESTRICTED

    async def far_returns_later() -> None:
        await asyncio.sleep(1.0)
        async with CountedDevice(env, "far-3"):
            await asyncio.sleep(2.5)

    late = asyncio.ensure_future(far_returns_later())
    outcomes = await command_group(op, group, Action.READ, timeout_s=3.0)
    await late
    assert set(outcomes) == set(group)
    assert outcomes["load-j"].ok
    assert outcomes["far-3"].ok  # retried when it appeared
    assert outcomes["relay-crit"].status is OutcomeStatus.EXPIRED  # still restricted at the time-out
    assert "not available" in outcomes["relay-crit"].detail


async def test_alert_when_device_becomes_available(env: Env, op: GridOperator) -> None:
    with pytest.raises(TimeoutError):
        await wait_available(op, "far-2", timeout=0.3)
    waiting = asyncio.ensure_future(wait_available(op, "far-2", timeout=10))
    await asyncio.sleep(0.2)
    assert not waiting.done()
    async with CountedDevice(env, "far-2"):
        view = await waiting
        assert view.present and view.state is DeviceState.ON


# -- durability -----------------------------------------------------------------------------------


@pytest.mark.timeout(240)
async def test_kill_9_while_queued_and_while_delivering(env: Env, relay: RelayProcess, op: GridOperator) -> None:
    """1,000 commands queued; the relay is killed with them queued, and again mid-delivery.
    Every command ends executed exactly once, or reported expired (never executed)."""
    queued = list(await asyncio.gather(*(op.command("far-1", Action.READ, ttl_s=120) for _ in range(950))))
    short = list(await asyncio.gather(*(op.command("far-1", Action.READ, ttl_s=4) for _ in range(50))))
    queued += short
    assert all(o.status is OutcomeStatus.QUEUED for o in queued)
    await relay.kill9()  # 1: everything queued, nothing delivered
    check = CommandQueue(relay.queue)
    assert check.counts() == {"queued": 1000}
    check.close()
    await asyncio.sleep(4.2)  # the short ones expire while the relay is down
    await relay.start()
    finals = asyncio.ensure_future(asyncio.gather(*(op.final_outcome(o) for o in queued)))
    async with CountedDevice(env, "far-1") as dev:
        while sum(dev.executions.values()) < 100:
            await asyncio.sleep(0.005)
        await relay.kill9()  # 2: while delivering
        check = CommandQueue(relay.queue)
        mid = check.counts()
        check.close()
        await relay.start()
        try:
            results = await asyncio.wait_for(asyncio.shield(finals), 60)
        except TimeoutError:
            check = CommandQueue(relay.queue)
            raise AssertionError(f"finals missing; queue {check.counts()}, executions {sum(dev.executions.values())}")
    print("states at the second kill:", mid)
    assert mid.get("delivering", 0) + mid.get("queued", 0) > 0, mid  # it really was mid-delivery
    by_status = Counter(r.status for r in results)
    assert by_status == Counter({OutcomeStatus.EXECUTED: 950, OutcomeStatus.EXPIRED: 50}), by_status
    assert all(dev.executions[o.command_id] == 0 for o in short)
    assert all(dev.executions[o.command_id] == 1 for o in queued[:950])
    assert sum(dev.executions.values()) == 950


async def test_up_starts_the_relay(tmp_path: Path) -> None:
    fleet = tmp_path / "fleet.toml"
    fleet.write_text('[[operators]]\nname = "olga"\n\n[[devices]]\nname = "pump"\nkind = "load"\nrated_kw = 30\n')
    data = tmp_path / "grid"
    proc, banner = await start_up(data, fleet)
    try:
        info = ConnectionInfo.load(data / "connection.json")
        assert info.relay is not None and info.relay.jid == "relay@localhost"
        assert f"SMTP {info.relay.smtp_host}:{info.relay.smtp_port}" in banner
        assert (data / "relay" / "queue.sqlite3").exists()
        code, out, err = await run_cli("mail-device", "pump", "--data", str(data), "--count", "1")
        assert code == 0 and "pump: mailed" in out, err
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


# -- start-up beside hosted devices ------------------------------------------------------------------

HOSTED_LOADS = ("h-pump", "h-fan", "h-heater")
# Refreshes far apart: what the relay knows of a device comes from the start-up alone.
HOSTED_GRID = hosted_fleet([*({"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in HOSTED_LOADS),
                            {"name": "c2s-pump", "kind": "load", "rated_kw": 10, "refresh_s": 600.0, "hosting": "c2s"}])
BOUNCED = "Component not connected"  # Prosody's line for each stanza to a component not connected


async def _relay_delivers_at_once(connection: ConnectionInfo, names: tuple[str, ...]) -> None:
    """A command mailed to the relay for each device (all present) is delivered without waiting
    for a presence: the relay knows each one is there."""
    async with GridOperator.from_connection(connection, resource=f"t-{os.urandom(3).hex()}") as op:
        await op.wait_for(lambda d: all(d[n].present for n in names), timeout=30)
        queued = [await op.queue_command(Command.new(Action.READ, op.jid, ttl_s=60), op.device(n).jid)
                  for n in names]
        assert {q.status for q in queued} == {OutcomeStatus.QUEUED}, queued
        finals = await asyncio.wait_for(asyncio.gather(*(op.final_outcome(q) for q in queued)), 20)
        assert {f.status for f in finals} == {OutcomeStatus.EXECUTED}, finals


async def test_relay_logs_in_after_the_component_link_and_knows_every_hosted_device(tmp_path: Path) -> None:
    """The grid's relay probes the devices it watches at its login; with the component link not
    yet up, Prosody bounced each hosted device's two stanzas (two log lines a device). It logs
    in after the link, and still learns every device's presence."""
    fleet = parse_fleet(HOSTED_GRID)
    async with running_grid(fleet, tmp_path / "grid", dashboard=False) as grid:
        assert grid.relay is not None
        tracker = grid.relay.tracker
        everyone = [fleet.jid(n) for n in (*HOSTED_LOADS, "c2s-pump")]
        await until(lambda: all(tracker.views[j].present for j in everyone), timeout=20,
                    what="the relay to see every device present")
        assert {tracker.views[fleet.jid(n)].transport for n in HOSTED_LOADS} == {"component"}
        await _relay_delivers_at_once(grid.connection, (*HOSTED_LOADS, "c2s-pump"))
        log_text = grid.server.log_path.read_text()
        assert "devices.localhost:component" in log_text  # (the log is the one the component writes to)
        assert BOUNCED not in log_text, [ln for ln in log_text.splitlines() if BOUNCED in ln][:4]


async def test_up_processes_starts_the_relay_after_the_hosted_devices(tmp_path: Path) -> None:
    """`up --processes`: the relay's process starts after the devices' one (which holds the
    component link): no bounces in Prosody's log, and the relay delivers to every device at once."""
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(fleet_toml(HOSTED_GRID))
    data = tmp_path / "grid"
    proc, _ = await start_up(data, fleet, "--processes", timeout=90, stderr=asyncio.subprocess.DEVNULL)
    try:
        await _relay_delivers_at_once(ConnectionInfo.load(data / "connection.json"), (*HOSTED_LOADS, "c2s-pump"))
        log_text = (data / "prosody.log").read_text()
        assert "devices.localhost:component" in log_text
        assert BOUNCED not in log_text, [ln for ln in log_text.splitlines() if BOUNCED in ln][:4]
    finally:
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 30) == 0


# -- signatures through the relay -------------------------------------------------------------------


async def test_relay_carries_signed_commands_verbatim_and_cannot_change_them(env: Env, relay: RelayProcess,
                                                                            op: GridOperator) -> None:
    """The relay stores and delivers the issuer's signed <openpgp/> as it came; a command changed
    in its queue (a compromised relay) fails the device's signature check and does nothing."""
    import base64
    import sqlite3

    honest = await op.command("far-3", Action.READ, ttl_s=60)
    altered = await op.command("far-3", Action.READ, ttl_s=60)
    assert honest.status is OutcomeStatus.QUEUED and altered.status is OutcomeStatus.QUEUED
    db = sqlite3.connect(relay.queue)
    (stored,) = db.execute("SELECT payload FROM commands WHERE id = ?", (altered.command_id,)).fetchone()
    assert stored.startswith("<ns0:openpgp") or "urn:xmpp:openpgp:0" in stored
    el = ET.fromstring(stored)
    blob = base64.b64decode(el.text or "")
    assert b'action="read"' in blob
    el.text = base64.b64encode(blob.replace(b'action="read"', b'action="shed"')).decode()
    with db:
        db.execute("UPDATE commands SET payload = ? WHERE id = ?", (ET.tostring(el, encoding="unicode"),
                                                                   altered.command_id))
    db.close()
    async with CountedDevice(env, "far-3") as dev:
        good, bad = await asyncio.wait_for(asyncio.gather(op.final_outcome(honest), op.final_outcome(altered)), 20)
        assert good.ok, good.summary()
        assert bad.status is OutcomeStatus.REJECTED and bad.reason is RejectReason.BAD_SIGNATURE, bad.summary()
        assert dev.executions == Counter({honest.command_id: 1})
        assert dev.agent.sim.state is DeviceState.ON


# -- transport security and signed device data ------------------------------------------------


async def test_relay_requires_starttls_verified_against_the_grid_ca(env: Env, relay: RelayProcess, tmp_path: Path) -> None:
    with smtplib.SMTP("127.0.0.1", relay.port) as plain:
        plain.ehlo()
        assert plain.has_extn("starttls")
        code, text = plain.mail("alice@localhost")
        assert code == 530 and b"STARTTLS" in text  # not even an address in clear
    with open_smtp("127.0.0.1", relay.port, tls_context(env.grid.server.certs.ca)) as smtp:
        assert smtp.mail("alice@localhost")[0] == 250
    # A client that trusts another CA does not talk to the relay, and says why.
    stranger = ensure_certificates(tmp_path / "other-ca", "localhost")
    with pytest.raises(MailTLSError, match="certificate verify failed.*grid's CA"):
        open_smtp("127.0.0.1", relay.port, tls_context(stranger.ca))
    info = ConnectionInfo.load(relay.data / "connection.json")
    assert info.relay is not None and info.relay.ca_file == env.grid.server.certs.ca
    route = RelayRoute(info.relay.model_copy(update={"ca_file": stranger.ca}))
    try:
        refused = await route.queue(Command.new(Action.READ, "alice@localhost", ttl_s=60), "far-1@localhost")
    finally:
        route.close()
    assert refused.status is OutcomeStatus.UNDELIVERABLE and "certificate verify failed" in refused.detail


async def test_device_data_must_carry_the_devices_signature(env: Env, relay: RelayProcess) -> None:
    info = ConnectionInfo.load(relay.data / "connection.json")
    assert info.relay is not None
    spec = env.fleet.device("mailer-1")
    cases = {
        "unsigned": MailDevice(spec, "mailer-1@localhost", info.relay),
        "someone else's key": MailDevice(spec, "mailer-1@localhost", info.relay, secret=env.grid.keys.secret("alice")),
    }
    for why, device in cases.items():
        try:
            with pytest.raises(smtplib.SMTPDataError) as refused:
                await device.push_report()
        finally:
            device.close()
        assert refused.value.smtp_code == 550, why
        assert (b"not signed" if why == "unsigned" else b"not by mailer-1@localhost's key") in refused.value.smtp_error
    # A billing report the relay refuses leaves the period open: its readings go in the next one.
    forger = MailDevice(spec, "mailer-1@localhost", info.relay, secret=env.grid.keys.secret("alice"),
                        keyring=readers_keys(PartyKeys.in_data_dir(relay.data, "mailer-1"), "mailer-1"),
                        audience=env.fleet.report_audience(spec))
    opened = forger.sim.registers.period_start  # type: ignore[attr-defined]
    try:
        with pytest.raises(smtplib.SMTPDataError) as refused:
            await forger.push_billing_report()
    finally:
        forger.close()
    assert refused.value.smtp_code == 550
    assert forger.sim.registers.period_start == opened and forger.sim.registers.samples >= 1  # type: ignore[attr-defined]
    # Signed, then changed on the way: the signature no longer matches.
    good = MailDevice(spec, "mailer-1@localhost", info.relay, secret=env.grid.keys.secret("mailer-1"))
    mail = build_mail(good.report(), "mailer-1@localhost", ["relay@localhost"], env.grid.keys.secret("mailer-1"))
    for part in mail.iter_attachments():
        if part.get_content_type() == "application/vnd.gridpresence+xml":
            changed_xml = part.get_content().replace(b' kw="', b' kw="9')
            assert changed_xml != part.get_content()
            part.set_content(changed_xml, "application", "vnd.gridpresence+xml", filename="payload.xml")
    raw = mail.as_bytes()
    try:
        with open_smtp("127.0.0.1", relay.port, tls_context(env.grid.server.certs.ca)) as smtp:
            with pytest.raises(smtplib.SMTPDataError) as changed:
                smtp.sendmail("mailer-1@localhost", ["relay@localhost"], raw)
            assert changed.value.smtp_code == 550 and b"does not match" in changed.value.smtp_error
        await good.push_report()  # the relay is still up and takes the device's own signed data
    finally:
        good.close()
    queue = CommandQueue(relay.queue)
    assert len(queue.db.execute("SELECT * FROM inbox").fetchall()) == 1  # nothing refused was stored
    queue.close()


async def test_billing_report_by_mail_is_routed_sealed(env: Env, relay: RelayProcess) -> None:
    """A mail-only meter mails one report to the billing party and the operators; the relay
    checks its signature and passes it on, and can read neither part."""
    bots = env.grid.bots
    assert bots is not None and bots.billing["billing"].inbox is not None
    billing = bots.billing["billing"]
    readers = relay.data / "keys" / "mailer-1.readers.json"
    readers.unlink()
    # Behind its firewall (no XMPP server to reach) it cannot commission itself: a clear error.
    offline = json.loads((relay.data / "connection.json").read_text())
    offline["server"].update(c2s_port=free_port(), port=None, bosh_url=None, web_url=None)
    cut_off = relay.data / "cut-off.json"
    cut_off.write_text(json.dumps(offline))
    code, _, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--connection", str(cut_off),
                                 "--count", "1", "--billing")
    assert code == 2 and "XMPP server is not reachable" in err and "mailer-1 was not commissioned" in err, err
    # Commissioning, where XMPP is reachable: the key goes out over PEP, the readers' keys come back.
    code, out, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--commission")
    assert code == 0 and "key announced over PEP" in out and "billing@localhost" in out, err
    assert readers.exists()
    async with operator(relay.data, "alice") as alice:
        assert alice.reports is not None
        code, out, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--count", "1",
                                       "--billing")
        assert code == 0, err
        assert "mailer-1: mailed billing report" in out
        meter = "mailer-1@localhost"
        bill = await billing.inbox.wait(lambda d: d.device == meter, timeout=10)
        quality = await alice.reports.wait(lambda d: d.device == meter, timeout=10)
        assert bill.report == quality.report and bill.register_kwh >= 0 and quality.frequency_hz > 40
    # What the relay kept is ciphertext: no reading is in its queue, and its own key opens nothing.
    queue = CommandQueue(relay.queue)
    (stored,) = [row[0] for row in queue.db.execute("SELECT payload FROM inbox").fetchall() if "billing-report" in row[0]]
    queue.close()
    assert "register-kwh" not in stored and "voltage" not in stored and repr(quality.voltage_v) not in stored
    report = billing_report_from_xml(ET.fromstring(stored))
    for part in PartName:
        with pytest.raises(NotForYou):
            await ReportReader("relay@localhost", env.grid.keys.secret("relay"), alice.keyring, part).read(report)


# -- fuzzing the SMTP side ------------------------------------------------------------------------

FUZZ_SEED = 20260113
FUZZ_MAILS = 160


def _mutations(rng: random.Random, good: list[tuple[str, list[str], EmailMessage]]) -> list[tuple[str, list[str], bytes]]:
    """Mails derived from valid ones: headers, MIME structure, base64 and signature bytes changed."""
    junk_sigs = [bytes.fromhex("0a89ed7a7b53"), b"", b"\x88", b"\xc2\x05\x04\x00\x16\x08\x00", b"\x89" * 40,
                 b"-----BEGIN PGP SIGNATURE-----\n\n=AAAA\n-----END PGP SIGNATURE-----\n"]
    out = []
    for _ in range(FUZZ_MAILS):
        sender, rcpts, base = rng.choice(good)
        msg = copy.deepcopy(base)
        kind = rng.randrange(6)
        parts = list(msg.iter_attachments())
        if kind == 0 and parts:  # the signature part's bytes: junk, truncated or flipped
            sig = parts[-1]
            blob = bytearray(sig.get_content())
            choice = rng.randrange(3)
            if choice == 0:
                blob = bytearray(rng.choice(junk_sigs))
            elif choice == 1:
                blob = blob[:rng.randrange(len(blob) + 1)]
            else:
                for _ in range(rng.randint(1, 8)):
                    blob[rng.randrange(len(blob))] = rng.randrange(256)
            sig.set_content(bytes(blob), "application", "pgp-signature", filename="payload.xml.sig")
        elif kind == 1 and parts:  # the payload part's bytes
            part = parts[0]
            blob = bytearray(part.get_content())
            for _ in range(rng.randint(1, 6)):
                if blob:
                    blob[rng.randrange(len(blob))] = rng.choice(b"<>&\"'\x00\xff =/" + bytes([rng.randrange(256)]))
            part.set_content(bytes(blob), "application", "vnd.gridpresence+xml", filename="payload.xml")
        elif kind == 2:  # headers: removed, doubled, garbled
            name = rng.choice(["From", "To", "Content-Type", "Message-ID", "MIME-Version", "Subject"])
            value = rng.choice(["", "\u00e9\u00e9\u00e9", "<<>>", "multipart/mixed; boundary=", "x" * 2000,
                                "alice@localhost, mallory@example.com", "text/plain; charset=\"\\\""])
            del msg[name]
            if rng.random() < 0.7:
                msg[name] = value
        try:
            raw = bytearray(msg.as_bytes())
        except (AttributeError, TypeError, UnicodeError):  # a header the generator cannot write: mutate the bytes instead
            raw, kind = bytearray(base.as_bytes()), 5
        if kind == 3:  # base64 bodies: characters flipped, lines cut
            for _ in range(rng.randint(1, 10)):
                i = rng.randrange(len(raw))
                raw[i] = rng.choice(b"ABCxyz019+/=!\r\n-")
        elif kind == 4:  # MIME structure: boundaries cut, doubled or removed
            text = bytes(raw)
            boundary = text.split(b"boundary=\"", 1)[-1].split(b"\"", 1)[0]
            if boundary and boundary != text:
                op = rng.randrange(3)
                if op == 0:
                    text = text.replace(b"--" + boundary, b"--" + boundary[: len(boundary) // 2], rng.randint(1, 3))
                elif op == 1:
                    text = text.replace(b"--" + boundary + b"--", b"")
                else:
                    cut = text.rfind(b"--" + boundary)
                    text = text[:cut] + text[text.find(b"--" + boundary):]
            raw = bytearray(text)
        elif kind == 5:  # raw bytes anywhere, or a truncated mail
            if rng.random() < 0.5:
                raw = raw[:rng.randrange(len(raw))]
            else:
                for _ in range(rng.randint(1, 20)):
                    raw[rng.randrange(len(raw))] = rng.randrange(256)
        out.append((sender, rcpts, bytes(raw)))
    return out


def _smtp_reply(smtp: smtplib.SMTP, sender: str, rcpts: list[str], raw: bytes) -> tuple[int, bytes]:
    try:
        smtp.sendmail(sender, rcpts, raw)
        return 250, b"stored"
    except smtplib.SMTPRecipientsRefused as exc:
        return next(iter(exc.recipients.values()))
    except smtplib.SMTPResponseException as exc:
        return exc.smtp_code, exc.smtp_error
    finally:
        try:
            smtp.rset()
        except smtplib.SMTPServerDisconnected:
            pass


@pytest.mark.timeout(90)
async def test_fuzzed_mail_gets_smtp_replies_and_the_relay_keeps_serving(env: Env, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """Random mutations of valid command and data mails, into the real relay's aiosmtpd server:
    every reply is a proper SMTP code with text (never 500 with a traceback), nothing is logged
    as an error, and a valid mail is stored afterwards. The 6 signature bytes a fuzzer once
    found (`0a 89 ed 7a 7b 53`, no signature packet) get 550 with a reason."""
    await commission_once(env, "mailer-1")
    async with env.operator("alice", resource=f"fuzz-{os.urandom(3).hex()}"):
        pass  # alice's key is on PEP: the relay checks her signature too
    relay = RelayService(env.fleet, env.grid.endpoint, env.grid.secrets.password("relay"), tmp_path / "q.sqlite3",
                         certs_dir=env.grid.server.certs.ca.parent, keys=PartyKeys.in_data_dir(env.data, "relay"))
    caplog.set_level(logging.WARNING)
    await relay.start()
    try:
        alice_key, meter_key = env.grid.keys.secret("alice"), env.grid.keys.secret("mailer-1")
        cmd = Command.new(Action.READ, "alice@localhost", ttl_s=60)
        signed = SignedCommand(cmd, element_to_text(sign_payload(command_to_xml(cmd), "far-1@localhost", alice_key)))
        meter = MailDevice(env.fleet.device("mailer-1"), "mailer-1@localhost",
                           RelayEndpoint(jid="relay@localhost", smtp_host="127.0.0.1", smtp_port=relay.smtp_port,
                                         ca_file=env.grid.server.certs.ca))
        good = [("alice@localhost", ["far-1@localhost"], build_mail(signed, "alice@localhost", ["far-1@localhost"],
                                                                    alice_key)),
                ("mailer-1@localhost", ["relay@localhost"], build_mail(meter.report(), "mailer-1@localhost",
                                                                       ["relay@localhost"], meter_key))]
        meter.close()
        mails = _mutations(random.Random(FUZZ_SEED), good)
        finding = copy.deepcopy(good[0][2])
        list(finding.iter_attachments())[-1].set_content(bytes.fromhex("0a89ed7a7b53"), "application",
                                                         "pgp-signature", filename="payload.xml.sig")

        def run() -> list[tuple[int, bytes]]:
            replies = []
            with open_smtp("127.0.0.1", relay.smtp_port, tls_context(env.grid.server.certs.ca)) as smtp:
                replies.append(_smtp_reply(smtp, "alice@localhost", ["far-1@localhost"], finding.as_bytes()))
                for sender, rcpts, raw in mails:
                    replies.append(_smtp_reply(smtp, sender, rcpts, raw))
                after = Command.new(Action.READ, "alice@localhost", ttl_s=60)
                replies.append(_smtp_reply(smtp, "alice@localhost", ["far-2@localhost"],
                                           build_mail(after, "alice@localhost", ["far-2@localhost"]).as_bytes()))
            return replies

        started = time.monotonic()
        replies = await asyncio.to_thread(run)
        assert time.monotonic() - started < 60
    finally:
        await relay.stop()
    code, text = replies[0]
    assert code == 550 and b"no OpenPGP signature packet" in text, (code, text)
    for code, text in replies:
        assert code // 100 in (2, 4, 5) and text.strip(), (code, text)
        # aiosmtpd's own 500 for a line over RFC 5321's limit is a protocol reply; any other 500
        # is an exception escaping the handler ("Error: (AttributeError) ...").
        assert code != 500 or text.startswith(b"Line too long"), (code, text)
    assert replies[-1] == (250, b"stored")  # still serving valid mail
    codes = Counter(code for code, _ in replies)
    assert len(codes) >= 3, codes  # the mutations reached several screens, not one
    bad = [r for r in caplog.records if r.name.startswith(("gridpresence", "mail.log"))
           and (r.levelno >= logging.ERROR or r.exc_info)]
    assert not bad, [r.getMessage() for r in bad]


async def test_every_mailed_report_updates_status(env: Env, relay: RelayProcess) -> None:
    """Each mailed report reaches what operators see (`status`), not only the first."""
    conn = ["--connection", str(relay.data / "connection.json"), "--json", "--settle", "1.5"]
    seen = []
    for _ in range(2):
        code, out, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--count", "1")
        assert code == 0, err
        code, out, err = await run_cli("status", *conn)
        assert code == 0, err
        (view,) = [d for d in json.loads(out)["devices"] if d["name"] == "mailer-1"]
        assert view["health_reason"] == "reported by mail through the relay" and view["telemetry"], view
        seen.append((view["since"], view["telemetry"]))
    assert seen[0] != seen[1], seen  # the second report, not the first one again
    # The meter keeps its register between two runs of its uplink, as a real one does: the
    # second report counts on from the first, over the time between them.
    assert seen[1][1]["energy_kwh"] > seen[0][1]["energy_kwh"], seen
    kept = json.loads((relay.data / "mail-devices" / "mailer-1.json").read_text())
    assert kept["register_kwh"] == pytest.approx(seen[1][1]["energy_kwh"], abs=1e-3) and kept["seq"] >= 2


async def test_mail_device_in_the_readme_order_commissions_itself(env: Env, relay: RelayProcess) -> None:
    """`mail-device NAME --count 1` first (as the README lists it), on a device never
    commissioned: where XMPP is reachable it commissions itself, and its data is taken, not 451."""
    readers = relay.data / "keys" / "mailer-2.readers.json"
    assert not readers.exists()
    async with operator(relay.data, "alice") as alice:
        code, out, err = await run_cli("mail-device", "mailer-2", "--data", str(relay.data), "--count", "1")
        assert code == 0, out + err
        assert "mailer-2: commissioned (key announced over PEP" in out and "mailer-2: mailed" in out, out
        assert readers.exists()
        await alice.wait_for(lambda d: d["mailer-2"].report is not None, timeout=5)
        code, out, err = await run_cli("mail-device", "mailer-2", "--data", str(relay.data), "--count", "1",
                                       "--billing")  # commissioned: its billing report can be sealed too
        assert code == 0 and "commissioned" not in out and "mailed billing report" in out, out + err


async def test_a_second_relay_does_not_take_over_the_running_ones_entry(env: Env, relay: RelayProcess) -> None:
    conn = relay.data / "connection.json"
    before = conn.read_text()
    code, out, err = await run_cli("relay", "--data", str(relay.data), "--smtp-port", str(free_port()))
    assert code == 2 and "a relay is already running" in err and f":{relay.port}" in err, out + err
    assert conn.read_text() == before
    code, out, err = await run_cli("mail-device", "mailer-1", "--data", str(relay.data), "--count", "1")
    assert code == 0 and "mailer-1: mailed" in out, out + err  # still routed to the running relay
    # A relay that ran while none did gives the entry back as it found it when it stops.
    await relay.stop()
    assert ConnectionInfo.load(conn).relay is None  # the fixture's relay put back what it found
    second = RelayProcess(relay.data, relay.queue, free_port())
    await second.start()
    assert ConnectionInfo.load(conn).relay.smtp_port == second.port  # type: ignore[union-attr]
    await second.stop()
    assert ConnectionInfo.load(conn).relay is None
