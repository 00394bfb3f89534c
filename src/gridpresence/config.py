"""The fleet file: who is on the grid network (operators, billing, devices) and how they relate.

A fleet file is TOML, validated with pydantic; every error names the field, and the party by
name, e.g. ``devices[3] (load-4).rated_kw: Input should be greater than 0``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import tomllib
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gridpresence.rules.settings import AlarmSettings
from gridpresence.protocol.models import DeviceKind, Tariff, TariffPeriod
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.reports import ReportAudience
from gridpresence.rules.model import RuleSetError, load_rules

# XMPP localparts we generate from names: keep them boring so every client can type them.
_NAME = re.compile(r"^[a-z][a-z0-9-]{0,47}$")
RESERVED = frozenset({"watchdog", "relay", "console"})
# One DNS label of the domain: letters, digits, '-' inside (RFC 1123), lowercase like our names.
_DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
# Code points XML 1.0 cannot carry (besides controls and surrogates): Prosody would refuse the
# roster or stanza holding them, and the client waiting for it would hang.
_NOT_XML = frozenset("\ufffe\uffff")


def _printable(value: str) -> str:
    """Free text that reaches the server (roster names, tariffs): no control characters."""
    for char in value:
        if unicodedata.category(char) in ("Cc", "Cs") or char in _NOT_XML:
            raise ValueError(f"must not contain control characters (found U+{ord(char):04X})")
    return value


def _hostname(value: str) -> str:
    """The XMPP domain: a host name (RFC 1123 labels; RFC 7622 domainpart), lowercase."""
    if len(value) > 253 or not all(_DNS_LABEL.match(label) for label in value.split(".")):
        raise ValueError("must be a host name: labels of lowercase letters, digits and '-' (not first or last), "
                         "1 to 63 characters each, separated by single dots")
    return value


# Free text a person reads in a client: printable, short enough for a roster line.
Text = Annotated[str, Field(max_length=200), AfterValidator(_printable)]


class FleetError(ValueError):
    """A fleet file that cannot be used; the message names the file and the field."""


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    display_name: Text = ""

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

    supplier: Text = "utility-supply"
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


Hosting = Literal["c2s", "component"]
COMPONENT_LABEL = "devices"  # hosted devices' JIDs are NAME@devices.DOMAIN


class DeviceSpec(_Spec):
    kind: DeviceKind
    # The serial number bound into every signed command for this device ([0045]).
    serial: str = Field(default="", pattern=r"^([A-Za-z0-9._:-]{1,64})?$")
    rated_kw: float = Field(gt=0, le=1e6, allow_inf_nan=False)
    critical: bool = False
    parent: str | None = None
    refresh_s: float = Field(default=60.0, ge=0.2, le=86400, allow_inf_nan=False)
    # Seconds between two passes of the device's physics and rules (its readings sampled, faults
    # checked, news told). None: the host's tick (1 s). Never longer than refresh_s.
    sample_s: float | None = Field(default=None, ge=0.05, le=3600, allow_inf_nan=False)
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
    # How the device's identity reaches the server: hosted on the fleet's component (many
    # identities over one connection, NAME@devices.DOMAIN) or a c2s/BOSH session of its own
    # (a device that must cross a firewall). None: the fleet's `hosting`.
    hosting: Hosting | None = None

    @model_validator(mode="after")
    def _sampled_within_refresh(self) -> DeviceSpec:
        if self.sample_s is not None and self.sample_s > self.refresh_s:
            raise ValueError(f"sample_s ({self.sample_s:g}) may not be longer than refresh_s ({self.refresh_s:g}): "
                             "a refresh tells the last sample")
        return self

    @model_validator(mode="after")
    def _serial(self) -> DeviceSpec:
        if not self.serial:
            object.__setattr__(self, "serial", default_serial(self.name))
        return self


class RulesSpec(BaseModel):
    """``[rules]``: the rule set live devices run instead of the built-in alarms. A relative
    ``file`` is relative to the fleet file; the loaded fleet holds it resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_printable)]

    @property
    def path(self) -> Path:
        return Path(self.file)


