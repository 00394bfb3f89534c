"""One poll's readings -> the presence the gateway will publish, validated by the protocol model.

Nothing that fails here is published: a bound point that is missing or not of good quality, or
a value the presence model refuses (NaN, out of range), is a :class:`ReadingError` naming the
field and the point.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping

from pydantic import ValidationError

from gridpresence.gateway.driver import Reading
from gridpresence.gateway.site import IedSpec, PointMap
from gridpresence.gateway.points import decimal_tidy
from gridpresence.protocol.models import Breaker, DeviceState, PresenceReport, Restriction, Telemetry


class ReadingError(ValueError):
    """A poll whose readings cannot become presence; the message names each field and point."""

    def __init__(self, device: str, problems: list[str]) -> None:
        self.device = device
        self.problems = problems
        super().__init__(f"{device}: " + "; ".join(problems))


def _good(readings: Mapping[str, Reading], point: str, field: str, problems: list[str]) -> Reading | None:
    reading = readings.get(point)
    if reading is None:
        problems.append(f"{field}: point '{point}' was not read")
    elif not reading.good:
        problems.append(f"{field}: point '{point}' is {reading.quality.value}")
    else:
        return reading
    return None


def _scaled(pmap: PointMap, readings: Mapping[str, Reading], point: str, field: str,
            problems: list[str]) -> Reading | None:
    """A good reading of ``point`` times its scale factor's power of ten, if it has one."""
    reading = _good(readings, point, field, problems)
    factor = pmap.points[point].scale_factor if point in pmap.points else None
    if reading is None or factor is None:
        return reading
    sf = _good(readings, factor, field, problems)
    if sf is None:
        return None
    if not (-10 <= float(sf.value) <= 10) or float(sf.value) != int(sf.value):  # type: ignore[arg-type]
        problems.append(f"{field}: scale factor '{factor}' reads {sf.value!r}, not a power of ten from -10 to 10")
        return None
    return Reading(decimal_tidy(float(reading.value) * 10.0 ** int(sf.value)))  # type: ignore[arg-type]


def _identified(pmap: PointMap, readings: Mapping[str, Reading], problems: list[str]) -> None:
    """The map's ``expect`` points read what identifies the IED (a SunSpec 'SunS', a model id)."""
    for point, wanted in pmap.expect.items():
        reading = _good(readings, point, f"expect.{point}", problems)
        allowed = wanted if isinstance(wanted, tuple) else (wanted,)
        if reading is not None and float(reading.value) not in allowed:  # type: ignore[arg-type]
            shown = " or ".join(f"{v:g}" for v in allowed)
            problems.append(f"expect.{point}: reads {float(reading.value):g}, not {shown}: "  # type: ignore[arg-type]
                            "the IED is not laid out as its map says")


def build_report(
    ied: IedSpec,
    pmap: PointMap,
    readings: Mapping[str, Reading],
    *,
    seq: int = 0,
    at: dt.datetime | None = None,
) -> PresenceReport:
    """The validated presence of ``ied`` for one poll; raises :class:`ReadingError`."""
    problems: list[str] = []
    _identified(pmap, readings, problems)
    values: dict[str, object] = {}
    for field, point in pmap.telemetry.items():
        if (r := _scaled(pmap, readings, point, field, problems)) is not None:
            values[field] = float(r.value)  # type: ignore[arg-type]
    if pmap.breaker is not None:
        closed = _good(readings, pmap.breaker.closed, "breaker", problems)
        tripped = _good(readings, pmap.breaker.tripped, "breaker", problems) if pmap.breaker.tripped else None
        if closed is not None and (pmap.breaker.tripped is None or tripped is not None):
            values["breaker"] = (
                Breaker.TRIPPED if tripped is not None and tripped.value
                else Breaker.CLOSED if closed.value else Breaker.OPEN
            )
    state, restriction = DeviceState.ON, None
    if pmap.state.on is not None and (r := _good(readings, pmap.state.on, "state", problems)) is not None:
        state = DeviceState.ON if r.value else DeviceState.OFF
    if pmap.state.restricted is not None:
        r = _good(readings, pmap.state.restricted, "state", problems)
        if r is not None and r.value:
            state, restriction = DeviceState.RESTRICTED, Restriction(note=pmap.state.note)
    try:
        telemetry = Telemetry.model_validate(values)
    except ValidationError as exc:
        for e in exc.errors():
            field = str(e["loc"][0]) if e["loc"] else "telemetry"
            point = pmap.telemetry.get(field, "?")  # type: ignore[call-overload]
            problems.append(f"{field}: {e['msg']} (read {values.get(field)!r} from point '{point}')")
        telemetry = None
    if problems or telemetry is None:
        raise ReadingError(ied.name, problems)
    extra: dict[str, object] = {}
    if at is not None:
        extra["at"] = at
    return PresenceReport(
        kind=ied.kind,
        state=state,
        critical=ied.critical,
        telemetry=telemetry,
        restriction=restriction,
        refresh_s=ied.refresh_s,
        seq=seq,
        serial=ied.serial,
        **extra,  # type: ignore[arg-type]
    )


def extra_readings(pmap: PointMap, readings: Mapping[str, Reading]) -> dict[str, float]:
    """The map's ``[readings]`` (run hours, operation counts...) that were read good."""
    out: dict[str, float] = {}
    for key, point in pmap.readings.items():
        r = _scaled(pmap, readings, point, key, [])
        if r is not None:
            out[key] = float(r.value)  # type: ignore[arg-type]
    return out
