"""The command path's disk writes in batches: the replay store's group commit (security/replay.py)
with the operated state beside it (device/operated.py), and a fan-out's pending commands kept in
one file (operator/pending.py). No server needed."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest

from gridpresence.device.operated import OperatedStore, kept_state, state_path
from gridpresence.operator.pending import PendingStore
from gridpresence.physics.base import Operated
from gridpresence.protocol.models import Action, Command, DeviceState, Outcome, OutcomeStatus
from gridpresence.security.replay import REPLAY_FILE, ReplayGuard, ReplayStore

ALICE = "alice@localhost"


def outcome(device: str, cmd_id: str) -> Outcome:
    return Outcome(command_id=cmd_id, device=device, status=OutcomeStatus.EXECUTED, detail="load shed")


async def test_writes_of_one_loop_turn_are_one_transaction_and_survive_a_reopen(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / REPLAY_FILE)
    batches: list[int] = []
    commit = store._commit
    store._commit = lambda batch: (batches.append(len(batch)), commit(batch))[1]  # type: ignore[method-assign]
    guards = [ReplayGuard(store, f"load-{i}@localhost") for i in range(200)]
    states = [OperatedStore(state_path(tmp_path, f"load-{i}"), store) for i in range(200)]
    forget = time.time() + 60
    waits = [g.record_soon(ALICE, f"c{i}", forget, outcome(g.device, f"c{i}")) for i, g in enumerate(guards)]
    waits += [asyncio.ensure_future(s.keep(Operated(state=DeviceState.OFF))) for s in states]
    assert guards[7].seen(ALICE, "c7") is not None, "in memory at once: a copy arriving now is a replay"
    await asyncio.wait_for(asyncio.gather(*waits), 10)
    assert sum(batches) >= 400 and len(batches) <= 3, batches  # a few fsyncs, not 400 (and a prune)
    store.close()
    again = ReplayStore(tmp_path / REPLAY_FILE)
    assert ReplayGuard(again, "load-199@localhost").seen(ALICE, "c199") is not None
    again.close()
    kept = kept_state(tmp_path, "load-42")
    assert kept is not None and kept.state is DeviceState.OFF
    assert not (tmp_path / "device-state").exists(), "in the store, not a file per device"


async def test_a_failed_batch_fails_its_waiters_and_the_next_batch_still_commits(tmp_path: Path) -> None:
    store = ReplayStore(tmp_path / REPLAY_FILE)
    bad = store.write("INSERT INTO no_such_table VALUES (?)", (1,))
    with pytest.raises(Exception, match="no_such_table"):
        await asyncio.wait_for(bad, 10)
    guard = ReplayGuard(store, "load-1@localhost")
    await asyncio.wait_for(guard.record_soon(ALICE, "c1", time.time() + 60, outcome(guard.device, "c1")), 10)
    store.close()
    again = ReplayStore(tmp_path / REPLAY_FILE)
    assert ReplayGuard(again, "load-1@localhost").seen(ALICE, "c1") is not None
    again.close()


def test_a_state_kept_by_an_older_run_as_a_file_is_still_read(tmp_path: Path) -> None:
    path = state_path(tmp_path, "pump")
    OperatedStore(path).save(Operated(state=DeviceState.OFF))  # no store: the JSON file, as before
    store = ReplayStore(tmp_path / REPLAY_FILE)
    try:
        kept = OperatedStore(path, store).load()
        assert kept is not None and kept.state is DeviceState.OFF
    finally:
        store.close()


def test_a_fan_outs_pending_commands_share_one_file_gone_with_the_last_answer(tmp_path: Path) -> None:
    store = PendingStore(tmp_path / "alice.pending")
    cmds = [Command.new(Action.SHED, ALICE, ttl_s=30) for _ in range(50)]
    store.add_many([store.entry(c, f"load-{i}@localhost", "<command/>", "direct") for i, c in enumerate(cmds)])
    [group] = list((tmp_path / "alice.pending").glob("*.json"))
    assert len(json.loads(group.read_text())["entries"]) == 50
    assert {e.command_id for e in store.entries()} == {c.id for c in cmds} and not store.orphans()
    for c in cmds[:-1]:
        store.remove(c.id)
    assert group.exists(), "one command of the group still waits"
    store.remove(cmds[-1].id)
    assert not list((tmp_path / "alice.pending").glob("*.json"))


def test_an_orphan_adopted_from_a_dead_process_group_leaves_that_group(tmp_path: Path) -> None:
    """Another process's group (its pid is gone): each entry adopted is taken out of the group's
    file, so a third process does not adopt it again."""
    directory = tmp_path / "alice.pending"
    dead = PendingStore(directory)
    cmds = [Command.new(Action.SHED, ALICE, ttl_s=30) for _ in range(3)]
    entries = [dead.entry(c, "load-1@localhost", "<command/>", "direct").model_copy(update={"pid": 2 ** 22 + 7})
               for c in cmds]
    dead.add_many(entries)
    heir = PendingStore(directory)
    orphans = heir.orphans()
    assert {e.command_id for e in orphans} == {c.id for c in cmds}
    mine = heir.adopt(orphans[0])
    assert mine.pid == os.getpid()
    left_by_dead = {e.command_id for e in PendingStore(directory).entries() if e.pid != os.getpid()}
    assert left_by_dead == {e.command_id for e in orphans[1:]}, "the adopted one left the dead group's file"
    heir.remove(mine.command_id)
    for entry in orphans[1:]:
        heir.remove(entry.command_id, found=True)  # their outcomes arrived unasked here
    assert not list(directory.glob("*.json"))


async def test_a_fan_out_keeps_at_most_its_window_in_flight_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """command_many: never more than FAN_OUT_WINDOW commands waiting at once (what comes back
    must not queue for seconds in front of our ping's answer), sent in the names' order, one
    outcome each, progress for every one."""
    from gridpresence.operator import library
    from gridpresence.operator.library import GridOperator
    from gridpresence.xmpp.session import Endpoint

    monkeypatch.setattr(library, "FAN_OUT_WINDOW", 20)
    op = GridOperator("alice@localhost", "secret", Endpoint())
    started: list[str] = []
    busy, most = 0, 0

    async def command(name: str, action: object, **_kw: object) -> Outcome:
        nonlocal busy, most
        started.append(name)
        busy += 1
        most = max(most, busy)
        await asyncio.sleep(0.001 * (len(started) % 3))
        busy -= 1
        return outcome(f"{name}@localhost", name)

    monkeypatch.setattr(op, "command", command)
    names = [f"load-{i:03d}" for i in range(300)]
    told: list[int] = []
    outcomes = await asyncio.wait_for(op.command_many(names, Action.SHED, progress=lambda d, _t: told.append(d)), 20)
    assert most == 20 and started == names
    assert list(outcomes) == names and all(o.command_id == n for n, o in outcomes.items())
    assert told == list(range(1, 301))


async def test_a_commands_state_and_replay_record_are_one_commit_before_anyone_is_told(tmp_path: Path) -> None:
    """A device's command: what it now is and that it had this command go to disk in one
    transaction (one fsync), both there once the outcome is made; a copy is then a replay."""
    from gridpresence.config import DeviceSpec
    from gridpresence.device.agent import DeviceAgent
    from gridpresence.device.host import DeviceSetup
    from gridpresence.protocol.models import RejectReason, utcnow
    from gridpresence.xmpp.session import Endpoint

    store = ReplayStore(tmp_path / REPLAY_FILE)
    commits: list[int] = []
    commit = store._commit
    store._commit = lambda batch: (commits.append(len(batch)), commit(batch))[1]  # type: ignore[method-assign]
    setup = DeviceSetup(operated=state_path(tmp_path, "l"))
    agent = DeviceAgent(DeviceSpec(name="l", kind="load", rated_kw=10), "l@localhost", "pw", Endpoint(),
                        ["alice@localhost"], setup=setup, replay=store)
    cmd = Command.new(Action.SHED, "alice@localhost", ttl_s=30)
    done = await agent.accept(cmd, utcnow(), signed=True)
    assert done.status is OutcomeStatus.EXECUTED and done.report is not None and done.report.state is DeviceState.OFF
    assert len(commits) == 1 and commits[0] >= 2, commits  # the state and the record (and a prune) together
    kept = kept_state(tmp_path, "l")
    assert kept is not None and kept.state is DeviceState.OFF
    assert ReplayGuard(ReplayStore(tmp_path / REPLAY_FILE), "l@localhost").seen("alice@localhost", cmd.id) is not None
    again = await agent.accept(cmd, utcnow(), signed=True)
    assert again.reason is RejectReason.REPLAYED and again.first is not None and again.first.status is OutcomeStatus.EXECUTED
    store.close()
