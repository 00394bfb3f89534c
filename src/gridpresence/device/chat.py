"""Plain-text chat with a device bot, for operators in ordinary XMPP clients.

``status``, ``shed``, ``read fuel``, ``ack 3``… typed in Gajim, Dino, Conversations or
Profanity. Actions become the same :class:`Command` a script sends and go through
:meth:`DeviceAgent.accept` — the same authorisation, expiry and once-only rule — so a
redelivered chat message (same stanza id) has no second effect. Every message gets an
answer written for a person; nothing a person types can end the bot.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from dataclasses import dataclass
from typing import Protocol

from slixmpp import JID, Message

from gridpresence.protocol import roster as roles
from gridpresence.device.alarms import AlarmDesk
from gridpresence.words import TITLES
from gridpresence.security.policy import DEFAULT_ALLOW, Role
from gridpresence.protocol.codec import q
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.protocol.models import Action, Command, Outcome, RejectReason, utcnow
from gridpresence.device.host import DeviceHost
from gridpresence.words import REASONS, describe_outcome, describe_report, unreadable


log = logging.getLogger(__name__)

CHAT_TTL_S = 30.0
# One "not authorised" per stranger per this many seconds: two bots must not talk forever.
REFUSAL_INTERVAL_S = 60.0

# Operators' actions only: billing and firmware commands come signed from their own parties.
ACTION_WORDS: dict[str, Action] = {a.value: a for a in DEFAULT_ALLOW[Role.OPERATOR]
                                   if a not in (Action.READ, Action.SET_TIME)}
FIELDS: dict[str, tuple[str, str]] = {  # chat name -> (telemetry field, unit)
    "load": ("load_pct", "%"),
    "kw": ("kw", "kW"),
    "capacity": ("capacity_kw", "kW"),
    "fuel": ("fuel_pct", "%"),
    "temperature": ("temperature_c", "°C"),
    "energy": ("energy_kwh", "kWh"),
    "breaker": ("breaker", ""),
}
_CHAT_ID = re.compile(r"[^A-Za-z0-9._:-]")


@dataclass(frozen=True)
class Reply:
    text: str


def unsigned_refusal(verb: str, form: bool = False) -> str:
    """The answer to an unsigned chat line or ad-hoc form that would act (SecuritySettings.may_act)."""
    never = "an ad-hoc form is never signed; " if form else ""
    return (f"Refused {verb}: {REASONS[RejectReason.UNSIGNED]}; {never}send it signed: an OpenPGP-signed chat "
            "message (OX), the gridpresence CLI or the operator library.")


class ChatVerbs(Protocol):
    """Chat words another desk answers (the verdict desk: "not a fault 3", "accept 1")."""

    WORDS: tuple[str, ...]

    def answer(self, who: str, text: str, *, signed: bool) -> str | None:
        """The reply, or None if the line is not one of these words (`signed`: may it act)."""


class ChatDesk:
    """Answers chat messages to one device bot."""

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self._refused_at: dict[str, float] = {}
        self._verbs: list[ChatVerbs] = []  # other desks' chat words (verdicts, thresholds)
        self._replying: set[asyncio.Task[None]] = set()
        agent.client.add_event_handler("message", self._on_message)

    def add_verbs(self, verbs: ChatVerbs) -> None:
        """Another desk's words: tried, in order, on a line the chat desk does not know itself."""
        self._verbs.append(verbs)

    def close(self) -> None:
        for task in self._replying:
            task.cancel()

    @property
    def name(self) -> str:
        return self.agent.spec.name

    def help_text(self) -> str:
        actions = sorted(a.value for a in self.agent.sim.actions if a.value in ACTION_WORDS)
        words = ["status", *actions, "read [" + "|".join(FIELDS) + "]", "alarms", "ack [ID]", *(w for v in self._verbs for w in v.WORDS), "help"]
        return f"{self.name} understands: " + ", ".join(words) + "."

    def _on_message(self, msg: Message) -> None:
        if msg["type"] not in ("chat", "normal") or not msg["body"] or msg["from"].bare == self.agent.jid:
            return
        if msg.xml.find(q("tariff")) is not None or msg.xml.find(f"{{{OPENPGP_NS}}}openpgp") is not None:
            return  # a price or another signed payload (its body is a note for people): not chat
        # Answered as a task: a command to a real IED waits for its read-back, the loop does not.
        task = asyncio.ensure_future(self._reply(msg))
        self._replying.add(task)
        task.add_done_callback(self._replying.discard)

    async def _reply(self, msg: Message) -> None:
        try:
            answer = await self.answer(msg["from"], msg["body"], msg["id"] or "")
        except Exception:  # nothing a person types may end the bot
            log.exception("%s: chat message from %s failed", self.name, msg["from"])
            answer = "Sorry, that failed inside the device; it is logged. Type help."
        if answer:
            reply = self.agent.client.make_message(mto=msg["from"], mbody=answer, mtype="chat")
            if msg["thread"]:
                reply["thread"] = msg["thread"]
            reply.send()

    async def handle(self, text: str, sender: JID, signed: bool, stanza_id: str = "") -> str | None:
        """The reply to one chat line. ``signed``: the line came verified from the sender's key
        (e.g. an XEP-0374 signcrypt message from an OX client); only then may it change the
        device's state, unless the fleet allows that action unsigned ([security]
        unsigned_chat_actions, a lab setting)."""
        return await self.answer(sender, text, stanza_id, signed=signed)

    async def answer(self, sender: JID, text: str, stanza_id: str = "", *, signed: bool = False) -> str | None:
        """The reply to one chat message (None: stay silent to a stranger already told)."""
        who = sender.bare
        if who not in self.agent.operators:
            return self.refuse(who)
        problem = unreadable(text)
        if problem:
            return f"{problem} {self.help_text()}"
        words = text.strip().rstrip(".!?").split()
        if not words:
            return self.help_text()
        verb, rest = words[0].lower(), words[1:]
        if verb in ("help", "?", "commands"):
            return self.help_text()
        if verb in ("status", "state", "s"):
            return describe_report(self.name, self.agent.current_report())
        if verb in ACTION_WORDS and not rest:
            if not self.agent.security.may_act(ACTION_WORDS[verb], signed):
                return unsigned_refusal(verb)
            return await self._act(who, ACTION_WORDS[verb], stanza_id)
        if verb == "read" and len(rest) <= 1:
            return await self._read(who, rest[0].lower() if rest else None, stanza_id)
        if verb == "alarms" and not rest:
            return self._alarms()
        if verb == "ack" and len(rest) <= 1:
            return self._ack(who, rest[0] if rest else None)
        for verbs in self._verbs:
            answer = verbs.answer(who, text, signed=signed)
            if answer is not None:
                return answer
        shown = text.strip()[:40]
        return f"I do not understand {shown!r}. {self.help_text()}"

    def refuse(self, who: str) -> str | None:
        """"Not authorised" for a stranger, once a minute; silence for another bot."""
        groups = self.agent.client.client_roster[who]["groups"] if who in self.agent.client.client_roster else []
        if roles.device_kind(groups) is not None or roles.SERVICES in groups:
            return None  # another bot: answering could start an endless exchange
        now = time.monotonic()
        if now - self._refused_at.get(who, -REFUSAL_INTERVAL_S) < REFUSAL_INTERVAL_S:
            return None
        if len(self._refused_at) > 1000:
            self._refused_at.clear()
        self._refused_at[who] = now
        log.warning("%s: chat from %s refused: not authorised", self.name, who)
        return f"not authorised: only the utility's operators may use {self.name}."

    async def _run(self, who: str, action: Action, stanza_id: str) -> Outcome:
        cmd = Command.new(action, who, ttl_s=CHAT_TTL_S)
        if stanza_id:  # the chat message's own id: a redelivery is recognised as the same command
            cmd = cmd.model_copy(update={"id": ("chat-" + _CHAT_ID.sub("_", stanza_id))[:64]})
        return await self.agent.accept(cmd, utcnow())

    async def _act(self, who: str, action: Action, stanza_id: str) -> str:
        return describe_outcome(self.name, action.value, await self._run(who, action, stanza_id))

    async def _read(self, who: str, field: str | None, stanza_id: str) -> str:
        if field is not None and field not in FIELDS:
            return f"There is no reading called {field[:40]!r}; try one of: {', '.join(FIELDS)}."
        outcome = await self._run(who, Action.READ, stanza_id)
        if not outcome.ok or outcome.report is None:
            return describe_outcome(self.name, "read", outcome)
        if field is None:
            return describe_report(self.name, outcome.report)
        attr, unit = FIELDS[field]
        value = getattr(outcome.report.telemetry, attr)
        if value is None:
            return f"{self.name} has no {field} reading (it is a {outcome.report.kind.value})."
        shown = value.value if hasattr(value, "value") else f"{value:g}"
        return f"{self.name} {field}: {shown}{(' ' + unit) if unit else ''}"

    def _alarms(self) -> str:
        entries = [e.alarm for e in self.agent.desk(AlarmDesk).open.values()]
        if not entries:
            return f"{self.name} has no open alarms."
        return "Open alarms: " + "; ".join(f"{a.id}: {TITLES[a.kind]} ({a.level.value})" for a in entries)

    def _ack(self, who: str, alarm_id: str | None) -> str:
        if alarm_id is not None and alarm_id not in self.agent.desk(AlarmDesk).open:
            return f"{self.name} has no open alarm {alarm_id[:20]!r}. {self._alarms()}"
        done = self.agent.desk(AlarmDesk).acknowledge(alarm_id, who)
        if not done:
            return f"{self.name} has no open alarms to acknowledge."
        return "Acknowledged: " + "; ".join(f"alarm {a.id} ({TITLES[a.kind]})" for a in done) + "."
