"""The wire: typed payloads (pydantic) and their XMPP stanza form (slixmpp), the same on
every side of it.

Every grid payload lives under one namespace, :data:`NS`; see ``PROTOCOL.md``. ``models`` is the
only place values are validated, ``codec`` the only place grid XML is written or read.
May import: nothing else of gridpresence (it is the lowest layer).
"""

from gridpresence.protocol.models import (
    NS,
    Action,
    Breaker,
    Command,
    DeviceKind,
    DeviceState,
    Health,
    HealthStatus,
    Outcome,
    OutcomeStatus,
    PresenceReport,
    RejectReason,
    Restriction,
    Tariff,
    TariffPeriod,
    Telemetry,
)

__all__ = [
    "NS",
    "Action",
    "Breaker",
    "Command",
    "DeviceKind",
    "DeviceState",
    "Health",
    "HealthStatus",
    "Outcome",
    "OutcomeStatus",
    "PresenceReport",
    "RejectReason",
    "Restriction",
    "Tariff",
    "TariffPeriod",
    "Telemetry",
]
