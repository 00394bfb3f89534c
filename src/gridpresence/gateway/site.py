"""The site file: which IEDs a gateway reads, how to reach them, and their point maps.

TOML, validated with pydantic; every error names the field, e.g.
``site.toml: ieds[2] (meter-3).link.port: Input should be less than or equal to 65535`` or
``site.toml: maps.my-meter.telemetry.kw: no point named 'kw_total'``. A point map is either a
``[maps.NAME]`` table of the site file or one shipped in ``gridpresence/gateway/maps/`` (by
file name); many IEDs may name the same map.
"""

from __future__ import annotations

import functools
import re
import tomllib
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from gridpresence.config import _Spec
from gridpresence.gateway.points import DNP3_TABLES, MODBUS_TABLES, Point
from gridpresence.protocol.models import Action, DeviceKind, Telemetry

_POINT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
_MAP_NAME = re.compile(r"^[a-z][a-z0-9-]{0,63}$")
# Telemetry fields a number is bound to; the breaker has its own table ([maps.X.breaker]).
TELEMETRY_FIELDS = tuple(f for f in Telemetry.model_fields if f != "breaker")
TelemetryField = Literal[TELEMETRY_FIELDS]  # type: ignore[valid-type]


class SiteError(ValueError):
    """A site file or point map that cannot be used; the message names the file and the field."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Write(_Model):
    """One write of a command: a value, or ``"now"`` (the gateway's UNIX time in seconds)."""

    point: str
    value: bool | Annotated[float, Field(allow_inf_nan=False)] | Literal["now"]


class Confirm(_Model):
    """The read-back that confirms a command: ``point`` equals ``equals`` (within ``tolerance``)."""

    point: str
    equals: bool | Annotated[float, Field(allow_inf_nan=False)]
    tolerance: float = Field(default=0.0, ge=0, allow_inf_nan=False)


class CommandSpec(_Model):
    writes: tuple[Write, ...] = Field(min_length=1, max_length=16)
    confirm: Confirm | None = None
    timeout_s: float = Field(default=5.0, gt=0, le=300, allow_inf_nan=False)


class StateSpec(_Model):
    """How the device state is read: ``on`` true -> on, false -> off; ``restricted`` true ->
    restricted with ``note``. Without ``on`` the device is on while it answers."""

    on: str | None = None
    restricted: str | None = None
    note: str = Field(default="restricted at the device", min_length=1, max_length=200)


class BreakerSpec(_Model):
    closed: str  # bit: true -> closed
    tripped: str | None = None  # bit: true -> tripped (wins over closed)


class PointMap(_Model):
    protocol: Literal["modbus", "dnp3"]
    description: str = Field(default="", max_length=500)
    # Modbus: registers (or bits) of gap a read may span to merge two ranges into one request.
    max_gap: int = Field(default=0, ge=0, le=124)
    points: dict[str, Point] = Field(min_length=1, max_length=1000)
    telemetry: dict[TelemetryField, str] = {}  # type: ignore[valid-type]
    readings: dict[str, str] = Field(default={}, max_length=64)  # extra values, e.g. run_hours
    state: StateSpec = StateSpec()
    breaker: BreakerSpec | None = None
    commands: dict[Action, CommandSpec] = {}
    # Points that identify the IED (a SunSpec marker, a model id): a poll reading another value
    # is not this map's IED, and is not published.
    expect: dict[str, Annotated[float, Field(allow_inf_nan=False)] | tuple[Annotated[float, Field(
        allow_inf_nan=False)], ...]] = Field(default={}, max_length=64)

    def polled(self) -> list[str]:
        """The points a poll reads: everything presence is made of, its scale factors, and the
        identifying points (outputs are read back only when a command confirms them)."""
        bound = [*self.telemetry.values(), *self.readings.values(), self.state.on, self.state.restricted]
        if self.breaker is not None:
            bound += [self.breaker.closed, self.breaker.tripped]
        names = [n for n in bound if n is not None]
        names += [sf for n in names if (sf := self.points[n].scale_factor) is not None]
        return list(dict.fromkeys([*names, *self.expect]))

    @model_validator(mode="after")
    def _named_points(self) -> PointMap:
        # Each point knows its own name (drivers key their readings by it).
        named = {k: p.model_copy(update={"name": k}) for k, p in self.points.items()}
        object.__setattr__(self, "points", named)
        return self

    def problems(self) -> list[str]:
        """What the field types cannot say: names that must exist, tables that must fit."""
        out: list[str] = []
        tables = MODBUS_TABLES if self.protocol == "modbus" else DNP3_TABLES
        for key, point in self.points.items():
            if not _POINT_NAME.match(key):
                out.append(f"points.{key}: a point name is lowercase letters, digits and '_'")
            if point.table not in tables:
                out.append(f"points.{key}.table: '{point.table}' is not a {self.protocol} table")
            if point.scale_factor is not None:
                factor = self.points.get(point.scale_factor)
                if factor is None:
                    out.append(f"points.{key}.scale_factor: no point named '{point.scale_factor}'")
                elif factor.is_bit or factor.scale_factor is not None:
                    out.append(f"points.{key}.scale_factor: point '{point.scale_factor}' is not a plain register")

        def need(where: str, name: str | None, *, bit: bool = False, write: bool = False) -> None:
            if name is None:
                return
            point = self.points.get(name)
            if point is None:
                out.append(f"{where}: no point named '{name}'")
            elif bit and not point.is_bit:
                out.append(f"{where}: point '{name}' is not a bit")
            elif write and not point.writable:
                out.append(f"{where}: point '{name}' ({point.table}) cannot be written")

        for field, name in self.telemetry.items():
            need(f"telemetry.{field}", name)
        for key, name in self.readings.items():
            if not _POINT_NAME.match(key):
                out.append(f"readings.{key}: a reading name is lowercase letters, digits and '_'")
            need(f"readings.{key}", name)
        need("state.on", self.state.on, bit=True)
        need("state.restricted", self.state.restricted, bit=True)
        if self.breaker is not None:
            need("breaker.closed", self.breaker.closed, bit=True)
            need("breaker.tripped", self.breaker.tripped, bit=True)
        for name in self.expect:
            need(f"expect.{name}", name)
        for action, command in self.commands.items():
            for i, write in enumerate(command.writes):
                need(f"commands.{action.value}.writes[{i}].point", write.point, write=True)
            if command.confirm is not None:
                need(f"commands.{action.value}.confirm.point", command.confirm.point)
        return out


class ModbusTcpLink(_Model):
    protocol: Literal["modbus-tcp"]
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=502, ge=1, le=65535)
    unit: int = Field(default=1, ge=0, le=255)
    timeout_s: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)


