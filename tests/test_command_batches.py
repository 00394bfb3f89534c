"""Commands in batches (issue 16: a signed shed to thousands): a fan-out's signed commands for
the devices of one host go as XEP-0033 multicast messages to the host's domain, each under one
signature for up to a hundred commands (PROTOCOL.md, "Commands in batches"). Against a real
Prosody and a host of 150 identities: each device carries out its own command once, a stock
client's roster shows every change, a batch sent again is answered from the replay memory, an
address the host does not serve ends in its own outcome, malformed multicasts are refused
with an error and leave the host serving; and, without a server, the batch's reading, its one
verification, and the pending store that keeps its wire once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path
from xml.etree import ElementTree as ET

import pytest
import pytest_asyncio
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from conftest import agent_of, hosted_fleet, link_of, plain_client, running_grid, until
from gridpresence.config import parse_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.issuer import wire_text
from gridpresence.operator.library import GridOperator
from gridpresence.operator.pending import SHARED_WIRE_MIN, PendingStore
from gridpresence.protocol import Action
from gridpresence.protocol.addressing import ADDRESS_NS, addresses_text, addresses_to_xml
from gridpresence.protocol.codec import (BATCH_COMMANDS_MAX, COMMANDS_MAX, PayloadError, command_to_text,
                                         commands_by_device, commands_to_text, outcome_from_xml, q)
from gridpresence.protocol.models import Command, DeviceState, Outcome, OutcomeStatus, RejectReason
from gridpresence.security.signed import SignatureFailure, open_signed, sign_payload
from gridpresence.xmpp.component import MULTICAST_MAX
from gridpresence.xmpp.session import close_session
from timebase import NOW, key_for

pytestmark = pytest.mark.timeout(180)

NAMES = [f"b-{i:03d}" for i in range(150)]
DOMAIN = "devices.localhost"
T0 = NOW  # the suite's one clock reading (timebase.py): the unit tests below read no clock


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Grid]:
    fleet = hosted_fleet([{"name": n, "kind": "load", "rated_kw": 10, "refresh_s": 600.0} for n in NAMES])
    async with running_grid(parse_fleet(fleet), tmp_path_factory.mktemp("batches"),
                            only=[*NAMES], dashboard=False, tick_s=600) as g:
        yield g


class Multicasts:
    """The multicast messages the host's link takes while installed (its XEP-0033 entry)."""

    def __init__(self, grid: Grid) -> None:
        self.link = link_of(grid)
        self.seen: list[int] = []  # addresses of each

    def __enter__(self) -> Multicasts:
        original = self.link._multicast

        def counting(xml: ET.Element, addresses: ET.Element) -> None:
            self.seen.append(len(addresses))
            original(xml, addresses)
        self.link._multicast = counting  # type: ignore[method-assign]
        return self

    def __exit__(self, *_exc: object) -> None:
        del self.link._multicast


async def outcomes_of(client: object) -> asyncio.Queue[Outcome]:
    """Outcomes (messages) and errors a plain session gets, in one queue."""
    queue: asyncio.Queue[Outcome] = asyncio.Queue()
    client.register_handler(Callback("outcome", StanzaPath("message/grid_outcome"),  # type: ignore[attr-defined]
                                     lambda m: queue.put_nowait(outcome_from_xml(m.xml.find(q("outcome"))))))
    return queue


async def test_a_shed_of_150_goes_in_two_batches_and_every_roster_shows_it(grid: Grid) -> None:
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="batch") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 30)
        bob = await plain_client(grid, "bob")  # a stock client's roster: every change shows
        try:
            items = {n: bob.client_roster[grid.fleet.jid(n)] for n in NAMES}
            await until(lambda: all(i.resources for i in items.values()), 20, "bob seeing every device")
            done: list[int] = []
            with Multicasts(grid) as multicasts:
                outcomes = await alice.command_many(NAMES, Action.SHED, progress=lambda d, _t: done.append(d))
            assert sorted(outcomes) == sorted(NAMES)
            bad = {n: o for n, o in outcomes.items() if o.status is not OutcomeStatus.EXECUTED}
            assert not bad, list(bad.items())[:3]
            assert multicasts.seen == [BATCH_COMMANDS_MAX, len(NAMES) - BATCH_COMMANDS_MAX]
            assert done[-1] == len(NAMES) and sorted(done) == done
            for name in NAMES:  # each carried out its own command, once
                assert agent_of(grid, name).sim.state is DeviceState.OFF
            await until(lambda: all(any((r.get("status") or "").startswith("off") for r in i.resources.values())
                                    for i in items.values()), 20, "bob seeing every device off")
            back = await alice.command_many(NAMES, Action.RESTORE)
            assert all(o.status is OutcomeStatus.EXECUTED for o in back.values())
        finally:
            await close_session(bob)


