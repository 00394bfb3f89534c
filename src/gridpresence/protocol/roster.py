"""Roster groups: how a party's role shows in every contact list.

Provisioning writes them; the operator library reads them to tell devices from people;
ordinary chat clients show them as folders ("Loads", "Generators", "Operators", ...).
"""

from __future__ import annotations

from collections.abc import Iterable

from gridpresence.protocol.models import DeviceKind

OPERATORS = "Operators"
BILLING = "Billing"
MANUFACTURERS = "Manufacturers"
SERVICES = "Services"

DEVICE_GROUPS: dict[DeviceKind, str] = {
    DeviceKind.LOAD: "Loads",
    DeviceKind.GENERATOR: "Generators",
    DeviceKind.METER: "Meters",
    DeviceKind.BREAKER: "Breakers",
    DeviceKind.MASTER: "Master IEDs",
}
_KIND_BY_GROUP = {group: kind for kind, group in DEVICE_GROUPS.items()}


def device_kind(groups: Iterable[str]) -> DeviceKind | None:
    """The device kind a roster entry's groups name, or None for a person or service."""
    for group in groups:
        if group in _KIND_BY_GROUP:
            return _KIND_BY_GROUP[group]
    return None
