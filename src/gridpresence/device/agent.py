"""A device bot: a simulated IED that is an XMPP client.

It publishes rich presence on every change and every refresh interval, executes commands
from the utility's operators, and answers each command with exactly one outcome.

A command is carried out as a task of its own (:meth:`DeviceAgent.accept` is awaited): a real
IED behind a field gateway answers when its read-back confirms, and while it does, the
session's loop goes on publishing and answering for every other identity it hosts.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from xml.etree import ElementTree as ET

from pydantic import ValidationError
from slixmpp import JID, Message, Presence
from slixmpp.jid import InvalidJID
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
from gridpresence.device.ticker import Ticker
from gridpresence.security.ox import is_encrypted
from gridpresence.xmpp.component import HostedClient
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
    outcome_wire,
    record_json,
    record_to_xml,
    report_from_xml,
    report_to_text,
    report_to_xml,
)
from gridpresence.protocol import openpgp  # noqa: F401  (registers <openpgp/> with slixmpp)
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.protocol.models import (
    Action,
    Command,
    DeviceKind,
    DeviceState,
    FaultRef,
    Outcome,
    OutcomeRecord,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Restriction,
    Telemetry,
    utcnow,
)
from gridpresence.security.gate import CommandGate, Refusal, SignedCommand, open_sealed, parse_command
from gridpresence.security.pgp import pgpy
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.replay import ReplayGuard, ReplayStore
from gridpresence.security.signed import SignatureFailure, key_of

log = logging.getLogger(__name__)
_DEVICE = q("device")  # the payload of every presence a device sends
_TARIFF, _FIRMWARE = q("tariff"), q("firmware")
_OPENPGP = f"{{{OPENPGP_NS}}}openpgp"

# Publish between refreshes only when a reading moves this much (percentage points of load):
# every drift would flood the operators with presence.
LOAD_DEADBAND_PCT = 5.0
# The first refresh after a session start comes this fraction of refresh_s early at most, by a
# fraction fixed per JID: a link's thousands of identities start their sessions within seconds
# of each other (a reconnect brings them all back at once), and their refreshes, each counted
# from its own last broadcast, would otherwise all fall due in the same second, every period.
REFRESH_PHASE_SPREAD = 0.5

# On stop, commands under way get this long to send their outcome before the goodbye.
STOP_GRACE_S = 5.0


def _health(state: DeviceState, restriction: Restriction | None, faults: tuple[FaultRef, ...],
            under_fault: bool | None, telemetry: Telemetry) -> tuple[object, ...]:
    """What of a report every subscriber is told of when it changes (DeviceAgent._health_changed)."""
    return state, restriction, faults, under_fault, telemetry.breaker


class DeviceAgent(PartySession):
    """One device identity on the network.

    ``directed_readings`` (default on): a reading that moved without a change of health goes to
    the telemetry audience only; off, it is broadcast to every subscriber, the way before
    (bench/operator_scale.py compares the two).

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

    directed_readings = True
    # Ticks from the event loop's one timer wheel (device/ticker.py); off, a task of its own each.
    shared_ticker = True

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
        self.tick_s = min(spec.sample_s or tick_s, spec.refresh_s)
        # The physics, or what stands for it: a field gateway passes its real IED (gateway/field_device.py).
        self.sim: SimDevice = sim if sim is not None else make_device(spec, utcnow())
        # What operators set survives a restart of the host (kill -9 too): shed stays shed. A real
        # IED behind a gateway keeps its own state: the gateway reads it, never restores it.
        replay = replay or ReplayStore(None)
        self.operated = OperatedStore(self.setup.operated, replay)  # in the replay store if it is on disk
        kept = self.operated.load() if sim is None else None
        if kept is not None:
            self.sim.restore(kept, utcnow())
            log.info("%s: state kept from the last run restored: %s", spec.name, kept.state.value)
        # Its own c2s/BOSH session, or the one given: a hosted identity on the fleet's component.
        self.client = client if client is not None else make_client(jid, password, endpoint)
        # No id on our presence (RFC 6120 needs none; nothing answers a presence by id): a uuid4
        # from os.urandom for each of the 2-3 presences a change makes across a branch is waste.
        self.client.use_presence_ids = False
        self.security = security or SecuritySettings()
        self.gate = CommandGate(JID(jid).bare, spec.serial, self.security,
                                dict(roles) if roles is not None else dict.fromkeys(self.operators, Role.OPERATOR),
                                self.relays)
        # Issuers' keys over PEP (XEP-0373), pinned; and this device's own key's announcement.
        self.keyring = PepKeyring(self.client, keys)
        # Every command taken, with its outcome, until its expiry: a copy has no second effect.
        self.replay = ReplayGuard(replay, self.gate.device)
        self._seq = 0
        self._published: PresenceReport | None = None  # the last report told to anyone
        self._broadcast: PresenceReport | None = None  # the last told to every subscriber
        self._published_at = 0.0
        self._loop_task: asyncio.Task[None] | None = None
        self._fetching: set[asyncio.Task[None]] = set()  # commands waiting for their issuer's key
        self._commands: set[asyncio.Task[None]] = set()  # commands being carried out
        # (issuer, id) of each command being carried out: a copy waits for it, then is a replay.
        self._in_flight: dict[tuple[str, str], asyncio.Future[None]] = {}
        self._stopping = False
        # The last record's outcome, as an element and (hosted) serialised: the issuer's answer (_record).
        self._outcome_xml: tuple[Outcome, ET.Element | None, str] | None = None
        # The last outcome told its issuer in the presence of its change: no message follows (_send_outcome).
        self._in_presence: Outcome | None = None
        self.client.register_handler(
            Callback("grid command", StanzaPath("message/grid_command"), self._on_command)
        )
        openpgp = Callback("openpgp", StanzaPath("message/openpgp"), self._on_openpgp)  # type: ignore[arg-type]
        self.client.register_handler(openpgp)
        dispatch = getattr(self.client, "shape_dispatch", None)  # xmpp/dispatch.py (hosted, or make_client's)
        if dispatch is not None:
            dispatch.take_for(openpgp, self._take_signed)
        self.client.add_event_handler("session_start", self._on_session_start)
        self.telemetry_audience = self._telemetry_audience()
        if self.children:  # (registered before the desks': their handlers run after it, either way)
            self.client.add_event_handler("presence", self._on_child_presence)
            self.take_presence_of(self.children, self._child_intake, self._on_child_presence)
        # Left out of a change of state that is not one of availability (HostedClient only: a c2s
        # account's broadcast is the server's). Never an operator, nor a service acting for them.
        self.health_only = (frozenset(JID(j).bare for j in self.setup.health_only) | self.relays) - self.operators
        self._online: dict[str, set[str]] = {}  # the telemetry audience's sessions online, by bare JID
        self.client.add_event_handler("presence", self._on_audience_presence)
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
        self._published = self._broadcast = None  # a new session has told no one anything yet
        self._online.clear()  # the new session's probes tell us again
        self.publish()
        self._published_at -= self.refresh_phase()  # (earlier only: never late for a watchdog)
        if self.shared_ticker:
            if not self._stopping and not Ticker.of().ticking(self):
                Ticker.of().join(self, self.tick_s, self._tick)
        elif self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.ensure_future(self._run())

    def refresh_phase(self) -> float:
        """How much earlier than refresh_s the first refresh after a session start comes: a
        fraction of REFRESH_PHASE_SPREAD of it, the same for a JID at every start, spread over
        the fleet's JIDs."""
        return random.Random(self.jid).uniform(0.0, REFRESH_PHASE_SPREAD) * self.spec.refresh_s

    async def stop(self) -> None:
        """Say goodbye (state "gone") and leave."""
        self._stopping = True
        for desk in reversed(self._desks.values()):
            desk.close()
        Ticker.of().leave(self)
        if self._loop_task:
            self._loop_task.cancel()
        for task in self._fetching:  # commands waiting for their issuer's key: never acted on
            task.cancel()
        if self._commands:  # commands under way: their outcomes still go out, if they come in time
            _, late = await asyncio.wait(self._commands, timeout=STOP_GRACE_S)
            for task in late:
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
        """The tick on a task of its own (``shared_ticker`` off: the baseline bench/idle_grid.py measures)."""
        while True:
            await asyncio.sleep(self.tick_s)
            self._tick()

    def _tick(self) -> None:
        try:
            self.sim.tick(utcnow())
            # Due at the tick nearest its time: the wheel ticks on a fixed schedule, so a tick can
            # come a hair before a whole refresh after the last presence (a strict >= then waited
            # a whole tick more, a 1 s refresh going out every 2 s).
            since = asyncio.get_running_loop().time() - self._published_at
            refresh_due = since >= self.spec.refresh_s - self.tick_s / 2
            reading = None if refresh_due else self._quiet_reading()
            if reading is not None:  # nothing to tell: the rules get the same readings, without a report
                self.alarms.check_reading(self.sim.state, self.sim.kind, reading)
            else:
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

    def _health_changed(self, report: PresenceReport) -> bool:
        """Something every subscriber needs (the watchdog and the relay too): state, restriction,
        faults, the breaker's position. A first publish counts."""
        old = self._broadcast
        return old is None or _health(old.state, old.restriction, old.faults, old.under_fault,
                                      old.telemetry) != _health(report.state, report.restriction, report.faults,
                                                                report.under_fault, report.telemetry)

    def _telemetry_changed(self, report: PresenceReport) -> bool:
        return self._published is None or self._reading_moved(report.telemetry)

    def _reading_moved(self, telemetry: Telemetry) -> bool:
        """Past the deadband since the last report told (there is one)."""
        old = self._published
        assert old is not None
        return abs((old.telemetry.load_pct or 0.0) - (telemetry.load_pct or 0.0)) >= LOAD_DEADBAND_PCT

    def _quiet_reading(self) -> Telemetry | None:
        """:meth:`_unmoved_reading`, and if there is one (nothing to tell), the seq its report
        would have taken spent, so the next report told has the seq it would have had."""
        reading = self._unmoved_reading()
        if reading is not None:
            self._seq += 1
        return reading

    def _unmoved_reading(self) -> Telemetry | None:
        """The physics' readings now, if ``publish(force=False)`` would send nothing for them
        (health as last broadcast, the reading within the deadband of the last told), found
        without building the report; else None (publish decides, and logs invalid values).
        Such a report would validate: its telemetry is built validated, and the rest is as in
        the last report told."""
        if self._broadcast is None or self._published is None or not self.directed_readings:
            return None
        sim, old = self.sim, self._broadcast
        try:
            telemetry = sim.telemetry()
        except ValidationError:
            return None
        under_fault = True if self.fold.parent_in_fault else None
        if _health(sim.state, sim.restriction, self._faults(), under_fault, telemetry) != _health(
                old.state, old.restriction, old.faults, old.under_fault, old.telemetry):
            return None
        return None if self._reading_moved(telemetry) else telemetry

    def _telemetry_audience(self) -> frozenset[str]:
        """Who is told of a reading that moved but changed no state (PROTOCOL.md, "Who gets which
        presence"): the operators, the services acting for them (the console, whose session the
        historian rides on), the parent, which sums this device's load, and every master IED
        above, whose branch advice reads its whole tree's loads. Not the watchdog or the relay,
        which need health only, nor the devices below, which follow faults only."""
        above = {self.setup.parent} if self.setup.parent else set()
        fleet = self.setup.fleet
        if fleet is not None:
            node = self.spec
            while node.parent is not None:
                node = fleet.device(node.parent)
                if node.kind is DeviceKind.MASTER:
                    above.add(fleet.jid(node.name))
        return self.operators | above

    def publish(self, force: bool = True, answer: tuple[str, Outcome] | None = None) -> PresenceReport | None:
        """Broadcast presence if forced (refresh) or if health changed (every subscriber
        needs it); a reading that moved past the deadband alone goes as directed presence to
        the telemetry audience only. Returns the current report (None if the physics produced
        invalid values). ``answer``: (issuer's bare JID, the outcome of its command, without
        report): put in the issuer's copy of a broadcast it is sent (PROTOCOL.md, "Answered in
        presence"), with this presence's seq; then kept as ``_in_presence``."""
        report = self.current_report()
        if report is None or not self.client.is_connected():
            return report
        broadcast = force or not self.directed_readings or self._health_changed(report)
        if not broadcast and not self._telemetry_changed(report):
            return report
        gone = report.state is DeviceState.GONE  # a field IED that stopped answering: unavailable, with why
        ptype, show = ("unavailable", None) if gone else (None, report.show())
        status = f"gone: {self.sim.status_note or 'gone'}" if gone else report.status_text()
        self._published = report
        if not broadcast:
            self._send_directed(self._presence(report, ptype, show, status))
            return report
        old = self._broadcast
        # A change of what it says, still there (not a refresh): not news to the watchdog.
        change = not force and old is not None and (old.state is DeviceState.GONE) == gone
        client = self.client
        if isinstance(client, HostedClient):
            leave_out = self.health_only if change else frozenset()
            told, said = None, None
            if answer is not None and ptype is None and client.reaches(answer[0], leave_out):
                told = answer[1].model_copy(update={"report": report})
                el, text = outcome_wire(told, by_seq=True)  # the seq of this very presence
                self._outcome_xml = (told, el, text)  # _send_outcome's, if the presence cannot carry it
                said = (answer[0], text)
            if client.broadcast_presence(_DEVICE, report_to_text(report), show=show, status=status, ptype=ptype,
                                         leave_out=leave_out, answer=said):
                self._in_presence = told
            else:  # (the stanza's way: the outcome goes as a message)
                self._in_presence = None
                client.broadcast_change(self._presence(report, ptype, show, status), leave_out)
        else:  # the server's fan-out: to every subscriber
            change = False
            self._presence(report, ptype, show, status).send()
        if not change:  # the refresh is counted from the last broadcast to all: the watchdog sees only those
            self._published_at = asyncio.get_running_loop().time()
        self._broadcast = report
        return report

    def _presence(self, report: PresenceReport, ptype: str | None, show: str | None, status: str) -> Presence:
        """The stanza of ``report`` (HostedClient.broadcast_presence writes the same as text)."""
        if ptype is not None:
            pres = self.client.make_presence(ptype=ptype, pstatus=status)  # type: ignore[arg-type]
        else:
            pres = self.client.make_presence(pshow=show, pstatus=status)  # type: ignore[arg-type]
        pres.append(report_to_xml(report))
        return pres

    def _send_directed(self, pres: Presence) -> None:
        """One copy to each member of the telemetry audience that is online (the server fans a
        bare JID out to its sessions); none to those offline, which the server would drop."""
        tos = [jid for jid in self.telemetry_audience if self._online.get(jid)]
        send_each = getattr(self.client, "send_each", None)  # a hosted identity's: filtered and serialised once
        if send_each is not None:
            send_each(pres, tos)
            return
        for jid in tos:
            copy = pres.__copy__()
            copy["to"] = jid
            copy.send()

    def _on_audience_presence(self, pres: Presence) -> None:
        """Who of the telemetry audience is online, by session. A session that comes online had
        its probe answered by the server with our last broadcast; if a reading has moved since
        (told by directed presence only), it is told now."""
        sender = pres["from"]
        if sender.bare not in self.telemetry_audience:
            return
        ptype = pres.xml.get("type")
        sessions = self._online.setdefault(sender.bare, set())
        if ptype == "unavailable":
            sessions.discard(sender.full)
            return
        if ptype is not None or sender.full in sessions:
            return
        sessions.add(sender.full)
        report = self._published
        if report is not None and report is not self._broadcast and self.client.is_connected():
            out = self.client.make_presence(pshow=report.show(), pstatus=report.status_text())
            out.append(report_to_xml(report))
            out["to"] = sender.full
            out.send()

    def take_presence_of(self, jids: Iterable[str], intake: Callable[[str, ET.Element], None],
                         slow_way: Callable[[Presence], None]) -> None:
        """``intake(bare, xml)`` takes the available and unavailable presence of ``jids`` (the
        devices below: a parent's children, a master's tree) straight from the XML where the
        session can (a hosted identity: HostedClient.take_contacts), and ``slow_way`` (an event
        handler of "presence" that hands the same to ``intake``) whenever slixmpp's path runs. Never
        the presence of a JID another handler reads (operators, the parent, the telemetry audience):
        those handlers are declared as needing none taken."""
        take = getattr(self.client, "take_contacts", None)
        if take is None:
            return
        others = self.operators | self.telemetry_audience | ({self.setup.parent} if self.setup.parent else set())
        take([j for j in jids if j not in others], intake, slow_way, self._on_audience_presence)

    def _on_child_presence(self, pres: Presence) -> None:
        self._child_intake(pres["from"].bare, pres.xml)

    def _child_intake(self, sender: str, xml: ET.Element) -> None:
        """A child's presence (either way: :meth:`take_presence_of`): its load in the branch sum,
        its faults in the folding, and this device's presence if that moved."""
        if sender not in self.children:
            return
        kw, child = 0.0, None
        device = xml.find(q("device"))
        if xml.get("type") != "unavailable" and device is not None:  # the attribute: pres["type"] costs more
            try:
                child = report_from_xml(device)
            except PayloadError as exc:
                log.warning("%s: dropped invalid presence from %s: %s", self.spec.name, sender, exc)
                return
            kw = branch_contribution(child)
        self.sim.branch_kw[sender] = kw
        if self.fold.child(sender, child):
            self.alarms.below_changed()
        # A child's refresh mostly moves the sum within the deadband: then no report is built
        # (a few hundred re-sums a second on a synthetic fleet of 10,000).
        if self._quiet_reading() is None:
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
            self._carry_out(sender, cmd)
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

    def _take_signed(self, xml: ET.Element) -> bool:
        """A signed command straight from the message's XML (xmpp/dispatch.py take_for): a shed's
        thousands skip slixmpp's stanza object. What _on_openpgp would send to _on_signed only,
        and not a tariff (the price desk reads the stanza): anything else goes slixmpp's way."""
        envelope = xml.find(_OPENPGP)
        if envelope is None or is_encrypted(envelope.text or "") or xml.find(_FIRMWARE) is not None:
            return False
        try:
            sender = JID(xml.get("from") or "")
        except InvalidJID:
            return False  # slixmpp's way says why
        return self._signed(sender, envelope, None)

    def _on_signed(self, msg: Message, envelope: ET.Element) -> None:
        self._signed(msg["from"], envelope, msg)

    def _signed(self, sender: JID, envelope: ET.Element, msg: Message | None) -> bool:
        """A signed command: checked, then acted on once. Sync while the issuer's key is cached.
        False, having done nothing, for a tariff without its stanza (``msg`` None)."""
        try:
            sealed = open_sealed(envelope)
            if sealed.payload.tag == _TARIFF:
                if msg is None:
                    return False
                self.prices.on_tariff(msg)  # the billing party's signed price: its own gate
                return True
            try:
                command = sealed.command_for(self.gate.device)  # (its own of a batch)
            except SignatureFailure as exc:
                raise Refusal(exc.reason, exc.detail) from None
            signed = SignedCommand(sealed, parse_command(command))
            if not self.gate.may_send(sender.bare):
                raise Refusal(RejectReason.NOT_AUTHORISED, f"{sender.bare} may not command this device",
                              signed.command.id)
            self.gate.may_issue(signed)
            key = self.keyring.cached(signed.command.issuer)
            if key is None:  # first command from this issuer: fetch its key, then go on
                task = asyncio.ensure_future(self._signed_after_fetch(sender, signed))
                self._fetching.add(task)
                task.add_done_callback(self._fetching.discard)
                return True
            self._carry_out(sender, self.gate.check(sender.bare, signed, key, utcnow()), in_presence=True)
        except Refusal as refusal:
            self._refused(sender, refusal)
        except Exception:  # never let one stanza end the bot
            log.exception("%s: signed command handling failed", self.spec.name)
            self._stanza_error(sender, "internal-server-error", "wait", "the device could not handle this command")
        return True

    def _carry_out(self, sender: JID, cmd: Command, in_presence: bool = False) -> None:
        """An authorised signed (or, by the fleet's leave, unsigned) command: its outcome is sent
        when the device has carried it out; meanwhile the handler returns to the loop.
        ``in_presence``: a signed one, whose outcome may go in the presence of its change."""
        task = asyncio.ensure_future(self._accept_and_answer(sender, cmd, in_presence))
        self._commands.add(task)
        task.add_done_callback(self._commands.discard)

    async def _accept_and_answer(self, sender: JID, cmd: Command, in_presence: bool = False) -> None:
        try:
            outcome = await self.accept(cmd, utcnow(), signed=True, answer_to=self._answer_to(sender, cmd, in_presence))
            self._send_outcome(sender, outcome, cmd.issuer)
        except Exception:  # never let one command end the bot
            log.exception("%s: command %s failed", self.spec.name, cmd.id)
            self._stanza_error(sender, "internal-server-error", "wait", "the device could not handle this command")

    async def _signed_after_fetch(self, sender: JID, signed: SignedCommand) -> None:
        try:
            key = await self._fetch_key(signed)
            cmd = self.gate.check(sender.bare, signed, key, utcnow())
            outcome = await self.accept(cmd, utcnow(), signed=True, answer_to=self._answer_to(sender, cmd, True))
            self._send_outcome(sender, outcome, cmd.issuer)
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

    def _refused(self, sender: JID, refusal: Refusal) -> None:
        log.warning("%s: command %s from %s refused (%s): %s", self.spec.name, refusal.command_id or "?", sender,
                    refusal.reason.value, refusal.detail)
        self._answer(sender, refusal.command_id, OutcomeStatus.REJECTED, refusal.reason, refusal.detail)

    def _answer_to(self, sender: JID, cmd: Command, in_presence: bool) -> str | None:
        """The bare JID whose copy of the change's presence may carry the outcome: a signed
        command asking for it (``answer="presence"``) from its issuer itself (not through the
        relay), an operator, to a hosted device (a c2s device's presence is the server's fan-out)."""
        if not in_presence or cmd.answer != "presence" or not isinstance(self.client, HostedClient):
            return None
        issuer = sender.bare
        return issuer if issuer == cmd.issuer and issuer in self.operators else None

    async def accept(self, cmd: Command, now: dt.datetime, *, signed: bool = False,
                     answer_to: str | None = None) -> Outcome:
        """The one path for an authorised, valid command (signed stanza, chat or ad-hoc).

        A command taken before (same issuer and id, until its expiry) has no second effect: a
        signed copy is rejected ``replayed`` with the first outcome attached; a chat or ad-hoc
        redelivery gets the first outcome again. A copy that arrives while the first is still
        being carried out waits for it, then is such a copy. A late command is expired.
        ``answer_to``: execute's (a copy or a late one is answered by message)."""
        running = self._in_flight.get((cmd.issuer, cmd.id))
        if running is not None:
            await asyncio.shield(running)
            now = utcnow()
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
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._in_flight[(cmd.issuer, cmd.id)] = done
        try:
            outcome = await self.execute(cmd, now, answer_to)  # on disk, with its effect, before it is told
        finally:
            del self._in_flight[(cmd.issuer, cmd.id)]
            done.set_result(None)
        # The device's own event log: what it did, when, with which command (the chaos test reads it).
        if log.isEnabledFor(logging.INFO):  # its timestamps are formatted only if it is kept
            log.info("%s: command %s from %s %s %s at %s (expires %s)", self.spec.name, cmd.id, cmd.issuer,
                     cmd.action.value, outcome.status.value, now.isoformat(), cmd.expires.isoformat())
        self._record(cmd, outcome)
        return outcome

    def _record(self, cmd: Command, outcome: Outcome) -> None:
        """A copy of each command taken, by whatever path it came (signed stanza, relay, chat,
        ad-hoc), to the recorders (the historian) — but to its own issuer, which has the outcome."""
        if not self.client.is_connected():
            return
        record = None
        json_record: str | None = None
        hosted = self.client if isinstance(self.client, HostedClient) else None
        for to in self.setup.recorders:
            if to == JID(cmd.issuer).bare:
                continue
            if hosted is not None:  # with the other identities' records, in one message (data only)
                if json_record is None:  # written once for every recorder
                    json_record = record_json(OutcomeRecord(action=cmd.action, issuer=cmd.issuer, outcome=outcome),
                                              by_seq=self._state_told(outcome, cmd.issuer))
                hosted.link.send_batched(to, q("outcome-records"), json_record)
                continue
            if record is None:  # built once, for every recorder, and its outcome kept for the issuer's answer
                el = outcome_to_xml(outcome, by_seq=self._state_told(outcome, cmd.issuer))
                record = record_to_xml(OutcomeRecord(action=cmd.action, issuer=cmd.issuer, outcome=outcome), el)
                self._outcome_xml = (outcome, el, "")
            msg = self.client.make_message(mto=to, mtype="normal")
            msg.append(record)
            msg.send()

    async def execute(self, cmd: Command, now: dt.datetime, answer_to: str | None = None) -> Outcome:
        """Apply a valid, authorised, fresh command to the physics (awaited: a real IED answers
        in its own time) and remember it (the replay guard); publish the new state first so an
        issuer that sees the outcome already sees the matching presence. ``answer_to``: the
        issuer (bare JID) whose copy of that presence may carry the outcome (then no message)."""
        kept = None
        if cmd.action in (Action.TARIFF, Action.PRICE, Action.FIRMWARE_UPGRADE):
            effect = Effect.refused(RejectReason.INVALID_ARGUMENTS, f"{cmd.action.value} is not a command on its own: "
                                    "a tariff or price is the billing party's signed <tariff/>, a firmware offer "
                                    "travels with its image")
        else:
            effect = await self.sim.carry_out(cmd.action, cmd.args, now, cmd.expires)
            kept = self.operated.keep_soon(self.sim.operated())
        outcome = Outcome(command_id=cmd.id, device=self.jid, status=effect.status, reason=effect.reason,
                          detail=effect.detail)
        # The state and the replay record in one group commit (the record keeps no report), both
        # on disk before anyone is told: the presence or the outcome.
        forget_at = cmd.expires.timestamp() + self.security.clock_skew_s
        recorded = self.replay.record_soon(cmd.issuer, cmd.id, forget_at, outcome)
        if kept is not None:
            await kept
        await recorded  # done with kept: the same batch
        # Only an executed command's: a refusal (a critical load's, restricted) is told by message, as ever.
        report = self.publish(force=False, answer=(answer_to, outcome) if answer_to and outcome.ok else None)
        told = self._in_presence
        if told is not None and told.command_id == outcome.command_id and told.report is report:
            return told  # in the presence of the change: _send_outcome sends no message
        return outcome.model_copy(update={"report": report}) if report is not None else outcome

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

    def _state_told(self, outcome: Outcome, issuer: str) -> bool:
        """Whether ``issuer`` already has a presence of this session at least as new as the
        outcome's report: then the outcome names that presence's seq instead of carrying the
        report again (PROTOCOL.md, "Commands and outcomes"). Operators and the services acting
        for them are subscribers no broadcast leaves out; it went out before the outcome."""
        told = self._broadcast
        return (outcome.report is not None and told is not None and outcome.report.seq <= told.seq
                and JID(issuer).bare in self.operators)

    def _send_outcome(self, to: JID, outcome: Outcome, issuer: str = "") -> None:
        made = self._outcome_xml
        self._outcome_xml = None
        if self._in_presence is outcome:  # told in the presence of its change (publish)
            self._in_presence = None
            return
        # The same outcome's element as in the record just sent (both are only serialised).
        hosted = isinstance(self.client, HostedClient)
        if made is not None and made[0] is outcome:
            el, text = made[1], made[2]
        else:
            by_seq = bool(issuer) and self._state_told(outcome, issuer)
            el, text = outcome_wire(outcome, by_seq=by_seq) if hosted else (outcome_to_xml(outcome, by_seq=by_seq), "")
        if hosted:
            self.client.send_payload(str(to), el, text=text)
            return
        msg = self.client.make_message(mto=to, mtype="normal")
        msg.append(el if el is not None else outcome_to_xml(outcome))
        msg.send()
