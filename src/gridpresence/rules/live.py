"""The rule engine's view of a device's presence report."""

from __future__ import annotations

from gridpresence.protocol.models import DeviceKind, DeviceState, PresenceReport, Telemetry
from gridpresence.rules.engine import Sample
from gridpresence.rules.model import NO_COMMAND


def report_sample(device: str, report: PresenceReport, ts: float, commanded: str | None = None) -> Sample:
    """`commanded`: the contacts position the device's last command asked for (None: none known)."""
    return reading_sample(device, report.state, report.kind, report.telemetry, ts, commanded)


def reading_sample(device: str, state: DeviceState, kind: DeviceKind, t: Telemetry, ts: float,
                   commanded: str | None = None) -> Sample:
    """The same as :func:`report_sample`, from the parts of a report (a device's tick that tells nothing)."""
    values = {"load_pct": t.load_pct, "output_kw": t.kw, "fuel_pct": t.fuel_pct, "temperature_c": t.temperature_c,
              "breaker": t.breaker.value if t.breaker is not None else None, "capacity_kw": t.capacity_kw,
              "commanded": commanded or NO_COMMAND}
    return Sample(device, ts, state, values, kind)
