"""The rule engine's view of a device's presence report."""

from __future__ import annotations

from gridpresence.protocol.models import PresenceReport
from gridpresence.rules.engine import Sample


def report_sample(device: str, report: PresenceReport, ts: float) -> Sample:
    t = report.telemetry
    values = {"load_pct": t.load_pct, "output_kw": t.kw, "fuel_pct": t.fuel_pct, "temperature_c": t.temperature_c,
              "breaker": t.breaker.value if t.breaker is not None else None, "capacity_kw": t.capacity_kw}
    return Sample(device, ts, report.state, values, report.kind)