class SiteRef(BaseModel):
    """``[[sites]]``: a field gateway's site file (gateway/site.py), whose IEDs get accounts and
    roster entries like devices; their bots are the gateway's, not ``up``'s. A relative ``file``
    is relative to the fleet file; the loaded fleet holds it resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    file: Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_printable)]
    # The demo's site: `up` plays its Modbus IEDs with the field simulator (real pymodbus
    # servers on their links) and hosts its gateway itself, beside the bots.
    simulate: bool = False

    @property
    def path(self) -> Path:
        return Path(self.file)


class Fleet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    domain: Annotated[str, AfterValidator(_hostname)] = "localhost"
    presence_grace_s: float = Field(default=15.0, gt=0, le=3600, allow_inf_nan=False)
    operators: tuple[OperatorSpec, ...] = Field(min_length=1)
    billing: tuple[BillingSpec, ...] = ()
    manufacturers: tuple[ManufacturerSpec, ...] = ()
    customers: tuple[CustomerSpec, ...] = ()
    devices: tuple[DeviceSpec, ...] = Field(min_length=1)
    alarms: AlarmSettings = AlarmSettings()
    security: SecuritySettings = SecuritySettings()
    rules: RulesSpec | None = None
    sites: tuple[SiteRef, ...] = Field(default=(), max_length=100)
    # Devices' default way to the server (each device's own `hosting` wins): "component" hosts
    # them over one XEP-0114 connection as NAME@devices.DOMAIN; "c2s" gives each its own session.
    hosting: Hosting = "c2s"

    @model_validator(mode="after")
    def _consistent(self) -> Fleet:
        seen: dict[str, str] = {}
        groups = {"operators": self.operators, "billing": self.billing, "manufacturers": self.manufacturers,
                  "customers": self.customers, "devices": self.devices}
        for group, parties in groups.items():
            for i, party in enumerate(parties):
                where = f"{group}[{i}] ({party.name})"
                if party.name in seen:
                    raise ValueError(f"{where}.name: name '{party.name}' is used twice (also {seen[party.name]})")
                seen[party.name] = where
        serials: dict[str, str] = {}
        names = self._by_name()
        customers = {c.name for c in self.customers}
        for i, dev in enumerate(self.devices):
            where = f"devices[{i}] ({dev.name})"
            if dev.serial in serials:
                raise ValueError(f"{where}.serial: serial '{dev.serial}' is used twice (also {serials[dev.serial]})")
            serials[dev.serial] = where
            if dev.customer is not None and dev.customer not in customers:
                raise ValueError(f"{where}.customer: no customer named '{dev.customer}'")
            if dev.customer is not None and dev.kind not in (DeviceKind.METER, DeviceKind.MASTER):
                raise ValueError(f"{where}.customer: only a meter or a master IED has a customer")
            if dev.parent is not None and dev.parent not in names:
                raise ValueError(f"{where}.parent: no device named '{dev.parent}'")
        # Walk up the tree, iteratively (a chain may be thousands deep): a cycle would make branch
        # sums loop forever. Each device is walked once: a walk stops at a device already cleared.
        cleared: set[str] = set()
        for i, dev in enumerate(self.devices):
            path: list[str] = []
            node: DeviceSpec | None = dev
            while node is not None and node.name not in cleared:
                if node.name in path:
                    ring = [*path[path.index(node.name):], node.name]
                    shown = ring if len(ring) <= 8 else [*ring[:3], "...", *ring[-2:]]
                    cycle = " -> ".join(shown) + (f" ({len(ring) - 1} devices)" if len(ring) > 8 else "")
                    raise ValueError(f"devices[{i}] ({dev.name}).parent: parent cycle {cycle}")
                path.append(node.name)
                node = names[node.parent] if node.parent is not None else None
            cleared.update(path)
        return self

    def _by_name(self) -> dict[str, DeviceSpec]:
        """Devices by name, built once per devices tuple (a model_copy with other devices rebuilds
        it). Kept in the instance dict, not a pydantic private attribute: those cost ~10 µs a read,
        and walking a deep tree reads it a million times."""
        cached = self.__dict__.get("_device_index")
        if cached is None or cached[0] is not self.devices:
            cached = (self.devices, {d.name: d for d in self.devices})
            self.__dict__["_device_index"] = cached
        return cached[1]

    def device(self, name: str) -> DeviceSpec:
        return self._by_name()[name]

    def report_audience(self, device: DeviceSpec) -> ReportAudience:
        """Who reads which part of `device`'s billing reports: billing parties and its customer
        the billing part, the operators the power-quality part ([0085])."""
        return ReportAudience(billing_parties=tuple(self.jid(b.name) for b in self.billing),
                              quality=tuple(self.jid(o.name) for o in self.operators),
                              customer=self.jid(device.customer) if device.customer else None)

    def children(self, name: str) -> tuple[DeviceSpec, ...]:
        # Indexed once per devices tuple, as _by_name: accounts ask it for every device of a
        # synthetic fleet of thousands (a scan each would make that quadratic).
        cached = self.__dict__.get("_children_index")
        if cached is None or cached[0] is not self.devices:
            kids: dict[str, list[DeviceSpec]] = {}
            for dev in self.devices:
                if dev.parent is not None:
                    kids.setdefault(dev.parent, []).append(dev)
            cached = (self.devices, {k: tuple(v) for k, v in kids.items()})
            self.__dict__["_children_index"] = cached
        return cached[1].get(name, ())

    def descendants(self, name: str) -> tuple[DeviceSpec, ...]:
        """Every device below `name`, depth first, without recursion (chains may be deep)."""
        kids: dict[str, list[DeviceSpec]] = {}
        for dev in self.devices:
            if dev.parent is not None:
                kids.setdefault(dev.parent, []).append(dev)
        out: list[DeviceSpec] = []
        stack = list(reversed(kids.get(name, [])))
        while stack:
            dev = stack.pop()
            out.append(dev)
            stack.extend(reversed(kids.get(dev.name, [])))
        return tuple(out)

    def jid(self, name: str) -> str:
        if name in self._hosted_names():
            return f"{name}@{self.component_domain}"
        return f"{name}@{self.domain}"

    @property
    def component_domain(self) -> str:
        """The domain of hosted devices' JIDs (the server's ``Component`` for them)."""
        return f"{COMPONENT_LABEL}.{self.domain}"

    def hosted(self, name: str) -> bool:
        """True when device `name` is hosted on the component (no account of its own)."""
        return name in self._hosted_names()

    def _hosted_names(self) -> frozenset[str]:
        """Built once per devices tuple, like ``_by_name`` (jid() is called in every loop)."""
        cached = self.__dict__.get("_hosted_index")
        if cached is None or cached[0] is not self.devices or cached[1] != self.hosting:
            names = frozenset(d.name for d in self.devices if (d.hosting or self.hosting) == "component")
            cached = (self.devices, self.hosting, names)
            self.__dict__["_hosted_index"] = cached
        return cached[2]

    def roles(self) -> dict[str, Role]:
        """Bare JID -> the role its signed commands are judged by ([security] allow)."""
        out = {self.jid(p.name): Role.MANUFACTURER for p in self.manufacturers}
        out.update({self.jid(p.name): Role.BILLING for p in self.billing})
        out.update({self.jid(p.name): Role.OPERATOR for p in self.operators})
        return out


def _where(loc: tuple[int | str, ...], data: object) -> str:
    """``devices[4] (load-5).rated_kw``: the field's path, each list item named when it has a name."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and 0 <= part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str) and name:
                out += f" ({name!r})" if not _NAME.match(name) else f" ({name})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "fleet"