async def test_the_domain_names_multicast_and_a_batch_sent_again_is_answered_as_a_replay(grid: Grid) -> None:
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="replay") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 30)
        info = await alice.client.plugin["xep_0030"].get_info(jid=DOMAIN, timeout=5)
        assert ADDRESS_NS in info["disco_info"]["features"]
        names = NAMES[:3]
        views = [alice.devices[n] for n in names]
        cmds = [Command.new(Action.SHED, alice.jid, serial=alice.serial_of(v), ttl_s=30) for v in views]
        first = await alice.issuer.send_batch([(c, v.full_jid or v.jid) for c, v in zip(cmds, views)], DOMAIN)
        assert [o.status for o in first] == [OutcomeStatus.EXECUTED] * 3
        # The same signed batch again, once multicast and once to one device's bare JID (as a
        # resend after a reconnect or an adoption sends it): no second effect anywhere.
        key = grid.keys.secret("alice")
        wire = sign_payload(commands_to_text([(command_to_text(c), v.jid) for c, v in zip(cmds, views)]),
                            [v.jid for v in views], key, now=cmds[0].issued)
        plain = await plain_client(grid, "alice")
        try:
            answers = await outcomes_of(plain)
            plain.send_raw(f"<message to='{DOMAIN}' type='normal' id='again'>{addresses_text([v.jid for v in views])}"
                           f"{wire_text(wire)}</message>")
            plain.send_raw(f"<message to='{views[1].jid}' type='normal' id='alone'>{wire_text(wire)}</message>")
            got = [await asyncio.wait_for(answers.get(), 10) for _ in range(4)]
        finally:
            await close_session(plain)
        assert sorted(o.command_id for o in got) == sorted([c.id for c in cmds] + [cmds[1].id])
        assert all(o.status is OutcomeStatus.REJECTED and o.reason is RejectReason.REPLAYED for o in got)
        assert all(o.first is not None and o.first.ok for o in got)
        for name in names:
            assert agent_of(grid, name).sim.state is DeviceState.OFF
        restored = await alice.command_many(names, Action.RESTORE)
        assert all(restored[n].ok for n in names)


async def test_an_address_the_host_does_not_serve_ends_in_its_own_outcome(grid: Grid) -> None:
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="ghost") as alice:
        await alice.wait_for(lambda d: all(v.present for v in d.values()), 30)
        view = alice.devices[NAMES[5]]
        real = Command.new(Action.SHED, alice.jid, serial=alice.serial_of(view), ttl_s=30)
        ghost = Command.new(Action.SHED, alice.jid, ttl_s=30)
        t0 = asyncio.get_running_loop().time()
        outcomes = await alice.issuer.send_batch([(real, view.full_jid or view.jid), (ghost, f"ghost@{DOMAIN}/x")],
                                                 DOMAIN)
        assert asyncio.get_running_loop().time() - t0 < 10  # answered, not left to expire (30 s)
        assert outcomes[0].status is OutcomeStatus.EXECUTED
        assert outcomes[1].status is OutcomeStatus.UNDELIVERABLE and outcomes[1].device == f"ghost@{DOMAIN}"
        assert "service-unavailable" in outcomes[1].detail
        assert (await alice.command(NAMES[5], Action.RESTORE)).ok


