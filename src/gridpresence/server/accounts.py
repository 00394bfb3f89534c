"""From a fleet to XMPP accounts: passwords that survive restarts, and who is in whose roster.

Rosters are what make presence flow: operators and the watchdog see every device; a device
sees the operators, the watchdog, its parent and its children; billing sees the operators.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

from gridpresence.protocol import roster as roles
from gridpresence.config import DeviceSpec, Fleet
from gridpresence.protocol.models import DeviceKind
from gridpresence.server.provision import AccountSpec, RosterEntry

WATCHDOG = "watchdog"
RELAY = "relay"  # the store-and-forward relay (gridpresence.services.relay): sees every device, relays commands
CONSOLE = "console"  # the fleet console bot operators chat with (services/console.py)


class Secrets:
    """Account passwords in ``DIR/secrets.json`` (mode 0600); a second `up` reuses them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.passwords: dict[str, str] = {}
        if path.exists():
            self.passwords = json.loads(path.read_text(encoding="utf-8"))

    def password(self, name: str) -> str:
        if name not in self.passwords:
            self.passwords[name] = secrets.token_urlsafe(18)
        return self.passwords[name]

    def save(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.passwords, fh, indent=1, sort_keys=True)
        os.replace(tmp, self.path)


def _device_entry(fleet: Fleet, dev: DeviceSpec) -> RosterEntry:
    return RosterEntry(jid=fleet.jid(dev.name), name=dev.label, groups=(roles.DEVICE_GROUPS[dev.kind],))


def _master_kin(fleet: Fleet, dev: DeviceSpec) -> list[DeviceSpec]:
    """A master IED follows its whole tree's presence ([00146]): it sees every device below it,
    and every device sees the masters above it."""
    if dev.kind is DeviceKind.MASTER:
        return list(fleet.descendants(dev.name))
    above, node = [], dev
    while node.parent is not None:
        node = fleet.device(node.parent)
        if node.kind is DeviceKind.MASTER:
            above.append(node)
    return above


def plan_accounts(fleet: Fleet, passwords: Secrets) -> list[AccountSpec]:
    """Every account the fleet needs, with its roster."""
    ops = [RosterEntry(jid=fleet.jid(o.name), name=o.label, groups=(roles.OPERATORS,)) for o in fleet.operators]
    billing = [RosterEntry(jid=fleet.jid(b.name), name=b.label, groups=(roles.BILLING,)) for b in fleet.billing]
    makers = [RosterEntry(jid=fleet.jid(m.name), name=m.label, groups=(roles.MANUFACTURERS,)) for m in fleet.manufacturers]
    watchdog = RosterEntry(jid=fleet.jid(WATCHDOG), name="Presence watchdog", groups=(roles.SERVICES,))
    relay = RosterEntry(jid=fleet.jid(RELAY), name="Store-and-forward relay", groups=(roles.SERVICES,))
    devices = [_device_entry(fleet, d) for d in fleet.devices]
    console = RosterEntry(jid=fleet.jid(CONSOLE), name="Fleet console", groups=(roles.SERVICES,))

    accounts: list[AccountSpec] = []
    for op in fleet.operators:
        others = [e for e in ops if e.jid != fleet.jid(op.name)]
        accounts.append(AccountSpec(op.name, passwords.password(op.name),
                                    tuple([*devices, *others, *billing, *makers, watchdog, relay, console])))
    for bill in fleet.billing:
        accounts.append(AccountSpec(bill.name, passwords.password(bill.name), tuple(ops)))
    # A manufacturer signs firmware offers that operators carry to devices; it sees the operators.
    for maker in fleet.manufacturers:
        accounts.append(AccountSpec(maker.name, passwords.password(maker.name), tuple(ops)))
    for customer in fleet.customers:  # reads its meters' billing parts; sees no one's presence
        accounts.append(AccountSpec(customer.name, passwords.password(customer.name), ()))
    accounts.append(AccountSpec(WATCHDOG, passwords.password(WATCHDOG), tuple([*devices, *ops])))
    accounts.append(AccountSpec(RELAY, passwords.password(RELAY), tuple([*devices, *ops])))
    accounts.append(AccountSpec(CONSOLE, passwords.password(CONSOLE), tuple([*devices, *ops, watchdog])))
    for dev in fleet.devices:
        if not fleet.hosted(dev.name):  # a hosted device's contacts are the component's (plan_hosted)
            accounts.append(AccountSpec(dev.name, passwords.password(dev.name),
                                        _device_contacts(fleet, dev, [*ops, watchdog, relay, console])))
    return accounts


def plan_hosted(fleet: Fleet) -> dict[str, tuple[RosterEntry, ...]]:
    """Hosted devices (no server account): bare JID -> the contacts the component keeps for
    it, the same a c2s device's server roster holds."""
    parties = [*(RosterEntry(jid=fleet.jid(o.name), name=o.label, groups=(roles.OPERATORS,)) for o in fleet.operators),
               RosterEntry(jid=fleet.jid(WATCHDOG), name="Presence watchdog", groups=(roles.SERVICES,)),
               RosterEntry(jid=fleet.jid(RELAY), name="Store-and-forward relay", groups=(roles.SERVICES,)),
               RosterEntry(jid=fleet.jid(CONSOLE), name="Fleet console", groups=(roles.SERVICES,))]
    return {fleet.jid(d.name): _device_contacts(fleet, d, parties) for d in fleet.devices if fleet.hosted(d.name)}


def _device_contacts(fleet: Fleet, dev: DeviceSpec, parties: list[RosterEntry]) -> tuple[RosterEntry, ...]:
    """A device sees the operators and services, its parent, its children and its masters."""
    kin = [fleet.device(dev.parent)] if dev.parent else []
    kin += list(fleet.children(dev.name))
    kin += [d for d in _master_kin(fleet, dev) if d not in kin]
    return tuple([*parties, *(_device_entry(fleet, k) for k in kin)])
