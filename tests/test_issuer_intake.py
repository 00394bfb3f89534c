"""operator/issuer.py's outcome intake: an outcome taken straight from the XML (xmpp/dispatch.py
take_for) ends exactly as slixmpp's way ends it: the same futures settled with the same
outcome, the same pending-store entries gone, the same orphans told, the same refusals.
Seeded, bounded fuzz of valid and hostile outcome messages; no server needed (the clients are
built, never connected)."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from pathlib import Path
from typing import Any
from xml.etree import ElementTree as ET

from gridpresence.operator.issuer import CommandIssuer
from gridpresence.operator.pending import PendingCommand, PendingStore
from gridpresence.protocol.codec import outcome_to_xml
from gridpresence.protocol.models import Action, Command, Outcome, OutcomeStatus, RejectReason
from gridpresence.xmpp.session import Endpoint, make_client

from timebase import NOW as BASE

DEVICES = [f"d-{i}@devices.localhost" for i in range(6)]
RELAY = "relay@localhost"
DEAD_PID = 2 ** 22 + 12345  # above the kernel's pid_max default: never a live process


def _outcome_xml(rng: random.Random, cmd_id: str, device: str) -> str:
    status = rng.choice([OutcomeStatus.EXECUTED, OutcomeStatus.REJECTED, OutcomeStatus.EXPIRED])
    reason = rng.choice(list(RejectReason)) if status is OutcomeStatus.REJECTED else None
    first = None
    if reason is RejectReason.REPLAYED and rng.random() < 0.7:
        first = Outcome(command_id=cmd_id, device=device, status=OutcomeStatus.EXECUTED, detail="first time")
    outcome = Outcome(command_id=cmd_id, device=device, status=status, reason=reason, first=first,
                      detail=rng.choice(["", "done", "<&> \"quoted\""]),
                      report_seq=rng.choice([None, 0, 7]))
    return ET.tostring(outcome_to_xml(outcome), encoding="unicode")


def _message(rng: random.Random, cmd_ids: list[str]) -> str:
    cmd_id = rng.choice(cmd_ids)
    device = rng.choice(DEVICES)
    sender = rng.choice([f"{device}/host", device, f"{rng.choice(DEVICES)}/host", RELAY + "/r",
                         device.upper() + "/host", f"{device}/other"])
    claimed = rng.choice([device, device, device, device + "/res", device.upper()])
    body = _outcome_xml(rng, cmd_id, claimed)
    hostile = rng.random()
    if hostile < 0.08:
        body = body.replace('status="', 'status="x')  # invalid
    elif hostile < 0.14:
        body += _outcome_xml(rng, rng.choice(cmd_ids), claimed)  # two outcomes: slixmpp reads one of them
    elif hostile < 0.18:
        body = body.replace("<ns0:outcome ", "<ns0:outcome xml:lang='de' ", 1)
    elif hostile < 0.22:
        body = body.replace('command-id="', 'command-id="?!', 1)
    frm = f" from='{sender}'" if rng.random() > 0.03 else ""
    return f"<message xmlns='jabber:client'{frm} to='op@localhost/x' type='normal'>{body}</message>"


def _command(cmd_id: str) -> Command:
    return Command(id=cmd_id, action=Action.SHED, issuer="op@localhost", issued=BASE,
                   expires=BASE + dt.timedelta(days=1))


async def _run(seed: int, tmp: Path, fast: bool) -> dict[str, Any]:
    rng = random.Random(seed)
    client = make_client("op@localhost/x", "secret", Endpoint())
    store = PendingStore(tmp / ("fast" if fast else "slow"))
    issuer = CommandIssuer(client, None, relay=RELAY, store=store)
    dispatch = client.shape_dispatch  # type: ignore[attr-defined]
    if not fast:
        dispatch._for.clear()  # slixmpp's way only
    cmd_ids = [f"c{i}" for i in range(12)]
    futures = {}
    for i, cmd_id in enumerate(cmd_ids[:8]):  # 8 waiting, 2 orphans of a dead process, 2 unknown
        futures[cmd_id] = issuer.expect(cmd_id)
        store.add(_command(cmd_id), DEVICES[i % len(DEVICES)], "<openpgp xmlns='urn:xmpp:openpgp:0'/>", "direct")
    assert store.directory is not None
    for cmd_id in cmd_ids[8:10]:
        entry = PendingCommand(command_id=cmd_id, device=DEVICES[0], action="shed", issued=BASE,
                               expires=BASE + dt.timedelta(days=1), route="direct", wire="<x/>",
                               pid=DEAD_PID)
        (store.directory / f"{cmd_id}.json").write_text(entry.model_dump_json())
    told: list[tuple[str, str]] = []
    issuer.on_orphan_outcome = lambda entry, outcome: told.append((entry.command_id, outcome.model_dump_json()))
    for _ in range(300):
        client._spawn_event(ET.fromstring(_message(rng, cmd_ids)))  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    return {
        "results": {k: f.result().model_dump_json() if f.done() else None for k, f in futures.items()},
        "held": sorted(k for k in cmd_ids if store.holds(k)),
        "files": sorted(p.name for p in store.directory.glob("*.json")),
        "told": told,
        "taken": dispatch.taken_for,
    }


async def test_outcomes_taken_from_the_xml_end_as_slixmpps_way_ends_them(tmp_path: Path) -> None:
    for seed in range(12):
        fast = await _run(seed, tmp_path / str(seed), fast=True)
        slow = await _run(seed, tmp_path / str(seed), fast=False)
        assert slow["taken"] == 0 and fast["taken"] > 0, (seed, fast["taken"])
        assert {k: v for k, v in fast.items() if k != "taken"} == {k: v for k, v in slow.items() if k != "taken"}, seed
        assert any(v is not None for v in fast["results"].values())  # the fuzz settles some


async def test_a_devices_outcome_is_taken_without_a_stanza_object_and_settles_its_command(tmp_path: Path) -> None:
    client = make_client("op@localhost/x", "secret", Endpoint())
    issuer = CommandIssuer(client, None, store=PendingStore(tmp_path / "p"))
    dispatch = client.shape_dispatch  # type: ignore[attr-defined]
    futs = [issuer.expect(f"k{i}") for i in range(5)]
    for i in range(5):
        outcome = Outcome(command_id=f"k{i}", device=DEVICES[1], status=OutcomeStatus.EXECUTED, report_seq=i)
        body = ET.tostring(outcome_to_xml(outcome), encoding="unicode")
        client._spawn_event(ET.fromstring(  # type: ignore[attr-defined]
            f"<message xmlns='jabber:client' from='{DEVICES[1]}/h' type='normal'>{body}</message>"))
    assert dispatch.taken_for == 4  # the first of its shape went slixmpp's way, which learns the shape
    assert [f.result().report_seq for f in futs] == list(range(5))
    # Another device's outcome claiming DEVICES[1]: refused (the slow way says why), nothing settled.
    late = issuer.expect("k9")
    body = ET.tostring(outcome_to_xml(Outcome(command_id="k9", device=DEVICES[1], status=OutcomeStatus.EXECUTED)),
                       encoding="unicode")
    client._spawn_event(ET.fromstring(  # type: ignore[attr-defined]
        f"<message xmlns='jabber:client' from='{DEVICES[2]}/h' type='normal'>{body}</message>"))
    assert not late.done() and dispatch.taken_for == 4


async def test_commands_without_an_outcome_expire_on_the_shared_timer_each_at_its_own_time(
        tmp_path: Path, monkeypatch: Any) -> None:
    """One timer serves every waiting command (operator/issuer.py _expire_later): each that gets
    no outcome ends "expired" at its own deadline, not before; an earlier deadline sent later
    moves the timer up; an answered one is not touched; nothing is left waiting."""
    import gridpresence.operator.issuer as issuer_module
    monkeypatch.setattr(issuer_module, "OUTCOME_MARGIN_S", 0.0)
    client = make_client("op@localhost/x", "secret", Endpoint())
    issuer = CommandIssuer(client, None, store=PendingStore(None))
    loop = asyncio.get_running_loop()
    ttls = {"slow": 0.4, "quick": 0.1, "answered": 0.3, "middle": 0.2}
    ended: dict[str, tuple[float, Outcome]] = {}
    started = loop.time()

    async def one(name: str) -> None:
        cmd = Command.new(Action.SHED, "op@localhost", ttl_s=ttls[name])
        object.__setattr__(cmd, "id", name)  # (readable ids; the model is frozen)
        outcome = await issuer.send(cmd, f"{DEVICES[0]}/h")
        ended[name] = (loop.time(), outcome)

    tasks = [asyncio.ensure_future(one(n)) for n in ttls]
    await asyncio.sleep(0.05)
    issuer._accept(Outcome(command_id="answered", device=DEVICES[0], status=OutcomeStatus.EXECUTED))
    await asyncio.gather(*tasks)
    assert ended["answered"][1].status is OutcomeStatus.EXECUTED and ended["answered"][0] - started < 0.2
    for name in ("quick", "middle", "slow"):
        at, outcome = ended[name]
        assert outcome.status is OutcomeStatus.EXPIRED and outcome.command_id == name
        assert ttls[name] - 0.05 <= at - started < ttls[name] + 0.5, (name, at - started)
    assert sorted(ended, key=lambda n: ended[n][0]) == ["answered", "quick", "middle", "slow"]
    assert not issuer.pending and not issuer._timed and issuer._expiry is None


async def test_an_outcome_another_handler_also_wants_goes_slixmpps_way_to_both(tmp_path: Path) -> None:
    """A shape that matches more than the outcome handler (here a body: slixmpp's "message"
    event too) is never taken: both run, as slixmpp runs them."""
    client = make_client("op@localhost/x", "secret", Endpoint())
    issuer = CommandIssuer(client, None, store=PendingStore(None))
    dispatch = client.shape_dispatch  # type: ignore[attr-defined]
    bodies: list[str] = []
    client.add_event_handler("message", lambda msg: bodies.append(str(msg["body"])))
    futs = [issuer.expect(f"b{i}") for i in range(4)]
    for i in range(4):
        body = ET.tostring(outcome_to_xml(Outcome(command_id=f"b{i}", device=DEVICES[3], status=OutcomeStatus.EXECUTED)),
                           encoding="unicode")
        client._spawn_event(ET.fromstring(  # type: ignore[attr-defined]
            f"<message xmlns='jabber:client' from='{DEVICES[3]}/h' type='normal'><body>hi {i}</body>{body}</message>"))
    assert dispatch.taken_for == 0 and all(f.done() and f.result().ok for f in futs)
    assert bodies == [f"hi {i}" for i in range(4)]


async def test_cancelled_waits_keep_their_commands_at_once_and_an_heirs_outcomes_stay_until_shown(
        tmp_path: Path) -> None:
    """Ctrl-C cancels the waits well before the 0.5 s keep: every command sent is on disk at
    once, still waiting (operator/pending.py). The next issuer of the operator adopts them: an
    outcome it takes, asked or unasked, is kept answered until shown; an adoption cancelled in
    turn (that process ended too) leaves its command waiting for the next."""
    directory = tmp_path / "alice.pending"
    issuer = CommandIssuer(make_client("op@localhost/a", "secret", Endpoint()), None, store=PendingStore(directory))
    cmds = [Command.new(Action.SHED, "op@localhost", ttl_s=30) for _ in DEVICES[:3]]
    tasks = [asyncio.ensure_future(issuer.send(c, f"{d}/h")) for c, d in zip(cmds, DEVICES)]
    await asyncio.sleep(0.05)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert issuer.store.waiting_here() == 3
    kept = PendingStore(directory).entries()
    assert [e.command_id for e in kept] == [c.id for c in cmds] and all(e.outcome is None for e in kept)
    for path in directory.glob("*.json"):  # as the interrupted process leaves them once it is gone
        path.unlink()
    PendingStore(directory).add_many([e.model_copy(update={"pid": DEAD_PID}) for e in kept])

    told: list[str] = []
    heir = CommandIssuer(make_client("op@localhost/b", "secret", Endpoint()), None, store=PendingStore(directory))
    heir.on_orphan_outcome = lambda entry, _outcome: told.append(entry.command_id)
    orphans = {e.command_id: e for e in heir.store.orphans()}
    assert set(orphans) == {c.id for c in cmds}
    answered = asyncio.ensure_future(heir.adopt(orphans[cmds[0].id]))
    given_up = asyncio.ensure_future(heir.adopt(orphans[cmds[1].id]))
    await asyncio.sleep(0.05)
    heir._accept(Outcome(command_id=cmds[0].id, device=DEVICES[0], status=OutcomeStatus.EXECUTED))
    heir._accept(Outcome(command_id=cmds[2].id, device=DEVICES[2], status=OutcomeStatus.EXECUTED))  # unasked
    given_up.cancel()
    assert (await answered).status is OutcomeStatus.EXECUTED
    await asyncio.gather(given_up, return_exceptions=True)
    assert told == [cmds[2].id]
    reader = PendingStore(directory)
    assert {e.command_id for e in reader.answered()} == {cmds[0].id, cmds[2].id}
    assert all(e.outcome is not None and e.outcome.ok for e in reader.answered())
    assert [e.command_id for e in reader.entries()] == [cmds[1].id] and heir.store.waiting_here() == 1
    reader.shown([cmds[0].id, cmds[2].id])
    assert not PendingStore(directory).answered() and [e.command_id for e in reader.entries()] == [cmds[1].id]


def test_the_orphans_of_a_fleet_sized_group_are_adopted_in_one_write_and_answers_are_not_waiting_twice(
        tmp_path: Path, monkeypatch: Any) -> None:
    """A Ctrl-C'd shed of 10,000 leaves one group file; the next process adopts them all with
    one file of its own and the old group removed, not rewritten once per entry. An entry
    answered and also still listed in a dead process's group counts as answered only."""
    import os

    directory = tmp_path / "alice.pending"
    sender = PendingStore(directory)
    cmds = [Command.new(Action.SHED, "op@localhost", ttl_s=30) for _ in range(10_000)]
    sender.add_many([PendingStore.entry(c, DEVICES[i % len(DEVICES)], "<command/>", "direct")
                     .model_copy(update={"pid": DEAD_PID}) for i, c in enumerate(cmds)])
    writes: list[str] = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (writes.append(str(b)), real_replace(a, b))[1])
    heir = PendingStore(directory)
    orphans = heir.orphans()
    assert len(orphans) == 10_000
    mine = heir.adopt_many(orphans)
    assert {e.pid for e in mine} == {os.getpid()} and len(writes) == 1  # one file written, none rewritten
    files = list(directory.glob("*.json"))
    assert len(files) == 1 and files[0].name == writes[0].rsplit("/", 1)[1]
    assert not PendingStore(directory).orphans()  # ours now, alive

    heir.answer(mine[0], Outcome(command_id=cmds[0].id, device=mine[0].device, status=OutcomeStatus.EXECUTED))
    reader = PendingStore(directory)
    assert [e.command_id for e in reader.answered()] == [cmds[0].id]
    waiting = reader.entries()
    assert len(waiting) == 9_999 and cmds[0].id not in {e.command_id for e in waiting}
