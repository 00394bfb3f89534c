"""The fleet file: who is on the grid network (operators, billing, devices) and how they relate.

A fleet file is TOML, validated with pydantic; every error names the field, e.g.
``devices[3].rated_kw: Input should be greater than 0``.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gridpresence.rules.settings import AlarmSettings
from gridpresence.protocol.models import DeviceKind, Tariff, TariffPeriod
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.reports import ReportAudience
from gridpresence.rules.model import RuleSetError, load_rules

# XMPP localparts we generate from names: keep them boring so every client can type them.
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,47}$")
RESERVED = frozenset({"watchdog", "relay", "console"})


class FleetError(ValueError):
    """A fleet file that cannot be used; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display_name: str = ""

    @field_validator("name")
    @classmethod
    def _name_shape(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError("must be lowercase letters, digits and '-', starting with a letter")
        if value in RESERVED:
            raise ValueError(f"'{value}' is reserved for a service account")
        return value

    @property
    def label(self) -> str:
        return self.display_name or self.name


class OperatorSpec(_Spec):
    """A utility operator: may command devices; duty order decides alarm escalation later."""


class BillingSpec(_Spec):
    """The billing party: sends tariffs and real-time prices to the utility ([00142])."""

    supplier: str = "utility-supply"
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    peak_price: float = Field(default=0.80, ge=0, allow_inf_nan=False)
    off_peak_price: float = Field(default=0.60, ge=0, allow_inf_nan=False)
    peak_start_hour: int = Field(default=6, ge=0, le=23)
    peak_end_hour: int = Field(default=18, ge=1, le=24)

    def tariff(self) -> Tariff:
        """Peak price between the peak hours, off-peak otherwise ([0093]: $0.80 6-18 h, $0.60)."""
        peak = TariffPeriod(start_hour=self.peak_start_hour, end_hour=self.peak_end_hour, price_per_kwh=self.peak_price)
        off = TariffPeriod(start_hour=self.peak_end_hour % 24, end_hour=self.peak_start_hour or 24,
                           price_per_kwh=self.off_peak_price)
        return Tariff(supplier=self.supplier, currency=self.currency, periods=(peak, off))


class ManufacturerSpec(_Spec):
    """A device manufacturer: signs firmware upgrade offers for the devices it made."""


def default_serial(name: str) -> str:
    """A device's serial number when the fleet file gives none: stable for a name, so a second
    `up` and every party computing it agree (``SN-`` and 12 hex digits of the name's SHA-256)."""
    return "SN-" + hashlib.sha256(name.encode()).hexdigest()[:12].upper()


class CustomerSpec(_Spec):
    """A customer of the utility: reads the billing part of its meters' reports ([0085]), nothing else."""


class DeviceSpec(_Spec):
    kind: DeviceKind
    # The serial number bound into every signed command for this device ([0045]).
    serial: str = Field(default="", pattern=r"^([A-Za-z0-9._:-]{1,64})?$")
    rated_kw: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    critical: bool = False
    parent: str | None = None
    refresh_s: float = Field(default=60.0, ge=0.2, le=86400, allow_inf_nan=False)
    # Generator: seconds in "starting" (restricted) before it is on ([00131]).
    startup_s: float = Field(default=10.0, ge=0, le=3600, allow_inf_nan=False)
    # Critical load: how long it stays restricted after refusing a shed.
    critical_hold_s: float = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)
    # Starting utilisation of a load/meter/breaker (0..1) or generator output share when on.
    utilisation: float = Field(default=0.6, ge=0, le=1.2, allow_inf_nan=False)
    initial_state: Annotated[str, Field(pattern="^(on|off)$")] | None = None
    # Meter or master IED: seconds between encrypted billing reports ([0085]), and the customer
    # (a [[customers]] name) who may read their billing part besides the billing party.
    billing_report_s: float = Field(default=3600.0, ge=1.0, le=31 * 86400, allow_inf_nan=False)
    customer: str | None = None

    @model_validator(mode="after")
    def _serial(self) -> DeviceSpec:
        if not self.serial:
            object.__setattr__(self, "serial", default_serial(self.name))
        return self


