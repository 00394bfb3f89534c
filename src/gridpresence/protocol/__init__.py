"""The wire: typed payloads (pydantic) and their XMPP stanza form (slixmpp).

Every grid payload lives under one namespace, :data:`NS`; see ``PROTOCOL.md``.
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