async def test_malformed_multicasts_are_refused_and_the_host_keeps_serving(grid: Grid) -> None:
    plain = await plain_client(grid, "alice")
    errors: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
    plain.register_handler(Callback("errors", StanzaPath("message@type=error"),
                                    lambda m: errors.put_nowait((m["id"], m["error"]["condition"]))))
    rng = random.Random(16033)
    try:
        body = "<openpgp xmlns='urn:xmpp:openpgp:0'>AAAA</openpgp>"
        refused = {
            "none": (f"<addresses xmlns='{ADDRESS_NS}'><address type='to' jid='{NAMES[0]}@{DOMAIN}' "
                     "delivered='true'/></addresses>", "bad-request"),
            "foreign": (addresses_text(["x@elsewhere.example"]), "bad-request"),
            "domain": (addresses_text([DOMAIN]), "bad-request"),
            "many": (addresses_text([f"n{i}@{DOMAIN}" for i in range(MULTICAST_MAX + 1)]), "not-acceptable"),
        }
        for tag, (addresses, expected) in refused.items():
            plain.send_raw(f"<message to='{DOMAIN}' type='normal' id='{tag}'>{addresses}{body}</message>")
            stanza_id, condition = await asyncio.wait_for(errors.get(), 10)
            assert (stanza_id, condition) == (tag, expected)
        # Seeded fuzz: addresses of random shapes around the real ones, with broken payloads;
        # whatever each is answered with, the host goes on and a device still takes a command.
        pieces = [f"<address type='to' jid='{grid.fleet.jid(NAMES[0])}'/>", "<address type='bcc' jid=''/>",
                  "<address type='cc' jid='@@'/>", "<address/>", "<address type='noreply'/>",
                  f"<address type='to' jid='{NAMES[1]}@{DOMAIN}' delivered='true'/>", "<x xmlns='y'/>"]
        payloads = [body, "<openpgp xmlns='urn:xmpp:openpgp:0'>!!</openpgp>", "<command xmlns='urn:gridpresence:0'/>",
                    "<body>hi</body>", ""]
        for i in range(60):
            picked = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6)))
            plain.send_raw(f"<message to='{DOMAIN}' type='normal' id='f{i}'><addresses xmlns='{ADDRESS_NS}'>"
                           f"{picked}</addresses>{rng.choice(payloads)}</message>")
        await asyncio.sleep(1.0)
    finally:
        await close_session(plain)
    assert link_of(grid).is_connected()
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="after") as alice:
        await alice.wait_for(lambda d: d[NAMES[0]].present, 20)
        assert (await alice.command(NAMES[0], Action.SHED)).ok
        assert (await alice.command(NAMES[0], Action.RESTORE)).ok


async def test_a_batch_whose_multicast_was_lost_is_sent_again_as_one_and_runs_once(grid: Grid) -> None:
    """The first multicast never reaches the devices (dropped at the host, as if lost with a
    cut connection); the resend after a reconnect of ours (resend_pending) sends the batch's
    copies as one multicast, and each device carries out its command once."""
    names = NAMES[10:15]
    link = link_of(grid)
    carried_out: dict[str, int] = {}
    for name in names:
        agent = agent_of(grid, name)
        execute = agent.execute

        async def counted(cmd: Command, now: dt.datetime, *rest: object, _e=execute, _n=name) -> Outcome:
            carried_out[_n] = carried_out.get(_n, 0) + 1
            return await _e(cmd, now, *rest)
        agent.execute = counted  # type: ignore[method-assign]
    dropped: list[int] = []
    original = link._multicast

    def drop_first(xml: ET.Element, addresses: ET.Element) -> None:
        if not dropped:
            dropped.append(len(addresses))
            return
        original(xml, addresses)
    try:
        async with GridOperator.from_connection(grid.connection, operator="alice", resource="lost") as alice:
            await alice.wait_for(lambda d: all(d[n].present for n in names), 30)
            link._multicast = drop_first  # type: ignore[method-assign]
            shed = asyncio.ensure_future(alice.command_many(names, Action.SHED))
            await until(lambda: dropped, 10, "the first multicast dropped")
            link._multicast = original  # type: ignore[method-assign]
            with Multicasts(grid) as multicasts:
                assert alice.issuer.resend_pending() == len(names)
                outcomes = await asyncio.wait_for(shed, 20)
            assert dropped == [len(names)] and multicasts.seen == [len(names)]
            assert all(o.status is OutcomeStatus.EXECUTED for o in outcomes.values()), outcomes
            await asyncio.sleep(0.3)
            assert carried_out == dict.fromkeys(names, 1)
            restored = await alice.command_many(names, Action.RESTORE)
            assert all(o.ok for o in restored.values())
    finally:
        for name in names:
            del agent_of(grid, name).execute
        if "_multicast" in vars(link):
            del link._multicast


