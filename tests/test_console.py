"""The fleet console, chatted with the way an operator would: fleet views, who is restricted,
shedding a number of kW, group actions — the CLI's operations through a chat window."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest_asyncio

from chatpeer import ChatPeer, chat_peer
from conftest import Env
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState
from gridpresence.operator.shedding import net_load_kw

CONSOLE = "console@localhost"


@pytest_asyncio.fixture
async def bob_chat(env: Env) -> AsyncIterator[ChatPeer]:
    peer = await chat_peer(env, "bob", "console-test")
    yield peer
    await peer.close()


async def test_fleet_view_and_who_is_restricted(env: Env, bob_chat: ChatPeer, alice: GridOperator) -> None:
    fleet = await bob_chat.ask(CONSOLE, "fleet")
    first, table = fleet.split("\n", 1)
    assert re.match(rf"{len(alice.devices)} devices: .*\d+ on.*; net load -?[\d.]+ kW$", first)
    assert table.startswith("DEVICE") and re.search(r"^gen-2\s+generator\s+off", table, re.M)
    refused = await bob_chat.ask(CONSOLE, "shed load-crit5")
    assert refused.startswith("shed: 0 of 1 executed.\nload-crit5: rejected (critical)")
    restricted = await bob_chat.ask(CONSOLE, "who is restricted")
    assert re.search(r"^load-crit5: critical process running, cannot be shed \(until", restricted, re.M)
    assert "not a state" in await bob_chat.ask(CONSOLE, "who is asleep")


async def test_shed_kw_and_group_actions(env: Env, bob_chat: ChatPeer, alice: GridOperator) -> None:
    before = net_load_kw(alice.devices)
    answer = await bob_chat.ask(CONSOLE, "shed 100kW", timeout=30)
    assert answer.startswith("Shedding 100 kW: net load was ")
    shed = re.findall(r"^shed (\S+): executed", answer, re.M)
    assert shed and answer.rstrip().endswith("target met.")
    try:
        await alice.wait_for(lambda d: all(d[n].state is DeviceState.OFF for n in shed), timeout=5)
        assert net_load_kw(alice.devices) <= before - 100 + 25  # loads drift a little meanwhile
        assert not any(alice.devices[n].report.critical for n in shed)  # type: ignore[union-attr]
    finally:
        restored = await bob_chat.ask(CONSOLE, "restore " + " ".join(shed), timeout=30)
    assert restored.startswith(f"restore: {len(shed)} of {len(shed)} executed.")
    gens = sorted(n for n, v in alice.devices.items() if v.kind and v.kind.value == "generator")
    running = [n for n in gens if alice.devices[n].state is DeviceState.ON]
    stopped = await bob_chat.ask(CONSOLE, "stop all generators", timeout=30)
    assert stopped.startswith(f"stop: {len(gens)} of {len(gens)} executed.")
    await alice.wait_for(lambda d: all(d[n].state is DeviceState.OFF for n in gens), timeout=5)
    if running:
        assert (await bob_chat.ask(CONSOLE, "start " + " ".join(running), timeout=30)).startswith("start: ")


async def test_console_bad_input_and_strangers(env: Env, bob_chat: ChatPeer) -> None:
    assert (await bob_chat.ask(CONSOLE, "make tea")).startswith("I do not understand 'make tea'. Fleet console commands:")
    assert "No device named 'nosuch'" in await bob_chat.ask(CONSOLE, "restore nosuch load-a")
    assert "name one of loads, generators" in await bob_chat.ask(CONSOLE, "stop all toasters")
    assert "characters long" in await bob_chat.ask(CONSOLE, "x" * 5000)
    stranger = await chat_peer(env, "billing", "console-test")
    try:
        assert (await stranger.ask(CONSOLE, "shed 500kW")).startswith("not authorised")
    finally:
        await stranger.close()
    assert (await bob_chat.ask(CONSOLE, "help")).startswith("Fleet console commands:")
