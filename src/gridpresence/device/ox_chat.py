"""Signed chat for operators whose client speaks OpenPGP for XMPP (XEP-0373/0374), such as
Profanity with ``/ox start``: the device opens the message (decrypt with its own key, verify
with the sender's pinned key, check it is addressed to it and fresh), answers the text as a
SIGNED chat line through the same :class:`ChatDesk`, and seals the answer back to the sender
so their client shows it decrypted. A message it will not act on gets a plain-text reply
saying why; nothing in one ends the bot.
"""

from __future__ import annotations

import asyncio
import logging

from slixmpp import JID, Message

from gridpresence.protocol.openpgp import FALLBACK_BODY
from gridpresence.security.ox import OxRefused, open_chat, seal_chat
from gridpresence.security.pgp import pgpy
from gridpresence.device.host import DeviceHost
from gridpresence.device.chat import ChatDesk


log = logging.getLogger(__name__)

MAX_PENDING = 64  # OX messages being opened at once; more are answered "busy", not queued


class OxDesk:
    """Answers OX chat messages to one device bot, with the device's own key and its keyring
    (the operators' keys looked up over PEP and pinned on first use)."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self._pending: set[asyncio.Task[None]] = set()


    def close(self) -> None:
        for task in self._pending:
            task.cancel()

    def take(self, msg: Message) -> None:
        """An encrypted ``<openpgp/>`` message (the device routes them here)."""
        if msg["type"] not in ("chat", "normal") or msg["from"].bare == self.agent.jid:
            return
        if len(self._pending) >= MAX_PENDING:
            self._reply_plain(msg, "The device is busy opening other encrypted messages; send it again shortly.")
            return
        task = asyncio.ensure_future(self._answer(msg))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _answer(self, msg: Message) -> None:
        sender: JID = msg["from"]
        try:
            if sender.bare not in self.agent.operators:
                refusal = self.agent.desk(ChatDesk).refuse(sender.bare)  # no crypto work for strangers
                if refusal:
                    self._reply_plain(msg, refusal)
                return
            secret = self.agent.keyring.secret_key
            if secret is None:
                self._reply_plain(msg, f"{self.agent.spec.name} has no OpenPGP key of its own, so it cannot read "
                                       "encrypted messages; send plain chat or a signed command.")
                return
            opened = await open_chat(msg["openpgp"].xml, sender.bare, self.agent.jid, secret, self.agent.keyring)
            answer = await self.agent.desk(ChatDesk).handle(opened.text, sender, signed=True, stanza_id="ox-" + opened.digest[:32])
            if answer:
                self._reply_sealed(msg, answer, secret, opened.key)
        except OxRefused as exc:
            log.warning("%s: OX message from %s refused: %s", self.agent.spec.name, sender, exc)
            self._reply_plain(msg, f"Your encrypted message was not accepted: {exc}.")
        except Exception:  # nothing a sender puts in a message may end the bot
            log.exception("%s: OX message from %s failed", self.agent.spec.name, sender)
            self._reply_plain(msg, "Sorry, that failed inside the device; it is logged.")

    def _reply_sealed(self, msg: Message, text: str, secret: pgpy.PGPKey, key: pgpy.PGPKey) -> None:
        sender: JID = msg["from"]
        try:
            sealed = seal_chat(text, secret, sender.bare, key)
        except OxRefused as exc:  # the command itself was handled: say so, not "refused"
            self._reply_plain(msg, f"Your message was handled, but the answer could not be encrypted ({exc}).")
            return
        reply = self.agent.client.make_message(mto=sender, mbody=FALLBACK_BODY, mtype="chat")
        reply.append(sealed)
        self._send(reply, msg)

    def _reply_plain(self, msg: Message, text: str) -> None:
        self._send(self.agent.client.make_message(mto=msg["from"], mbody=text, mtype="chat"), msg)

    @staticmethod
    def _send(reply: Message, msg: Message) -> None:
        if msg["thread"]:
            reply["thread"] = msg["thread"]
        reply.send()
