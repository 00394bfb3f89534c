"""Issue 14's chaos run, bounded and seeded: signed shed/restore commands flow from an operator
while faults strike in turn — Prosody killed -9, a bot process frozen (SIGSTOP), `up` killed -9
and restarted, the c2s port dropped by an nftables rule (root only; a table of this test's own,
``gp14_chaos_PID``, always deleted again). Per command: executed at most once, never after its expiry, the issuer's outcome
is what the device did, and a command no fault touched is executed. Recovery times are printed.

The devices' own event log (one INFO line per command they took, device/agent.py) is the truth
the issuer's outcomes are checked against.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import re
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gridpresence.operator.library import GridOperator
from portcut import can_drop_ports, drop_port, undrop_port
from gridpresence.protocol.models import Outcome
from gridpresence.xmpp.session import ConnectionInfo

SEED = 14
TTL_S = 8.0
RATE_HZ = 4.0
CALM_S = 4.0  # between faults
FREEZE_S = 3.0
DROP_S = 8.0  # the c2s port dropped (issue 14's run: 10 s); the pings (5 + 5 s) notice it about then
NFT_TABLE = f"gp14_chaos_{os.getpid()}"  # ours alone: never another test's or docker's tables
DEVICES = [f"load-{i}" for i in range(1, 7)]
APART = "frozen"  # run in a `gridpresence bots` process of its own: the one SIGSTOP freezes
FLEET = "\n".join(['domain = "localhost"', "presence_grace_s = 2.0", '[[operators]]', 'name = "olga"']
                  + [f'[[devices]]\nname = "{n}"\nkind = "load"\nrated_kw = 20' for n in (*DEVICES, APART)])
EXE = Path(sys.executable).with_name("gridpresence")
LOG_LINE = re.compile(r"(\S+): command (\w+) from \S+ \w+ (\w+) at (\S+) \(expires (\S+)\)")


@dataclass
class Proc:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    @classmethod
    async def start(cls, *args: str, ready: str) -> Proc:
        proc = await asyncio.create_subprocess_exec(str(EXE), "-v", *args, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        me = cls(proc)
        me.reader = asyncio.ensure_future(me._read())
        async with asyncio.timeout(40):
            while not any(ready in line for line in me.lines):
                if proc.returncode is not None:
                    raise AssertionError("".join(me.lines[-40:]))
                await asyncio.sleep(0.05)
        return me

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():  # drained always: a full pipe would freeze it
            self.lines.append(line.decode(errors="replace"))

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        if self.reader:
            await self.reader

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                pass
        await self.kill()


@dataclass
class Sent:
    device: str
    issued: float
    outcome: Outcome | None = None


async def test_chaos_commands_stay_true_through_faults(tmp_path: Path) -> None:
    rng = random.Random(SEED)
    fleet = tmp_path / "fleet.toml"
    fleet.write_text(FLEET)
    data = tmp_path / "grid"
    up_args = ("up", "--data", str(data), "--fleet", str(fleet), "--without", APART)
    runs: list[Proc] = [await Proc.start(*up_args, ready="Ctrl-C")]
    bots = await Proc.start("bots", "--data", str(data), "--only", APART, ready="running")
    op = GridOperator.from_connection(ConnectionInfo.load(data / "connection.json"), resource="chaos")
    await op.connect(settle_s=3.0)
    sent: dict[str, Sent] = {}
    faults: list[tuple[str, float, float]] = []  # (what, start, recovered) in time.time()
    flowing = True
    up_serving = 0.0

    async def one(name: str) -> None:
        issued = time.time()
        try:
            outcome = await op.command(name, rng.choice(["shed", "restore"]), ttl_s=TTL_S, wait_final=True)
        except Exception as exc:  # the library must not raise on a fault: that is a finding
            raise AssertionError(f"command to {name} raised {exc!r}") from exc
        sent[outcome.command_id] = Sent(name, issued, outcome)

    async def flow() -> None:
        tasks = []
        while flowing:
            tasks.append(asyncio.ensure_future(one(rng.choice([*DEVICES, APART]))))
            await asyncio.sleep(1 / RATE_HZ)
        await asyncio.gather(*tasks)

    async def all_present() -> None:
        await op.wait_for(lambda d: all(d[n].present for n in (*DEVICES, APART)), timeout=30)

    async def all_answer() -> None:
        """Every device answers a ping through the server: after a cut, "present" is only what
        the operator last heard; the path works again when an answer comes back."""
        ping = op.client.plugin["xep_0199"]
        async with asyncio.timeout(40):
            for name in (*DEVICES, APART):
                while True:
                    target = op.devices[name].full_jid
                    try:
                        if target:
                            await ping.send_ping(target, timeout=2)
                            break
                    except Exception:  # no answer yet, or an error while the session is rebuilt
                        pass
                    await asyncio.sleep(0.2)

    flowing_task = asyncio.ensure_future(flow())
    try:
        await asyncio.sleep(CALM_S)
        order = ["prosody", "freeze", "up", *(["c2s"] if can_drop_ports() else [])]
        rng.shuffle(order)
        for fault in order:
            start = time.time()
            if fault == "prosody":
                os.kill(int((data / "prosody.pid").read_text()), signal.SIGKILL)
                await asyncio.sleep(0.5)  # the supervisor's restart and the losses are under way
            elif fault == "freeze":
                bots.proc.send_signal(signal.SIGSTOP)
                await asyncio.sleep(FREEZE_S)
                bots.proc.send_signal(signal.SIGCONT)
            elif fault == "c2s":
                drop_port(NFT_TABLE, ConnectionInfo.load(data / "connection.json").server.c2s_port)
                try:
                    await asyncio.sleep(DROP_S)
                finally:
                    undrop_port(NFT_TABLE)
                await all_answer()
            else:
                await runs[-1].kill()
                runs.append(await Proc.start(*up_args, ready="Ctrl-C"))
                up_serving = time.time() - start
            await all_present()
            faults.append((fault, start, time.time()))
            await asyncio.sleep(CALM_S)
        flowing = False
        await asyncio.wait_for(flowing_task, TTL_S + 15)
    finally:
        flowing = False
        undrop_port(NFT_TABLE)
        await op.close()
        await bots.stop()
        for run in runs:
            await run.stop()

    # The devices' truth, from every process that hosted them.
    did: dict[str, list[tuple[str, str, dt.datetime, dt.datetime]]] = {}
    for line in (ln for p in (*runs, bots) for ln in p.lines):
        m = LOG_LINE.search(line)
        if m:
            did.setdefault(m[2], []).append((m[1], m[3], dt.datetime.fromisoformat(m[4]),
                                             dt.datetime.fromisoformat(m[5])))
    assert sent, "no command was sent"
    wrong, lost_untouched = [], []
    for cmd_id, s in sent.items():
        taken = did.get(cmd_id, [])
        assert len(taken) <= 1, f"{cmd_id} taken {len(taken)} times: {taken}"
        for _dev, status, at, expires in taken:
            assert at < expires, f"{cmd_id} executed at {at}, after its expiry {expires}"
        device_status = taken[0][1] if taken else None
        assert s.outcome is not None
        issuer_status = s.outcome.status.value
        if device_status != issuer_status and not (device_status is None and issuer_status in ("expired",
                                                                                              "undeliverable")):
            wrong.append((cmd_id, s.device, device_status, issuer_status, s.outcome.detail))
        if device_status is None:
            touched = any(start <= s.issued + TTL_S and s.issued <= end for _f, start, end in faults)
            if not touched:
                lost_untouched.append((cmd_id, s.device, issuer_status, s.outcome.detail))
    statuses = [s.outcome.status.value for s in sent.values() if s.outcome]
    summary = {k: statuses.count(k) for k in sorted(set(statuses))}
    recovery = {f: round(end - start, 2) for f, start, end in faults}
    print(f"\nchaos seed {SEED}: {len(sent)} commands {summary}; recovery s {recovery} (`up` serving again "
          f"after {up_serving:.2f} s); median {statistics.median(recovery.values()):.2f} s; "
          f"load average {os.getloadavg()[0]:.1f}")
    assert not wrong, f"issuer's outcome differs from what the device did: {wrong}"
    assert not lost_untouched, f"commands no fault touched were not executed: {lost_untouched}"
    # Issue 14: parties back <= 5 s after Prosody is; after `up` restarts, what is ours (reconnects,
    # presence) <= 5 s too. `up`'s own start (Python imports, key loading) is the machine's speed:
    # ~3 s idle, 10-25 s on this shared 2-core box at load 10, so only bounded loosely here.
    assert recovery["prosody"] <= 6.0, recovery
    if "c2s" in recovery:  # the cut plus the pings' bound (5 + 5 s) plus a reconnect
        assert recovery["c2s"] <= DROP_S + 15.0, recovery
    assert recovery["up"] - up_serving <= 5.0 and recovery["up"] <= 45.0, (recovery, up_serving)