async def test_a_cancelled_batch_keeps_only_the_commands_still_waiting(grid: Grid) -> None:
    """One device of a batch never answers; the others' outcomes come (and progress counts each
    as it comes, not the batch at the end); the fan-out cancelled then (a Ctrl-C) keeps on disk
    for a later process the one command still waiting, not those answered."""
    names = NAMES[20:25]
    silent = agent_of(grid, names[2])
    hold: asyncio.Event = asyncio.Event()

    async def never(cmd: Command, now: dt.datetime, *rest: object) -> Outcome:
        await hold.wait()
        raise asyncio.CancelledError
    silent.execute = never  # type: ignore[method-assign]
    try:
        async with GridOperator.from_connection(grid.connection, operator="alice", resource="cancel") as alice:
            await alice.wait_for(lambda d: all(d[n].present for n in names), 30)
            store = alice.issuer.store
            assert store.directory is not None  # (alice's key is on file: her commands are kept)
            progress: list[int] = []
            shed = asyncio.ensure_future(alice.command_many(names, Action.SHED, ttl_s=60,
                                                            progress=lambda d, _t: progress.append(d)))
            await until(lambda: progress and progress[-1] == len(names) - 1, 10, "the four outcomes told")
            await asyncio.sleep(0.7)  # past KEEP_AFTER_S: the waiting one is kept by now anyway
            shed.cancel()
            with pytest.raises(asyncio.CancelledError):
                await shed
            waiting = [e for e in store.entries() if e.pid == os.getpid()]
            assert [e.device for e in waiting] == [grid.fleet.jid(names[2])]
            store.remove(waiting[0].command_id)
            restored = await alice.command_many([n for n in names if n != names[2]], Action.RESTORE)
            assert all(o.ok for o in restored.values())
    finally:
        del silent.execute
        hold.set()


async def test_a_device_named_twice_by_name_and_jid_gets_both_commands(grid: Grid) -> None:
    name = NAMES[30]
    async with GridOperator.from_connection(grid.connection, operator="alice", resource="twice") as alice:
        await alice.wait_for(lambda d: d[name].present, 30)
        t0 = asyncio.get_running_loop().time()
        outcomes = await alice.command_many([name, grid.fleet.jid(name), NAMES[31]], Action.SHED, ttl_s=30)
        assert asyncio.get_running_loop().time() - t0 < 10  # none left to expire
        assert len(outcomes) == 3 and all(o.status is not OutcomeStatus.EXPIRED for o in outcomes.values())
        assert outcomes[name].status is OutcomeStatus.EXECUTED
        restored = await alice.command_many([name, NAMES[31]], Action.RESTORE)
        assert all(o.ok for o in restored.values())


# -- without a server ----------------------------------------------------------------------


def _batch(n: int) -> tuple[list[Command], list[str]]:
    cmds = [Command.new(Action.SHED, "alice@localhost", ttl_s=30, now=T0, serial=f"SN-{i}") for i in range(n)]
    return cmds, [f"d{i}@{DOMAIN}" for i in range(n)]


