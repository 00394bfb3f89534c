"""Seeded, bounded fuzz of the grid payloads a device takes (urn:gridpresence:0 commands, signed
and bare, ad-hoc command IQs, rich presence) into a real device over real Prosody: every command
message gets exactly one answer (an outcome, or a bad-request error when it has no id to answer),
every IQ exactly one result or error, the device logs no exception, and it still executes a
valid signed command afterwards."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
import time
from xml.etree import ElementTree as ET

import pytest
from slixmpp.exceptions import IqError, IqTimeout

from conftest import Env
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import close_session
from gridpresence.protocol import NS, Action, Command, DeviceState
from gridpresence.protocol.codec import command_to_xml
from timebase import NOW
from test_bad_input import RawPeer, _peer, _target

SEED = 4242
DEVICE = "load-c"
FAR_FUTURE = (NOW + dt.timedelta(days=3650)).isoformat()
NASTY = ("", " ", "nan", "inf", "-1", "1e400", "²", "x" * 300, "\u202e", "shed", "read", "set_time", "explode",
         FAR_FUTURE, "yesterday", "0001-01-01T00:00:00Z",  # calendar: instants a command must refuse "bob@localhost", "load-c@localhost", "a b",
         "<", "&", "'", "id:1", "SN-0")
COMMAND_ATTRS = ("id", "action", "issuer", "issued", "expires", "serial", "x-unknown")


def _mutated_command(rng: random.Random, base: ET.Element) -> ET.Element:
    el = ET.fromstring(ET.tostring(base))
    for _ in range(rng.randint(1, 4)):
        name = rng.choice(COMMAND_ATTRS)
        roll = rng.random()
        if roll < 0.2:
            el.attrib.pop(name, None)
        else:
            el.set(name, rng.choice(NASTY) if roll < 0.8 else str(rng.randint(-10**6, 10**6)))
    if rng.random() < 0.3:
        arg = ET.SubElement(el, f"{{{NS}}}arg", {"name": rng.choice(NASTY)} if rng.random() < 0.9 else {})
        arg.text = rng.choice(NASTY)
    if rng.random() < 0.1:
        ET.SubElement(el, f"{{{NS}}}{rng.choice(['command', 'outcome', 'device'])}")
    # Keep ids unique across cases, so a remembered outcome never stands in for a new case.
    if "id" in el.attrib and rng.random() < 0.8:
        el.set("id", f"fz{rng.randrange(10**9)}")
    return el


async def _adhoc_iq(peer: RawPeer, rng: random.Random, to: str) -> None:
    iq = peer.client.make_iq_set(ito=to)
    cmd = ET.SubElement(iq.xml, "{http://jabber.org/protocol/commands}command")
    for name in ("node", "action", "sessionid"):
        if rng.random() < 0.8:
            cmd.set(name, rng.choice(("status", "run", "ack-alarm", "judge-alarm", "execute", "complete", "next",
                                      "cancel", "prev", "") + NASTY))
    if rng.random() < 0.5:
        x = ET.SubElement(cmd, "{jabber:x:data}x", {"type": rng.choice(("submit", "form", "bogus"))})
        field = ET.SubElement(x, "{jabber:x:data}field", {"var": rng.choice(("action", "alarm", "verdict") + NASTY)})
        ET.SubElement(field, "{jabber:x:data}value").text = rng.choice(NASTY)
    try:
        await iq.send(timeout=5)
    except IqError:
        pass  # an error is an answer
    except IqTimeout:
        pytest.fail(f"the device did not answer {ET.tostring(cmd)!r}")


async def test_fuzzed_payloads_each_get_one_answer_and_the_device_lives_on(
        env: Env, alice: GridOperator, caplog: pytest.LogCaptureFixture) -> None:
    rng = random.Random(SEED)
    caplog.set_level(logging.WARNING)
    peer = await _peer(env, "bob")
    to = _target(alice, DEVICE)
    serial = alice.serial_of(alice.devices[DEVICE])
    base = command_to_xml(Command.new(Action.READ, "bob@localhost", serial=serial))
    started = time.monotonic()
    try:
        for i in range(120):
            el = _mutated_command(rng, base)
            if i % 4 == 3:
                await _adhoc_iq(peer, rng, to if rng.random() < 0.5 else env.fleet.jid(DEVICE))  # full or bare JID
                continue
            if i % 4 == 2:  # rich presence nonsense, straight to the device: no answer promised
                pres = peer.client.make_presence(pto=to)
                device = ET.SubElement(pres.xml, f"{{{NS}}}device", {"kind": rng.choice(NASTY), "state": rng.choice(NASTY)})
                ET.SubElement(device, f"{{{NS}}}telemetry", {"load-pct": rng.choice(NASTY)})
                pres.send()
                continue
            peer.send(to, el, sign=rng.random() < 0.7)
            reply = await peer.reply(timeout=5)  # exactly one answer: one now ...
            outcome = reply.xml.find(f"{{{NS}}}outcome")
            if reply["type"] == "error":  # only a command with nothing to correlate an outcome with
                assert reply["error"]["condition"] == "bad-request" and not el.get("id", "").strip(), ET.tostring(el)
            else:
                assert outcome is not None and outcome.get("command-id") == el.get("id"), ET.tostring(el)
        await asyncio.sleep(0.5)
        assert peer.inbox.empty(), "a payload was answered twice"  # ... and no second one later
        assert time.monotonic() - started < 30
        # No exception was logged by anyone (the device runs in this process).
        failures = [r for r in caplog.records if r.exc_info is not None or r.levelno >= logging.ERROR]
        assert failures == [], [r.getMessage() for r in failures]
        read = await alice.command(DEVICE, Action.READ)  # a valid signed command still works
        assert read.ok, read
    finally:
        await close_session(peer.client)
        if alice.devices[DEVICE].state is DeviceState.OFF:
            await alice.command(DEVICE, Action.RESTORE)