class ModbusRtuLink(_Model):
    protocol: Literal["modbus-rtu"]
    device: str = Field(min_length=1, max_length=4096)
    baudrate: int = Field(default=19200, ge=300, le=1_000_000)
    bytesize: Literal[7, 8] = 8
    parity: Literal["N", "E", "O"] = "N"
    stopbits: Literal[1, 2] = 1
    unit: int = Field(default=1, ge=1, le=247)
    timeout_s: float = Field(default=1.0, gt=0, le=60, allow_inf_nan=False)


class Dnp3TcpLink(_Model):
    protocol: Literal["dnp3-tcp"]
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(default=20000, ge=1, le=65535)
    outstation: int = Field(default=10, ge=0, le=65519)
    master: int = Field(default=1, ge=0, le=65519)
    timeout_s: float = Field(default=2.0, gt=0, le=60, allow_inf_nan=False)
    integrity_s: float = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)


Link = Annotated[ModbusTcpLink | ModbusRtuLink | Dnp3TcpLink, Field(discriminator="protocol")]
_LINK_TAGS = frozenset({"modbus-tcp", "modbus-rtu", "dnp3-tcp"})


class IedSpec(_Spec):
    kind: DeviceKind
    link: Link
    map: str = Field(min_length=1, max_length=64)
    poll_s: float = Field(default=1.0, ge=0.1, le=3600, allow_inf_nan=False)
    refresh_s: float = Field(default=60.0, ge=0.2, le=86400, allow_inf_nan=False)
    critical: bool = False
    serial: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    rated_kw: float = Field(default=100.0, gt=0, le=1e6, allow_inf_nan=False)  # the fleet's rating of it
    # Loss of the field link: restricted ("no answer from the IED since 12:03") at once, gone after this.
    gone_after_s: float = Field(default=300.0, gt=0, le=86400, allow_inf_nan=False)

    @property
    def family(self) -> str:
        return "dnp3" if self.link.protocol.startswith("dnp3") else "modbus"


