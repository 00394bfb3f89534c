"""Operator verdicts over chat on a real Prosody: "not a fault" replies to a device's alarms feed
its threshold adjustment; the proposal reaches the operator as a chat message, the operator's
answer applies it (audited), the device raises alarms by the new threshold, and a revert undoes it.
The "Judge an alarm" ad-hoc command records a verdict the same way."""

from __future__ import annotations

import asyncio
import datetime as dt
import json

from chatpeer import ChatPeer, chat_peer, high_loading, judged_not_a_fault_twice, raises_by_a_limit_of_90
from conftest import Env, run_cli
from gridpresence.host.fleet import FleetBots
from gridpresence.rules.audit_log import audit_path
from gridpresence.security.policy import SecuritySettings
from gridpresence.device.agent import DeviceAgent
from gridpresence.protocol.alarm import AlarmStatus
from test_adhoc import _gajim
from gridpresence.xmpp.session import close_session
from timebase import NOW

DEVICE = "verdict-load"


def agent(env: Env) -> DeviceAgent:
    assert env.grid.bots is not None
    return env.grid.bots.devices[DEVICE]


async def reply_from(peer: ChatPeer, device: str, needle: str, timeout: float = 6.0) -> str:
    async with asyncio.timeout(timeout):
        while True:
            msg = await peer.replies.get()
            if msg["from"].bare == device and needle in msg["body"]:
                return msg["body"]


async def test_not_a_fault_over_chat_proposes_confirms_and_reverts(env: Env) -> None:
    dev = agent(env)
    device = env.fleet.jid(DEVICE)
    alice = await chat_peer(env, "alice", "verdicts")
    sim = dev.sim
    try:
        await asyncio.sleep(0.3)
        # The second verdict as a bare reply: it is taken for the alarm just cleared.
        pid, _ = await judged_not_a_fault_twice(dev, alice, lambda _aid: alice.ask(device, "Not a fault."))
        # Bad answers are refused with the reason; nothing changes.
        assert "outside the bounds" in await alice.ask(device, f"set {pid} 120")
        assert "not a number" in await alice.ask(device, f"set {pid} lots")
        assert "no threshold proposal 999" in await alice.ask(device, "accept 999")
        assert dev.alarms.thresholds.current(DEVICE, "high_loading", "high_loading") == 80.0
        # The operator enters another value (hybrid): applied, audited as theirs.
        changed = await alice.ask(device, f"set {pid} 90")
        assert "changed 80 -> 90 by " + env.fleet.jid("alice") in changed
        change = dev.alarms.thresholds.audit[-1]
        assert (change.old, change.new, change.by) == (80.0, 90.0, env.fleet.jid("alice"))
        assert "not a fault" in change.why and "operator entered 90" in change.why
        await raises_by_a_limit_of_90(dev, alice)
        # Reverted: back to the rule set's value, the revert audited too.
        reverted = await alice.ask(device, f"revert {change.id}")
        assert "changed 90 -> 80" in reverted and f"revert of change {change.id}" in reverted
        assert dev.alarms.thresholds.current(DEVICE, "high_loading", "high_loading") == 80.0
        assert "revert of change" in await alice.ask(device, "thresholds")
    finally:
        sim.utilisation = 0.5  # type: ignore[attr-defined]
        dev.alarms.acknowledge(None, "test-cleanup")
        await alice.close()


async def test_verdict_by_adhoc_command_and_bad_ids(env: Env) -> None:
    dev = agent(env)
    device = env.fleet.jid(DEVICE)
    bob = await chat_peer(env, "bob", "verdicts")
    gajim = await _gajim(env, "alice")
    try:
        await asyncio.sleep(0.3)
        assert "raised no alarm" in await bob.ask(device, "not a fault 12345")
        dev.sim.utilisation = 0.85  # type: ignore[attr-defined]
        aid = await high_loading(bob, device, AlarmStatus.RAISED)
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        full = dev.client.boundjid.full
        first = await gajim.execute(full, "judge-alarm")
        form = first["command"]["form"]
        assert aid in [o["value"] for o in form.get_fields()["alarm"]["options"]]
        bad = await gajim.submit(full, await gajim.execute(full, "judge-alarm"), {"alarm": aid, "verdict": "maybe"})
        assert "verdict must be fault or not_fault" in bad["command"]["notes"][0][1]
        done = await gajim.submit(full, first, {"alarm": aid, "verdict": "not_fault"})
        assert done["command"]["notes"][0][1].startswith(f"Recorded: alarm {aid} (high_loading) is not a fault.")
        hist = dev.alarms.adjuster._hist[(DEVICE, "high_loading")]
        assert hist.alarms[-1].verdict is False
        # One rule set, stored once, shared by the devices (each with its own threshold book).
        assert env.grid.bots is not None
        other = env.grid.bots.devices["hot-load"].alarms
        assert other.engine.rules is dev.alarms.engine.rules and other.thresholds is not dev.alarms.thresholds
    finally:
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        dev.alarms.acknowledge(None, "test-cleanup")
        await bob.close()
        await close_session(gajim.client)