def test_a_batch_is_read_per_device_and_verified_once() -> None:
    key, other = key_for("alice@localhost"), key_for("mallory@localhost")
    cmds, devices = _batch(5)
    wire = sign_payload(commands_to_text([(command_to_text(c), d) for c, d in zip(cmds, devices)]), devices,
                        key, now=T0)
    sealed = open_signed(wire)
    assert set(sealed.content.to) == set(devices)
    assert open_signed(wire) is sealed  # each copy of the multicast opens it once
    for cmd, device in zip(cmds, devices):
        el = sealed.command_for(device)
        assert el.get("id") == cmd.id and el.get("serial") == cmd.serial
    with pytest.raises(SignatureFailure) as refused:
        sealed.command_for(f"d9@{DOMAIN}")
    assert refused.value.reason is RejectReason.WRONG_RECIPIENT
    pub, other_pub = key.pubkey, other.pubkey
    with pytest.raises(SignatureFailure):
        sealed.check(other_pub, "mallory@localhost")  # a key it was not made with
    sealed.check(pub, "alice@localhost")
    assert sealed.checked is not None and [ok for _k, ok in sealed.checked] == [False, True]
    sealed.check(pub, "alice@localhost")  # the second device's check: the first's answer
    assert len(sealed.checked) == 2
    # A tampered copy (another element) is opened again, and refused at the opening or the check.
    for at in (len(wire.text) // 2, len(wire.text) - 10):
        tampered = ET.Element(wire.tag)
        raw = bytearray(wire.text.encode())
        raw[at] = ord("A") if raw[at] != ord("A") else ord("B")
        tampered.text = raw.decode()
        with pytest.raises(SignatureFailure):
            bad = open_signed(tampered)
            assert bad is not sealed
            bad.check(pub, "alice@localhost")


def test_commands_by_device_refuses_a_device_twice_and_an_oversized_batch() -> None:
    cmds, devices = _batch(3)
    text = commands_to_text([(command_to_text(c), d) for c, d in zip(cmds, [devices[0], devices[1], devices[0]])])
    parts = commands_by_device(ET.fromstring(text))
    assert parts[devices[0]] is None and parts[devices[1]] is not None
    big = ET.Element(q("commands"))
    big.extend(ET.Element(q("command"), {"to": f"d{i}@{DOMAIN}"}) for i in range(COMMANDS_MAX + 1))
    with pytest.raises(PayloadError):
        commands_by_device(big)


def test_opening_fuzzed_batches_only_ever_refuses() -> None:
    rng = random.Random(1616)
    key = key_for("alice@localhost")
    cmds, devices = _batch(4)
    text = commands_to_text([(command_to_text(c), d) for c, d in zip(cmds, devices)])
    for i in range(300):
        chars = list(text)
        for _ in range(rng.randrange(1, 6)):
            at = rng.randrange(len(chars))
            chars[at] = rng.choice("<>/='\"& x")
        wire = sign_payload("".join(chars) if i % 3 else text.replace("to=", rng.choice(["to=", "tx=", "to =", ""])),
                            devices, key, now=T0)
        try:
            sealed = open_signed(wire)
            for device in devices:
                try:
                    sealed.command_for(device)
                except SignatureFailure:
                    pass
        except SignatureFailure:
            pass  # refused with a reason: all a device may do with it


def test_a_group_of_batched_commands_keeps_the_wire_once(tmp_path: Path) -> None:
    store = PendingStore(tmp_path / "alice.pending")
    key = key_for("alice@localhost")
    cmds, devices = _batch(BATCH_COMMANDS_MAX)
    wire = wire_text(sign_payload(commands_to_text([(command_to_text(c), d) for c, d in zip(cmds, devices)]),
                                  devices, key, now=T0))
    store.add_many([store.entry(c, d, wire, "direct") for c, d in zip(cmds, devices)])
    files = list((tmp_path / "alice.pending").glob("*.json"))
    assert len(files) == 1 and files[0].stat().st_size < 2 * len(wire)
    assert "wires" in json.loads(files[0].read_text())
    again = PendingStore(tmp_path / "alice.pending").entries()
    assert len(again) == BATCH_COMMANDS_MAX and all(e.wire == wire for e in again)
    assert {e.command_id for e in again} == {c.id for c in cmds}


def test_a_group_rewritten_by_another_process_keeps_its_shared_wire(tmp_path: Path) -> None:
    """An entry of a group taken out of it by a later process (an orphan's outcome answered
    there): the group's other entries still read back with the batch's wire."""
    directory = tmp_path / "alice.pending"
    key = key_for("alice@localhost")
    cmds, devices = _batch(30)  # (a wire long enough to be shared: SHARED_WIRE_MIN)
    wire = wire_text(sign_payload(commands_to_text([(command_to_text(c), d) for c, d in zip(cmds, devices)]),
                                  devices, key, now=T0))
    first = PendingStore(directory)
    first.add_many([first.entry(c, d, wire, "direct") for c, d in zip(cmds, devices)])
    assert len(wire) >= SHARED_WIRE_MIN and "wires" in json.loads(next(directory.glob("group-*")).read_text())
    later = PendingStore(directory)
    entry = next(e for e in later.entries() if e.command_id == cmds[0].id)
    later.answer(entry, Outcome(command_id=cmds[0].id, device=devices[0], status=OutcomeStatus.EXECUTED))
    reader = PendingStore(directory)
    again = {e.command_id: e for e in reader.entries()}
    assert sorted(again) == sorted(c.id for c in cmds[1:])
    assert all(e.wire == wire for e in again.values())
    assert [e.command_id for e in reader.answered()] == [cmds[0].id]


def test_addresses_as_text_and_as_element_are_the_same() -> None:
    devices = [f"d{i}@{DOMAIN}" for i in range(3)] + ["o'brien&co@devices.localhost"]
    assert ET.tostring(ET.fromstring(addresses_text(devices))) == ET.tostring(addresses_to_xml(devices))
