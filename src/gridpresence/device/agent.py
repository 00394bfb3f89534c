"""A device bot: a simulated IED that is an XMPP client.

It publishes rich presence on every change and every refresh interval, executes commands
from the utility's operators, and answers each command with exactly one outcome.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from dataclasses import replace
from xml.etree import ElementTree as ET

from pydantic import ValidationError
from slixmpp import JID, Message, Presence
from slixmpp.xmlstream.handler import Callback
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.device.alarms import AlarmDesk
from gridpresence.device.chat import ChatDesk
from gridpresence.device.desks import DESKS
from gridpresence.device.firmware import FirmwareDesk
from gridpresence.device.folding import BranchFold
from gridpresence.device.host import D, Desk, DeviceSetup
from gridpresence.device.operated import OperatedStore
from gridpresence.device.ox_chat import OxDesk
from gridpresence.device.price_feed import PriceFeed
from gridpresence.security.ox import is_encrypted
from gridpresence.xmpp.party import PartySession
from gridpresence.xmpp.reconnect import reconnector_of
from gridpresence.xmpp.session import Endpoint, close_session, make_client
from gridpresence.transport.policy import GridClient
from gridpresence.config import DeviceSpec
from gridpresence.physics import SimDevice, make_device
from gridpresence.physics.base import Effect, branch_contribution
from gridpresence.protocol.codec import (
    PayloadError,
    q,
    outcome_to_xml,
    record_to_xml,
    report_from_xml,
    report_to_xml,
)
from gridpresence.protocol import openpgp  # noqa: F401  (registers <openpgp/> with slixmpp)
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.protocol.models import (
    Action,
    Command,
    DeviceState,
    FaultRef,
    Outcome,
    OutcomeRecord,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Telemetry,
    utcnow,
)
from gridpresence.security.gate import CommandGate, Refusal, SignedCommand, open_sealed, parse_command
from gridpresence.security.pgp import pgpy
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.replay import ReplayGuard, ReplayStore
from gridpresence.security.signed import SignatureFailure, key_of

log = logging.getLogger(__name__)

# Publish between refreshes only when a reading moves this much (percentage points of load):
# every drift would flood the operators with presence.
LOAD_DEADBAND_PCT = 5.0


class DeviceAgent(PartySession):
    """One device identity on the network.

    ``operators`` are the bare JIDs on alarm duty that may chat with it; ``children`` the bare
    JIDs whose load this device sums (a master IED or a branch meter); ``relays`` the
    store-and-forward relays that may hand over a signed command. Commands must be signed:
    ``roles`` (bare JID -> role, default: operators and services as operators) and
    ``security`` decide who may issue what, ``keys`` finds the issuers' public keys, and
    ``replay`` (default: memory only) remembers the commands taken, across restarts. ``sim`` is
    the device behind the identity (default: the simulated physics of ``spec.kind``); ``client``
    its session (default: a c2s/BOSH client of its own; host/fleet.py gives hosted devices one
    on the component, xmpp/component.py).
    """

    def __init__(
        self,
        spec: DeviceSpec,
        jid: str,
        password: str,
        endpoint: Endpoint,
        operators: Iterable[str],
        children: Iterable[str] = (),
        tick_s: float = 1.0,
        relays: Iterable[str] = (),
        services: Iterable[str] = (),
        keys: PartyKeys | None = None,
        *,
        setup: DeviceSetup | None = None,
        security: SecuritySettings | None = None,
        roles: Mapping[str, Role] | None = None,
        replay: ReplayStore | None = None,
        sim: SimDevice | None = None,
        client: GridClient | None = None,
    ) -> None:
        self.spec = spec
        self.endpoint = endpoint
        duty = tuple(dict.fromkeys(JID(j).bare for j in operators))  # fleet order is duty order
        self.setup = replace(setup or DeviceSetup(), duty=duty)
        # Service bots acting for operators (the fleet console) may command, but are never on duty.
        self.operators = frozenset(duty) | {JID(j).bare for j in services}
        self.children = frozenset(JID(j).bare for j in children)
        # Store-and-forward relays may hand over commands, but only ones an operator issued.
        self.relays = frozenset(JID(j).bare for j in relays)
        self.tick_s = min(tick_s, spec.refresh_s)
        # The physics, or what stands for it: a field gateway passes its real IED (gateway/field_device.py).
        self.sim: SimDevice = sim if sim is not None else make_device(spec, utcnow())
        # What operators set survives a restart of the host (kill -9 too): shed stays shed. A real
        # IED behind a gateway keeps its own state: the gateway reads it, never restores it.
        self.operated = OperatedStore(self.setup.operated)
        kept = self.operated.load() if sim is None else None
        if kept is not None:
            self.sim.restore(kept, utcnow())
            log.info("%s: state kept from the last run restored: %s", spec.name, kept.state.value)
        # Its own c2s/BOSH session, or the one given: a hosted identity on the fleet's component.
        self.client = client if client is not None else make_client(jid, password, endpoint)
        self.security = security or SecuritySettings()
        self.gate = CommandGate(JID(jid).bare, spec.serial, self.security,
                                dict(roles) if roles is not None else dict.fromkeys(self.operators, Role.OPERATOR),
                                self.relays)
        # Issuers' keys over PEP (XEP-0373), pinned; and this device's own key's announcement.
        self.keyring = PepKeyring(self.client, keys)
        # Every command taken, with its outcome, until its expiry: a copy has no second effect.
        self.replay = ReplayGuard(replay or ReplayStore(None), self.gate.device)
        self._seq = 0
        self._published: PresenceReport | None = None
        self._published_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._fetching: set[asyncio.Task[None]] = set()
        self._stopping = False
        self.client.register_handler(
            Callback("grid command", StanzaPath("message/grid_command"), self._on_command)
        )
        self.client.register_handler(Callback("openpgp", StanzaPath("message/openpgp"),
                                              self._on_openpgp))  # type: ignore[arg-type]
        if self.children:
            self.client.add_event_handler("presence", self._on_child_presence)
        self.client.add_event_handler("session_start", self._on_session_start)
        # Every feature is a desk, built in the table's order for this kind (device/desks.py).
        self._desks: dict[type[Desk], Desk] = {}
        for kind in DESKS[spec.kind]:
            self._desks[kind] = kind(self)

    # -- desks (device/host.py: what they may use of the device) ----------------------------

    @property
    def stopping(self) -> bool:
        return self._stopping

    def desk(self, kind: type[D]) -> D:
        return self._desks[kind]  # type: ignore[return-value]  # keyed by its own class

    def has_desk(self, kind: type[Desk]) -> bool:
        return kind in self._desks

    @property
    def alarms(self) -> AlarmDesk:
        return self.desk(AlarmDesk)

    @property
    def chat(self) -> ChatDesk:
        return self.desk(ChatDesk)

    @property
    def prices(self) -> PriceFeed:
        return self.desk(PriceFeed)

    @property
    def fold(self) -> BranchFold:
        return self.desk(BranchFold)

    @property
    def firmware(self) -> FirmwareDesk:
        return self.desk(FirmwareDesk)

    # -- life cycle -------------------------------------------------------------------

    def _on_session_start(self, _event: object) -> None:
        self._published = None  # a new session has told no one anything yet
        self.publish()
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        """Say goodbye (state "gone") and leave."""
        self._stopping = True
        for desk in reversed(self._desks.values()):
            desk.close()
        if self._loop_task:
            self._loop_task.cancel()
        for task in self._fetching:  # commands waiting for their issuer's key: never acted on
            task.cancel()
        reconnector_of(self.client).close()  # also when the session is down: no more tries
        self.client.cancel_connection_attempt()
        if self.client.is_connected():
            report = self._report(DeviceState.GONE)
            pres = self.client.make_presence(ptype="unavailable", pstatus="gone: shut down")
            pres.append(report_to_xml(report))
            pres.send()
            await close_session(self.client)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                self.sim.tick(utcnow())
                refresh_due = loop.time() - self._published_at >= self.spec.refresh_s
                self.alarms.check(self.publish(force=refresh_due))
                if self._published is not None and self._published.faults != self._faults():
                    self.publish(force=False)  # parent and children learn of a fault now, not at the next refresh
            except Exception:  # one bad tick must not end the device
                log.exception("%s: tick failed", self.spec.name)

    # -- presence ---------------------------------------------------------------------

    def _report(self, state: DeviceState | None = None) -> PresenceReport:
        self._seq += 1
        return PresenceReport(
            kind=self.sim.kind,
            state=state or self.sim.state,
            critical=self.spec.critical,
            telemetry=self.sim.telemetry() if state is None else Telemetry(),
            restriction=self.sim.restriction if state is None else None,
            refresh_s=self.spec.refresh_s,
            seq=self._seq,
            transport=self.client.transport_name,
            serial=self.spec.serial,
            faults=self._faults() if state is None else (),
            under_fault=True if state is None and self.fold.parent_in_fault else None,
        )

    def _faults(self) -> tuple[FaultRef, ...]:
        return self.fold.presence_faults(self.alarms.own_faults)

    def current_report(self) -> PresenceReport | None:
        """The device's state as a validated report, or None (logged) if the physics is off."""
        try:
            return self._report()
        except ValidationError as exc:
            log.error("%s: refusing to publish invalid values: %s", self.spec.name, exc)
            return None

    def _changed(self, report: PresenceReport) -> bool:
        old = self._published
        if (old is None or old.state != report.state or old.restriction != report.restriction
                or old.faults != report.faults or old.under_fault != report.under_fault):
            return True
        a, b = old.telemetry, report.telemetry
        if a.breaker != b.breaker:
            return True
        return abs((a.load_pct or 0.0) - (b.load_pct or 0.0)) >= LOAD_DEADBAND_PCT

    def publish(self, force: bool = True) -> PresenceReport | None:
        """Broadcast presence if forced (refresh) or if something worth telling changed;
        returns the current report (None if the physics produced invalid values)."""
        report = self.current_report()
        if report is None or not self.client.is_connected() or not (force or self._changed(report)):
            return report
        if report.state is DeviceState.GONE:  # a field IED that stopped answering: unavailable, with why
            pres = self.client.make_presence(ptype="unavailable", pstatus=f"gone: {self.sim.status_note or 'gone'}")
        else:
            pres = self.client.make_presence(pshow=report.show(), pstatus=report.status_text())
        pres.append(report_to_xml(report))
        pres.send()
        self._published = report
        self._published_at = asyncio.get_running_loop().time()
        return report

    def _on_child_presence(self, pres: Presence) -> None:
        sender = pres["from"].bare
        if sender not in self.children:
            return
        kw, child = 0.0, None
        if pres["type"] != "unavailable" and pres.xml.find(q("device")) is not None:
            try:
                child = report_from_xml(pres["grid_device"].xml)
            except PayloadError as exc:
                log.warning("%s: dropped invalid presence from %s: %s", self.spec.name, sender, exc)
                return
            kw = branch_contribution(child)
        self.sim.branch_kw[sender] = kw
        if self.fold.child(sender, child):
            self.alarms.below_changed()
        self.publish(force=False)

    # -- commands ---------------------------------------------------------------------

    def _on_command(self, msg: Message) -> None:
        """A bare ``<command/>``: refused as unsigned (unless the fleet turned signatures off)."""
        sender = msg["from"]
        try:
            raw = msg["grid_command"].xml
            if not self.gate.may_send(sender.bare):
                raise Refusal(RejectReason.NOT_AUTHORISED, f"{sender.bare} may not command this device",
                              raw.get("id") or "")
            if self.security.require_signatures:
                raise Refusal(RejectReason.UNSIGNED, "commands must be signed with the issuer's OpenPGP key "
                                                     "(<openpgp xmlns='urn:xmpp:openpgp:0'/>)", raw.get("id") or "")
            cmd = self.gate.check_unsigned(sender.bare, parse_command(raw))
            self._send_outcome(sender, self.accept(cmd, utcnow(), signed=True))
        except Refusal as refusal:
            self._refused(sender, refusal)
        except Exception:  # never let one stanza end the bot
            log.exception("%s: command handling failed", self.spec.name)
            self._stanza_error(sender, "internal-server-error", "wait", "the device could not handle this command")

    def _on_openpgp(self, msg: Message) -> None:
        """Every ``<openpgp/>`` (XEP-0373) goes to one place, by what the message is."""
        envelope = msg["openpgp"].xml
        if is_encrypted(envelope.text or ""):
            self.desk(OxDesk).take(msg)  # signed and encrypted (XEP-0374 chat from an OX client)
        elif msg.xml.find(q("firmware")) is None:  # with an image: the firmware desk's signed offer
            self._on_signed(msg, envelope)

    def _on_signed(self, msg: Message, envelope: ET.Element) -> None:
        """A signed command: checked, then acted on once. Sync while the issuer's key is cached."""
        sender = msg["from"]
        try:
            sealed = open_sealed(envelope)
            if sealed.payload.tag == q("tariff"):
                self.prices.on_tariff(msg)  # the billing party's signed price: its own gate
                return
            signed = SignedCommand(sealed, parse_command(sealed.payload))
            if not self.gate.may_send(sender.bare):
                raise Refusal(RejectReason.NOT_AUTHORISED, f"{sender.bare} may not command this device",
                              signed.command.id)
            self.gate.may_issue(signed)
            key = self.keyring.cached(signed.command.issuer)
            if key is None:  # first command from this issuer: fetch its key, then go on
                task = asyncio.ensure_future(self._signed_after_fetch(sender, signed))
                self._fetching.add(task)
                task.add_done_callback(self._fetching.discard)
                return
            self._send_outcome(sender, self._take_signed(sender, signed, key))
        except Refusal as refusal:
            self._refused(sender, refusal)
        except Exception:  # never let one stanza end the bot
            log.exception("%s: signed command handling failed", self.spec.name)
            self._stanza_error(sender, "internal-server-error", "wait", "the device could not handle this command")

    async def _signed_after_fetch(self, sender: JID, signed: SignedCommand) -> None:
        try:
            key = await self._fetch_key(signed)
            self._send_outcome(sender, self._take_signed(sender, signed, key))
        except SignatureFailure as exc:
            self._refused(sender, Refusal(exc.reason, exc.detail, signed.command.id))
        except Refusal as refusal:
            self._refused(sender, refusal)
        except Exception:
            log.exception("%s: signed command handling failed", self.spec.name)

    async def _fetch_key(self, signed: SignedCommand) -> pgpy.PGPKey:
        """The issuer's key; a lookup cut short by our own lost session is tried again once the
        session is back (until the command expires): a reconnect is not the issuer's fault."""
        session = reconnector_of(self.client)
        while True:
            before = session.reconnects
            try:
                return await key_of(signed.command.issuer, self.keyring)
            except SignatureFailure as exc:
                cut = session.reconnects != before or not session.online.is_set()
                left = (signed.command.expires - utcnow()).total_seconds()
                if exc.reason is not RejectReason.UNKNOWN_KEY or not cut or left <= 0 or self._stopping:
                    raise
                log.info("%s: key lookup for %s cut by a reconnect; trying again", self.spec.name,
                         signed.command.issuer)
                async with asyncio.timeout(left):
                    await session.online.wait()

    def _take_signed(self, sender: JID, signed: SignedCommand, key: pgpy.PGPKey) -> Outcome:
        now = utcnow()
        cmd = self.gate.check(sender.bare, signed, key, now)
        return self.accept(cmd, now, signed=True)

    def _refused(self, sender: JID, refusal: Refusal) -> None:
        log.warning("%s: command %s from %s refused (%s): %s", self.spec.name, refusal.command_id or "?", sender,
                    refusal.reason.value, refusal.detail)
        self._answer(sender, refusal.command_id, OutcomeStatus.REJECTED, refusal.reason, refusal.detail)

    def accept(self, cmd: Command, now: dt.datetime, *, signed: bool = False) -> Outcome:
        """The one path for an authorised, valid command (signed stanza, chat or ad-hoc).

        A command taken before (same issuer and id, until its expiry) has no second effect: a
        signed copy is rejected ``replayed`` with the first outcome attached; a chat or ad-hoc
        redelivery gets the first outcome again. A late command is expired."""
        seen = self.replay.seen(cmd.issuer, cmd.id)
        if seen is not None:
            first = seen.outcome
            if not signed:
                return first.model_copy(update={"report": self.current_report()})
            log.warning("%s: command %s from %s seen before: refused as a replay", self.spec.name, cmd.id, cmd.issuer)
            at = dt.datetime.fromtimestamp(seen.first_at, dt.timezone.utc)
            return Outcome(command_id=cmd.id, device=self.jid, status=OutcomeStatus.REJECTED,
                           reason=RejectReason.REPLAYED, first=first,
                           detail=f"already had at {at:%H:%M:%S} UTC: {first.summary()}"[:500],
                           report=self.current_report())
        if cmd.is_expired(now):
            late = (now - cmd.expires).total_seconds()
            expired = Outcome(command_id=cmd.id, device=self.jid, status=OutcomeStatus.EXPIRED,
                              detail=f"arrived {late:.1f} s after its expiry")
            self._record(cmd, expired)
            return expired
        outcome = self.execute(cmd, now)
        forget_at = cmd.expires.timestamp() + self.security.clock_skew_s
        self.replay.record(cmd.issuer, cmd.id, forget_at, outcome)
        # The device's own event log: what it did, when, with which command (the chaos test reads it).
        log.info("%s: command %s from %s %s %s at %s (expires %s)", self.spec.name, cmd.id, cmd.issuer,
                 cmd.action.value, outcome.status.value, now.isoformat(), cmd.expires.isoformat())
        self._record(cmd, outcome)
        return outcome

    def _record(self, cmd: Command, outcome: Outcome) -> None:
        """A copy of each command taken, by whatever path it came (signed stanza, relay, chat,
        ad-hoc), to the recorders (the historian) — but to its own issuer, which has the outcome."""
        if not self.client.is_connected():
            return
        for to in self.setup.recorders:
            if to == JID(cmd.issuer).bare:
                continue
            msg = self.client.make_message(mto=to, mtype="normal")
            msg.append(record_to_xml(OutcomeRecord(action=cmd.action, issuer=cmd.issuer, outcome=outcome)))
            msg.send()

    def execute(self, cmd: Command, now: dt.datetime) -> Outcome:
        """Apply a valid, authorised, fresh command to the physics; publish the new state first
        so an issuer that sees the outcome already sees the matching presence."""
        if cmd.action in (Action.TARIFF, Action.PRICE, Action.FIRMWARE_UPGRADE):
            effect = Effect.refused(RejectReason.INVALID_ARGUMENTS, f"{cmd.action.value} is not a command on its own: "
                                    "a tariff or price is the billing party's signed <tariff/>, a firmware offer "
                                    "travels with its image")
        else:
            effect = self.sim.execute(cmd.action, cmd.args, now)
            self.operated.save(self.sim.operated())  # on disk before anyone is told the outcome
        report = self.publish(force=False)
        return Outcome(
            command_id=cmd.id,
            device=self.jid,
            status=effect.status,
            reason=effect.reason,
            detail=effect.detail,
            report=report,
        )

    def _answer(self, to: JID, cmd_id: str, status: OutcomeStatus, reason: RejectReason | None, detail: str) -> None:
        if not cmd_id:  # nothing to correlate with: a stanza-level error is all we can give
            self._stanza_error(to, "bad-request", "modify", f"grid command without an id: {detail}")
            return
        self._send_outcome(to, Outcome(command_id=cmd_id[:64], device=self.jid, status=status, reason=reason,
                                       detail=detail[:500]))

    def _stanza_error(self, to: JID, condition: str, etype: str, text: str) -> None:
        err = self.client.make_message(mto=to, mtype="error")
        err["error"]["type"] = etype
        err["error"]["condition"] = condition
        err["error"]["text"] = text[:500]
        err.send()

    def _send_outcome(self, to: JID, outcome: Outcome) -> None:
        msg = self.client.make_message(mto=to, mtype="normal")
        msg.append(outcome_to_xml(outcome))
        msg.send()
