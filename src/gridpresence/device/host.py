"""What a desk may use of its device, and what the fleet tells a device about its place in it.

A desk is one feature of a device bot (chat, ad-hoc commands, alarms, ...). It is built by the
device with the device itself as its only argument, typed as :class:`DeviceHost`: the members
below are everything a desk may touch. A desk registers its own stanza handlers when built and
finds the desks it works with through :meth:`DeviceHost.desk`, so no desk imports the device
class and the device imports desks only through the table in ``device.desks``.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar
from xml.etree import ElementTree as ET

from slixmpp import Presence

from gridpresence.config import DeviceSpec, Fleet
from gridpresence.physics import SimDevice
from gridpresence.physics.metering import PeakHours
from gridpresence.protocol.models import Command, Outcome, PresenceReport, Tariff
from gridpresence.rules.model import RuleSet
from gridpresence.rules.settings import AlarmSettings
from gridpresence.security.gate import CommandGate
from gridpresence.security.pep_keyring import PepKeyring
from gridpresence.security.policy import SecuritySettings
from gridpresence.security.replay import ReplayGuard
from gridpresence.security.reports import ReportAudience
from gridpresence.transport.policy import GridClient

D = TypeVar("D", bound="Desk")


class Desk(Protocol):
    """A feature of a device: built with the device, closed when the device stops."""

    def __init__(self, agent: DeviceHost) -> None: ...

    def close(self) -> None:
        """Stop timers and tasks; the session is still open (goodbyes may still be sent)."""


@dataclass(frozen=True)
class DeviceSetup:
    """The device's place in the fleet, as its desks need it (``host.fleet.device_agent`` fills it)."""

    duty: tuple[str, ...] = ()  # operators on alarm duty, in the fleet's order
    recorders: tuple[str, ...] = ()  # bare JIDs sent a copy of every alarm state and command outcome (the historian)
    # Bare JIDs that need only the device's availability and refreshes (the watchdog; the relays
    # count too): a hosted device leaves them out of a change of state (PROTOCOL.md).
    health_only: tuple[str, ...] = ()
    alarms: AlarmSettings = field(default_factory=AlarmSettings)
    rules: RuleSet | None = None  # the fleet's rule set (None: the built-in one for ``alarms``)
    audit: Path | None = None  # where threshold changes are journalled (None: memory only)
    operated: Path | None = None  # where what operators set is kept over restarts (None: memory only)
    billing: tuple[str, ...] = ()  # billing parties' bare JIDs: the only senders of prices
    tariff: Tariff | None = None  # the fleet file's tariff, until billing sends its own
    parent: str | None = None  # the branch above, whose faults fold this device's
    audience: ReportAudience | None = None  # metering devices: who reads which part of a report
    peak: PeakHours = field(default_factory=PeakHours)
    fleet: Fleet | None = None  # master IEDs: the branch tree they watch


class DeviceHost(Protocol):
    """The device as its desks see it."""

    spec: DeviceSpec
    setup: DeviceSetup
    client: GridClient
    sim: SimDevice
    gate: CommandGate
    keyring: PepKeyring
    security: SecuritySettings
    replay: ReplayGuard
    operators: frozenset[str]  # bare JIDs that may chat with and command the device

    @property
    def jid(self) -> str: ...

    @property
    def stopping(self) -> bool:
        """True once the device is leaving: desks start nothing new."""

    def desk(self, kind: type[D]) -> D:
        """This device's desk of that class (KeyError if its kind has none)."""

    def has_desk(self, kind: type[Desk]) -> bool: ...

    async def accept(self, cmd: Command, now: dt.datetime, *, signed: bool = False) -> Outcome:
        """The one path for an authorised command: replay guard, expiry, then the physics
        (awaited: a real IED behind a gateway answers when its read-back confirms)."""

    def publish(self, force: bool = True) -> PresenceReport | None: ...

    def take_presence_of(self, jids: Iterable[str], intake: Callable[[str, ET.Element], None],
                         slow_way: Callable[[Presence], None]) -> None:
        """``intake(bare, xml)`` for the presence of devices below, straight from the XML where the
        session can; ``slow_way`` (a "presence" handler calling ``intake``) otherwise."""

    def current_report(self) -> PresenceReport | None: ...

