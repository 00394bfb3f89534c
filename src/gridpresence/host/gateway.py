"""The field gateway process: every IED of a site as its own device identity on the grid.

Each IED is a device bot (host/fleet.py ``device_agent``: the fleet's operators, roles, policy,
rules, keys and replay guard) whose physics is the real IED (gateway/field_device.py). Its
account is the grid's: a fleet names the site file in ``[[sites]]`` and ``gridpresence up``
provisions the IEDs like its devices; the gateway reads their passwords and keys from the
grid's data directory and reaches the server as bots do (c2s, or BOSH when only the web port
gets through).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from pathlib import Path

from gridpresence.config import Fleet
from gridpresence.device.agent import DeviceAgent
from gridpresence.gateway.field_device import FieldDevice, FieldIed, FieldLoop
from gridpresence.gateway.simulator import FieldSimulator, SimulatorError
from gridpresence.gateway.site import Site
from gridpresence.host.fleet import device_agent, log_in_all
from gridpresence.protocol.models import utcnow
from gridpresence.rules.model import rules_for
from gridpresence.security.pep_keyring import PartyKeys
from gridpresence.security.replay import REPLAY_FILE, ReplayStore
from gridpresence.server.accounts import Secrets
from gridpresence.xmpp.session import Endpoint

log = logging.getLogger(__name__)

GATEWAY_REPLAY_FILE = "gateway-" + REPLAY_FILE  # the gateway's own memory of commands taken


class GatewayError(RuntimeError):
    """A gateway that cannot start: the message says what to do."""


class Gateway:
    """The identities of a site's IEDs. ``fleet`` is the grid's (its copy in the data directory
    holds the site's IEDs once ``up`` has run with the site in ``[[sites]]``)."""

    def __init__(self, site: Site, fleet: Fleet, endpoint: Endpoint, secrets: Secrets,
                 data_dir: Path | None = None) -> None:
        self.site = site
        known = {d.name: d for d in fleet.devices}
        missing = [i.name for i in site.ieds if i.name not in known or i.name not in secrets.passwords]
        if missing:
            raise GatewayError(f"no account on the grid for {', '.join(missing)}: name the site file in the fleet's "
                               "[[sites]] (file = \"...\") and run `gridpresence up` again")
        for ied in site.ieds:
            if known[ied.name].kind is not ied.kind:
                raise GatewayError(f"{ied.name} is a {known[ied.name].kind.value} on the grid, the site says "
                                   f"{ied.kind.value}: run `gridpresence up` again with this site file")
        self.field_loop = FieldLoop()
        self.replay = ReplayStore(Path(data_dir) / GATEWAY_REPLAY_FILE if data_dir is not None else None)
        rules = rules_for(fleet.rules.path if fleet.rules else None, fleet.alarms)
        self.ieds: dict[str, FieldIed] = {}
        self.devices: dict[str, DeviceAgent] = {}
        now = utcnow()
        for ied in site.ieds:
            field = FieldIed(ied, site.map_for(ied))
            sim = FieldDevice(fleet.device(ied.name), field, self.field_loop, now)
            keys = PartyKeys.in_data_dir(data_dir, ied.name) if data_dir is not None else None
            self.ieds[ied.name] = field
            self.devices[ied.name] = device_agent(fleet, ied.name, endpoint, secrets.passwords[ied.name], keys,
                                                  self.replay, tick_s=ied.poll_s, rules=rules, data_dir=data_dir,
                                                  sim=sim)
        self._main: asyncio.AbstractEventLoop | None = None

    def _polled(self, name: str) -> None:
        """After a poll (on the bot's loop): a change reaches the operators now, not at the next tick."""
        agent = self.devices[name]
        if agent.stopping or not agent.client.is_connected():
            return
        agent.sim.tick(utcnow())
        agent.publish(force=False)

    async def start(self, timeout: float = 60.0) -> None:
        """Poll every IED once (so the first presence is its state), then log every identity in."""
        main = self._main = asyncio.get_running_loop()
        self.field_loop.start()
        first = [asyncio.wrap_future(self.field_loop.submit(f.poll())) for f in self.ieds.values()]
        await asyncio.wait_for(asyncio.gather(*first), timeout)
        for name, field in self.ieds.items():
            field.on_poll = functools.partial(main.call_soon_threadsafe, self._polled, name)
            self.field_loop.submit(field.run())
        await log_in_all(self.devices.values(), timeout)

    async def stop(self) -> None:
        """Goodbyes first (state "gone"), then the field links close."""
        results = await asyncio.gather(*(a.stop() for a in self.devices.values()), return_exceptions=True)
        for res in results:
            if isinstance(res, BaseException):
                log.warning("a gateway identity did not stop cleanly: %s", res)
        for field in self.ieds.values():
            field.on_poll = None
        await asyncio.to_thread(self.field_loop.stop)
        self.replay.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def play_site(site: Site) -> FieldSimulator | None:
    """A site the grid plays itself (``[[sites]] simulate = true``): its Modbus IEDs served by
    the field simulator, real Modbus servers its gateway then reads. One that cannot serve (its
    port taken) is logged, and the site comes up all the same: its IEDs show "no answer"."""
    sim = FieldSimulator(site)
    try:
        await sim.start()
    except SimulatorError as exc:
        log.error("the field simulator of %s did not start: %s", ", ".join(i.name for i in site.ieds), exc)
        return None
    return sim
