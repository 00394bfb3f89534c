#!/usr/bin/env python3
"""The email store-and-forward relay: how fast queued commands reach a returning device, and
how many mails per second it takes in.

1. presence return -> first queued command executed (goal: median <= 100 ms; p99 reported).
   Baseline, same run: a direct XMPP command round trip (operator -> present device -> outcome).
2. flushing 1,000 queued commands: presence return -> all 1,000 executed on the device, and ->
   all 1,000 final outcomes at the operator (goal <= 2 s). Baseline: the same 1,000 commands
   sent directly over XMPP to the present device, all in flight at once.
3. mails ingested per second (goal >= 200): command mails over 4 SMTP connections, each after
   STARTTLS verified against the grid's CA (the relay requires it) and answered only after its
   commit to the queue. Baseline: the same mails, also over STARTTLS with the same certificate,
   into raw aiosmtpd with a handler that stores nothing, also in its own process.
4. signed device data ingested per second: presence reports a device mails with its detached
   OpenPGP signature, which the relay checks before storing (same no-op baseline as 3).

The relay runs as its own process (`gridpresence relay`), as in production; the operator and the
device are in this process.

    python bench/relay.py [--trials 30] [--mails 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import statistics
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

from common import bench_fleet, summary

from gridpresence.host.fleet import device_agent
from gridpresence.protocol.openpgp import element_to_text
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import ConnectionInfo
from gridpresence.transport.tls import tls_context
from gridpresence.host.grid import Grid
from gridpresence.protocol import Action, Command, DeviceKind, DeviceState, OutcomeStatus, PresenceReport, Telemetry
from gridpresence.services.relay.commissioning import commission
from gridpresence.transport.mail import SignedCommand, build_mail, open_smtp
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.server.ports import free_port

NOOP_SMTP = textwrap.dedent("""
    import asyncio, ssl, sys
    from aiosmtpd.smtp import SMTP
    class NoOp:
        async def handle_DATA(self, server, session, envelope):
            return "250 OK"
    async def main():
        loop = asyncio.get_running_loop()
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(sys.argv[2], sys.argv[3])
        server = await loop.create_server(lambda: SMTP(NoOp(), hostname="localhost", tls_context=tls,
                                                       require_starttls=True), "127.0.0.1", int(sys.argv[1]))
        print("ready", flush=True)
        await loop.run_in_executor(None, sys.stdin.read)
    asyncio.run(main())
