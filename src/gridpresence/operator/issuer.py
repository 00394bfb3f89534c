"""The issuing side of a command, shared by every party that issues them (operators, the fleet
console, the billing party): sign, send, and wait for the one outcome.

Each command is signed with the issuer's OpenPGP key for its device (XEP-0373 ``<sign/>``, the
device's serial bound in). A party without a key sends it unsigned — and the device refuses it:
a password alone does not command the grid.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import logging
from collections.abc import Callable, Sequence
from xml.etree import ElementTree as ET

from slixmpp import JID, ClientXMPP, Message
from slixmpp.xmlstream import tostring
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.protocol import openpgp  # noqa: F401  (registers <openpgp/> with slixmpp)
from gridpresence.protocol.addressing import addresses_text, addresses_to_xml
from gridpresence.xmpp.outgoing import may_skip_queue, messages_need_no_filter
from gridpresence.xmpp.slixfix.escape import escape as xml_escape  # the fast one
from gridpresence.protocol.codec import (BATCH_TEXT_MAX, PayloadError, command_to_text, command_to_xml,
                                         commands_to_text, outcome_from_xml, q)
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.operator.pending import PendingCommand, PendingStore
from gridpresence.protocol.models import Command, Outcome, OutcomeStatus, RejectReason, utcnow
from gridpresence.security.pgp import pgpy
from gridpresence.security.signed import sign_payload

log = logging.getLogger(__name__)
_OPENPGP = f"{{{OPENPGP_NS}}}openpgp"
_OUTCOME = q("outcome")
_LANG = "{http://www.w3.org/XML/1998/namespace}lang"

# Extra time after a command's expiry for its "expired" outcome to travel back.
OUTCOME_MARGIN_S = 1.0
KEEP_AFTER_S = 0.5  # a command still unanswered this long is kept on disk (operator/pending.py)
KEEP_GROUP_S = 0.25  # ...in one file with the others due within this much more


class _NoOutcome(Exception):
    """A command's wait ran out without its outcome (CommandIssuer._expire_due)."""


