"""The utility operator's library: the one API behind load-shed scripts, the CLI and the console.

Example::

    async with GridOperator.from_connection(ConnectionInfo.load(path)) as grid:
        for name, view in grid.devices.items():
            print(name, view.label, view.report and view.report.telemetry.kw)
        outcome = await grid.command("load-1", "shed")
        await grid.wait_for(lambda devices: devices["load-1"].state is DeviceState.OFF, timeout=5)
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import logging
from xml.etree import ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from slixmpp import JID, Message, Presence
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.protocol import roster as roles
from gridpresence.operator.issuer import CommandIssuer
from gridpresence.operator.pending import PendingCommand, PendingStore
from gridpresence.security.tariff import TariffRefused, tariff_from_billing
from gridpresence.operator.reports import ReportInbox, request_report
from gridpresence.security.reports import ReportReader
from gridpresence.xmpp.session import (
    ConnectionInfo,
    Endpoint,
    RelayEndpoint,
    close_session,
    ensure_running,
    make_client,
    open_session,
)
from gridpresence.operator.tracker import OWN_OUTAGE, DeviceChange, DeviceView, PresenceTracker
from gridpresence.xmpp import heap
from gridpresence.xmpp.reconnect import Reconnector, SessionChange, reconnector_of
from gridpresence.protocol.codec import (
    BATCH_COMMANDS_MAX,
    PayloadError,
    health_from_xml,
    q,
    record_from_xml,
    records_from_xml,
    report_from_xml,
)
from gridpresence.protocol.alarm import Alarm, alarm_from_xml
from gridpresence.protocol.models import Action, Answer, Command, Outcome, OutcomeStatus, Tariff, utcnow
from gridpresence.protocol.openpgp import FALLBACK_BODY, OPENPGP_NS
from gridpresence.security.keyring import KeyUnavailable
from gridpresence.security.ox import OxRefused, is_encrypted, open_chat, seal_chat
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.operator.relay_route import RelayRoute
from gridpresence.operator.roster_cache import KeptRoster, fetch_roster, roster_file_beside
from gridpresence.protocol.relay import FINAL_MARGIN_S
from gridpresence.protocol.billing_report import PartData, PartName, QualityData
from gridpresence.protocol.addressing import ADDRESS_NS, origin_of
from gridpresence.protocol.paging import RSM_NS
from gridpresence.protocol.stanzas import FLEET_HEALTH_PAGE
from gridpresence.xmpp.handlers import stanza_callback

log = logging.getLogger(__name__)

FAN_OUT_BATCH = 50  # commands of a fan-out prepared (signed) before the loop may send them
# Commands of one fan-out in flight at once: enough to keep the server and the devices busy,
# few enough that what comes back (outcomes, presence) never queues for seconds in front of the
# answer to our liveness ping (10,000 at once did: the session was dropped as "not answering").
FAN_OUT_WINDOW = 1000
MULTICAST_DISCO_S = 5.0  # for the disco#info of a host's domain before its first batch
# How long `connect` waits for the tariff of a billing party that is online.
TARIFF_WAIT_S = 5.0
# connect's settle: the pause in a login's burst taken for its end while some devices have sent
# nothing yet (a host of 10,000 sending the alarms it owes an operator at its login pauses ~1 s).
UNHEARD_QUIET_S = 3.0
# The watchdog's fleet health, page by page (XEP-0059): how long one page and all of them may
# take, and how many healths beyond our roster's devices we take (devices added since) before
# we stop asking, whatever a watchdog gone wrong keeps sending.
WATCHDOG_PAGE_S = 3.0
WATCHDOG_HEALTH_S = 15.0
WATCHDOG_HEALTH_MARGIN = FLEET_HEALTH_PAGE


KEPT_ALARMS = 1000  # alarms kept in GridOperator.alarms


class UnknownDevice(KeyError):
    def __str__(self) -> str:
        return f"no device named {self.args[0]!r} in this operator's roster"


class GridOperator:
    """A logged-in utility operator: sees every device's rich presence and commands devices."""

    def __init__(
        self,
        jid: str,
        password: str,
        endpoint: Endpoint,
        *,
        watchdog: str | None = None,
        grace_s: float = 15.0,
        resource: str | None = None,
        relay: RelayEndpoint | None = None,
        keys: PartyKeys | None = None,
        serials: Mapping[str, str] | None = None,
    ) -> None:
        full = f"{jid}/{resource}" if resource else jid
        self.endpoint = endpoint
        self.watchdog = watchdog
        self.client = make_client(full, password, endpoint)
        # A lost session comes back by itself (xmpp/reconnect.py); see `session_changes`.
        self.session: Reconnector = reconnector_of(self.client)
        self.session.on_resume(self._come_back)
        self.presence_status = "grid operator"  # what our presence says (the console says more)
        self.keyring = PepKeyring(self.client, keys)  # our key's announcement, others' pinned keys
        self.tracker = PresenceTracker(self.client, grace_s=grace_s)
        self.tariff: Tariff | None = None
        # Every command is signed with the operator's key; without one, devices refuse them.
        self.issuer = CommandIssuer(self.client, self.keyring.secret_key, relay.jid if relay is not None else None,
                                    store=PendingStore.beside(keys.secret_file if keys else None))
        self.tracker.take_outcomes(self.issuer.outcome_in_presence)  # (what `command` asks hosted devices for)
        # Outcomes of commands an earlier process of ours sent and died waiting for (see `inherited`).
        self.inherited: dict[str, tuple[PendingCommand, asyncio.Future[Outcome]]] = {}
        self.issuer.on_orphan_outcome = self._late_inherited
        self._busy: set[asyncio.Task[None]] = set()
        self._closing = False
        self._pending = self.issuer.pending
        # Serial numbers by device JID from the connection file, for devices not seen yet.
        self.serials = dict(serials or {})
        # Commands for absent devices go to the store-and-forward relay, if there is one.
        self.relay = RelayRoute(relay, self.keyring.secret_key) if relay is not None else None
        self._queued: dict[str, Command] = {}  # command id -> command the relay holds for us
        self._multicast: dict[str, bool] = {}  # host domain -> whether it takes XEP-0033 (_multicast_hosts)
        # command_many's batches (PROTOCOL.md, "Commands in batches"); False: one message per
        # device, as for a host without multicast (bench/fanout.py --batches compares the two).
        self.batches = True
        # The roster kept between logins (XEP-0237): see `keep_roster`.
        self.kept_roster: KeptRoster | None = None
        # Items in the server's answer to the last roster get; None: "the kept roster is current".
        self.roster_items_sent: int | None = None
        if keys is not None and (kept := roster_file_beside(keys.secret_file, JID(jid).user)) is not None:
            self.keep_roster(kept)
        self._version = 0
        self._changed = asyncio.Event()
        self.tracker.listen(lambda _change: self._bump())
        self.tracker.listen(self._on_device_session)
        self.client.register_handler(stanza_callback("grid tariff", StanzaPath("message/grid_tariff"),
                                                     self._on_tariff))
        # A device's copy of a command someone else issued (this session is a recorder's).
        self.client.register_handler(stanza_callback("outcome record", StanzaPath("message/grid_outcome_record"),
                                                     self._on_record))
        self.client.register_handler(stanza_callback("outcome records", StanzaPath("message/grid_outcome_records"),
                                                     self._on_records))
        self.client.register_handler(stanza_callback("signed tariff", StanzaPath("message/openpgp"),
                                                     self._on_tariff))
        self.client.register_handler(stanza_callback("mailed data", StanzaPath("message/grid_device"),
                                                     self._on_mailed_data))
        self.alarms: list[Alarm] = []  # alarms devices sent this operator, oldest first (the newest KEPT_ALARMS)
        self._alarms_total = 0  # every alarm ever received: new_alarms() counts on this, not on the kept list
        # Who else wants each alarm and each command's outcome as it comes (the historian).
        self._alarm_listeners: list[Callable[[Alarm], None]] = []
        self._outcome_listeners: list[Callable[[str, str, Outcome], None]] = []
        self.client.register_handler(stanza_callback("grid alarm", StanzaPath("message/grid_alarm"),
                                                     self._on_alarm))
        # The power-quality part of meters' billing reports is for the utility ([0085]).
        self.reports: ReportInbox | None = None
        if self.keyring.secret_key is not None:
            reader = ReportReader(JID(jid).bare, self.keyring.secret_key, self.keyring, PartName.POWER_QUALITY)
            self.reports = ReportInbox(self.client, reader, [relay.jid] if relay else [])

    @classmethod
    def from_connection(cls, info: ConnectionInfo, operator: str | None = None, resource: str | None = None) -> GridOperator:
        acc = info.operator(operator)
        if acc.key_file is None:
            log.warning("%s: the connection file names no OpenPGP key: read-only, cannot sign", acc.jid)
        return cls(acc.jid, acc.password, info.server, watchdog=info.watchdog, grace_s=info.presence_grace_s,
                   resource=resource, relay=info.relay, keys=PartyKeys.beside(acc.key_file, acc.name),
                   serials=info.serials)

    def keep_roster(self, path: Path) -> None:
        """Keep the roster and its version in ``path`` between logins (operator/roster_cache.py):
        a later login with nothing changed is sent no roster items. An operator made
        ``from_connection`` with a key file keeps it beside the key (``NAME.roster.json``)."""
        self.kept_roster = KeptRoster(path, self.client.boundjid.bare)
        self.client.client_roster.set_backend(self.kept_roster, save=False)

    async def _fetch_roster(self) -> None:
        """The roster from the server (only its version when the kept one is current), then
        the devices in it."""
        self.roster_items_sent = await fetch_roster(self.client, self.kept_roster)
        self.tracker.load_roster()

    @property
    def quality(self) -> list[QualityData]:
        """Power-quality parts of billing reports read so far, oldest first."""
        return [d for d in (self.reports.received if self.reports else []) if isinstance(d, QualityData)]

    def request_report(self, device: str) -> None:
        """Ask a meter or master IED (by name) for its billing report now."""
        request_report(self.client, self.device(device).jid)

    async def wait_quality(self, device: str, since: dt.datetime | None = None, timeout: float = 10.0) -> QualityData:
        """The power-quality part of `device`'s next report (one ending at or after `since`)."""
        if self.reports is None:
            raise RuntimeError("this operator has no OpenPGP key: it cannot read billing reports")
        jid = self.device(device).jid

        def wanted(data: PartData) -> bool:
            return isinstance(data, QualityData) and data.device == jid and (since is None or data.period_end >= since)

        found = await self.reports.wait(wanted, timeout)
        assert isinstance(found, QualityData)
        return found

    @property
    def jid(self) -> str:
        return self.client.boundjid.bare

    # -- life cycle -------------------------------------------------------------------

    async def connect(self, timeout: float = 20.0, settle_s: float = 0.5, tariff_s: float = TARIFF_WAIT_S) -> None:
        """Log in, learn the devices from the roster, go online and collect their presence.

        `settle_s` waits for the initial presence burst: it ends once every device is present
        and, if the roster has a billing party, its tariff has come (or the party is known to be
        offline), or once `settle_s` (at least UNHEARD_QUIET_S while some devices have sent
        nothing) has passed without a device newly heard from, up to `timeout` in all: a burst
        still coming in is waited out. A billing party seen online is waited for up to
        `tariff_s` in all: it sends the tariff when it sees our presence, a few signatures later.
        """
        await ensure_running(self.endpoint)  # a stopped grid is said at once, not after `timeout`
        await open_session(self.client, self.endpoint, timeout)
        await self.keyring.announced()
        await self._fetch_roster()
        billing = {jid for jid in self.client.client_roster if self._is_billing(jid)}
        offline: set[str] = set()  # billing parties the server said are offline (its probe answer)

        def on_presence(pres: Presence) -> None:
            if pres["from"].bare in billing:
                (offline.add if pres["type"] == "unavailable" else offline.discard)(pres["from"].bare)
                self._bump()

        self.client.add_event_handler("presence", on_presence)  # only while settling: presence is hot
        if (dispatch := getattr(self.client, "shape_dispatch", None)) is not None:
            dispatch.declare(on_presence)  # billing parties only: devices' presence may be taken fast
        started = asyncio.get_running_loop().time()
        try:
            self.client.send_presence(pshow="chat", pstatus=self.presence_status)

            def settled() -> bool:  # O(1): it runs at every presence of the burst
                return (self.tracker.present_count >= len(self.tracker.views)
                        and (self.tariff is not None or billing <= offline))

            await self._settle(settled, settle_s, started + max(settle_s, timeout))
            online = {jid for jid in billing - offline if self.client.client_roster[jid].resources}
            left = tariff_s - (asyncio.get_running_loop().time() - started)
            if self.tariff is None and online and left > 0:
                try:
                    await self.wait_tariff(left)
                except TimeoutError:
                    log.info("no tariff from %s within %g s", ", ".join(sorted(online)), tariff_s)
        finally:
            self.client.del_event_handler("presence", on_presence)
        await self._adopt_watchdog_health()
        self.tracker.start_watchdog()
        self._adopt_orphans()
        heap.settle(len(self.tracker.views))  # what the login built lives on: no full GC stalls over it

    async def _settle(self, settled: Callable[[], bool], settle_s: float, limit: float) -> None:
        """Wait until `settled()`, or until no device was newly heard from or present for
        `settle_s`, or until loop time `limit`. A login's burst can outlast `settle_s` (thousands
        of hosted devices answer the server's probes over seconds): while it still brings news,
        waiting on is what shows the whole fleet; devices that stay silent cost one `settle_s`,
        or UNHEARD_QUIET_S if longer."""
        loop = asyncio.get_running_loop()
        tracker = self.tracker
        heard = present = -1
        quiet_until = 0.0
        while settle_s > 0 and not settled():
            now = loop.time()
            if tracker.heard_count > heard or tracker.present_count > present:
                heard, present = max(heard, tracker.heard_count), max(present, tracker.present_count)
                # While devices have not been heard from at all, a pause is more likely their
                # host busy (alarms owed to us going out at our login) than the burst's end.
                quiet = settle_s if heard >= len(tracker.views) else max(settle_s, UNHEARD_QUIET_S)
                quiet_until = min(limit, now + quiet)
            if now >= quiet_until:
                return  # some devices are not present; the view says so
            try:
                async with asyncio.timeout(quiet_until - now):  # (no task per wait, as wait_for makes)
                    await self._changed.wait()
            except TimeoutError:
                pass

    def _adopt_orphans(self) -> None:
        """Commands an earlier process of this operator sent and died waiting for: their
        outcomes are awaited here (`inherited`), told to the outcome listeners, logged, and kept
        in the pending store until `gridpresence pending` shows them (operator/pending.py)."""
        fresh = [e for e in self.issuer.store.orphans() if e.command_id not in self.inherited]
        adopted = 0
        for entry in self.issuer.store.adopt_many(fresh):  # one write for them all, however many
            task = asyncio.ensure_future(self.issuer.adopt(entry, kept=True))
            self.inherited[entry.command_id] = (entry, task)
            task.add_done_callback(functools.partial(self._inherited_done, entry))
            adopted += 1
        if adopted:  # (not those whose outcome came unasked before: they were said)
            log.warning("%s: %d commands sent by an earlier process had no outcome yet; waiting for them here",
                        self.jid, adopted)

    def _late_inherited(self, entry: PendingCommand, outcome: Outcome) -> None:
        """An earlier process's command answered here before (or without) being adopted."""
        known = self.inherited.get(entry.command_id)
        if known is not None and not known[1].done():
            known[1].cancel()  # its adoption's wait: the outcome is here
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        fut.set_result(outcome)
        self.inherited[entry.command_id] = (entry, fut)
        self._inherited_done(entry, fut)

    def _name_of(self, device: str) -> str:
        view = self.tracker.views.get(device)
        return view.name if view is not None else JID(device).user

    def _inherited_done(self, entry: PendingCommand, task: asyncio.Future[Outcome]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        outcome = task.result()
        log.warning("%s: command %s (%s %s) from an earlier process: %s %s (kept for `gridpresence pending`)",
                    self.jid, entry.command_id, entry.action, self._name_of(entry.device), outcome.status.value,
                    outcome.detail)
        self._tell(self._outcome_listeners, self._name_of(entry.device), entry.action, outcome)

    async def inherited_outcomes(self) -> list[tuple[str, PendingCommand, Outcome]]:
        """(device name, command, outcome) for every command of an earlier process of this
        operator with an outcome nobody has shown yet: those adopted here, once each has ended
        (at the latest when it expires), and those an earlier session took and kept; oldest
        first. `shown` then drops them from the pending store."""
        done: dict[str, tuple[PendingCommand, Outcome]] = {}
        for cmd_id in list(self.inherited):
            while True:  # an adoption's wait may be replaced by the outcome arriving unasked
                entry, fut = self.inherited[cmd_id]
                try:
                    done[cmd_id] = (entry, await asyncio.shield(fut))
                    break
                except asyncio.CancelledError:
                    if self.inherited[cmd_id][1] is fut:
                        raise
        for entry in self.issuer.store.answered():  # (also those just kept: the same outcome)
            assert entry.outcome is not None
            done.setdefault(entry.command_id, (entry, entry.outcome))
        ordered = sorted(done.values(), key=lambda pair: pair[0].issued)
        return [(self._name_of(entry.device), entry, self.with_state(outcome)) for entry, outcome in ordered]

    def shown(self, outcomes: Iterable[tuple[str, PendingCommand, Outcome]]) -> None:
        """These outcomes (from `inherited_outcomes`) reached the person: no longer kept."""
        self.issuer.store.shown([entry.command_id for _name, entry, _outcome in outcomes])

    def _on_device_session(self, change: DeviceChange) -> None:
        """A device back on a new session gets the commands still waiting for it again."""
        full = change.current.full_jid
        if full is not None and full != change.previous.full_jid:
            self.issuer.resend_to_new_session(change.current.jid, full)

    async def _come_back(self) -> None:
        """After a reconnect: the roster and our presence again (the devices' presence follows),
        then every command still waiting for its outcome is sent again on the new session."""
        await self._fetch_roster()
        self.client.send_presence(pshow="chat", pstatus=self.presence_status)
        self._multicast.clear()  # (asked again: a host may have changed meanwhile)
        self.issuer.resend_pending()

    @property
    def reconnects(self) -> int:
        """How many times this operator's session was lost and re-established."""
        return self.session.reconnects

    async def session_changes(self) -> AsyncIterator[SessionChange]:
        """Every loss and return of this operator's own session, as it happens."""
        queue: asyncio.Queue[SessionChange] = asyncio.Queue()
        stop = self.session.listen(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            stop()

    async def close(self) -> None:
        self.tracker.stop_watchdog()
        self.issuer.cancel_all()
        if self.relay is not None:
            await asyncio.to_thread(self.relay.close)
        self._closing = True
        await close_session(self.client)
        for task in list(self._busy):  # a tariff still waiting for billing's key is of no use now
            task.cancel()

    async def __aenter__(self) -> GridOperator:
        await self.connect()
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        await self.close()

    async def _adopt_watchdog_health(self) -> None:
        """Devices that vanished before we connected: ask the watchdog service what it saw."""
        if not self.watchdog or all(v.present for v in self.tracker.views.values()):
            return
        resources = self.client.client_roster[self.watchdog].resources
        for _ in range(20):  # its presence may still be on the way
            if resources:
                break
            await asyncio.sleep(0.05)
        if not resources:
            log.info("watchdog %s is not present; using own view only", self.watchdog)
            return
        to = f"{self.watchdog}/{next(iter(resources))}"
        bound = len(self.tracker.views) + WATCHDOG_HEALTH_MARGIN
        taken, after = 0, ""
        try:
            async with asyncio.timeout(WATCHDOG_HEALTH_S):
                while taken < bound:
                    got, after = await self._adopt_health_page(to, after)
                    taken += got
                    if not after:
                        return
            log.warning("watchdog %s sent %d healths for %d devices; asked no more", self.watchdog, taken,
                        len(self.tracker.views))
        except (IqError, IqTimeout, TimeoutError) as exc:
            log.info("watchdog %s did not answer (%s) after %d healths; using own view for the rest",
                     self.watchdog, str(exc) or "no time left", taken)

    async def _adopt_health_page(self, to: str, after: str) -> tuple[int, str]:
        """Ask the watchdog for the page after key ``after`` ("": the first) and adopt it; the
        healths in it and the key to ask after next ("": that was the last page)."""
        iq = self.client.make_iq_get(ito=to)
        rsm = iq.enable("grid_fleet_health")["rsm"]
        rsm["max"] = str(FLEET_HEALTH_PAGE)
        if after:
            rsm["after"] = after
        result = await iq.send(timeout=WATCHDOG_PAGE_S)
        query = result["grid_fleet_health"]
        healths = query.xml.findall(q("health"))
        for el in healths:
            try:
                self.tracker.adopt(health_from_xml(el))
            except PayloadError as exc:
                log.warning("watchdog sent invalid health: %s", exc)
        if query.xml.find(f"{{{RSM_NS}}}set") is None:  # an older watchdog: everything in one answer
            return len(healths), ""
        page = query["rsm"]
        last = page["last"] or ""
        if not healths or not last or last <= after:  # past the end, or a watchdog not moving on
            return len(healths), ""
        # XEP-0059: the count and the first item's index tell whether more follow (a page may
        # be shorter than asked: the watchdog's own page size); without them, a short page ends.
        count, first = page["count"], page["first_index"]
        if count and first and count.isdigit() and first.isdigit():
            more = int(first) + len(healths) < int(count)
        else:
            more = len(healths) >= FLEET_HEALTH_PAGE
        return len(healths), last if more else ""

    # -- views ------------------------------------------------------------------------

    @property
    def devices(self) -> Mapping[str, DeviceView]:
        """Every device in the roster, by name: a live view (take `dict(...)` for a snapshot)."""
        return self.tracker.by_name()

    def device(self, name: str) -> DeviceView:
        """A device by name or bare JID."""
        view = self.tracker.find(name)
        if view is None:
            raise UnknownDevice(name)
        return view

    def _bump(self) -> None:
        self._version += 1
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(self, predicate: Callable[[Mapping[str, DeviceView]], bool], timeout: float) -> Mapping[str, DeviceView]:
        """Wait until `predicate(devices)` holds; raises TimeoutError."""
        async with asyncio.timeout(timeout):
            while not predicate(self.devices):
                await self._changed.wait()
        return self.devices

    async def changes(self) -> AsyncIterator[DeviceChange]:
        """Every presence or health change, as it happens."""
        queue: asyncio.Queue[DeviceChange] = asyncio.Queue()
        stop = self.tracker.listen(queue.put_nowait)
        try:
            while True:
                yield await queue.get()
        finally:
            stop()

    # -- commands ---------------------------------------------------------------------

    async def command(self, name: str, action: Action | str, *, args: dict[str, str] | None = None,
                      ttl_s: float = 30.0, wait_final: bool = False) -> Outcome:
        """Send one command and wait for its one outcome (executed, rejected, expired, undeliverable).

        A device without presence gets the command through the relay (if the connection names
        one): the outcome is then "queued", and :meth:`final_outcome` (or ``wait_final=True``)
        gives the device's real outcome, or "expired" if it did not return in time.
        """
        view = self.device(name)
        # A hosted device may answer in the presence of the change, which this library tracks.
        answer: Answer | None = "presence" if view.transport == "component" else None
        cmd = Command.new(action, self.jid, ttl_s=ttl_s, args=args, serial=self.serial_of(view), answer=answer)
        if view.full_jid is None and self.session.armed:
            view = await self._after_own_outage(view, cmd)
            if view is None:
                return Outcome(command_id=cmd.id, device=self.device(name).jid, status=OutcomeStatus.EXPIRED,
                               detail="this operator's own session to the server did not return before "
                                      "the command expired; it was never sent")
        if view.full_jid is None:
            if self.relay is None:
                outcome = Outcome(command_id=cmd.id, device=view.jid, status=OutcomeStatus.UNDELIVERABLE,
                                  detail=f"{view.name} has no presence ({view.label})")
            else:
                queued = await self.queue_command(cmd, view.jid)
                outcome = await self.final_outcome(queued) if wait_final else queued
        else:
            outcome = await self.send_command(cmd, view.full_jid)
        self._tell(self._outcome_listeners, view.name, cmd.action.value, outcome)
        return outcome

    def listen_outcomes(self, callback: Callable[[str, str, Outcome], None]) -> Callable[[], None]:
        """Call `callback(device name, action, outcome)` for each command's outcome; returns its stop."""
        self._outcome_listeners.append(callback)
        return lambda: self._outcome_listeners.remove(callback)

    def listen_alarms(self, callback: Callable[[Alarm], None]) -> Callable[[], None]:
        """Call `callback(alarm)` for each alarm (and each of its updates) sent to this operator."""
        self._alarm_listeners.append(callback)
        return lambda: self._alarm_listeners.remove(callback)

    @staticmethod
    def _tell(listeners: list[Callable[..., None]], *args: Any) -> None:
        for listener in list(listeners):
            try:
                listener(*args)
            except Exception:  # a faulty listener must not lose the operator an outcome or an alarm
                log.exception("listener failed")

    async def _after_own_outage(self, view: DeviceView, cmd: Command) -> DeviceView | None:
        """A device that looks absent because *our* session is down, or was until just now, is
        not known to be absent: wait (within the command's life) for our session, then at most
        a presence grace for the device's presence on it, before routing by relay. None: the
        command expired meanwhile."""
        left = (cmd.expires - utcnow()).total_seconds()
        if not self.session.online.is_set():
            try:
                await asyncio.wait_for(self.session.online.wait(), max(0.0, left))
            except TimeoutError:
                return None
        elif view.health_reason != OWN_OUTAGE:
            return view  # absent for reasons of its own
        left = (cmd.expires - utcnow()).total_seconds()
        try:
            await self.wait_for(lambda d: d[view.name].present, timeout=max(0.0, min(left, self.tracker.grace_s)))
        except TimeoutError:
            pass  # absent on the new session too: the relay, as for any absent device
        return self.device(view.name)

    def serial_of(self, view: DeviceView) -> str | None:
        """The device's serial number: from its presence, else from the connection file."""
        if view.report is not None and view.report.serial:
            return view.report.serial
        return self.serials.get(view.jid)

    async def queue_command(self, cmd: Command, device: str) -> Outcome:
        """Mail `cmd` to the relay for `device` (bare JID); "queued" or "undeliverable"."""
        assert self.relay is not None
        cmd = self._bind_serial(cmd, device)
        self.issuer.expect(cmd.id)
        wire = self.issuer.wire(cmd, device)
        outcome = await self.relay.queue(cmd, device, wire)
        if outcome.status is OutcomeStatus.QUEUED:
            self._queued[cmd.id] = cmd
            self.issuer.store.add(cmd, device, ET.tostring(wire, encoding="unicode"), "relay")
        else:
            self._pending.pop(cmd.id, None)
        return outcome

    async def final_outcome(self, queued: Outcome) -> Outcome:
        """The real outcome of a command the relay queued: the device's, or "expired"."""
        cmd = self._queued.get(queued.command_id)
        fut = self._pending.get(queued.command_id)
        if cmd is None or fut is None:
            return queued  # not one of ours in the relay: already final
        wait_s = max(0.0, (cmd.expires - utcnow()).total_seconds()) + FINAL_MARGIN_S
        given_up = False
        try:
            return self.with_state(await asyncio.wait_for(asyncio.shield(fut), wait_s))
        except asyncio.TimeoutError:
            return Outcome(command_id=cmd.id, device=queued.device, status=OutcomeStatus.EXPIRED,
                           detail="the relay reported no outcome before the command expired")
        except asyncio.CancelledError:
            given_up = True  # kept on disk: a later process of ours learns the outcome
            raise
        finally:
            if not given_up:
                self.issuer.store.remove(cmd.id)
            self._pending.pop(cmd.id, None)
            self._queued.pop(cmd.id, None)

    async def send_command(self, cmd: Command, to: str) -> Outcome:
        """Sign and send ``cmd`` to a device's full JID (its serial bound in); its one outcome."""
        return self.with_state(await self.issuer.send(self._bind_serial(cmd, to), to))

    def with_state(self, outcome: Outcome) -> Outcome:
        """An outcome that names the device's presence by its seq instead of carrying the report
        (``report-seq``, PROTOCOL.md): with the report of the device's presence as seen here, if
        that is at least as new; else as it came (no report)."""
        if outcome.report is not None or outcome.report_seq is None:
            return outcome
        views = self.tracker.views  # (a device's outcome names its bare JID as the roster spells it)
        view = views.get(outcome.device) or self.tracker.find(JID(outcome.device).bare)
        report = view.report if view is not None else None
        if report is None or report.seq < outcome.report_seq:
            return outcome
        return outcome.model_copy(update={"report": report})

    def _bind_serial(self, cmd: Command, to: str) -> Command:
        if cmd.serial is not None:
            return cmd
        view = self.tracker.find(JID(to).bare)
        serial = self.serial_of(view) if view is not None else self.serials.get(JID(to).bare)
        return cmd.model_copy(update={"serial": serial}) if serial else cmd

    async def command_many(self, names: Iterable[str], action: Action | str, *, args: dict[str, str] | None = None,
                           ttl_s: float = 30.0, wait_final: bool = False,
                           progress: Callable[[int, int], None] | None = None) -> dict[str, Outcome]:
        """The same command to many devices at once; one outcome per device. `progress(done,
        total)` is called as each outcome comes back (a CLI shows long fan-outs with it).

        Signed commands for present devices of a host whose domain takes XEP-0033 multicast
        go to it in batches of up to BATCH_COMMANDS_MAX under one signature (PROTOCOL.md,
        "Commands in batches"); every other device gets its own command, as `command` sends it."""
        names = list(names)
        action = Action(action)
        tasks: list[asyncio.Future[Any]] = []
        done = 0
        outcomes: dict[str, Outcome] = {}
        window = asyncio.Semaphore(FAN_OUT_WINDOW)  # FIFO: the commands go out in the names' order
        hosts = await self._multicast_hosts(names) if self.issuer.key is not None and self.batches else set()

        def one_more() -> None:
            nonlocal done
            done += 1
            if progress is not None:
                try:
                    progress(done, len(names))
                except Exception:  # a faulty display must not lose the fan-out
                    log.exception("progress callback failed")

        async def one(name: str) -> None:
            async with window:
                outcome = await self.command(name, action, args=args, ttl_s=ttl_s, wait_final=wait_final)
            outcomes.setdefault(name, outcome)
            one_more()

        async def batch(domain: str, chunk: list[str]) -> None:
            for _ in chunk:  # a slot of the window per command, each given back as its outcome comes
                await window.acquire()
            left = len(chunk)

            def ended() -> None:
                nonlocal left
                left -= 1
                window.release()
                one_more()
            try:
                await self._command_batch(domain, chunk, action, args, ttl_s, wait_final, outcomes, ended)
            finally:
                for _ in range(left):
                    window.release()

        batched: set[str] = set()
        chunks: dict[str, list[str]] = {}
        singles = 0
        try:
            for name in names:
                view = self.tracker.find(name) if hosts else None
                domain = JID(view.jid).domain if view is not None else ""
                if (view is None or domain not in hosts or not _batchable(view)
                        or view.jid in batched):  # (a device named twice, by name and JID: its second alone)
                    tasks.append(asyncio.ensure_future(one(name)))
                    singles += 1
                    if singles % FAN_OUT_BATCH == 0:
                        # Let the commands just prepared go on the wire before signing the next
                        # ones: the server and the devices start at once, not after the last.
                        await asyncio.sleep(0)
                    continue
                batched.add(view.jid)
                chunk = chunks.setdefault(domain, [])
                chunk.append(name)
                if len(chunk) >= BATCH_COMMANDS_MAX:
                    tasks.append(asyncio.ensure_future(batch(domain, chunks.pop(domain))))
                    await asyncio.sleep(0)  # (as above: each batch on the wire as it is made)
            tasks += [asyncio.ensure_future(batch(domain, chunk)) for domain, chunk in chunks.items()]
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            for task in tasks:
                task.cancel()
            raise
        return {name: outcomes[name] for name in names}

    async def _command_batch(self, domain: str, chunk: list[str], action: Action, args: dict[str, str] | None,
                             ttl_s: float, wait_final: bool, outcomes: dict[str, Outcome],
                             told: Callable[[], None]) -> None:
        """command_many's batch for devices of the host at ``domain``: those still present now
        in one (CommandIssuer.send_batch); any other by `command`. ``told`` as each ends."""
        now = utcnow()
        ready: list[tuple[str, Command, str]] = []  # (name, command, full JID)
        alone: list[str] = []
        for name in chunk:
            view = self.tracker.find(name)
            if view is None or view.full_jid is None:
                alone.append(name)  # gone meanwhile: the relay's or the absent device's way
                continue
            cmd = Command.new(action, self.jid, ttl_s=ttl_s, args=args, now=now, serial=self.serial_of(view),
                              answer="presence")
            ready.append((name, self._bind_serial(cmd, view.full_jid), view.full_jid))

        name_of = {cmd.id: name for name, cmd, _ in ready}

        def each(cmd: Command, outcome: Outcome) -> None:  # as each comes: progress, listeners, the window
            name = name_of[cmd.id]
            outcome = self.with_state(outcome)
            self._tell(self._outcome_listeners, name, cmd.action.value, outcome)
            outcomes.setdefault(name, outcome)
            told()

        async def single(name: str) -> None:
            outcomes.setdefault(name, await self.command(name, action, args=args, ttl_s=ttl_s, wait_final=wait_final))
            told()

        sent = [self.issuer.send_batch([(cmd, full) for _, cmd, full in ready], domain, each)] if ready else []
        await asyncio.gather(*sent, *(single(n) for n in alone))

    async def _multicast_hosts(self, names: list[str]) -> set[str]:
        """The domains of hosted devices among ``names`` that take XEP-0033 multicast (their
        disco#info names the feature; asked once per domain, and again after a failed ask)."""
        domains = set()
        for name in names:
            view = self.tracker.find(name)
            if view is not None and _batchable(view):
                domains.add(JID(view.jid).domain)
        found = set()
        for domain in domains:
            known = self._multicast.get(domain)
            if known is None:
                try:
                    info = await self.client.plugin["xep_0030"].get_info(jid=domain, timeout=MULTICAST_DISCO_S)
                    known = ADDRESS_NS in info["disco_info"]["features"]
                except (IqError, IqTimeout) as exc:
                    log.info("%s: no multicast to %s (%s): one command per device", self.jid, domain,
                             type(exc).__name__)
                    continue  # asked again at the next fan-out
                self._multicast[domain] = known
            if known:
                found.add(domain)
        return found

    def _on_mailed_data(self, msg: Message) -> None:
        """A device's data that reached the relay by mail ([00116]): update that device's view."""
        device = origin_of(msg.xml)
        if self.relay is None or msg["from"].bare != self.relay.jid or device is None:
            return
        try:
            report = report_from_xml(msg["grid_device"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid mailed data for %s: %s", device, exc)
            return
        self.tracker.note_mailed(device, report)

    def _on_alarm(self, msg: Message) -> None:
        try:
            alarm = alarm_from_xml(msg["grid_alarm"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid alarm from %s: %s", msg["from"], exc)
            return
        if JID(alarm.device).bare != msg["from"].bare or self.tracker.find(alarm.device) is None:
            log.warning("alarm from %s for %s ignored: not that device", msg["from"], alarm.device)
            return
        self.alarms.append(alarm)
        self._alarms_total += 1
        del self.alarms[:-KEPT_ALARMS]  # a recorder's session gets every alarm state of the grid
        self._tell(self._alarm_listeners, alarm)
        self._bump()

    def _on_record(self, msg: Message) -> None:
        try:
            record = record_from_xml(msg["grid_outcome_record"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid outcome record from %s: %s", msg["from"], exc)
            return
        view = self.tracker.find(record.outcome.device)
        if view is None or JID(record.outcome.device).bare != msg["from"].bare:
            log.warning("outcome record from %s for %s ignored: not that device", msg["from"], record.outcome.device)
            return
        self._tell(self._outcome_listeners, view.name, record.action.value, record.outcome)

    def _on_records(self, msg: Message) -> None:
        """A device host's batch of records, from its component's domain (which speaks for every
        identity on it): each record only for a device of that domain that we watch."""
        sender = msg["from"]
        if sender.user:  # a user's JID speaks for no host: the whole batch is refused, with one line
            log.warning("outcome records from %s ignored: only a device host's domain sends them", sender)
            return
        try:
            records, bad = records_from_xml(msg["grid_outcome_records"].xml)
        except PayloadError as exc:
            log.warning("dropped invalid outcome records from %s: %s", sender, exc)
            return
        for why in bad[:3]:
            log.warning("dropped an invalid outcome record from %s: %s", sender, why)
        for record in records:
            view = self.tracker.find(record.outcome.device)
            if view is None or JID(record.outcome.device).domain != sender.bare:
                log.warning("outcome record from %s for %s ignored: not that device's host", sender,
                            record.outcome.device)
                continue
            self._tell(self._outcome_listeners, view.name, record.action.value, record.outcome)

    async def new_alarms(self) -> AsyncIterator[Alarm]:
        """Alarms sent to this operator from now on, as they arrive."""
        seen = self._alarms_total
        while True:
            while seen < self._alarms_total:
                back = self._alarms_total - seen  # how far from the newest this one is
                seen += 1
                if back <= len(self.alarms):  # not yet trimmed (a reader KEPT_ALARMS behind loses the oldest)
                    yield self.alarms[-back]
            await self._changed.wait()

    # -- chat -------------------------------------------------------------------------

    async def ask(self, name: str, text: str, timeout: float = 10.0, *, signed: bool = False) -> str:
        """Say one chat line to a device (as a person would) and return its reply.

        ``signed``: send it as OpenPGP for XMPP chat (XEP-0374), signed with our key and
        encrypted to the device's, as an OX client would: the device treats it as a signed line
        (the chat words that act need that) and seals its answer, which is opened here. Raises
        :class:`OxRefused` if this operator has no key or the device's key is unusable.
        """
        jid = self.device(name).jid
        sealed = None
        if signed:
            secret = self.keyring.secret_key
            if secret is None:
                raise OxRefused(f"{self.jid} has no OpenPGP key file; a signed chat line needs one")
            try:
                device_key = await self.keyring.key_for(jid)
            except KeyUnavailable as exc:
                raise OxRefused(f"{name}'s key: {exc}") from None
            sealed = seal_chat(text, secret, jid, device_key)
        reply: asyncio.Future[Message] = asyncio.get_running_loop().create_future()

        def on_message(msg: Message) -> None:
            if (msg["type"] == "chat" and msg["from"].bare == jid and msg["body"] and not reply.done()
                    and msg.xml.find(q("alarm")) is None):
                reply.set_result(msg)

        self.client.add_event_handler("message", on_message)
        try:
            msg = self.client.make_message(mto=jid, mbody=FALLBACK_BODY if sealed is not None else text, mtype="chat")
            if sealed is not None:
                msg.append(sealed)
            msg.send()
            answer = await asyncio.wait_for(reply, timeout)
        finally:
            self.client.del_event_handler("message", on_message)
        envelope = answer.xml.find(f"{{{OPENPGP_NS}}}openpgp")
        if envelope is None or self.keyring.secret_key is None:
            return str(answer["body"])  # plain text (also what a device says when it refuses an OX line)
        try:
            opened = await open_chat(envelope, jid, self.jid, self.keyring.secret_key, self.keyring)
        except OxRefused as exc:
            raise OxRefused(f"{name}'s sealed answer could not be opened: {exc}") from None
        return opened.text

    # -- tariffs ----------------------------------------------------------------------

    def _on_tariff(self, msg: Message) -> None:
        if self._closing:  # arrived while leaving: the key lookup would only time out
            return
        if msg["type"] == "chat" and is_encrypted(msg["openpgp"].xml.text or ""):
            return  # a device's sealed chat answer (see `ask`), not a signed price
        task = asyncio.ensure_future(self._take_tariff(msg))  # the billing key may have to be fetched
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)

    async def _take_tariff(self, msg: Message) -> None:
        try:
            self.tariff = await tariff_from_billing(msg, self._is_billing, self.keyring)
        except TariffRefused as exc:
            log.warning("tariff from %s ignored: %s", msg["from"], exc)
            return
        self._bump()

    def _is_billing(self, jid: str) -> bool:
        roster = self.client.client_roster  # has_jid: `in` would walk the roster (no __contains__)
        return roster.has_jid(jid) and roles.BILLING in roster[jid]["groups"]

    async def wait_tariff(self, timeout: float) -> Tariff:
        async with asyncio.timeout(timeout):
            while self.tariff is None:
                await self._changed.wait()
        return self.tariff

    def price_now(self) -> float | None:
        return self.tariff.price_at() if self.tariff else None


def _batchable(view: DeviceView) -> bool:
    """A device command_many may put in a batch: hosted on a component, and present."""
    return view.transport == "component" and view.full_jid is not None
