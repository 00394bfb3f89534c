"""slixmpp stanza plugins for the grid payloads, so handlers match them the slixmpp way
(``StanzaPath('message/grid_command')``). The XML itself is read and written by
:mod:`gridpresence.protocol.codec`; these classes only name the elements."""

from __future__ import annotations

from slixmpp import Iq, Message, Presence
from slixmpp.plugins.xep_0059.stanza import Set
from slixmpp.xmlstream import ElementBase, register_stanza_plugin

from gridpresence.protocol.models import NS


class GridDevice(ElementBase):
    name = "device"
    namespace = NS
    plugin_attrib = "grid_device"


class GridCommand(ElementBase):
    name = "command"
    namespace = NS
    plugin_attrib = "grid_command"


class GridOutcome(ElementBase):
    name = "outcome"
    namespace = NS
    plugin_attrib = "grid_outcome"


class GridOutcomeRecord(ElementBase):
    name = "outcome-record"
    namespace = NS
    plugin_attrib = "grid_outcome_record"


class GridOutcomeRecords(ElementBase):
    """A batch of records from a device host's domain (xmpp/component.py send_batched)."""

    name = "outcome-records"
    namespace = NS
    plugin_attrib = "grid_outcome_records"


class GridTariff(ElementBase):
    name = "tariff"
    namespace = NS
    plugin_attrib = "grid_tariff"


# The most <health/> elements in one fleet-health result: ~130 bytes each (a 300-character
# reason makes ~450), so a page stays well below Prosody's 256 KiB c2s stanza limit, which
# the watchdog's one answer for the whole fleet passed at ~2,600 devices.
FLEET_HEALTH_PAGE = 500


class GridHealthQuery(ElementBase):
    """``<fleet-health/>`` in an iq get; the result holds one ``<health/>`` per device of a page,
    the devices in the order of their bare JIDs, paged with XEP-0059 (``query["rsm"]``,
    :mod:`gridpresence.protocol.paging`)."""

    name = "fleet-health"
    namespace = NS
    plugin_attrib = "grid_fleet_health"


_registered = False


def register() -> None:
    """Register the grid stanza plugins once per process."""
    global _registered
    if _registered:
        return
    register_stanza_plugin(Presence, GridDevice)
    register_stanza_plugin(Message, GridDevice)
    register_stanza_plugin(Message, GridCommand)
    register_stanza_plugin(Message, GridOutcome)
    register_stanza_plugin(Message, GridOutcomeRecord)
    register_stanza_plugin(Message, GridOutcomeRecords)
    register_stanza_plugin(Message, GridTariff)
    register_stanza_plugin(Iq, GridHealthQuery)
    register_stanza_plugin(GridHealthQuery, Set)
    _registered = True
