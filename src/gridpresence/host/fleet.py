"""Hosts a fleet's bots — devices, billing, watchdog — in one process and one event loop.

A thousand device identities are a thousand light XMPP sessions here, not a thousand processes;
they log in a few at a time so the server is not hit by one thundering herd.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Protocol, cast

from gridpresence.server.accounts import CONSOLE, RELAY, WATCHDOG, Secrets
from gridpresence.services.billing import BillingAgent
from gridpresence.services.console import ConsoleAgent
from gridpresence.protocol.models import METERING_KINDS
from gridpresence.physics import SimDevice
from gridpresence.physics.metering import peak_hours
from gridpresence.device.agent import DeviceAgent
from gridpresence.device.host import DeviceSetup
from gridpresence.device.operated import state_path
from gridpresence.services.historian import HISTORY_FILE, Historian, open_store
from gridpresence.services.manufacturer import ManufacturerAgent
from gridpresence.xmpp.component import COMPONENT_SECRET, HOSTING_FILE, ComponentLink, HostedStore
from gridpresence.xmpp.session import Endpoint, SessionError
from gridpresence.host.processes import PROGRESS_MARK
from gridpresence.transport.policy import GridClient
from gridpresence.services.watchdog import WatchdogAgent
from gridpresence.config import Fleet
from gridpresence.rules.audit_log import audit_path
from gridpresence.rules.model import RuleSet, rules_for
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.policy import Role
from gridpresence.security.replay import REPLAY_FILE, ReplayStore

log = logging.getLogger(__name__)

YOUNG_GC_THRESHOLD = 20_000  # allocations between collections of the youngest generation

LOGIN_CONCURRENCY = 16

# Bots built, or logged in, between two freezes of every object alive (see settle_gc).
FREEZE_EVERY = 256


class _GcSettler:
    """Keeps the cyclic GC from re-scanning the bots already built while thousands more are.

    Each full collection scans every tracked object: bringing up 2,000 hosted identities spent
    7 s of 23 in the GC, and more per identity the more there are. Every FREEZE_EVERY bots, what
    exists is frozen, so later collections scan the newest bots only. What is frozen is never
    collected: it is the bots themselves, which live as long as the process. It is frozen
    without a collection first: building and logging in 2,000 hosted identities leaves 16
    unreachable objects in all, and the 16 collections that found them cost 1.3 s of CPU
    (0.6 ms per identity, an eighth of the bring-up)."""

    def __init__(self) -> None:
        self.count = 0
        # Fewer collections of the youngest generation while thousands of objects are made.
        gc.set_threshold(YOUNG_GC_THRESHOLD, *gc.get_threshold()[1:])

    def tick(self) -> None:
        self.count += 1
        if self.count % FREEZE_EVERY == 0:
            gc.freeze()


class Bot(Protocol):
    @property
    def keyring(self) -> PepKeyring: ...
    async def login(self, timeout: float = 20.0) -> None: ...
    async def start(self, timeout: float = 20.0) -> None: ...
    async def stop(self) -> None: ...


LOGIN_STALL_S = 60.0  # a fleet's login fails only when no bot at all got in for this long
PROGRESS_EVERY_S = 5.0  # how often a long login says how far it is

Progress = Callable[[str], None]


async def log_in_all(bots: Iterable[Bot], stall_s: float = LOGIN_STALL_S, paced: Collection[Bot] = (),
                     settler: _GcSettler | None = None, progress: Progress | None = None) -> None:
    """Log bots in a few at a time (the server is not hit by one thundering herd), each
    announcing its key. A `paced` bot (a hosted identity) holds its place until its key is
    announced too: its login and announcement are work of this process alone, and thousands
    begun at once would starve each other's answers past their time-outs.

    No limit on the whole: ten thousand bots on a busy machine take what they take. It fails
    (SessionError, saying how far it got) only when no bot got in for `stall_s`. `progress`
    hears "N of M logged in" every PROGRESS_EVERY_S while it lasts."""
    bots = list(bots)
    gate = asyncio.Semaphore(LOGIN_CONCURRENCY)
    loop = asyncio.get_running_loop()
    done = 0
    last_in = loop.time()

    async def one(bot: Bot) -> None:
        nonlocal done, last_in
        async with gate:
            await bot.login()
            if bot in paced:
                await bot.keyring.announced()
            if settler is not None:
                settler.tick()
        done += 1
        last_in = loop.time()
        # Outside the gate: the next login need not wait for this key announcement's round trip.
        await bot.keyring.announced()

    everyone = asyncio.ensure_future(asyncio.gather(*(one(b) for b in bots)))
    said = loop.time()
    try:
        while not everyone.done():
            await asyncio.wait([everyone], timeout=min(PROGRESS_EVERY_S, stall_s))
            now = loop.time()
            if everyone.done():
                break
            if now - last_in >= stall_s:
                raise SessionError(f"logins stalled: {done} of {len(bots)} bots logged in, none in the last "
                                   f"{stall_s:g} s (is the server overloaded or unreachable?)")
            if progress is not None and now - said >= PROGRESS_EVERY_S:
                progress(f"{done} of {len(bots)} bots {PROGRESS_MARK}")
                said = now
        everyone.result()
    finally:
        if not everyone.done():
            everyone.cancel()
            await asyncio.gather(everyone, return_exceptions=True)


class FleetBots:
    """The bots of a fleet. `only` limits them to some names (e.g. to run one device apart);
    `data_dir` is where devices keep their threshold audit and replay guard, and every party its
    OpenPGP key."""

    def __init__(self, fleet: Fleet, endpoint: Endpoint, secrets: Secrets, only: Collection[str] | None = None,
                 tick_s: float = 1.0, with_services: bool = True, data_dir: Path | None = None,
                 history: str | None = None) -> None:
        self.fleet = fleet

        def keys(name: str) -> PartyKeys | None:
            """Each bot's key and pins in the grid's data directory (none: no key to announce)."""
            return PartyKeys.in_data_dir(data_dir, name) if data_dir is not None else None

        operators = [fleet.jid(o.name) for o in fleet.operators]
        # The devices' memory of commands taken, in the data directory so it outlives a restart.
        self.replay = ReplayStore(Path(data_dir) / REPLAY_FILE if data_dir is not None else None)
        wanted = set(only) if only is not None else None
        self.devices: dict[str, DeviceAgent] = {}
        self.billing: dict[str, BillingAgent] = {}
        self.manufacturers: dict[str, ManufacturerAgent] = {}
        self.watchdog: WatchdogAgent | None = None
        self.console: ConsoleAgent | None = None
        # One rule set, loaded once, shared by every device.
        self.rules = rules_for(fleet.rules.path if fleet.rules else None, fleet.alarms)
        # Hosted devices share one component connection (xmpp/component.py); the others log in
        # over c2s/BOSH, each with its own session (those that must cross a firewall).
        self.link: ComponentLink | None = None
        self._gc = _GcSettler()
        for dev in fleet.devices:
            if wanted is None or dev.name in wanted:
                client = None
                if fleet.hosted(dev.name):
                    client = cast(GridClient, self._link(fleet, endpoint, secrets, data_dir).client(fleet.jid(dev.name)))
                self.devices[dev.name] = device_agent(fleet, dev.name, endpoint, secrets.password(dev.name), keys(dev.name),
                                                      self.replay, tick_s=tick_s, rules=self.rules, data_dir=data_dir,
                                                      client=client)
                self._gc.tick()
        for bill in fleet.billing:
            if wanted is None or bill.name in wanted:
                self.billing[bill.name] = BillingAgent(bill, fleet.jid(bill.name), secrets.password(bill.name),
                                                       endpoint, operators, [fleet.jid(d.name) for d in fleet.devices],
                                                       keys=keys(bill.name), relays=[fleet.jid(RELAY)])
        for maker in fleet.manufacturers:
            if wanted is None or maker.name in wanted:
                self.manufacturers[maker.name] = ManufacturerAgent(maker, fleet.jid(maker.name),
                                                                   secrets.password(maker.name), endpoint,
                                                                   keys=keys(maker.name))
        if with_services and (wanted is None or WATCHDOG in wanted):
            self.watchdog = WatchdogAgent(fleet.jid(WATCHDOG), secrets.password(WATCHDOG), endpoint, operators,
                                          grace_s=fleet.presence_grace_s, keys=keys(WATCHDOG))

        if with_services and (wanted is None or CONSOLE in wanted):
            self.console = ConsoleAgent(fleet.jid(CONSOLE), secrets.password(CONSOLE), endpoint, operators,
                                        watchdog=fleet.jid(WATCHDOG), grace_s=fleet.presence_grace_s,
                                        keys=keys(CONSOLE), serials={fleet.jid(d.name): d.serial for d in fleet.devices},
                                        security=fleet.security)
        # The historian rides on the console's session: it already sees every device, gets the
        # alarms sent to services and the outcomes of the commands it issues. Its store: `history`
        # (a PostgreSQL URL or a file), else DATA/history.sqlite.
        self.historian: Historian | None = None
        if self.console is not None and (history is not None or data_dir is not None):
            self.historian = Historian(open_store(history or Path(data_dir) / HISTORY_FILE))  # type: ignore[arg-type]
            self.historian.attach(self.console.grid)

    def _link(self, fleet: Fleet, endpoint: Endpoint, secrets: Secrets, data_dir: Path | None) -> ComponentLink:
        if self.link is None:
            if endpoint.component_port is None:
                raise SessionError(f"the fleet hosts devices on {fleet.component_domain}, but the server has no "
                                   "component port (re-run `gridpresence up` to provision it)")
            store = HostedStore(Path(data_dir) / HOSTING_FILE if data_dir is not None else None)
            self.link = ComponentLink(fleet.component_domain, secrets.password(COMPONENT_SECRET), endpoint.host,
                                      endpoint.component_port, store)
        return self.link

    @property
    def bots(self) -> list[Bot]:
        # The watchdog first, so it sees every device arrive.
        return [*([self.watchdog] if self.watchdog else []), *self.billing.values(), *self.manufacturers.values(),
                *self.devices.values(),
                *([self.console] if self.console else [])]

    async def connect_link(self) -> None:
        """The component link of the hosted devices, up (once; nothing without hosted devices).
        Before any party that watches them logs in (the grid's relay): that login sends each
        one its presence and a probe, which the server bounces while no component is connected."""
        if self.link is not None and not self.link.online:
            await self.link.start()

    async def start(self, stall_s: float = LOGIN_STALL_S, progress: Progress | None = None) -> None:
        if self.historian is not None:
            self.historian.start()  # before the logins, so it records the fleet arriving
        await self.connect_link()  # hosted devices' sessions start when the link is up
        hosted = {d for name, d in self.devices.items() if self.fleet.hosted(name)}
        await log_in_all(self.bots, stall_s, paced=hosted, settler=self._gc, progress=progress)
        # Thousands of long-lived session objects now exist; keep the cyclic GC from
        # re-scanning them on every full collection (a third of a fan-out's time otherwise).
        gc.collect()
        gc.freeze()
        # A fan-out puts thousands of stanzas in flight at once; at the default threshold (700
        # allocations) each burst is promoted to the old generations and sets off full
        # collections of 50-100 ms here. Collecting the young less often keeps them young
        # (the device process of bench/fanout.py spent 4.5 s in GC over 50 fan-outs, now 1 s).
        # (Set from the bots' construction on, by _GcSettler.)

    async def stop(self) -> None:
        results = await asyncio.gather(*(b.stop() for b in self.bots), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                log.warning("a bot did not stop cleanly: %s", res)
        if self.link is not None:  # after the goodbyes the hosted devices sent over it
            await self.link.stop()
        if self.historian is not None:
            try:
                await self.historian.stop()  # after the bots: their goodbyes are recorded too
            except Exception as exc:
                log.warning("the historian did not write its last batch: %s", exc)
        self.replay.close()


def device_agent(fleet: Fleet, name: str, endpoint: Endpoint, password: str, keys: PartyKeys | None,
                 replay: ReplayStore | None = None, tick_s: float = 1.0, rules: RuleSet | None = None,
                 data_dir: Path | None = None, sim: SimDevice | None = None,
                 client: GridClient | None = None) -> DeviceAgent:
    """The bot of the fleet's device `name`, with the fleet's parties, roles, policy and rules;
    `sim` is the device behind it (default: its simulated physics; a gateway's: the real IED)."""
    spec = fleet.device(name)
    setup = DeviceSetup(
        alarms=fleet.alarms,
        rules=rules or rules_for(fleet.rules.path if fleet.rules else None, fleet.alarms),
        audit=audit_path(data_dir, name) if data_dir else None,
        operated=state_path(data_dir, name) if data_dir else None,
        billing=tuple(fleet.jid(b.name) for b in fleet.billing),
        # Devices rank faults at the billing party's price: its fleet-file tariff until it sends one.
        tariff=fleet.billing[0].tariff() if fleet.billing else None,
        parent=fleet.jid(spec.parent) if spec.parent else None,
        audience=fleet.report_audience(spec) if spec.kind in METERING_KINDS else None,
        peak=peak_hours(fleet),
        fleet=fleet,
        recorders=(fleet.jid(CONSOLE),),  # the historian rides on the console's session
        health_only=(fleet.jid(WATCHDOG),),
    )
    return DeviceAgent(spec, fleet.jid(name), password, endpoint, [fleet.jid(o.name) for o in fleet.operators],
                       [fleet.jid(c.name) for c in fleet.children(name)], tick_s=tick_s, relays=[fleet.jid(RELAY)],
                       services=[fleet.jid(CONSOLE)], keys=keys, setup=setup,
                       security=fleet.security, roles=issuer_roles(fleet), replay=replay, sim=sim,
                       client=client)


def issuer_roles(fleet: Fleet) -> dict[str, Role]:
    """Who signs as what: the fleet's parties, and the console acting for the operators."""
    return {**fleet.roles(), fleet.jid(CONSOLE): Role.OPERATOR}
