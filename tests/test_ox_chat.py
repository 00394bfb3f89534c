"""Signed, encrypted chat (XEP-0373/0374) with a device bot over the real server, the way an
OX client sends it: the command acts and the answer comes back sealed to the operator; a
replayed copy has no second effect; everything the device will not act on gets a plain
reply saying why, and the bot keeps answering."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator

import pytest_asyncio
from slixmpp import Message

from chatpeer import ChatPeer, chat_peer
from conftest import Env, GridUnderTest
from gridpresence.operator.library import GridOperator
from gridpresence.protocol import DeviceState
from gridpresence.protocol.models import utcnow
from gridpresence.protocol.openpgp import FALLBACK_BODY, chat_payload, openpgp_to_xml, ox
from gridpresence.security.keyring import StaticKeys
from gridpresence.security.ox import MAX_AGE_S, open_chat
from gridpresence.security.parts import seal

DEVICE = "ox-wire"


@pytest_asyncio.fixture
async def alice_chat(env: Env, alice: GridOperator) -> AsyncIterator[ChatPeer]:
    """Alice in a plain client; the operator library (``alice``) has announced her key on PEP."""
    peer = await chat_peer(env, "alice", "ox-script")
    yield peer
    await peer.close()


def send_ox(peer: ChatPeer, to: str, blob: bytes | str) -> None:
    """An OX chat message holding ``blob`` (an OpenPGP message, or text as it stands)."""
    el = openpgp_to_xml(blob if isinstance(blob, bytes) else b"")
    if isinstance(blob, str):
        el.text = blob
    msg = peer.client.make_message(mto=to, mbody=FALLBACK_BODY, mtype="chat")
    msg.append(el)
    msg.send()


def sealed(env: GridUnderTest, text: str, signer: str = "alice", when: dt.datetime | None = None, to: str = "",
           name: str = DEVICE) -> bytes:
    """``text`` as an OX chat payload, signed by ``signer``, encrypted to device ``name``."""
    device = env.fleet.jid(name)
    recipient = env.grid.keys.secret(to).pubkey if to else env.grid.keys.secret(name).pubkey
    return seal(chat_payload(text), env.grid.keys.secret(signer), {device: recipient}, now=when or utcnow())


async def opened_reply(env: GridUnderTest, msg: Message, name: str = DEVICE) -> str:
    """Alice opens device ``name``'s answer: encrypted to her, signed by the device's key."""
    el = msg.xml.find(ox("openpgp"))
    assert el is not None, f"expected an OX answer, got plain text: {msg['body']!r}"
    assert msg["body"] == FALLBACK_BODY
    device = env.fleet.jid(name)
    pinned = StaticKeys({device: env.grid.keys.secret(name)})
    return (await open_chat(el, device, env.fleet.jid("alice"), env.grid.keys.secret("alice"), pinned)).text


async def test_signed_shed_acts_and_the_answer_comes_back_sealed(env: Env, alice_chat: ChatPeer,
                                                                  alice: GridOperator) -> None:
    device = env.fleet.jid(DEVICE)
    shed = sealed(env, "shed")
    send_ox(alice_chat, device, shed)
    answer = await opened_reply(env, await alice_chat.reply_from(device))
    assert answer.startswith(f"Done: load shed. Now: {DEVICE} (load) is off")
    await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.OFF, timeout=5)

    send_ox(alice_chat, device, sealed(env, "restore"))
    assert (await opened_reply(env, await alice_chat.reply_from(device))).startswith("Done: load restored.")
    await alice.wait_for(lambda d: d[DEVICE].state is DeviceState.ON, timeout=5)
    # The first message captured and sent again (a new stanza around the same OpenPGP message):
    # the same command, answered from memory, no second shed.
    send_ox(alice_chat, device, shed)
    assert (await opened_reply(env, await alice_chat.reply_from(device))).startswith("Done: load shed.")
    assert (await alice_chat.ask(device, "status")).startswith(f"{DEVICE} (load) is on")
    assert alice.devices[DEVICE].state is DeviceState.ON


async def test_what_the_device_will_not_act_on_is_answered_in_plain_text(env: Env, alice_chat: ChatPeer,
                                                                         alice: GridOperator) -> None:
    device = env.fleet.jid(DEVICE)
    cases: list[tuple[bytes | str, str]] = [
        (sealed(env, "shed", signer="bob"), "not alice@localhost's"),
        (sealed(env, "shed", when=utcnow() - dt.timedelta(seconds=MAX_AGE_S + 60)),
         "s ago; signed commands must arrive within 20 s"),
        (sealed(env, "shed", to="bob"), f"part is not for {device}"),
    ]
    for blob, why in cases:
        send_ox(alice_chat, device, blob)
        reply = await alice_chat.reply_from(device)
        assert reply.xml.find(ox("openpgp")) is None
        assert reply["body"].startswith("Your encrypted message was not accepted: ") and why in reply["body"], reply["body"]
    assert alice.devices[DEVICE].state is DeviceState.ON  # nothing acted
    assert (await alice_chat.ask(device, "status")).startswith(f"{DEVICE} (load) is on")  # and the bot lives

    # A stranger gets the usual refusal, and no decryption work is done for it.
    stranger = await chat_peer(env, "billing", "ox")
    try:
        send_ox(stranger, device, sealed(env, "shed", signer="billing"))
        assert (await stranger.reply_from(device))["body"] == f"not authorised: only the utility's operators may use {DEVICE}."
    finally:
        await stranger.close()