class RulesSpec(BaseModel):
    """``[rules]``: the rule set live devices run instead of the built-in alarms. A relative
    ``file`` is relative to the fleet file; the loaded fleet holds it resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: str = Field(min_length=1, max_length=4096)

    @property
    def path(self) -> Path:
        return Path(self.file)


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: str = Field(default="localhost", pattern=r"^[a-z0-9.-]{1,253}$")
    presence_grace_s: float = Field(default=15.0, gt=0, le=3600, allow_inf_nan=False)
    operators: tuple[OperatorSpec, ...] = Field(min_length=1)
    billing: tuple[BillingSpec, ...] = ()
    manufacturers: tuple[ManufacturerSpec, ...] = ()
    customers: tuple[CustomerSpec, ...] = ()
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)
    alarms: AlarmSettings = AlarmSettings()
    security: SecuritySettings = SecuritySettings()
    rules: RulesSpec | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        seen: set[str] = set()
        for party in (*self.operators, *self.billing, *self.manufacturers, *self.customers, *self.devices):
            if party.name in seen:
                raise ValueError(f"name '{party.name}' is used twice")
            seen.add(party.name)
        names = {d.name: d for d in self.devices}
        customers = {c.name for c in self.customers}
        for i, dev in enumerate(self.devices):
            if dev.customer is not None and dev.customer not in customers:
                raise ValueError(f"devices[{i}].customer: no customer named '{dev.customer}'")
            if dev.customer is not None and dev.kind not in (DeviceKind.METER, DeviceKind.MASTER):
                raise ValueError(f"devices[{i}].customer: only a meter or a master IED has a customer")
            if dev.parent is None:
                continue
            if dev.parent not in names:
                raise ValueError(f"devices[{i}].parent: no device named '{dev.parent}'")
            # Walk up the tree: a cycle would make branch sums loop forever.
            hops, node = 0, dev
            while node.parent is not None:
                node = names[node.parent]
                hops += 1
                if hops > len(names):
                    raise ValueError(f"devices[{i}].parent: '{dev.name}' is in a parent cycle")
        return self

    def device(self, name: str) -> DeviceSpec:
        for dev in self.devices:
            if dev.name == name:
                return dev
        raise KeyError(name)

    def report_audience(self, device: DeviceSpec) -> ReportAudience:
        """Who reads which part of `device`'s billing reports: billing parties and its customer
        the billing part, the operators the power-quality part ([0085])."""
        return ReportAudience(billing_parties=tuple(self.jid(b.name) for b in self.billing),
                              quality=tuple(self.jid(o.name) for o in self.operators),
                              customer=self.jid(device.customer) if device.customer else None)

    def children(self, name: str) -> tuple[DeviceSpec, ...]:
        return tuple(d for d in self.devices if d.parent == name)

    def descendants(self, name: str) -> tuple[DeviceSpec, ...]:
        out: list[DeviceSpec] = []
        for child in self.children(name):
            out.append(child)
            out.extend(self.descendants(child.name))
        return tuple(out)

    def jid(self, name: str) -> str:
        return f"{name}@{self.domain}"

    def roles(self) -> dict[str, Role]:
        """Bare JID -> the role its signed commands are judged by ([security] allow)."""
        out = {self.jid(p.name): Role.MANUFACTURER for p in self.manufacturers}
        out.update({self.jid(p.name): Role.BILLING for p in self.billing})
        out.update({self.jid(p.name): Role.OPERATOR for p in self.operators})
        return out


def _where(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "fleet"


def parse_fleet(data: dict[str, object], source: str = "fleet", base: Path | None = None) -> Fleet:
    """Validate a fleet; `base` is the fleet file's folder, for a relative ``[rules] file``."""
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as exc:
        lines = [f"{source}: {_where(e['loc'])}: {e['msg']}" for e in exc.errors()]
        raise FleetError("\n".join(lines)) from None
    return _with_rules(fleet, source, base)


def _with_rules(fleet: Fleet, source: str, base: Path | None) -> Fleet:
    """Resolve the rule-set file and check it now: a bad rule stops `up` before anything starts."""
    if fleet.rules is None:
        return fleet
    path = fleet.rules.path
    if not path.is_absolute() and base is not None:
        path = (base / path).resolve()
    try:
        load_rules(path)
    except RuleSetError as exc:
        raise FleetError(f"{source}: rules.file: {exc}") from None
    return fleet.model_copy(update={"rules": RulesSpec(file=str(path))})


def load_fleet(path: Path) -> Fleet:
    """Read and validate a fleet file (TOML, or the JSON copy `up` keeps in its data
    directory); raises :class:`FleetError` naming the field."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except FileNotFoundError:
        raise FleetError(f"{path}: no such fleet file") from None
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FleetError(f"{path}: not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") from None
    if not isinstance(data, dict):
        raise FleetError(f"{path}: a fleet file holds a table of settings")
    return parse_fleet(data, str(path), path.parent)