class Site(_Model):
    ieds: tuple[IedSpec, ...] = Field(min_length=1, max_length=10000)
    maps: dict[str, PointMap] = {}

    def map_for(self, ied: IedSpec) -> PointMap:
        return self.maps.get(ied.map) or shipped_maps()[ied.map]


def _where(loc: tuple[int | str, ...], data: object) -> str:
    """A pydantic location as the site file's path: ``ieds[2] (meter-3).link.port``."""
    out, node, prev = "", data, None
    for part in loc:
        if prev == "link" and part in _LINK_TAGS:
            continue  # the union's branch: the user wrote `protocol`, not this
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            name = node.get("name") if isinstance(node, dict) else None
            if prev == "ieds" and isinstance(name, str):
                out += f" ({name[:48]})"
        else:
            out += f".{part}" if out else str(part)
            node = node.get(part) if isinstance(node, dict) else None
        prev = part
    return out or "site"


def _messages(exc: ValidationError, data: object) -> list[str]:
    return [f"{_where(e['loc'], data)}: {e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]


def parse_map(data: object, source: str) -> PointMap:
    """Validate one point map (a shipped file, or a test's table)."""
    try:
        pmap = PointMap.model_validate(data)
    except ValidationError as exc:
        raise SiteError("\n".join(f"{source}: {m}" for m in _messages(exc, data))) from None
    if problems := pmap.problems():
        raise SiteError("\n".join(f"{source}: {p}" for p in problems))
    return pmap


@functools.cache
def shipped_maps() -> dict[str, PointMap]:
    """The ready maps in gridpresence/gateway/maps/, by file name without ``.toml``."""
    out: dict[str, PointMap] = {}
    for entry in resources.files("gridpresence.gateway").joinpath("maps").iterdir():
        if entry.name.endswith(".toml"):
            out[entry.name.removesuffix(".toml")] = parse_map(tomllib.loads(entry.read_text("utf-8")), f"maps/{entry.name}")
    return out


def parse_site(data: object, source: str = "site") -> Site:
    """Validate a site; raises :class:`SiteError` naming every wrong field."""
    if not isinstance(data, dict):
        raise SiteError(f"{source}: a site file holds a table of settings")
    try:
        site = Site.model_validate(data)
    except ValidationError as exc:
        raise SiteError("\n".join(f"{source}: {m}" for m in _messages(exc, data))) from None
    problems: list[str] = []
    for name, own in site.maps.items():
        if not _MAP_NAME.match(name):
            problems.append(f"maps.{name}: a map name is lowercase letters, digits and '-'")
        problems += [f"maps.{name}.{p}" for p in own.problems()]
    seen: set[str] = set()
    shipped = shipped_maps()
    for i, ied in enumerate(site.ieds):
        where = f"ieds[{i}] ({ied.name})"
        if ied.name in seen:
            problems.append(f"{where}.name: '{ied.name}' is used twice")
        seen.add(ied.name)
        pmap = site.maps.get(ied.map) or shipped.get(ied.map)
        if pmap is None:
            known = ", ".join(sorted({*site.maps, *shipped}))
            problems.append(f"{where}.map: no map named '{ied.map}' (known: {known})")
        elif pmap.protocol != ied.family:
            problems.append(f"{where}.map: '{ied.map}' is a {pmap.protocol} map, the link is {ied.link.protocol}")
    if problems:
        raise SiteError("\n".join(f"{source}: {p}" for p in problems))
    return site


def load_site(path: Path) -> Site:
    """Read and validate a site file; raises :class:`SiteError` naming the field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SiteError(f"{path}: no such site file") from None
    except OSError as exc:
        raise SiteError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise SiteError(f"{path}: not valid TOML: {exc}") from None
    return parse_site(data, str(path))