class CommandIssuer:
    """Signs commands with ``key`` and matches outcomes to them. ``relay``: a bare JID whose
    outcomes are accepted on behalf of devices (the store-and-forward relay passes them on)."""

    def __init__(self, client: ClientXMPP, key: pgpy.PGPKey | None, relay: str | None = None,
                 store: PendingStore | None = None) -> None:
        self.client = client
        self.key = key
        self.relay = relay
        # Commands without an outcome yet, on disk: a later process of this issuer learns how
        # they ended if this one dies waiting (operator/pending.py).
        self.store = store or PendingStore(None)
        # Told the outcome of an earlier process's command that arrives here unasked.
        self.on_orphan_outcome: Callable[[PendingCommand, Outcome], None] | None = None
        self.pending: dict[str, asyncio.Future[Outcome]] = {}  # command id -> outcome
        self._adopted: set[str] = set()  # ids in `pending` that are an earlier process's (adopt)
        self._stanza_to_command: dict[str, str] = {}  # message id -> command id, for bounces
        # ...and of a batch: message id -> (the host's domain, device bare JID -> command id)
        self._batch_of_stanza: dict[str, tuple[str, dict[str, str]]] = {}
        self._batch_wires: dict[int, ET.Element] = {}  # id -> the wire of a batch still waiting (_resend)
        self._to_resend: list[tuple[str, ET.Element, str, str]] = []  # resend_to_new_session's, this loop turn
        # What was sent for each command still waiting, to which device (bare JID) and to which of
        # its sessions (full JID): sent again after a reconnect of ours or of the device's, as the
        # first copy, or its outcome, may have died with the old session.
        self._sent: dict[str, tuple[ET.Element, str, str]] = {}
        # Commands sent and, if still waiting at the due time, to be kept on disk (_keep_later).
        self._to_keep: collections.deque[tuple[float, Command, str, ET.Element]] = collections.deque()
        self._keep_timer: asyncio.TimerHandle | None = None
        self._out: list[str] = []  # commands serialised this loop turn, written together (_post)
        # When each command sent waits no longer (_expire_later): (loop time, command id), and
        # the waits still running.
        self._deadlines: list[tuple[float, str]] = []
        self._timed: dict[str, asyncio.Future[Outcome]] = {}
        self._expiry: asyncio.TimerHandle | None = None
        handler = Callback("grid outcome", StanzaPath("message/grid_outcome"), self._on_outcome)  # type: ignore[arg-type]
        client.register_handler(handler)
        dispatch = getattr(client, "shape_dispatch", None)  # xmpp/dispatch.py (make_client installs it)
        if dispatch is not None:
            dispatch.take_for(handler, self._take_outcome)
        client.add_event_handler("message_error", self._on_bounce)

    def wire(self, cmd: Command, device: str) -> ET.Element:
        """What goes on the wire for ``cmd`` to ``device`` (bare JID): signed if we hold a key."""
        if self.key is None:
            return command_to_xml(cmd)
        return sign_payload(command_to_text(cmd), device, self.key, now=cmd.issued)

    def expect(self, cmd_id: str) -> asyncio.Future[Outcome]:
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self.pending[cmd_id] = fut
        return fut

    async def send(self, cmd: Command, to: str) -> Outcome:
        """Send ``cmd`` to a device's full JID; its one outcome, or "expired" if none came."""
        fut = self.expect(cmd.id)
        device = JID(to).bare
        wire = self.wire(cmd, device)
        self._sent[cmd.id] = (wire, device, str(to))

        # Kept on disk only once it is slow to answer: most outcomes come within milliseconds
        # (only a kill -9 this soon after sending goes unkept; a cancelled wait keeps it at once,
        # below). The commands of a fan-out still waiting then go in one file (_keep_due).
        if self.store.directory is not None:
            self._keep_later(cmd, device, wire)
        stanza_id = self._post(str(to), wire)
        self._stanza_to_command[stanza_id] = cmd.id
        try:
            return await self._outcome(cmd, fut, device, wire)
        finally:
            self._stanza_to_command.pop(stanza_id, None)

    async def send_batch(self, batch: Sequence[tuple[Command, str]], domain: str,
                         each: Callable[[Command, Outcome], None] | None = None) -> list[Outcome]:
        """Commands for devices hosted on ``domain`` ((command, the device's full JID) pairs, at
        most BATCH_COMMANDS_MAX, one per device, issued together: the batch is signed at the
        first one's ``issued``) in XEP-0033 multicast messages to the domain, each under one
        signature for all its commands (as many as BATCH_TEXT_MAX bytes of them allow); their
        outcomes, in order, each as :meth:`send` gives it, and each also to ``each`` as it comes.
        A copy sent again (a reconnect, a new session of a device, an adoption) is its batch
        to the devices still waiting, which take their own commands (PROTOCOL.md, "Commands in
        batches"). Only with a key."""
        assert self.key is not None
        items = [(cmd, full, JID(full).bare, command_to_text(cmd)) for cmd, full in batch]
        parts: list[list[tuple[Command, str, str, str]]] = [[]]
        size = 0
        for item in items:
            text = item[3]
            # (its text, its <to/> and its to='…'; a signed message holds bytes)
            length = (len(text) if text.isascii() else len(text.encode())) + 2 * len(item[2].encode()) + 40
            if parts[-1] and size + length > BATCH_TEXT_MAX:
                parts.append([])
                size = 0
            parts[-1].append(item)
            size += length
        done = await asyncio.gather(*(self._send_part(p, domain, each) for p in parts))
        return [outcome for part in done for outcome in part]

    async def _send_part(self, part: list[tuple[Command, str, str, str]], domain: str,
                         each: Callable[[Command, Outcome], None] | None) -> list[Outcome]:
        assert self.key is not None
        devices = [device for _, _, device, _ in part]
        wire = sign_payload(commands_to_text([(text, device) for _, _, device, text in part]), devices, self.key,
                            now=part[0][0].issued)
        keeping = self.store.directory is not None
        futs = []
        for cmd, full, device, _ in part:
            futs.append(self.expect(cmd.id))
            self._sent[cmd.id] = (wire, device, full)
            if keeping:
                self._keep_later(cmd, device, wire)
        stanza_id = self._post(domain, wire, devices)
        self._batch_of_stanza[stanza_id] = (domain, {device: cmd.id for cmd, _, device, _ in part})
        self._batch_wires[id(wire)] = wire

        async def one(cmd: Command, fut: asyncio.Future[Outcome], device: str) -> Outcome:
            outcome = await self._outcome(cmd, fut, device, wire, keep_on_cancel=False)
            if each is not None:
                each(cmd, outcome)
            return outcome

        try:
            return list(await asyncio.gather(*(one(cmd, fut, device)
                                               for (cmd, _, device, _), fut in zip(part, futs))))
        except asyncio.CancelledError:
            if keeping:  # kept at once, as send keeps one, but in one file (the batch's wire once)
                text = wire_text(wire)
                self.store.add_many([self.store.entry(cmd, device, text, "direct")
                                     for (cmd, _, device, _), fut in zip(part, futs)
                                     if fut.cancelled() and not self.store.holds(cmd.id)])  # (not those answered)
            raise
        finally:
            self._batch_of_stanza.pop(stanza_id, None)
            self._batch_wires.pop(id(wire), None)

    async def _outcome(self, cmd: Command, fut: asyncio.Future[Outcome], device: str, wire: ET.Element, *,
                       keep_on_cancel: bool = True) -> Outcome:
        """The wait for a command sent: its outcome, or "expired"."""
        keeping = self.store.directory is not None
        wait_s = max(0.0, (cmd.expires - utcnow()).total_seconds()) + OUTCOME_MARGIN_S
        self._expire_later(cmd.id, fut, wait_s)
        given_up = False
        try:
            return await fut
        except _NoOutcome:
            return Outcome(command_id=cmd.id, device=device, status=OutcomeStatus.EXPIRED,
                           detail="no outcome before the command expired")
        except asyncio.CancelledError:
            given_up = True  # the caller stopped waiting (Ctrl-C, shutdown), not the command: keep it
            if keeping and keep_on_cancel and not self.store.holds(cmd.id):
                self.store.add(cmd, device, wire_text(wire), "direct")
            raise
        finally:
            if not given_up:
                self.store.remove(cmd.id)
            self.pending.pop(cmd.id, None)
            self._timed.pop(cmd.id, None)
            self._sent.pop(cmd.id, None)

    def _expire_later(self, cmd_id: str, fut: asyncio.Future[Outcome], wait_s: float) -> None:
        """``fut`` ends in :class:`_NoOutcome` after ``wait_s`` unless settled before: one timer
        for all the commands waiting (a fan-out's share one deadline), not one each."""
        loop = asyncio.get_running_loop()
        when = loop.time() + wait_s
        self._timed[cmd_id] = fut
        heapq.heappush(self._deadlines, (when, cmd_id))
        if self._expiry is None or when < self._expiry.when():
            if self._expiry is not None:
                self._expiry.cancel()
            self._expiry = loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        self._expiry = None
        loop = asyncio.get_running_loop()
        now, deadlines = loop.time(), self._deadlines
        while deadlines and deadlines[0][0] <= now:
            _, cmd_id = heapq.heappop(deadlines)
            fut = self._timed.pop(cmd_id, None)  # (gone: answered, or its wait ended otherwise)
            if fut is not None and not fut.done():
                fut.set_exception(_NoOutcome())
        if deadlines:
            self._expiry = loop.call_at(deadlines[0][0], self._expire_due)

    def _post(self, to: str, wire: ET.Element, addresses: Sequence[str] = ()) -> str:
        """Send ``wire`` in a message to ``to`` (with ``addresses``: XEP-0033's, to each of
        them, through the multicast service ``to``); its stanza id. With the session up and nothing
        in slixmpp's send queue, serialised here and written with the other commands of this
        loop turn in one write: a fan-out's 1,000 commands cost one TLS record and system call
        per turn instead of one each, and no stanza object each (a message has nothing for the
        outgoing filters to do). Otherwise as any stanza, through the queue (held while the
        session is down, in order behind what waits)."""
        client = self.client
        # The filters are asked once per loop turn, by its first command (a turn of a fan-out
        # writes hundreds; filters come with plugins, registered before any command).
        if not may_skip_queue(client) or (not self._out and (not messages_need_no_filter(client)
                                                             or "xep_0198" in client.plugin)):
            return self._send_copy(to, wire, addresses)  # (stream management counts what its filter sees)
        stanza_id = client.new_id()
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        if wire.tag == _OPENPGP and not len(wire) and not wire.attrib:  # a signed command: base64 text only
            self._out.append(f"<message to='{xml_escape(to)}' type='normal' id='{xml_escape(stanza_id)}'>"
                             f"{addresses_text(addresses) if addresses else ''}{wire_text(wire)}</message>")
            return stanza_id
        xml = ET.Element(f"{{{client.default_ns}}}message", {"to": to, "type": "normal", "id": stanza_id})
        if addresses:
            xml.append(addresses_to_xml(addresses))
        xml.append(wire)
        self._out.append(tostring(xml, xmlns=client.default_ns, stream=client, top_level=True))
        return stanza_id

    def _flush(self) -> None:
        data, self._out = "".join(self._out), []
        if data and self.client.transport is not None:  # gone meanwhile: resend_pending sends them again
            self.client.send_raw(data)

    def _keep_later(self, cmd: Command, device: str, wire: ET.Element) -> None:
        """Keep ``cmd`` on disk if it is still waiting KEEP_AFTER_S from now: one timer for all
        the commands sent meanwhile, one file for those of them still waiting then."""
        loop = asyncio.get_running_loop()
        self._to_keep.append((loop.time() + KEEP_AFTER_S, cmd, device, wire))
        if self._keep_timer is None:
            self._keep_timer = loop.call_later(KEEP_AFTER_S, self._keep_due)

    def _keep_due(self) -> None:
        self._keep_timer = None
        now = asyncio.get_running_loop().time()
        due = []
        texts: dict[int, tuple[ET.Element, str]] = {}  # a batch's wire written once (and kept once: pending.py)
        while self._to_keep and self._to_keep[0][0] <= now:
            _, cmd, device, wire = self._to_keep.popleft()
            fut = self.pending.get(cmd.id)
            if fut is not None and not fut.done() and not self.store.holds(cmd.id):
                text = texts.get(id(wire))
                if text is None:
                    text = texts[id(wire)] = (wire, wire_text(wire))
                due.append(self.store.entry(cmd, device, text[1], "direct"))
        self.store.add_many(due)
        if self._to_keep:  # the next group: those due within KEEP_GROUP_S more (a fan-out sends continuously)
            self._keep_timer = asyncio.get_running_loop().call_at(max(self._to_keep[0][0], now + KEEP_GROUP_S),
                                                                  self._keep_due)

    def resend_pending(self) -> int:
        """After a reconnect: send every command still waiting once more, to its device's bare
        JID (its resource may have changed too). A device that had it answers from its replay
        memory with the first outcome (see first_outcome), so nothing runs twice; a copy that
        arrives late is answered "expired" by the device. A bounce of a copy is not an outcome:
        the first copy may have been executed."""
        picked = self._pick(lambda device, _to: device)
        self._send_picked(picked)
        if picked:
            log.info("%s: sent %d unanswered commands again after a reconnect", self.client.boundjid.bare,
                     len(picked))
        return len(picked)

    def resend_to_new_session(self, device: str, full_jid: str) -> int:
        """The device came back on a new session (``full_jid``): every command still waiting that
        went to an earlier session of it goes once more to this one. The old session may have
        taken the command, or sent its outcome, and died before either got through (a cut
        network that the device's liveness ping ended); the device answers a copy of one it ran
        from its replay memory, so nothing runs twice. Which commands is decided now; they go
        at the end of this loop turn, with those of the other devices back in it: a host's new
        connection brings all its identities back at once, and a batch's copies go together."""
        picked = self._pick(lambda dev, to: full_jid if dev == device and to != full_jid else None)
        if picked:
            if not self._to_resend:
                asyncio.get_running_loop().call_soon(self._resend_due)
            self._to_resend += picked
            log.info("%s: sending %d unanswered commands again to %s, back on a new session",
                     self.client.boundjid.bare, len(picked), full_jid)
        return len(picked)

    def _resend_due(self) -> None:
        picked, self._to_resend = self._to_resend, []
        self._send_picked([p for p in picked if (fut := self.pending.get(p[0])) is not None and not fut.done()])

    def _pick(self, target: Callable[[str, str], str | None]) -> list[tuple[str, ET.Element, str, str]]:
        """(command id, wire, device, where) of each command still waiting for which
        ``target(device, where it went)`` names where to send it again; noted as sent there."""
        picked = []
        for cmd_id, (wire, device, to) in list(self._sent.items()):
            fut = self.pending.get(cmd_id)
            where = target(device, to)
            if fut is None or fut.done() or where is None:
                continue
            self._sent[cmd_id] = (wire, device, where)
            picked.append((cmd_id, wire, device, where))
        return picked

    def _send_picked(self, picked: list[tuple[str, ET.Element, str, str]]) -> None:
        """Each copy to where it goes; the copies of one batch (send_batch) as one multicast to
        the host's domain when more than one of its devices waits, not its whole wire once each."""
        batches: dict[int, tuple[ET.Element, list[str], list[str]]] = {}  # id(wire) -> (wire, devices, wheres)
        for _cmd_id, wire, device, where in picked:
            if self._batch_wires.get(id(wire)) is wire:
                group = batches.setdefault(id(wire), (wire, [], []))
                group[1].append(device)
                group[2].append(where)
            else:
                self._send_copy(where, wire)
        for wire, devices, wheres in batches.values():
            if len(devices) == 1:
                self._send_copy(wheres[0], wire)
            else:  # (a hosted identity answers at its bare JID, whatever resource was asked)
                self._send_copy(JID(devices[0]).domain, wire, devices)

    def _send_copy(self, to: str, wire: ET.Element, addresses: Sequence[str] = ()) -> str:
        """``wire`` in a message to ``to`` through slixmpp's queue (held while our session is
        down); its stanza id."""
        msg = self.client.make_message(mto=to, mtype="normal")
        if addresses:
            msg.append(addresses_to_xml(addresses))
        msg.append(wire)
        msg.send()
        return str(msg["id"])

    async def adopt(self, entry: PendingCommand, kept: bool = False) -> Outcome:
        """Wait for the outcome of a command an earlier process of this issuer sent and never
        heard back about (operator/pending.py). Sent straight to the device, it is sent again,
        unchanged, while it is valid (the device answers a copy from its replay memory); one the
        relay holds is answered by the relay. Expired already: "expired", with why. The outcome
        is kept in the store, answered, until `gridpresence pending` shows it; a wait cancelled
        (this process ends first) leaves the entry waiting, for the next process. `kept`: the
        store has it as this process's already (`PendingStore.adopt_many`, for many at once)."""
        if not kept:
            entry = self.store.adopt(entry)
        if entry.expires <= utcnow():
            outcome = Outcome(command_id=entry.command_id, device=entry.device, status=OutcomeStatus.EXPIRED,
                              detail="expired before any outcome reached its issuer (the process that sent it "
                                     "ended first); what the device did is in its history")
            self.store.answer(entry, outcome)
            return outcome
        fut = self.expect(entry.command_id)
        self._adopted.add(entry.command_id)
        if entry.route == "direct":
            try:
                wire = ET.fromstring(entry.wire)
            except ET.ParseError:
                wire = None
            if wire is not None:
                self._sent[entry.command_id] = (wire, entry.device, entry.device)
                self._send_copy(entry.device, wire)
        wait_s = max(0.0, (entry.expires - utcnow()).total_seconds()) + OUTCOME_MARGIN_S
        try:
            outcome = await asyncio.wait_for(asyncio.shield(fut), wait_s)
        except asyncio.TimeoutError:
            outcome = Outcome(command_id=entry.command_id, device=entry.device, status=OutcomeStatus.EXPIRED,
                              detail="no outcome before the command expired (sent by an earlier process)")
        finally:
            self.pending.pop(entry.command_id, None)
            self._sent.pop(entry.command_id, None)
            self._adopted.discard(entry.command_id)
        self.store.answer(entry, outcome)
        return outcome

    def cancel_all(self) -> None:
        for fut in self.pending.values():
            if not fut.done():
                fut.cancel()

    def _take_outcome(self, xml: ET.Element) -> bool:
        """An outcome straight from the message's XML (xmpp/dispatch.py take_for): a fan-out's
        thousands skip slixmpp's stanza object and JID parsing. Only the commonest case, the
        device answering for itself with its JID written as the outcome names it; anything else
        (an invalid outcome, the relay's, another spelling of the JID) goes to _on_outcome."""
        sender = xml.get("from") or ""
        found = xml.findall(_OUTCOME)
        if len(found) != 1 or found[0].get(_LANG) is not None:
            return False  # which one slixmpp's msg["grid_outcome"] reads is its business
        try:
            outcome = outcome_from_xml(found[0])
        except PayloadError:
            return False  # _on_outcome says why
        if outcome.device != sender.partition("/")[0]:
            return False
        self._accept(outcome)
        return True

    def outcome_in_presence(self, device: str, el: ET.Element) -> None:
        """An ``<outcome/>`` in an available presence of ``device`` (bare JID, the sender: see
        PresenceTracker.take_outcomes), the answer to a command sent with ``answer="presence"``.
        Taken only for a command of this session still waiting that went to that device, the
        outcome naming it; anything else is ignored (another session's of ours, a forgery, one
        malformed): a command whose answer is lost so is asked again by the resends (a new
        session of ours or of the device's, an adoption), answered from the replay memory."""
        try:
            outcome = outcome_from_xml(el)
        except PayloadError as exc:
            log.warning("dropped invalid outcome in the presence of %s: %s", device, exc)
            return
        sent = self._sent.get(outcome.command_id)
        fut = self.pending.get(outcome.command_id)
        if sent is None or fut is None or fut.done() or sent[1] != device or outcome.device != device:
            log.debug("outcome in the presence of %s for no command of ours waiting on it: %s", device,
                      outcome.command_id)
            return
        fut.set_result(first_outcome(outcome))
        self.store.remove(outcome.command_id)

    def _on_outcome(self, msg: Message) -> None:
        try:
            outcome = outcome_from_xml(msg["grid_outcome"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid outcome from %s: %s", msg["from"], exc)
            return
        relayed = self.relay is not None and msg["from"].bare == self.relay
        if JID(outcome.device).bare != msg["from"].bare and not relayed:
            log.warning("outcome for %s claims device %s but came from %s", outcome.command_id, outcome.device,
                        msg["from"])
            return
        self._accept(outcome)

    def _accept(self, outcome: Outcome) -> None:
        """An outcome from the device it names (or the relay): to the command waiting for it."""
        fut = self.pending.get(outcome.command_id)
        if fut is None or fut.done():
            self._maybe_orphans(outcome)
            return
        fut.set_result(first_outcome(outcome))
        if outcome.command_id not in self._adopted:  # (adopt keeps an adopted one's outcome)
            self.store.remove(outcome.command_id)  # answered: no later process need wait for it

    def _maybe_orphans(self, outcome: Outcome) -> None:
        """An outcome for no command of this process: an earlier process of ours may have sent
        it and died waiting (the device answered the full JID it no longer has, or the relay
        our bare JID). Taken for it, kept in the store as answered, and told, instead of being
        dropped."""
        entry = next((e for e in self.store.orphans() if e.command_id == outcome.command_id), None)
        if entry is None or JID(entry.device).bare != JID(outcome.device).bare:
            log.debug("outcome for unknown or answered command %s from %s", outcome.command_id, outcome.device)
            return
        outcome = first_outcome(outcome)
        self.store.answer(entry, outcome)
        if self.on_orphan_outcome is not None:
            self.on_orphan_outcome(entry, outcome)

    def _on_bounce(self, msg: Message) -> None:
        sender = msg["from"].bare
        batch = self._batch_of_stanza.get(msg["id"])
        if batch is not None:  # a device of the batch bounced its copy; its host, the whole batch
            domain, ids = batch
            bounced = [(d, i) for d, i in ids.items() if d == sender] if sender != domain else list(ids.items())
        else:
            cmd_id = self._stanza_to_command.get(msg["id"])
            bounced = [(sender, cmd_id)] if cmd_id else []
        err = msg["error"]
        detail = f"{err['condition']}: {err['text']}".rstrip(": ")
        for device, cmd_id in bounced:
            fut = self.pending.get(cmd_id)
            if fut is None or fut.done():
                continue
            fut.set_result(Outcome(command_id=cmd_id, device=device, status=OutcomeStatus.UNDELIVERABLE,
                                   detail=detail))
            self.store.remove(cmd_id)


def wire_text(wire: ET.Element) -> str:
    """A command's wire element as text (kept by operator/pending.py, written by _post): a signed
    one, base64 text only, without the serialiser (a fan-out keeps thousands still waiting)."""
    if wire.tag == _OPENPGP and not len(wire) and not wire.attrib:
        return f"<openpgp xmlns='{OPENPGP_NS}'>{wire.text or ''}</openpgp>"
    return ET.tostring(wire, encoding="unicode")


def first_outcome(outcome: Outcome) -> Outcome:
    """For the issuer of a command it is waiting on, a ``replayed`` refusal means the device had
    this very command already (an XEP-0198 resend, the relay's resend after a crash): what counts
    is the first outcome, which the device attached, with the device's state now."""
    if outcome.reason is not RejectReason.REPLAYED or outcome.first is None:
        return outcome
    first = outcome.first
    note = "answered again: the device had this command already"
    return first.model_copy(update={"report": outcome.report, "detail": f"{first.detail} ({note})"[:500]})
