"""Plain-text chat with device bots, the way a person types in an ordinary client: answers
for people, the same command path as stanza commands, and bad input answered, never fatal."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from chatpeer import ChatPeer, chat_peer
from conftest import Env
from gridpresence.words import MAX_CHARS, describe_report
from gridpresence.host.fleet import FleetBots
from gridpresence.security.policy import SecuritySettings
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState


@pytest_asyncio.fixture
async def bob_chat(env: Env) -> AsyncIterator[ChatPeer]:
    peer = await chat_peer(env, "bob", "phone")
    yield peer
    await peer.close()


def jid(env: Env, name: str) -> str:
    return env.fleet.jid(name)


async def test_status_shed_restore_by_chat(env: Env, bob_chat: ChatPeer, alice: GridOperator) -> None:
    status = await bob_chat.ask(jid(env, "load-d"), "status")
    assert status.startswith("load-d (load) is on") and " kW of 80 kW" in status and "load " in status
    shed = await bob_chat.ask(jid(env, "load-d"), "Shed")
    assert shed.startswith("Done: load shed.") and "load-d (load) is off" in shed
    await alice.wait_for(lambda d: d["load-d"].state is DeviceState.OFF, timeout=5)
    restore = await bob_chat.ask(jid(env, "load-d"), "restore")
    assert restore.startswith("Done: load restored.")
    await alice.wait_for(lambda d: d["load-d"].state is DeviceState.ON, timeout=5)


async def test_redelivered_chat_command_has_no_second_effect(env: Env, bob_chat: ChatPeer, alice: GridOperator) -> None:
    target = jid(env, "load-e")
    assert (await bob_chat.ask(target, "shed", stanza_id="msg-42")).startswith("Done: load shed")
    assert (await bob_chat.ask(target, "restore")).startswith("Done: load restored")
    # The same stanza again (a client resending after a reconnect): answered from memory.
    again = await bob_chat.ask(target, "shed", stanza_id="msg-42")
    assert again.startswith("Done: load shed")
    assert (await bob_chat.ask(target, "status")).startswith("load-e (load) is on")
    assert alice.devices["load-e"].state is DeviceState.ON


async def test_critical_load_refuses_then_restricted(env: Env, bob_chat: ChatPeer) -> None:
    target = jid(env, "load-crit4")
    refused = await bob_chat.ask(target, "shed")
    assert refused.startswith("Refused shed: it is a critical load")
    restricted = await bob_chat.ask(target, "restore")
    assert restricted.startswith("Refused restore: the device is restricted (critical process running")
    assert "is restricted — critical process running, cannot be shed (until" in await bob_chat.ask(target, "status")


async def test_read_fields_and_help(env: Env, bob_chat: ChatPeer) -> None:
    fuel = await bob_chat.ask(jid(env, "gen-2"), "read fuel")
    assert fuel.startswith("gen-2 fuel: ") and fuel.endswith(" %")
    assert "no fuel reading (it is a load)" in await bob_chat.ask(jid(env, "load-f"), "read fuel")
    assert (await bob_chat.ask(jid(env, "breaker-1"), "read breaker")) == "breaker-1 breaker: closed"
    assert "There is no reading called 'voltage'" in await bob_chat.ask(jid(env, "load-f"), "read voltage")
    helped = await bob_chat.ask(jid(env, "gen-2"), "help")
    assert helped.startswith("gen-2 understands:") and "start" in helped and "shed" not in helped


async def test_bad_input_gets_clear_answers_and_bot_lives(env: Env, bob_chat: ChatPeer) -> None:
    target = jid(env, "load-g")
    unknown = await bob_chat.ask(target, "frobnicate the grid")
    assert unknown.startswith("I do not understand 'frobnicate the grid'.") and "understands:" in unknown
    long = await bob_chat.ask(target, "shed " * 4000)
    assert f"is 20000 characters long; commands are at most {MAX_CHARS}" in long
    garbage = bytes(range(0x80, 0x100)).decode("latin-1") + "\x7f\x01shed"[:2]
    assert "control characters or binary data" in await bob_chat.ask(target, garbage.replace("\x01", ""))
    assert "not something this device can do" in await bob_chat.ask(target, "start")
    assert "I do not understand 'shed now please'" in await bob_chat.ask(target, "shed now please")
    assert "no open alarm '99'" in await bob_chat.ask(target, "ack 99")
    # Still alive, still the same state: none of that did anything.
    assert (await bob_chat.ask(target, "status")).startswith("load-g (load) is on")


async def test_unauthorised_sender_is_told_and_nothing_happens(env: Env, alice: GridOperator) -> None:
    stranger = await chat_peer(env, "billing", "chat")
    try:
        answer = await stranger.ask(jid(env, "load-h"), "shed")
        assert answer == "not authorised: only the utility's operators may use load-h."
    finally:
        await stranger.close()
    assert alice.devices["load-h"].state is DeviceState.ON


def test_describe_report_reads_like_a_sentence(alice: GridOperator) -> None:
    line = describe_report("gen-2", alice.devices["gen-2"].report)
    assert line.startswith("gen-2 (generator) is off, 0.0 kW of 300 kW") and "fuel" in line


# -- fuzzing chat into a real device ---------------------------------------------------------------

CHAT_FUZZ_SEED = 7041
CHAT_FUZZ_LINES = 150
VERBS = ["status", "shed", "restore", "start", "stop", "open", "close", "read", "read fuel", "alarms", "ack", "help",
         "accept", "set", "reject", "revert", "thresholds", "not a fault", "fault", "no fault", "false alarm", "?"]
ODD = ["\u00e9", "\u4e2d\u6587", "\U0001F50C", "\u202e", "\u0301", "\u200b", "\ufeff", "\u2028", "\x7f", "\x85",
       "\t", "\r\n", "\u00a0", "\U0010fffd", "<x/>", "&amp;", "'", '"', "%s", "{0}", "\\", "NaN", "inf", "-0"]


def fuzz_line(rng: random.Random) -> str:
    """A chat line mixing verbs, numbers, unicode and control characters (only those XML can
    carry: the server would end a stream holding others, before any device saw them)."""
    words: list[str] = []
    for _ in range(rng.randint(1, 5)):
        pick = rng.random()
        if pick < 0.45:
            words.append(rng.choice(VERBS).upper() if rng.random() < 0.2 else rng.choice(VERBS))
        elif pick < 0.75:
            words.append(rng.choice([str(rng.randint(-5, 10)), str(rng.randint(0, 10 ** 12)), f"{rng.uniform(-1e6, 1e6):g}",
                                     "1e309", "0x10", "99999999999999999999", "1.5.3"]))
        else:
            words.append("".join(rng.choice(ODD) for _ in range(rng.randint(1, 4))))
    line = rng.choice([" ", "  ", "\t"]).join(words) + rng.choice(["", ".", "!", "?", " ", "\n"])
    if rng.random() < 0.05:
        line = line + rng.choice(["x", " shed", "\U0001F50C"]) * rng.randint(200, 3000)  # very long
    return line if line.strip(" ") else "help"


async def test_fuzzed_chat_gets_one_answer_each_and_unsigned_lines_change_nothing(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    """Random lines into a real device with the default [security]: each gets exactly one answer,
    nothing is logged as an error, and neither the device's state nor its thresholds change."""
    name, device = "guard-load", jid(env, "guard-load")
    fleet = env.fleet.model_copy(update={"security": SecuritySettings()})
    bots = FleetBots(fleet, env.grid.endpoint, env.grid.secrets, only=[name], tick_s=0.2, with_services=False,
                     data_dir=env.data)
    caplog.set_level(logging.WARNING)
    await bots.start()
    peer = await chat_peer(env, "alice", "fuzz")
    dev = bots.devices[name]
    try:
        dev.sim.utilisation = 0.85  # type: ignore[attr-defined]  # an alarm to judge: verdicts could teach
        await peer.alarm(device, 8)
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        assert dev.alarms.rule_alarms
        before = (dev.sim.state, list(dev.alarms.thresholds.audit), dict(dev.alarms.adjuster.pending),
                  {k: [a.verdict for a in h.alarms] for k, h in dev.alarms.adjuster._hist.items()})
        rng = random.Random(CHAT_FUZZ_SEED)
        lines = [fuzz_line(rng) for _ in range(CHAT_FUZZ_LINES)]
        answers = []
        async with asyncio.timeout(60):
            for n, line in enumerate(lines):
                answers.append(await peer.ask(device, line, timeout=10, stanza_id=f"fuzz-{n}"))
            await asyncio.sleep(0.5)
        assert peer.replies.empty(), "a line got more than one answer"
        assert len(answers) == len(lines) and all(a.strip() for a in answers)
        assert not [a for a in answers if a.startswith("Sorry, that failed inside the device")]
        acted = [(ln, a) for ln, a in zip(lines, answers) if a.startswith("Done:")]
        assert not acted, acted[:3]
        assert sum(a.startswith("Refused ") for a in answers) >= 5  # the fuzz did reach the acting words
        after = (dev.sim.state, list(dev.alarms.thresholds.audit), dict(dev.alarms.adjuster.pending),
                 {k: [a.verdict for a in h.alarms] for k, h in dev.alarms.adjuster._hist.items()})
        assert after == before
        assert dev.sim.state is DeviceState.ON
    finally:
        dev.sim.utilisation = 0.5  # type: ignore[attr-defined]
        await peer.close()
        await bots.stop()
    bad = [r for r in caplog.records if r.name.startswith("gridpresence") and (r.levelno >= logging.ERROR or r.exc_info)]
    assert not bad, [r.getMessage() for r in bad]
