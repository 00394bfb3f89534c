"""Alarm thresholds from the fleet file ([00145]): fixed levels for now, one table for the fleet."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AlarmSettings(BaseModel):
    """``[alarms]`` in the fleet file. Percentages are of a device's rated kW."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    high_loading_pct: float = Field(default=80.0, gt=0, le=150, allow_inf_nan=False)
    trip_imminent_pct: float = Field(default=95.0, gt=0, le=150, allow_inf_nan=False)
    # A closed breaker carrying this much or less (0 %) has tripped.
    breaker_tripped_pct: float = Field(default=0.0, ge=0, le=100, allow_inf_nan=False)
    low_fuel_pct: float = Field(default=10.0, ge=0, le=100, allow_inf_nan=False)
    max_temperature_c: float = Field(default=105.0, ge=-60, le=400, allow_inf_nan=False)
    # A generator asks for service after this many running hours.
    service_after_run_h: float = Field(default=500.0, gt=0, le=1e6, allow_inf_nan=False)
    # An alarm nobody acknowledges within this time is escalated again.
    ack_timeout_s: float = Field(default=120.0, ge=0.5, le=86400, allow_inf_nan=False)
    # A reading must fall this far below a threshold before the alarm can be raised anew.
    hysteresis_pct: float = Field(default=2.0, ge=0, le=50, allow_inf_nan=False)
    # Warnings costing less than high_cost_per_day (kW past the threshold x 24 h x the billing
    # party's price) wait this long and go out together, costliest first; 0 sends every one at once.
    batch_low_priority_s: float = Field(default=0.0, ge=0, le=86400, allow_inf_nan=False)
    high_cost_per_day: float = Field(default=50.0, ge=0, allow_inf_nan=False)

    @model_validator(mode="after")
    def _ordered(self) -> AlarmSettings:
        if self.trip_imminent_pct <= self.high_loading_pct:
            raise ValueError("trip_imminent_pct must be above high_loading_pct")
        return self