""")


class TimedDevice:
    """A device bot that notes when its presence goes out and when each command executes."""

    def __init__(self, grid: Grid, name: str) -> None:
        self.agent = device_agent(grid.fleet, name, grid.endpoint, grid.secrets.password(name),
                                  PartyKeys.in_data_dir(grid.data_dir, name))
        self.present_at = 0.0
        self.executed_at: list[float] = []
        self.agent.client.add_event_handler("session_start", lambda _e: setattr(self, "present_at", time.perf_counter()))
        run = self.agent.execute

        def timed(cmd, now):  # type: ignore[no-untyped-def]
            self.executed_at.append(time.perf_counter())
            return run(cmd, now)

        self.agent.execute = timed  # type: ignore[method-assign]


async def absent(op: GridOperator, name: str) -> None:
    await op.wait_for(lambda d: not d[name].present, timeout=10)


async def presence_to_first(grid: Grid, op: GridOperator, trials: int) -> list[float]:
    samples = []
    for _ in range(trials):
        await absent(op, "dev-0000")
        queued = await op.command("dev-0000", Action.READ, ttl_s=60)
        assert queued.status is OutcomeStatus.QUEUED, queued
        dev = TimedDevice(grid, "dev-0000")
        await dev.agent.start()
        final = await op.final_outcome(queued)
        assert final.ok, final
        samples.append(dev.executed_at[0] - dev.present_at)
        await dev.agent.stop()
    return samples


async def direct_round_trips(grid: Grid, op: GridOperator, trials: int) -> list[float]:
    dev = TimedDevice(grid, "dev-0001")
    await dev.agent.start()
    await op.wait_for(lambda d: d["dev-0001"].present, timeout=10)
    samples = []
    for _ in range(trials):
        t0 = time.perf_counter()
        assert (await op.command("dev-0001", Action.READ)).ok
        samples.append(time.perf_counter() - t0)
    await dev.agent.stop()
    return samples


async def flush_1000(grid: Grid, op: GridOperator) -> tuple[float, float]:
    await absent(op, "dev-0002")
    queued = await asyncio.gather(*(op.command("dev-0002", Action.READ, ttl_s=300) for _ in range(1000)))
    assert all(q.status is OutcomeStatus.QUEUED for q in queued)
    dev = TimedDevice(grid, "dev-0002")
    await dev.agent.start()
    finals = await asyncio.gather(*(op.final_outcome(q) for q in queued))
    all_back = time.perf_counter()
    assert all(f.ok for f in finals) and len(dev.executed_at) == 1000, len(dev.executed_at)
    executed = dev.executed_at[-1] - dev.present_at
    await dev.agent.stop()
    return executed, all_back - dev.present_at


async def direct_1000(grid: Grid, op: GridOperator) -> float:
    dev = TimedDevice(grid, "dev-0001")
    await dev.agent.start()
    await op.wait_for(lambda d: d["dev-0001"].present, timeout=10)
    full = op.devices["dev-0001"].full_jid or ""
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(op.send_command(Command.new(Action.READ, op.jid, ttl_s=60), full)
                                      for _ in range(1000)))
    elapsed = time.perf_counter() - t0
    assert all(o.ok for o in outcomes)
    await dev.agent.stop()
    return elapsed


def ingest(port: int, mails: list[bytes], sender: str, device: str, ca_file: Path,
           connections: int = 4) -> tuple[float, list[float]]:
    """Send the mails over `connections` STARTTLS SMTP connections; (mails per second, per-mail seconds)."""
    latencies: list[float] = []
    lock = threading.Lock()

    def worker(share: list[bytes]) -> None:
        mine = []
        with open_smtp("127.0.0.1", port, tls_context(ca_file)) as client:
            for raw in share:
                t0 = time.perf_counter()
                client.sendmail(sender, [device], raw)
                mine.append(time.perf_counter() - t0)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, args=(mails[i::connections],)) for i in range(connections)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(mails) / (time.perf_counter() - t0), latencies


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--mails", type=int, default=2000)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="relaybench-"))
    grid = Grid(bench_fleet(4), data, only=["watchdog"])
    await grid.start()
    relay_port, noop_port = free_port(), free_port()
    exe = Path(sys.executable).with_name("gridpresence")
    relay = await asyncio.create_subprocess_exec(str(exe), "relay", "--data", str(data), "--smtp-port", str(relay_port),
                                                 stdout=asyncio.subprocess.PIPE)
    certs = grid.server.certs
    noop = await asyncio.create_subprocess_exec(sys.executable, "-c", NOOP_SMTP, str(noop_port), str(certs.cert),
                                                str(certs.key),
                                                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert (await relay.stdout.readline()).startswith(b"relay up")  # type: ignore[union-attr]
        assert (await noop.stdout.readline()).strip() == b"ready"  # type: ignore[union-attr]
        op = GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"), resource="bench")
        await op.connect(settle_s=0.5)
        await direct_round_trips(grid, op, 20)  # warm-up
        print(f"1. presence return -> first queued command executed ({args.trials} returns)")
        first = summary("relay: presence -> first queued executed", await presence_to_first(grid, op, args.trials))
        base = summary("baseline: direct XMPP command round trip", await direct_round_trips(grid, op, args.trials))
        print(f"   ratio (median) {first['median_ms'] / base['median_ms']:.2f} x baseline; "
              f"goal median <= 100 ms: {'met' if first['median_ms'] <= 100 else 'NOT met'}")

        print("2. flushing 1,000 queued commands (3 rounds)")
        rounds = [await flush_1000(grid, op) for _ in range(3)]
        direct = [await direct_1000(grid, op) for _ in range(3)]
        executed = statistics.median(r[0] for r in rounds)
        back = statistics.median(r[1] for r in rounds)
        d = statistics.median(direct)
        print(f"  relay: presence -> 1,000 executed          median {executed:.3f} s")
        print(f"  relay: presence -> 1,000 outcomes at issuer median {back:.3f} s")
        print(f"  baseline: 1,000 direct commands in flight  median {d:.3f} s")
        print(f"   ratio {back / d:.2f} x baseline; goal <= 2 s: {'met' if back <= 2 else 'NOT met'}")

        print(f"3. mails ingested ({args.mails} command mails, 4 connections)")
        cmds = [Command.new(Action.READ, op.jid, ttl_s=3600) for _ in range(args.mails)]
        # Signed, as the library mails them: the relay opens each to route it.
        mails = [build_mail(SignedCommand(c, element_to_text(op.issuer.wire(c, "dev-0003@localhost"))), op.jid,
                            ["dev-0003@localhost"]).as_bytes() for c in cmds]
        rate_base, lat_base = await asyncio.to_thread(ingest, noop_port, mails, op.jid, "dev-0003@localhost", certs.ca)
        rate, lat = await asyncio.to_thread(ingest, relay_port, mails, op.jid, "dev-0003@localhost", certs.ca)
        summary("relay: per mail (stored, 250)", lat)
        summary("baseline: raw aiosmtpd no-op handler (STARTTLS)", lat_base)
        print(f"  relay {rate:.0f} mails/s, baseline {rate_base:.0f} mails/s, ratio {rate / rate_base:.2f}; "
              f"goal >= 200/s: {'met' if rate >= 200 else 'NOT met'}")

        print(f"4. signed device data ingested ({args.mails // 2} presence reports by mail, signature checked)")
        # The device announces its key over PEP once (commissioning): the relay checks mail with it.
        await commission("dev-0003", grid.fleet.jid("dev-0003"), grid.secrets.password("dev-0003"), grid.endpoint,
                         PartyKeys.in_data_dir(data, "dev-0003"), ())
        key = grid.keys.secret("dev-0003")
        reports = [PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.ON, telemetry=Telemetry(kw=1.0 + i), seq=i)
                   for i in range(args.mails // 2)]
        signed = [build_mail(r, "dev-0003@localhost", ["relay@localhost"], key).as_bytes() for r in reports]
        rate_s, lat_s = await asyncio.to_thread(ingest, relay_port, signed, "dev-0003@localhost", "relay@localhost",
                                                certs.ca)
        summary("relay: per signed device mail (checked, stored, 250)", lat_s)
        print(f"  relay {rate_s:.0f} signed mails/s, ratio {rate_s / rate_base:.2f} x the no-op baseline above")
        await op.close()
    finally:
        relay.terminate()
        await relay.wait()
        noop.stdin.close()  # type: ignore[union-attr]
        await noop.wait()
        await grid.stop()
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    # A device bot stopped mid-stream leaves slixmpp filter tasks behind; their "destroyed but
    # pending" notices at exit are noise here.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    asyncio.run(main())
