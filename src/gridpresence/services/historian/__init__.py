"""The historian ([00103]: "the real time data can be logged for historical analysis"): a recorder
of every device's telemetry, state and health changes, alarms and command outcomes, on SQLite in
the grid's data directory by default or on PostgreSQL; and the queries the export reads."""

from gridpresence.services.historian.recorder import Historian
from gridpresence.services.historian.store import (HISTORY_FILE, METRIC_UNITS, Event, HistoryStore, Point, Retention,
                                                   Sample, StoreError, open_store)

__all__ = ["HISTORY_FILE", "METRIC_UNITS", "Event", "Historian", "HistoryStore", "Point", "Retention", "Sample",
           "StoreError", "open_store"]
