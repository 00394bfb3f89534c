"""A metering device's registers for one billing period: energy split by the tariff's peak
hours ([0089], [0093]), maximum demand, and power quality (voltage, frequency, power factor,
harmonic distortion) simulated from the load. Pure Python; the report's parts are built from it."""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass

from gridpresence.config import Fleet
from gridpresence.physics.base import step_for, walk
from gridpresence.protocol.billing_report import BillingData, QualityData

NOMINAL_V = 230.0
NOMINAL_HZ = 50.0
SAG_LEVEL = 0.9  # a sample under 90 % of nominal voltage is a sag (IEC 61000-4-30)


@dataclass(frozen=True)
class PeakHours:
    """The tariff's peak window in the device's clock hours; ``start == end`` means none."""

    start: int = 6
    end: int = 18

    def contains(self, when: dt.datetime) -> bool:
        h = when.hour
        return self.start <= h < self.end if self.start <= self.end else (h >= self.start or h < self.end)


class MeterRegisters:
    def __init__(self, now: dt.datetime, rng: random.Random, peak: PeakHours = PeakHours()) -> None:
        self.rng = rng
        self.peak = peak
        self.register_kwh = 0.0
        self.power_factor = 0.95
        self.thd_pct = 3.0
        self.frequency_hz = NOMINAL_HZ
        self.voltage_v = NOMINAL_V
        self._open(now)

    def _open(self, now: dt.datetime) -> None:
        self.period_start = now
        self.start_kwh = self.register_kwh
        self.peak_kwh = self.off_peak_kwh = self.max_kw = 0.0
        self.v_min = self.v_max = self.voltage_v
        self.v_sum = self.load_sum = 0.0
        self.samples = self.sags = 0

    def reset_register(self) -> float:
        """A billing reset ([0085]): the energy register starts again from zero; the open
        period keeps what it counted so far. Returns the register's reading before."""
        was = self.register_kwh
        self.start_kwh -= was
        self.register_kwh = 0.0
        return was

    def sample(self, kw: float, load_pct: float, dt_s: float, now: dt.datetime) -> None:
        """Accumulate `dt_s` seconds at `kw`, and drift the quality readings with the load."""
        kwh = kw * dt_s / 3600.0
        self.register_kwh += kwh
        if self.peak.contains(now):
            self.peak_kwh += kwh
        else:
            self.off_peak_kwh += kwh
        self.max_kw = max(self.max_kw, kw)
        # Voltage drops with load along the feeder; distortion rises with it.
        self.voltage_v = NOMINAL_V * (1 - 0.05 * load_pct / 100) + self.rng.uniform(-1.5, 1.5)
        self.frequency_hz = walk(self.rng, self.frequency_hz, step_for(0.005, dt_s), NOMINAL_HZ - 0.2, NOMINAL_HZ + 0.2)
        self.power_factor = walk(self.rng, self.power_factor, step_for(0.002, dt_s), 0.80, 0.99)
        self.thd_pct = walk(self.rng, self.thd_pct, step_for(0.05, dt_s), 1.0, 8.0)
        self.v_min, self.v_max = min(self.v_min, self.voltage_v), max(self.v_max, self.voltage_v)
        self.v_sum += self.voltage_v
        self.load_sum += load_pct
        self.samples += 1
        self.sags += self.voltage_v < SAG_LEVEL * NOMINAL_V

    def close(self, report: str, device: str, customer: str | None, now: dt.datetime,
              load_pct: float) -> tuple[BillingData, QualityData]:
        """The period's two parts; the next period starts now."""
        n, start = self.samples, self.period_start
        billing = BillingData(report=report, device=device, period_start=start, period_end=now, customer=customer, register_kwh=round(self.register_kwh, 4),
                              period_kwh=round(self.register_kwh - self.start_kwh, 4),
                              peak_kwh=round(self.peak_kwh, 4), off_peak_kwh=round(self.off_peak_kwh, 4),
                              max_demand_kw=round(self.max_kw, 3))
        quality = QualityData(report=report, device=device, period_start=start, period_end=now, voltage_v=round(self.v_sum / n if n else self.voltage_v, 2),
                              voltage_min_v=round(self.v_min, 2), voltage_max_v=round(self.v_max, 2),
                              frequency_hz=round(self.frequency_hz, 3), power_factor=round(self.power_factor, 3),
                              thd_pct=round(self.thd_pct, 2),
                              load_pct=round(min(150.0, self.load_sum / n if n else load_pct), 2), sags=self.sags)
        self._open(now)
        return billing, quality


def peak_hours(fleet: Fleet) -> PeakHours:
    """The peak window of the fleet's (first) billing party: the meters' tariff registers."""
    if not fleet.billing:
        return PeakHours()
    spec = fleet.billing[0]
    return PeakHours(spec.peak_start_hour, spec.peak_end_hour % 24)