def _message(error: Any) -> str:
    # pydantic prefixes what our validators raise; the field is already named before it.
    return str(error["msg"]).removeprefix("Value error, ")


def parse_fleet(data: dict[str, object], source: str = "fleet", base: Path | None = None) -> Fleet:
    """Validate a fleet; `base` is the fleet file's folder, for a relative ``[rules] file``."""
    try:
        fleet = Fleet.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        # "at least 1 item" of a list whose items were all wrong says nothing the items' own errors
        # do not (pydantic counts what validated).
        errors = [e for e in errors if not (e["type"] == "too_short" and any(
            len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors))]
        # Cross-field checks (no loc) name their field themselves.
        lines = [f"{source}: {_where(e['loc'], data) + ': ' if e['loc'] else ''}{_message(e)}" for e in errors]
        raise FleetError("\n".join(lines)) from None
    fleet = _with_rules(fleet, source, base)
    if base is not None and fleet.sites:
        sites = tuple(s.model_copy(update={"file": str(s.path if s.path.is_absolute() else (base / s.path).resolve())})
                      for s in fleet.sites)
        fleet = fleet.model_copy(update={"sites": sites})
    return fleet


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
    except FileNotFoundError:
        raise FleetError(f"{path}: no such fleet file") from None
    except UnicodeDecodeError as exc:
        raise FleetError(f"{path}: not a text file in UTF-8: {exc}") from None
    except OSError as exc:  # a directory, no permission, an I/O error: whatever the OS says
        raise FleetError(f"{path}: cannot read the fleet file: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (ValueError, RecursionError) as exc:  # decode errors; over-long integers; nesting too deep
        kind = "JSON" if path.suffix == ".json" else "TOML"
        raise FleetError(f"{path}: not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise FleetError(f"{path}: a fleet file holds a table of settings")
    return parse_fleet(data, str(path), path.parent)


# -- synthetic fleets (`gridpresence up --devices N`, `gridpresence fleet generate N`) ----------

MAX_SYNTHETIC_DEVICES = 100_000
SUBSTATION_SIZE = 50  # devices under one master IED in a synthetic fleet
LOADS_PER_BRANCH = 12
CRITICAL_EVERY = 20  # one load in this many is critical (refuses a shed)
# A synthetic fleet's devices are sampled once a second up to this many; a larger fleet every
# devices / this many seconds (10,000: every 4 s), so its host runs about this many device passes
# (physics, rules) a second whatever the size: at 10,000 and 1 s they took a whole core of the
# 2-core machine, and an operator's status no longer saw the fleet.
SAMPLES_PER_S = 2500
MAX_SYNTHETIC_SAMPLE_S = 10.0  # the longest interval readings still drift as fast at (physics.base.step_for)
# A synthetic substation starts at about this share of its ratings: its loads' draw sizes its
# branch meters and master (the "near its limit" advice is at 80 %, so a new fleet is quiet).
START_LOADING = 0.55
_LOAD_NAMES = ("HVAC", "water heaters", "EV chargers", "pumps", "street lighting", "cold store", "workshop",
               "irrigation", "offices", "data room")


def synthetic_fleet_data(devices: int, *, seed: int = 0, refresh_s: float = 60.0,
                         hosting: Hosting = "c2s") -> dict[str, Any]:
    """A fleet of `devices` devices as the fleet file's data: substations of up to
    SUBSTATION_SIZE devices, each a master IED with a main breaker, branch meters, loads under
    the meters (one in CRITICAL_EVERY critical) and a generator per ten loads. Names say where a
    device sits (``s003-load-017``); the same `devices` and `seed` give the same fleet. Past
    SAMPLES_PER_S devices, each is sampled less often (``sample_s``).
    ``hosting``: the devices' way to the server (``"component"``: all in one hosting process)."""
    import random

    if not 1 <= devices <= MAX_SYNTHETIC_DEVICES:
        raise FleetError(f"a synthetic fleet has 1 to {MAX_SYNTHETIC_DEVICES} devices, not {devices}")
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    stations = -(-devices // SUBSTATION_SIZE)
    for s in range(1, stations + 1):
        size = min(SUBSTATION_SIZE, devices - len(out))
        p = f"s{s:03d}" if stations < 1000 else f"s{s:05d}"
        master = f"{p}-master"
        top: list[dict[str, Any]] = [{"name": master, "display_name": f"Master IED, substation {s}",
                                      "kind": "master", "rated_kw": 1200.0, "refresh_s": refresh_s}]
        out.append(top[0])
        rest = size - 1
        if rest >= 1:
            top.append({"name": f"{p}-breaker", "display_name": f"Main breaker, substation {s}", "kind": "breaker",
                        "rated_kw": 1200.0, "parent": master, "utilisation": 0.45, "refresh_s": refresh_s})
            out.append(top[-1])
            rest -= 1
        branches = max(1, rest // (LOADS_PER_BRANCH + 1)) if rest >= 2 else 0
        gens = rest // 10 if rest >= 10 else 0
        loads = rest - branches - gens
        meters = [{"name": f"{p}-branch-{b + 1:02d}", "display_name": f"Branch {b + 1} meter, substation {s}",
                   "kind": "meter", "rated_kw": 500.0, "parent": master, "refresh_s": refresh_s}
                  for b in range(branches)]
        out.extend(meters)
        draw = [0.0] * branches
        for i in range(loads):
            what = _LOAD_NAMES[rng.randrange(len(_LOAD_NAMES))]
            load: dict[str, Any] = {
                "name": f"{p}-load-{i + 1:03d}", "display_name": f"{what.capitalize()}, substation {s}",
                "kind": "load", "rated_kw": float(rng.choice((20, 40, 80, 120, 150))),
                "utilisation": round(rng.uniform(0.3, 0.9), 2), "refresh_s": refresh_s}
            if branches:
                load["parent"] = f"{p}-branch-{i % branches + 1:02d}"
                draw[i % branches] += load["rated_kw"] * load["utilisation"]
            if (i + 1) % CRITICAL_EVERY == 0:
                load["critical"] = True
            out.append(load)
        for meter, kw in zip(meters, draw):
            meter["rated_kw"] = _rating(kw, meter["rated_kw"], 50)
        for device in top:  # the main breaker is rated like the substation it protects
            device["rated_kw"] = _rating(sum(draw), device["rated_kw"], 100)
        for g in range(gens):
            out.append({"name": f"{p}-gen-{g + 1}", "display_name": f"Generator {g + 1}, substation {s}",
                        "kind": "generator", "rated_kw": float(rng.choice((250, 400))), "parent": master,
                        "startup_s": 10.0, "refresh_s": refresh_s})
    if devices > SAMPLES_PER_S:
        sample_s = round(devices / SAMPLES_PER_S, 1)
        for device in out:
            device["sample_s"] = min(sample_s, MAX_SYNTHETIC_SAMPLE_S, refresh_s)
    return {
        "domain": "localhost",
        "hosting": hosting,
        "presence_grace_s": 15.0,
        "operators": [{"name": "alice", "display_name": "Alice (control room)"},
                      {"name": "bob", "display_name": "Bob (field operator)"}],
        "billing": [{"name": "billing", "display_name": "Billing company", "supplier": "northern-supply",
                     "peak_price": 0.80, "off_peak_price": 0.60}],
        "devices": out,
    }


def _rating(draw_kw: float, least_kw: float, step_kw: int) -> float:
    """A rating that carries `draw_kw` at START_LOADING, in steps of `step_kw`, at least `least_kw`."""
    return max(least_kw, float(math.ceil(draw_kw / START_LOADING / step_kw) * step_kw))


def synthetic_fleet(devices: int, *, seed: int = 0, refresh_s: float = 60.0, hosting: Hosting = "c2s") -> Fleet:
    """:func:`synthetic_fleet_data`, validated."""
    return parse_fleet(synthetic_fleet_data(devices, seed=seed, refresh_s=refresh_s, hosting=hosting),
                       f"synthetic fleet of {devices}")


def fleet_toml(data: dict[str, Any]) -> str:
    """Fleet data (strings, numbers, booleans and lists of tables, as the fleet file has) as TOML."""
    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        return json.dumps(v)  # a JSON string is a valid TOML basic string

    lines = [f"{k} = {value(v)}" for k, v in data.items() if not isinstance(v, list)]
    for key, items in data.items():
        if isinstance(items, list):
            for item in items:
                lines += ["", f"[[{key}]]", *(f"{k} = {value(v)}" for k, v in item.items())]
    return "\n".join(lines) + "\n"
