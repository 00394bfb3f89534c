"""The relay service: SMTP in, durable queue, and an XMPP client that watches every device.

* A command mailed for a device is stored (the issuer's library reports "queued"); the moment
  the device's presence returns, its queued commands go to it over XMPP, in order, all at
  once (one stream keeps them ordered). The device's outcome goes to the original issuer.
* Retry timing follows each command's expiry, not RFC 5321's 30-minute schedule: a command is
  (re)sent whenever its device's presence (re)appears, and never after its expiry; when the
  expiry passes first, the issuer gets "expired". A sent command whose device leaves before
  answering is sent again on its return (the device answers a seen id from memory).
* Data and outcomes a device can only push by mail go to the operators over XMPP; a billing
  report goes to its readers (billing party, the device's customer, operators), still sealed:
  the relay checks the device's signature on the mail but holds no key that opens a part.

How a device trusts a relayed command: the command is the issuer's signed ``<openpgp/>``,
stored and sent verbatim; the device verifies the issuer's signature, role, serial and window
(security/gate.py), so the relay can route a command but not forge or change one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from xml.etree import ElementTree as ET

from slixmpp import JID, Message
from slixmpp.exceptions import IqError, IqTimeout
from slixmpp.xmlstream.matcher import StanzaPath

from gridpresence.server.accounts import RELAY
from gridpresence.xmpp.reconnect import SessionChange, SessionEvent, reconnector_of
from gridpresence.xmpp.session import Endpoint, close_session, make_client, open_session
from gridpresence.operator.tracker import DeviceChange, PresenceTracker
from gridpresence.config import Fleet
from gridpresence.protocol.addressing import add_origin
from gridpresence.protocol.codec import PayloadError, outcome_from_xml, outcome_to_xml
from gridpresence.protocol.relay import ANSWER_MARGIN_S
from gridpresence.protocol.models import Outcome, OutcomeStatus, PresenceReport
from gridpresence.transport.mail import payload_from_xml
from gridpresence.services.relay.queue import CommandQueue, QueuedCommand, State
from gridpresence.protocol.billing_report import BillingReport
from gridpresence.services.relay.smtp import Directory, RelayHandler, Stored, server_tls, smtp_factory
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.server.certs import cert_ips, ensure_certificates
from gridpresence.xmpp.handlers import stanza_callback

log = logging.getLogger(__name__)

class RelayService:
    """One relay for a fleet: ``await start()``, then it runs in the current event loop."""

    def __init__(self, fleet: Fleet, endpoint: Endpoint, password: str, queue_path: Path, *, certs_dir: Path,
                 smtp_host: str = "127.0.0.1", smtp_port: int = 0, durable: bool = False,
                 keys: PartyKeys | None = None, advertise: str | None = None) -> None:
        self.fleet = fleet
        self.endpoint = endpoint
        self.jid = fleet.jid(RELAY)
        self.operators = frozenset(fleet.jid(o.name) for o in fleet.operators)
        self.devices = frozenset(fleet.jid(d.name) for d in fleet.devices)
        self.queue = CommandQueue(queue_path, durable=durable)
        self.smtp_host, self.smtp_port = smtp_host, smtp_port
        self.client = make_client(f"{self.jid}/relay", password, endpoint)
        self.keyring = PepKeyring(self.client, keys)
        self.tracker = PresenceTracker(self.client, grace_s=fleet.presence_grace_s)
        self.tracker.listen(self._on_change)
        readers = frozenset(fleet.jid(p.name) for p in (*fleet.billing, *fleet.customers))
        # Signatures on mailed data are checked with the senders' keys found over PEP (a mail-only
        # device announced its key when it was commissioned: services/relay/commissioning.py).
        self.handler = RelayHandler(Directory(self.operators, self.devices, self.jid, readers), self.queue,
                                    self._on_stored, self.keyring)
        # STARTTLS with a certificate of the grid's CA for the address the relay listens on.
        # `advertise`: the name it is dialled by when not its address (a container's service name).
        self.certs = ensure_certificates(certs_dir, fleet.domain, cert_ips(advertise or smtp_host), service=RELAY,
                                         hosts=[advertise] if advertise else [])
        self.tls = server_tls(self.certs.cert, self.certs.key)
        self.client.register_handler(stanza_callback("relay outcome", StanzaPath("message/grid_outcome"),
                                                     self._on_outcome))
        self._server: asyncio.AbstractServer | None = None
        self._online = False
        self._expiry: asyncio.TimerHandle | None = None
        self._answers: list[tuple[str, str, str]] = []  # outcomes waiting for the next batched commit
        self._confirming: set[asyncio.Task[None]] = set()
        self._forwarding: set[int] = set()  # inbox rows sent, not yet confirmed
        # Every loss of the XMPP session takes the relay offline until it is back (issue 14).
        self.session = reconnector_of(self.client)
        self.session.listen(self._on_session)
        self.session.on_resume(self._come_online)

    # -- life cycle -------------------------------------------------------------------

    async def start(self, timeout: float = 20.0) -> None:
        requeued = self.queue.requeue()  # sent before a crash, unanswered: send again on presence
        if requeued:
            log.info("relay: %d commands sent before a restart will be sent again", requeued)
        loop = asyncio.get_running_loop()
        factory = smtp_factory(self.handler, hostname=self.fleet.domain, tls_context=self.tls)
        self._server = await loop.create_server(factory, self.smtp_host, self.smtp_port, reuse_address=True)
        self.smtp_port = self._server.sockets[0].getsockname()[1]
        try:
            await open_session(self.client, self.endpoint, timeout)
            await self.keyring.announced()
            await self._come_online()
        except BaseException:
            await self.stop()
            raise

    async def _come_online(self) -> None:
        """At start and after every reconnect: roster, presence (the devices' presence follows and
        flushes their queues), then whatever is owed: outcomes, mailed data, expiries."""
        await self.client.get_roster()
        self.tracker.load_roster()
        self._online = True
        self.client.send_presence(pstatus="store-and-forward relay")
        for row in self.queue.answered():  # stored while offline or before a crash, maybe never told
            self._tell_issuer(row)
        self._forwarding.clear()  # unconfirmed forwards died with the old session: send again
        self._forward_inbox()
        self._expire_due()
        for device, view in self.tracker.views.items():
            if view.present:
                self.flush(device)

    def _on_session(self, change: SessionChange) -> None:
        if change.event is SessionEvent.LOST:
            self._online = False
            log.warning("relay: offline (XMPP session lost); storing until it is back")

    async def stop(self) -> None:
        self._online = False
        if self._expiry is not None:
            self._expiry.cancel()
        if self._server is not None:
            self._server.close()
            self._server = None
        self._commit_answers()
        if self._confirming:
            await asyncio.wait(self._confirming, timeout=5)
        self.session.close()  # also when the session is down: no more tries
        self.client.cancel_connection_attempt()
        if self.client.is_connected():
            await close_session(self.client)
        self.queue.close()

    # -- commands to devices ----------------------------------------------------------

    def _on_change(self, change: DeviceChange) -> None:
        before, now = change.previous, change.current
        if now.present and now.full_jid != before.full_jid:
            self.flush(now.jid)
        elif before.present and not now.present:
            self.queue.requeue(now.jid)

    def flush(self, device: str) -> int:
        """Send the device's queued, unexpired commands in order; returns how many were sent."""
        view = self.tracker.views.get(device)
        if not self._online or view is None or view.full_jid is None:
            return 0
        now = time.time()
        live = [c for c in self.queue.queued_for(device) if c.expires > now]
        if not live:
            return 0
        self.queue.mark([(c.id, c.device) for c in live], State.DELIVERING, only_from=State.QUEUED)
        for cmd in live:
            msg = self.client.make_message(mto=view.full_jid, mtype="normal")
            msg.append(ET.fromstring(cmd.payload))
            msg.send()
        log.info("relay: sent %d queued commands to %s", len(live), view.full_jid)
        return len(live)

    def _on_stored(self, stored: Stored) -> None:
        for device in stored.devices:
            self.flush(device)  # present already (a race with its return): no need to wait
        if stored.command is not None and stored.devices:
            self._schedule_expiry(stored.command.expires.timestamp())
        if stored.inbox:
            self._forward_inbox()

    def _on_outcome(self, msg: Message) -> None:
        sender = msg["from"].bare
        if sender not in self.devices:
            log.warning("relay: outcome from %s ignored: not a device", sender)
            return
        try:
            outcome = outcome_from_xml(msg["grid_outcome"].xml)
        except PayloadError as exc:
            log.warning("relay: dropped invalid outcome from %s: %s", sender, exc)
            return
        if outcome.device != sender:
            log.warning("relay: outcome from %s claims device %s; ignored", sender, outcome.device)
            return
        if not self._answers:  # one commit for every outcome that arrives in this loop turn
            asyncio.get_running_loop().call_soon(self._commit_answers)
        self._answers.append((outcome.command_id, sender, ET.tostring(msg["grid_outcome"].xml, encoding="unicode")))

    def _commit_answers(self) -> None:
        answers, self._answers = self._answers, []
        if answers:
            self._close(self.queue.answer(answers))

    def _close(self, rows: list[QueuedCommand]) -> None:
        for row in rows:
            self._tell_issuer(row)
        keys = [(r.id, r.device) for r in rows]
        self._after_server_has_it(lambda: self.queue.mark(keys, State.CLOSED))

    def _after_server_has_it(self, then: Callable[[], None]) -> None:
        """Run `then` once the server has every stanza sent so far.

        ``send()`` only queues a stanza in slixmpp; a crash right after would lose it. The
        server answers a ping after everything sent before it on the stream, so its answer
        is the moment the outcomes are the server's to deliver (or keep offline).
        """
        async def confirm() -> None:
            try:
                await self.client.plugin["xep_0199"].send_ping(JID(self.fleet.domain), timeout=30)
            except (IqError, IqTimeout) as exc:
                log.warning("relay: server did not confirm delivery (%s); will tell again after a restart", exc)
                return
            then()

        task = asyncio.ensure_future(confirm())
        self._confirming.add(task)
        task.add_done_callback(self._confirming.discard)

    def _tell_issuer(self, row: QueuedCommand) -> None:
        if not self._online or row.outcome is None:
            return
        msg = self.client.make_message(mto=row.issuer, mtype="normal")
        msg.append(ET.fromstring(row.outcome))
        msg.send()

    def _expire_due(self) -> None:
        self._expiry = None
        due = self.queue.due_to_expire(time.time(), ANSWER_MARGIN_S)
        answers = []
        for row in due:
            sent = self.queue.get(row.id, row.device)
            detail = ("no answer from the device before the command expired" if sent and sent.state is State.DELIVERING
                      else "the device had no presence before the command expired")
            outcome = Outcome(command_id=row.id, device=row.device, status=OutcomeStatus.EXPIRED, detail=detail)
            answers.append((row.id, row.device, ET.tostring(outcome_to_xml(outcome), encoding="unicode")))
        if answers:
            log.info("relay: %d commands expired undelivered", len(answers))
            self._close(self.queue.answer(answers))
        self._schedule_expiry()

    def _schedule_expiry(self, when: float | None = None) -> None:
        """Check expiries at `when` (POSIX seconds), or at the queue's next expiry if not given."""
        if when is None:
            when = self.queue.next_expiry(ANSWER_MARGIN_S)
        if when is None or not self._online:
            return
        if self._expiry is not None:
            if self._expiry.when() <= asyncio.get_running_loop().time() + (when - time.time()):
                return  # an earlier check is already scheduled
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_later(max(0.0, when - time.time()) + 0.01, self._expire_due)

    # -- data devices push by mail ------------------------------------------------------

    def _forward_inbox(self) -> None:
        if not self._online:
            return
        done: list[int] = []
        for item in self.queue.inbox():
            if item.seq in self._forwarding:
                continue  # sent, waiting for the server's confirmation
            self._forwarding.add(item.seq)
            try:
                payload = payload_from_xml(item.payload)
            except PayloadError as exc:  # screened on the way in; a bad row must not stop the rest
                log.error("relay: stored payload from %s unreadable: %s", item.sender, exc)
                done.append(item.seq)
                continue
            if isinstance(payload, Outcome):
                rows = self.queue.answer([(payload.command_id, item.sender, item.payload)])
                if rows:
                    self._close(rows)
                else:
                    self._to_operators(item.sender, item.payload, payload.summary())
            elif isinstance(payload, PresenceReport):
                self._to_operators(item.sender, item.payload, payload.status_text())
            elif isinstance(payload, BillingReport):
                self._to_readers(item.sender, item.payload, payload)
            done.append(item.seq)
        def confirmed() -> None:
            self.queue.forwarded(done)
            self._forwarding.difference_update(done)

        self._after_server_has_it(confirmed)

    def _to_operators(self, device: str, payload: str, text: str) -> None:
        self._pass_on(sorted(self.operators), device, payload, text)

    def _to_readers(self, device: str, payload: str, report: BillingReport) -> None:
        """The sealed report, unchanged, to everyone who reads one of its parts."""
        try:
            spec = self.fleet.device(device.split("@", 1)[0])
        except KeyError:
            log.error("relay: billing report from %s, which is not in the fleet", device)
            return
        self._pass_on(self.fleet.report_audience(spec).everyone, device, payload, report.summary())

    def _pass_on(self, readers: Iterable[str], device: str, payload: str, text: str) -> None:
        for reader in readers:
            msg = self.client.make_message(mto=reader, mtype="normal", mbody=f"{device} (by mail): {text}")
            msg.append(ET.fromstring(payload))
            add_origin(msg.xml, device)
            msg.send()


def relay_files(data_dir: Path) -> tuple[Path, Path]:
    """Where a grid directory keeps the relay's queue and its SMTP port (kept for the next run)."""
    base = Path(data_dir) / "relay"
    return base / "queue.sqlite3", base / "smtp-port"


def relay_port(data_dir: Path, host: str, wanted: int | None = None) -> int:
    """The relay's SMTP port: `wanted`, else the one used last time if still free, else a free one."""
    from gridpresence.server.ports import free_port, port_is_free

    _, port_file = relay_files(data_dir)
    port = wanted
    if port is None and port_file.exists():
        last = int(port_file.read_text().strip() or 0)
        port = last if last and port_is_free(host, last) else None
    port = port or free_port(host)
    port_file.parent.mkdir(parents=True, exist_ok=True)
    port_file.write_text(str(port))
    return port