async def test_low_priority_warning_batched_costly_one_at_once(env: Env) -> None:
    """Ranked by cost per day at the billing party's tariff: 2 kW past the limit waits for the
    batch (and is dropped if it passes first); 13 kW past it goes at once."""
    assert env.grid.bots is not None
    dev = env.grid.bots.devices["hot-load"]
    name, device = "hot-load", env.fleet.jid("hot-load")
    before = dev.alarms.settings
    dev.alarms.settings = before.model_copy(update={"batch_low_priority_s": 2.0, "high_cost_per_day": 100.0})
    bob = await chat_peer(env, "bob", "batch")

    async def until(held: bool) -> None:
        async with asyncio.timeout(5):
            while ("high_loading" in dev.alarms.engine.active(name)) != held:
                await asyncio.sleep(0.05)

    try:
        await asyncio.sleep(0.3)
        assert dev.alarms.price is not None and dev.alarms.price() in (0.8, 0.6)  # the fleet's billing tariff
        # A short, cheap excursion: batched, then passed before the batch went out: nobody is told.
        dev.sim.utilisation = 0.82  # type: ignore[attr-defined]
        await until(True)
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await until(False)
        await asyncio.sleep(2.5)
        assert not [m for m in bob.alarms._queue if m["from"].bare == device]  # type: ignore[attr-defined]
        # A cheap one that lasts: told once the batch goes out, with its cost.
        dev.sim.utilisation = 0.82  # type: ignore[attr-defined]
        await until(True)
        aid = await high_loading(bob, device, AlarmStatus.RAISED, timeout=5)
        text = dev.alarms.open[aid].alarm.text
        assert "low priority" in text and "a day, batched" in text
        cost = float(text.split("low priority, ")[1].split(" a day")[0])
        assert 0 < cost < 100
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await high_loading(bob, device, AlarmStatus.CLEARED)
        # A costly one: at once, no batching note.
        dev.sim.utilisation = 0.93  # type: ignore[attr-defined]
        await until(True)
        aid = await high_loading(bob, device, AlarmStatus.RAISED, timeout=1.0)
        assert "batched" not in dev.alarms.open[aid].alarm.text
    finally:
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        dev.alarms.settings = before
        dev.alarms.acknowledge(None, "test-cleanup")
        await bob.close()


# -- unsigned chat may look, not act: thresholds too -------------------------------------------------

GUARD = "guard-load"


def _guard_bots(env: Env) -> FleetBots:
    """guard-load with the default [security]: no lab setting, so unsigned lines may only look."""
    fleet = env.fleet.model_copy(update={"security": SecuritySettings()})
    return FleetBots(fleet, env.grid.endpoint, env.grid.secrets, only=[GUARD], tick_s=0.2, with_services=False,
                     data_dir=env.data)


async def test_unsigned_threshold_verbs_are_refused_signed_ones_act(env: Env) -> None:
    """A leaked password alone must not silence alarms: `accept`, `set`, `reject`, `revert` and a
    verdict (chat or the judge-alarm form) are refused unsigned, with the reason and no change; the
    same lines OX-signed act, and `gridpresence rules revert` signs its line."""
    jid = env.fleet.jid(GUARD)
    journal = audit_path(env.data, GUARD)
    journal.parent.mkdir(parents=True, exist_ok=True)
    journal.write_text(json.dumps({"id": 1, "device": GUARD, "rule": "high_loading", "param": "high_loading",
                                   "old": 80.0, "new": 90.0, "by": "alice@localhost", "why": "by hand",
                                   "at": (NOW - dt.timedelta(days=1)).isoformat()}) + "\n")
    bots = _guard_bots(env)
    await bots.start()
    dev = bots.devices[GUARD]
    alice = await chat_peer(env, "alice", "guard")
    gajim = await _gajim(env, "bob")
    grid = env.operator("alice", resource="guard-signed")
    await grid.connect()
    try:
        book = dev.alarms.thresholds
        assert book.current(GUARD, "high_loading", "high_loading") == 90.0
        dev.sim.utilisation = 0.925  # type: ignore[attr-defined]
        aid = await high_loading(alice, jid, AlarmStatus.RAISED, timeout=8)
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        hist = dev.alarms.adjuster._hist[(GUARD, "high_loading")]
        for line in ("revert 1", "accept 1", "set 1 99", "reject 1", f"not a fault {aid}", "fault", "Not a fault."):
            answer = await alice.ask(jid, line)
            assert answer.startswith("Refused "), (line, answer)
            assert "unsigned chat line may not change" in answer and "OpenPGP-signed" in answer, answer
        first = await gajim.execute(dev.client.boundjid.full, "judge-alarm")
        form = await gajim.submit(dev.client.boundjid.full, first, {"alarm": aid, "verdict": "not_fault"})
        assert form["command"]["notes"][0][1].startswith("Refused judge-alarm: ")
        assert [c.id for c in book.audit] == [1] and book.current(GUARD, "high_loading", "high_loading") == 90.0
        assert all(a.verdict is None for a in hist.alarms)  # nothing learnt from unsigned verdicts
        assert (await alice.ask(jid, "thresholds")).startswith(f"{GUARD}: threshold high_loading")  # looking is fine
        # Signed (OX), the same words act.
        judged = await grid.ask(GUARD, f"not a fault {aid}", signed=True)
        assert judged.startswith(f"Recorded: alarm {aid} (high_loading) is not a fault."), judged
        assert hist.alarms[-1].verdict is False
        reverted = await grid.ask(GUARD, "revert 1", signed=True)
        assert "changed 90 -> 80 by alice@localhost (change 2): revert of change 1" in reverted, reverted
        # The CLI signs its revert: it works where unsigned chat is refused, and a repeat is refused.
        conn = ["--connection", str(env.grid.connection_file), "--as", "bob"]
        code, out, err = await run_cli("rules", "revert", GUARD, "2", *conn)
        assert code == 0 and "changed 80 -> 90 by bob@localhost (change 3): revert of change 2" in out, out + err
        code, out, _ = await run_cli("rules", "revert", GUARD, "2", *conn)
        assert code == 1 and "change 2 was already reverted by change 3" in out, out
        assert [c.id for c in book.audit] == [1, 2, 3]
    finally:
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await grid.close()
        await close_session(gajim.client)
        await alice.close()
        await bots.stop()
        journal.unlink()
