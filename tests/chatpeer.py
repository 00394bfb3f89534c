"""A person in a chat client, as far as the grid can tell: a plain XMPP session that sets its
presence, sends chat bodies and reads the replies and alarms that come back."""

from __future__ import annotations

import asyncio

from slixmpp import ClientXMPP, Message

from conftest import GridUnderTest
from gridpresence.xmpp.session import close_session, make_client, open_session


class ChatPeer:
    def __init__(self, client: ClientXMPP) -> None:
        self.client = client
        self.replies: asyncio.Queue[Message] = asyncio.Queue()
        self.alarms: asyncio.Queue[Message] = asyncio.Queue()
        client.add_event_handler("message", self._on_message)

    def _on_message(self, msg: Message) -> None:
        if msg["type"] != "chat":
            return
        if msg.xml.find("{urn:gridpresence:0}alarm") is not None:
            self.alarms.put_nowait(msg)
        else:
            self.replies.put_nowait(msg)

    def say(self, to: str, text: str, stanza_id: str | None = None) -> None:
        msg = self.client.make_message(mto=to, mbody=text, mtype="chat")
        if stanza_id:
            msg["id"] = stanza_id
        msg.send()

    async def ask(self, to: str, text: str, timeout: float = 5.0, stanza_id: str | None = None) -> str:
        """Send a chat line and return the reply from that device."""
        self.say(to, text, stanza_id)
        return (await self.reply_from(to, timeout))["body"]

    async def reply_from(self, device: str, timeout: float = 5.0) -> Message:
        """The next chat message (not an alarm) from ``device``."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.replies.get()
                if msg["from"].bare == device:
                    return msg

    async def alarm(self, device: str, timeout: float, predicate=lambda m: True) -> Message:  # type: ignore[no-untyped-def]
        """The next alarm message from `device` that satisfies `predicate`."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.alarms.get()
                if msg["from"].bare == device and predicate(msg):
                    return msg

    async def close(self) -> None:
        await close_session(self.client)


async def chat_peer(env: GridUnderTest, name: str, resource: str, show: str | None = None) -> ChatPeer:
    client = make_client(f"{env.fleet.jid(name)}/{resource}", env.grid.secrets.password(name), env.grid.endpoint)
    peer = ChatPeer(client)
    await open_session(client, env.grid.endpoint)
    await client.get_roster()
    client.send_presence(pshow=show) if show else client.send_presence()
    return peer
