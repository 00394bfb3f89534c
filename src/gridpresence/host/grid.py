"""The whole grid network on the embedded server: what ``gridpresence up`` runs, and what the
tests start. Server, accounts, connection file and bots come up and go down together."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

from gridpresence.server.accounts import CONSOLE, RELAY, WATCHDOG, Secrets, plan_accounts, plan_hosted
from gridpresence.gateway.fleet import with_sites
from gridpresence.gateway.simulator import FieldSimulator
from gridpresence.gateway.site import load_site
from gridpresence.host.gateway import Gateway, play_site
from gridpresence.host.fleet import FleetBots, Progress
from gridpresence.host.processes import HUNG_AFTER_S, SupervisedChild, gridpresence_argv
from gridpresence.xmpp.session import Account, ConnectionInfo, Endpoint, RelayEndpoint, SessionError
from gridpresence.config import Fleet, FleetError
from gridpresence.protocol.models import Outcome
from gridpresence.services.dashboard import Dashboard
from gridpresence.services.historian import HISTORY_FILE
from gridpresence.server.certs import cert_ips, ensure_certificates
from gridpresence.services.relay.service import RelayService, relay_files, relay_port
from gridpresence.security.keys import KEYS_DIR, KeyStore, fingerprint
from gridpresence.security.pep_keyring import PartyKeys, vouch
from gridpresence.security.pins import PinStore
from gridpresence.server import ProsodyServer, ServerPorts, provision
from gridpresence.server.prosody import ServerError
from gridpresence.xmpp.component import COMPONENT_SECRET, HOSTING_FILE, HostedStore
from gridpresence.xmpp.reconnect import backoff_delay

log = logging.getLogger(__name__)

CONNECTION_FILE = "connection.json"
SECRETS_FILE = "secrets.json"
FLEET_COPY = "fleet.json"  # the fleet this directory runs, for `gridpresence bots`
# A Prosody that is running but silent (SIGSTOP, a deadlock) is as good as dead: probed every
# HUNG_PROBE_S (a stream header, answered with features), it is killed and restarted after
# HUNG_PROBES probes in a row went unanswered (busy is slow, not silent for that long).
HUNG_PROBE_S = 3.0
HUNG_PROBES = 3


class Grid:
    """`only` limits the bots to those names; `without` holds back some devices' bots (their
    accounts are provisioned all the same: they can be run apart later, or stay absent). The IEDs
    of the fleet's ``[[sites]]`` are devices too, always held back: `gridpresence gateway` runs them,
    but for a site marked ``simulate`` (the demo's), whose field simulator and gateway the grid
    runs itself."""

    def __init__(self, fleet: Fleet, data_dir: Path, *, bind: str = "127.0.0.1", ports: ServerPorts | None = None,
                 bots: bool = True, only: Collection[str] | None = None, without: Collection[str] = (),
                 tick_s: float = 1.0, prosody_bin: str = "prosody", log_level: str = "info",
                 processes: bool = False, history: str | None = None, dashboard: bool = True,
                 dashboard_port: int = 0, advertise: str | None = None, hung_after_s: float = HUNG_AFTER_S,
                 progress: Progress | None = None) -> None:
        # IEDs of the fleet's sites get accounts here; their bots are a field gateway's.
        fleet, self.gateway_ieds = with_sites(fleet)
        without = (*without, *self.gateway_ieds)
        self.fleet = fleet
        self.data_dir = Path(data_dir)
        unknown = sorted(set(without) - {d.name for d in fleet.devices})
        if unknown:
            raise FleetError(f"cannot hold back {', '.join(repr(n) for n in unknown)}: no such device in the fleet")
        if without:
            everyone = [*(p.name for p in (*fleet.devices, *fleet.billing, *fleet.manufacturers)), WATCHDOG, RELAY,
                        CONSOLE]
            only = [n for n in (everyone if only is None else only) if n not in set(without)]
        self.secrets = Secrets(self.data_dir / SECRETS_FILE)
        # Hosted devices (fleet `hosting`) come over the server's component; c2s ones have accounts.
        hosted = any(fleet.hosted(d.name) for d in fleet.devices)
        self.server = ProsodyServer(self.data_dir, domain=fleet.domain, bind=bind, ports=ports, prosody_bin=prosody_bin,
                                    log_level=log_level,
                                    adhoc_accounts=[d.name for d in fleet.devices if not fleet.hosted(d.name)],
                                    advertise=advertise,
                                    component_secret=self.secrets.password(COMPONENT_SECRET) if hosted else None)
        self.keys = KeyStore(self.data_dir / KEYS_DIR)
        self._want_bots = bots
        self._only = only
        self._tick_s = tick_s
        self._history = history  # the historian's store (None: DATA/history.sqlite)
        self._want_dashboard = dashboard and bots
        self._dashboard_port = dashboard_port
        self.dashboard: Dashboard | None = None
        self.bots: FleetBots | None = None
        self.relay: RelayService | None = None
        self._bind = bind
        self._supervisor: asyncio.Task[None] | None = None
        # `processes`: devices, services and the relay each in a supervised process of their own.
        self._processes = processes
        self._hung_after_s = hung_after_s  # a child process without a heartbeat this long is restarted
        self._progress = progress  # hears how far a long start is ("N of M bots logged in")
        self.children: list[SupervisedChild] = []
        self.server_restarts: list[float] = []  # seconds each supervised restart took
        # The simulated sites' field simulators (None: it could not start) and gateways.
        self.sites: list[tuple[FieldSimulator | None, Gateway]] = []
        self.hung_kills = 0  # times Prosody was found hung and killed to restart it
        self._restarting = False
        self._hung_watch: asyncio.Task[None] | None = None

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.server.connect_host, c2s_port=self.server.ports.c2s, domain=self.fleet.domain,
                        ca_file=self.server.certs.ca, bosh_url=self.server.bosh_url, web_url=self.server.web_url,
                        component_port=self.server.ports.component if self.server.component_domain else None)

    @property
    def connection(self) -> ConnectionInfo:
        ops = tuple(Account(name=o.name, jid=self.fleet.jid(o.name), password=self.secrets.password(o.name),
                            key_file=str(self.keys.secret_path(o.name)))
                    for o in self.fleet.operators)
        return ConnectionInfo(server=self.endpoint, operators=ops, watchdog=self.fleet.jid(WATCHDOG),
                              billing=tuple(self.fleet.jid(b.name) for b in self.fleet.billing),
                              presence_grace_s=self.fleet.presence_grace_s, relay=self.relay_endpoint,
                              serials={self.fleet.jid(d.name): d.serial for d in self.fleet.devices},
                              history=self.history_url,
                              dashboard=self.dashboard.url if self.dashboard is not None else None)

    @property
    def history_url(self) -> str:
        """Where the historian records (`gridpresence history` reads it from connection.json)."""
        return self._history or str((self.data_dir / HISTORY_FILE).resolve())

    @property
    def relay_endpoint(self) -> RelayEndpoint | None:
        if self._processes and self.connection_file.exists():
            try:  # the relay process publishes itself there (cli/relay.py)
                return ConnectionInfo.load(self.connection_file).relay
            except SessionError:
                return None
        if self.relay is None:
            return None
        return RelayEndpoint(jid=self.relay.jid, smtp_host=self.server.connect_host, smtp_port=self.relay.smtp_port,
                             ca_file=self.relay.certs.ca)

    @property
    def connection_file(self) -> Path:
        return self.data_dir / CONNECTION_FILE

    def provision(self) -> None:
        """Everything but running: the server's config and certificates, accounts, keys, pins,
        the fleet copy and the connection file. `gridpresence up --provision-only` stops here (a
        deployment whose server and bots run as processes, or containers, of their own)."""
        # A second `up` on a directory in use must change nothing there (ports, config, accounts).
        self.server.refuse_if_running_elsewhere()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.server.render()
        accounts = plan_accounts(self.fleet, self.secrets)
        provision(self.server.storage_path, self.fleet.domain, accounts)
        self.secrets.save()
        hosted = plan_hosted(self.fleet)
        if hosted:  # the component keeps hosted devices' subscriptions, as the server keeps accounts' rosters
            store = HostedStore(self.data_dir / HOSTING_FILE)
            try:
                store.seed({owner: [(c.jid, c.name, c.groups) for c in contacts] for owner, contacts in hosted.items()})
            finally:
                store.close()
        names = [*(a.username for a in accounts), *(d.name for d in self.fleet.devices if self.fleet.hosted(d.name))]
        for name in names:  # every party gets its OpenPGP key when it is provisioned
            self.keys.ensure(name, self.fleet.jid(name))
        self._pin_issuers()
        (self.data_dir / FLEET_COPY).write_text(self.fleet.model_dump_json(indent=1, exclude_defaults=True))
        self._write_connection()

    async def start(self) -> None:
        self.provision()
        await self.server.start()
        self._supervisor = asyncio.ensure_future(self._supervise())
        self._hung_watch = asyncio.ensure_future(self._watch_hung())
        try:
            if self._want_dashboard:  # in this process in both modes: it reads the historian's store
                await self._start_dashboard()
            if self._processes:
                self._write_connection()
                if self._want_bots:
                    await self._start_children()
                return
            if self._want_bots:
                self.bots = FleetBots(self.fleet, self.endpoint, self.secrets, only=self._only, tick_s=self._tick_s,
                                      data_dir=self.data_dir, history=self._history)
                await self.bots.connect_link()  # before the relay: see _start_relay
                if self._only is None or RELAY in self._only:
                    await self._start_relay()
            self._write_connection()
            if self.bots is not None:
                await self.bots.start(progress=self._progress)
                await self._play_sites()
        except BaseException:
            await self.stop()
            raise

    async def _start_children(self) -> None:
        """The devices first, then the relay (it publishes itself in the connection file), then
        the services; each a `gridpresence` process of its own, supervised. The devices' process
        holds the hosted devices' component link: a relay logging in before it is up has its
        presence and probes to them bounced (see _start_relay); after it, its probes are
        answered by each device's last presence."""
        f, data = self.fleet, str(self.data_dir)
        wanted = set(self._only) if self._only is not None else None

        def chosen(names: list[str]) -> list[str]:
            return [n for n in names if wanted is None or n in wanted]

        verbose = ["-v"] if log.isEnabledFor(logging.INFO) else []
        devices = chosen([d.name for d in f.devices])
        services = chosen([WATCHDOG, CONSOLE, *(p.name for p in (*f.billing, *f.manufacturers))])
        plan = []
        if devices:
            plan.append(SupervisedChild("devices", gridpresence_argv(*verbose, "bots", "--data", data, "--only",
                                                                     *devices), ready="running",
                                        hung_after_s=self._hung_after_s, progress=self._progress))
        if chosen([RELAY]):
            plan.append(SupervisedChild("relay", gridpresence_argv(*verbose, "relay", "--data", data,
                                                                   "--bind", self._bind), ready="relay up",
                                        hung_after_s=self._hung_after_s))
        if services:
            plan.append(SupervisedChild("services", gridpresence_argv(*verbose, "bots", "--data", data,
                                                                      "--only", *services), ready="running",
                                        hung_after_s=self._hung_after_s, progress=self._progress))
        for ref in f.sites:  # a simulated site's IEDs and their gateway: one process per site, as in-process
            if ref.simulate:
                plan.append(SupervisedChild(f"gateway-{ref.path.stem}", gridpresence_argv(
                    *verbose, "gateway", str(ref.path), "--data", data, "--simulate"), ready="gateway up",
                    hung_after_s=self._hung_after_s))
        for child in plan:
            self.children.append(child)
            await child.start()

    @property
    def simulated_ieds(self) -> tuple[str, ...]:
        """The IEDs of the sites the grid plays and hosts itself (``[[sites]] simulate = true``), in
        this process or, under ``--processes``, in a child of their own."""
        if not self._want_bots:
            return ()
        return tuple(ied.name for ref in self.fleet.sites if ref.simulate for ied in load_site(ref.path).ieds)

    async def _play_sites(self) -> None:
        """Each ``simulate`` site in this process: its Modbus IEDs as real Modbus servers, then
        its gateway (under ``--processes`` each is a child of its own: :meth:`_start_children`)."""
        for ref in self.fleet.sites:
            if ref.simulate:
                site = load_site(ref.path)
                sim = await play_site(site)
                gateway = Gateway(site, self.fleet, self.endpoint, self.secrets, data_dir=self.data_dir)
                self.sites.append((sim, gateway))  # stop() stops both, whatever happens next
                await gateway.start()

    def _pin_issuers(self) -> None:
        """Devices get the keys of every party that may command them pinned at provisioning,
        not on first use: an operator account taken over with a key of the thief's is refused
        even by a device that never heard from that operator before. Operators get the billing
        parties' keys pinned likewise."""
        f = self.fleet
        issuers = [p.name for p in (*f.operators, *f.billing, *f.manufacturers)] + [CONSOLE]
        issuer_keys = {f.jid(name): self.keys.secret(name) for name in issuers}
        pins = {jid: fingerprint(key) for jid, key in issuer_keys.items()}
        for dev in self.fleet.devices:
            PinStore(PartyKeys.in_data_dir(self.data_dir, dev.name).pins_file).provision(pins)
        # ...and their public keys handed over with the pins, so no device asks for them.
        vouched = PartyKeys.in_data_dir(self.data_dir, CONSOLE).vouched_dir
        assert vouched is not None
        for jid, key in issuer_keys.items():
            vouch(vouched, jid, key)
        # Operators take prices only signed by billing: its key is pinned for them the same way.
        billing = {f.jid(b.name): pins[f.jid(b.name)] for b in f.billing}
        for op in f.operators:
            PinStore(PartyKeys.beside(self.keys.secret_path(op.name), op.name).pins_file).provision(billing)

    async def _start_relay(self) -> None:
        """The store-and-forward relay, before the devices log in so it sees them arrive, but
        after the hosted devices' component link is up: its login sends every device it watches
        its presence and a probe, which Prosody bounces, two lines of its log each, for hosted
        ones while no component is connected. A hosted device tells it it is there at its login
        (its first presence goes to every subscriber)."""
        queue_path, _ = relay_files(self.data_dir)
        port = relay_port(self.data_dir, self._bind)
        self.relay = RelayService(self.fleet, self.endpoint, self.secrets.password(RELAY), queue_path,
                                  certs_dir=self.server.certs.ca.parent,
                                  smtp_host=self._bind, smtp_port=port, keys=PartyKeys.in_data_dir(self.data_dir, RELAY))
        await self.relay.start()

    async def _start_dashboard(self) -> None:
        """The operators' web page, on HTTPS with a certificate from the grid's own CA."""
        cert = ensure_certificates(self.server.certs.ca.parent, self.fleet.domain, cert_ips(self._bind),
                                   service="dashboard")
        passwords = {o.name: self.secrets.password(o.name) for o in self.fleet.operators}
        self.dashboard = Dashboard(self.fleet, lambda: self.connection, passwords, self.history_url,
                                   (str(cert.cert), str(cert.key)), bind=self._bind, port=self._dashboard_port,
                                   record_outcome=self._record_outcome)
        await self.dashboard.start()

    def _record_outcome(self, name: str, action: str, outcome: Outcome) -> None:
        if self.bots is not None and self.bots.historian is not None:
            self.bots.historian.on_outcome(name, action, outcome)

    def _write_connection(self) -> None:
        data = self.connection.model_dump(mode="json")
        data["server"]["port"] = self.server.ports.c2s  # the name a person looks for
        tmp = self.connection_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.connection_file)

    async def _supervise(self) -> None:
        """Prosody is restarted at once, on the same config and ports, whenever it dies; every
        party reconnects by itself (xmpp/reconnect.py)."""
        while True:
            status = await self.server.wait_exit()
            if status is None:
                return  # stopped on purpose
            died = time.monotonic()
            log.error("Prosody exited (status %s); restarting it with the same config. End of %s:\n%s",
                      status, self.server.log_path, self.server.log_tail(5))
            attempt = 0
            self._restarting = True
            try:
                while True:
                    attempt += 1
                    try:
                        await self.server.start(keep_ports=True)
                        break
                    except ServerError as exc:
                        delay = backoff_delay(attempt)
                        log.error("Prosody restart %d failed (%s); again in %.1f s", attempt, exc, delay)
                        await asyncio.sleep(delay)
            finally:
                self._restarting = False
            took = time.monotonic() - died
            self.server_restarts.append(took)
            log.warning("Prosody is back after %.2f s (restart %d)", took, len(self.server_restarts))

    async def _watch_hung(self) -> None:
        """Kill a Prosody that runs but no longer answers; `_supervise` then restarts it."""
        missed = 0
        while True:
            every_s, probes = HUNG_PROBE_S, HUNG_PROBES  # read each time: tests shorten them
            await asyncio.sleep(every_s)
            if self._restarting or not self.server.running:
                missed = 0
                continue
            if await self.server.answers(timeout=every_s):
                missed = 0
                continue
            missed += 1
            log.warning("Prosody did not answer a probe within %.0f s (%d of %d)", every_s, missed, probes)
            if missed >= probes and not self._restarting:
                self.hung_kills += 1
                log.error("Prosody is running but hung (no answer for %d probes); killing it to restart it", missed)
                self.server.kill()
                missed = 0

    async def stop(self) -> None:
        if self._hung_watch is not None:
            self._hung_watch.cancel()
            self._hung_watch = None
        if self._supervisor is not None:
            self._supervisor.cancel()
            self._supervisor = None
        for child in reversed(self.children):
            await child.stop()
        self.children = []
        for sim, gateway in reversed(self.sites):  # goodbyes first, then the IEDs go
            await gateway.stop()
            if sim is not None:
                await sim.stop()
        self.sites = []
        if self.dashboard is not None:
            await self.dashboard.stop()
            self.dashboard = None
        if self.bots is not None:
            await self.bots.stop()
            self.bots = None
        if self.relay is not None:
            await self.relay.stop()
            self.relay = None
        await self.server.stop()

    async def __aenter__(self) -> Grid:
        await self.start()
        return self

    async def __aexit__(self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]) -> None:
        await self.stop()
