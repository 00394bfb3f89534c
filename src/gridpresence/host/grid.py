"""The whole grid network on the embedded server: what ``gridpresence up`` runs, and what the
tests start. Server, accounts, connection file and bots come up and go down together."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Collection
from pathlib import Path
from types import TracebackType

from gridpresence.server.accounts import CONSOLE, RELAY, WATCHDOG, Secrets, plan_accounts
from gridpresence.host.fleet import FleetBots
from gridpresence.xmpp.session import Account, ConnectionInfo, Endpoint, RelayEndpoint
from gridpresence.config import Fleet, FleetError
from gridpresence.services.relay.service import RelayService, relay_files, relay_port
from gridpresence.security.keys import KEYS_DIR, KeyStore, fingerprint
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.security.pins import PinStore
from gridpresence.server import ProsodyServer, ServerPorts, provision

log = logging.getLogger(__name__)

CONNECTION_FILE = "connection.json"
SECRETS_FILE = "secrets.json"
FLEET_COPY = "fleet.json"  # the fleet this directory runs, for `gridpresence bots`


class Grid:
    """`only` limits the bots to those names; `without` holds back some devices' bots (their
    accounts are provisioned all the same: they can be run apart later, or stay absent)."""

    def __init__(self, fleet: Fleet, data_dir: Path, *, bind: str = "127.0.0.1", ports: ServerPorts | None = None,
                 bots: bool = True, only: Collection[str] | None = None, without: Collection[str] = (),
                 tick_s: float = 1.0, prosody_bin: str = "prosody", log_level: str = "info",
                 advertise: str | None = None) -> None:
        self.fleet = fleet
        self.data_dir = Path(data_dir)
        unknown = sorted(set(without) - {d.name for d in fleet.devices})
        if unknown:
            raise FleetError(f"cannot hold back {', '.join(repr(n) for n in unknown)}: no such device in the fleet")
        if without:
            everyone = [*(p.name for p in (*fleet.devices, *fleet.billing, *fleet.manufacturers)), WATCHDOG, RELAY,
                        CONSOLE]
            only = [n for n in (everyone if only is None else only) if n not in set(without)]
        self.server = ProsodyServer(self.data_dir, domain=fleet.domain, bind=bind, ports=ports, prosody_bin=prosody_bin,
                                    log_level=log_level, adhoc_accounts=[d.name for d in fleet.devices],
                                    advertise=advertise)
        self.secrets = Secrets(self.data_dir / SECRETS_FILE)
        self.keys = KeyStore(self.data_dir / KEYS_DIR)
        self._want_bots = bots
        self._only = only
        self._tick_s = tick_s
        self.bots: FleetBots | None = None
        self.relay: RelayService | None = None
        self._bind = bind

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint(host=self.server.connect_host, c2s_port=self.server.ports.c2s, domain=self.fleet.domain,
                        ca_file=self.server.certs.ca, bosh_url=self.server.bosh_url, web_url=self.server.web_url)

    @property
    def connection(self) -> ConnectionInfo:
        ops = tuple(Account(name=o.name, jid=self.fleet.jid(o.name), password=self.secrets.password(o.name),
                            key_file=str(self.keys.secret_path(o.name)))
                    for o in self.fleet.operators)
        return ConnectionInfo(server=self.endpoint, operators=ops, watchdog=self.fleet.jid(WATCHDOG),
                              billing=tuple(self.fleet.jid(b.name) for b in self.fleet.billing),
                              presence_grace_s=self.fleet.presence_grace_s, relay=self.relay_endpoint,
                              serials={self.fleet.jid(d.name): d.serial for d in self.fleet.devices})

    @property
    def relay_endpoint(self) -> RelayEndpoint | None:
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
        for account in accounts:  # every party gets its OpenPGP key when it is provisioned
            self.keys.ensure(account.username, self.fleet.jid(account.username))
        self._pin_issuers()
        (self.data_dir / FLEET_COPY).write_text(self.fleet.model_dump_json(indent=1, exclude_defaults=True))
        self._write_connection()

    async def start(self) -> None:
        self.provision()
        await self.server.start()
        try:
            if self._want_bots and (self._only is None or RELAY in self._only):
                await self._start_relay()
            self._write_connection()
            if self._want_bots:
                self.bots = FleetBots(self.fleet, self.endpoint, self.secrets, only=self._only, tick_s=self._tick_s,
                                      data_dir=self.data_dir)
                await self.bots.start()
        except BaseException:
            await self.stop()
            raise

    def _pin_issuers(self) -> None:
        """Devices get the keys of every party that may command them pinned at provisioning,
        not on first use: an operator account taken over with a key of the thief's is refused
        even by a device that never heard from that operator before. Operators get the billing
        parties' keys pinned likewise."""
        f = self.fleet
        issuers = [p.name for p in (*f.operators, *f.billing, *f.manufacturers)] + [CONSOLE]
        pins = {f.jid(name): fingerprint(self.keys.secret(name)) for name in issuers}
        for dev in self.fleet.devices:
            PinStore(PartyKeys.in_data_dir(self.data_dir, dev.name).pins_file).provision(pins)
        # Operators take prices only signed by billing: its key is pinned for them the same way.
        billing = {f.jid(b.name): pins[f.jid(b.name)] for b in f.billing}
        for op in f.operators:
            PinStore(PartyKeys.beside(self.keys.secret_path(op.name), op.name).pins_file).provision(billing)

    async def _start_relay(self) -> None:
        """The store-and-forward relay, before the devices so it sees them arrive."""
        queue_path, _ = relay_files(self.data_dir)
        port = relay_port(self.data_dir, self._bind)
        self.relay = RelayService(self.fleet, self.endpoint, self.secrets.password(RELAY), queue_path,
                                  certs_dir=self.server.certs.ca.parent,
                                  smtp_host=self._bind, smtp_port=port, keys=PartyKeys.in_data_dir(self.data_dir, RELAY))
        await self.relay.start()

    def _write_connection(self) -> None:
        data = self.connection.model_dump(mode="json")
        data["server"]["port"] = self.server.ports.c2s  # the name a person looks for
        tmp = self.connection_file.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds passwords
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, self.connection_file)

    async def stop(self) -> None:
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
