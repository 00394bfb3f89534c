"""Plain-text chat with device bots, the way a person types in an ordinary client: answers
for people, the same command path as stanza commands, and bad input answered, never fatal."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from chatpeer import ChatPeer, chat_peer
from conftest import Env
from gridpresence.device.chat import MAX_CHARS, describe_report
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
