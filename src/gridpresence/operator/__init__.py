"""The operator library: what a utility's scripts, the CLI and the fleet console use to watch the
grid and act on it. This package's ``__all__`` is the public API for scripts::

    from gridpresence.operator import GridOperator, ConnectionInfo

    async with GridOperator.from_connection(ConnectionInfo.load(path)) as grid:
        outcome = await grid.command("load-1", "shed")

Inside: ``library`` (GridOperator: sessions, signed commands, outcomes), ``tracker`` (every
device's view from presence), ``issuer`` (one outcome per command), ``availability``,
``shedding`` (the load-shed plan), ``selection`` (filters and summaries at fleet size), ``firmware`` (upgrade campaigns), ``reports`` (reading billing
reports), ``relay_route`` (commands by mail to the relay). May import: protocol, words, security,
rules, config, physics, transport, xmpp, server (never the device package).
"""

from gridpresence.operator.availability import available, command_group, command_when_available, wait_available
from gridpresence.operator.firmware import FirmwareCampaign, upgrade_firmware
from gridpresence.operator.library import GridOperator, UnknownDevice
from gridpresence.operator.selection import DeviceFilter, FilterError, FleetSummary
from gridpresence.operator.shedding import net_load_kw, shed_to_target, sheddable
from gridpresence.operator.tracker import DeviceChange, DeviceView, PresenceTracker
from gridpresence.xmpp.session import ConnectionInfo, SessionError

__all__ = [
    "ConnectionInfo",
    "DeviceChange",
    "DeviceFilter",
    "DeviceView",
    "FilterError",
    "FirmwareCampaign",
    "FleetSummary",
    "GridOperator",
    "PresenceTracker",
    "SessionError",
    "UnknownDevice",
    "available",
    "command_group",
    "command_when_available",
    "net_load_kw",
    "shed_to_target",
    "sheddable",
    "upgrade_firmware",
    "wait_available",
]
