"""Typed grid payloads. Everything that crosses the wire is one of these models.

Validation lives here and only here: a device builds its presence through
:class:`PresenceReport` (so it cannot publish an out-of-range value) and a receiver
parses through the same model (so it drops what another party got wrong).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from enum import StrEnum
from typing import Annotated, Literal, get_args

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

NS = "urn:gridpresence:0"

MAX_NOTE = 200


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# How a device reaches the server: the XMPP port, BOSH through a web-only firewall, or hosted
# over the server's component (xmpp/component.py).
Transport = Literal["tcp", "bosh", "component"]
TRANSPORTS: tuple[str, ...] = get_args(Transport)


class DeviceKind(StrEnum):
    LOAD = "load"
    GENERATOR = "generator"
    METER = "meter"
    BREAKER = "breaker"
    MASTER = "master"


# Devices that keep energy registers and send billing reports ([0085]).
METERING_KINDS = frozenset({DeviceKind.METER, DeviceKind.MASTER})


class DeviceState(StrEnum):
    """The real-presence sub-states of [00129]/[00137]."""

    ON = "on"  # available and on
    OFF = "off"  # available but not on
    RESTRICTED = "restricted"  # available with restriction (busy/critical/starting)
    GONE = "gone"  # unavailable, said goodbye


class Breaker(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    TRIPPED = "tripped"


class Action(StrEnum):
    SHED = "shed"
    RESTORE = "restore"
    START = "start"
    STOP = "stop"
    OPEN = "open"
    CLOSE = "close"
    READ = "read"
    SET_TIME = "set_time"
    # Issued by parties other than operators (see the [security] policy in the fleet file).
    BILLING_RESET = "billing_reset"  # billing party: a meter zeroes its billing energy register
    TARIFF = "tariff"  # billing party: the device stores its tariff
    PRICE = "price"  # billing party: the device stores a real-time price
    FIRMWARE_UPGRADE = "firmware_upgrade"  # manufacturer: a signed offer for one firmware image


class OutcomeStatus(StrEnum):
    EXECUTED = "executed"
    REJECTED = "rejected"
    EXPIRED = "expired"
    UNDELIVERABLE = "undeliverable"
    QUEUED = "queued"  # not final: the relay holds it until the device's presence returns


class RejectReason(StrEnum):
    RESTRICTED = "restricted"
    CRITICAL = "critical"
    NOT_SUPPORTED = "not-supported"
    INVALID_ARGUMENTS = "invalid-arguments"
    NOT_AUTHORISED = "not-authorised"  # the sender or the signer's role may not issue this
    # Signed commands (security/signed.py): why a command's signature or freshness was refused.
    UNSIGNED = "unsigned"
    BAD_SIGNATURE = "bad-signature"
    UNKNOWN_KEY = "unknown-key"
    KEY_CHANGED = "key-changed"
    REPLAYED = "replayed"
    STALE = "stale"
    WRONG_SERIAL = "wrong-serial"
    WRONG_RECIPIENT = "wrong-recipient"
    # An IED behind a field gateway (gateway/): why the mapped writes did not carry a command out.
    NO_ANSWER = "no-answer"  # the IED did not answer (in time)
    DEVICE_REFUSED = "device-refused"  # the IED answered with a refusal (exception, control status)
    NOT_CONFIRMED = "not-confirmed"  # the writes were taken but the read-back disagrees


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


def _finite(lo: float, hi: float) -> object:
    return Field(default=None, ge=lo, le=hi, allow_inf_nan=False)


class Telemetry(_Model):
    """Measured values a device publishes in its presence ([00129], [00145])."""

    load_pct: Annotated[float | None, _finite(0.0, 150.0)] = None
    kw: Annotated[float | None, _finite(0.0, 1e7)] = None
    capacity_kw: Annotated[float | None, _finite(0.0, 1e7)] = None
    fuel_pct: Annotated[float | None, _finite(0.0, 100.0)] = None
    temperature_c: Annotated[float | None, _finite(-60.0, 400.0)] = None
    energy_kwh: Annotated[float | None, _finite(0.0, 1e12)] = None
    breaker: Breaker | None = None


class Restriction(_Model):
    """Why a device cannot take commands now, e.g. "critical process, offline at 13:03"."""

    note: str = Field(min_length=1, max_length=MAX_NOTE)
    until: AwareDatetime | None = None

    @field_validator("note")
    @classmethod
    def _printable(cls, value: str) -> str:
        if any(ord(c) < 32 for c in value):
            raise ValueError("note must not contain control characters")
        return value


MAX_FAULTS = 64


class FaultRef(_Model):
    """A fault named in a device's presence: its own (no `device`), or one of a device below it
    folded into it because the device is in fault itself (a branch alarm names what it folds)."""

    kind: str = Field(pattern=r"^[a-z][a-z-]{0,47}$")  # the alarm kind (protocol.alarm.AlarmKind)
    device: str | None = Field(default=None, min_length=3, max_length=300)


class PresenceReport(_Model):
    """The typed extension carried in a device's presence."""

    kind: DeviceKind
    state: DeviceState
    critical: bool = False  # a critical load refuses to be shed: scripts skip it
    telemetry: Telemetry = Telemetry()
    restriction: Restriction | None = None
    refresh_s: float = Field(default=60.0, gt=0, le=86400, allow_inf_nan=False)
    seq: int = Field(default=0, ge=0)
    at: AwareDatetime = Field(default_factory=utcnow)
    # How the device reaches the server: the XMPP port, or BOSH through a web-only firewall.
    transport: Transport | None = None
    # The device's serial number: issuers bind it into every signed command ([0045]).
    serial: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    # Faults active now (own first, then those folded into them); empty on a healthy device.
    faults: tuple[FaultRef, ...] = Field(default=(), max_length=MAX_FAULTS)
    # A branch above is in fault: faults here and below are folded into its alarm (None: not).
    under_fault: bool | None = None

    @property
    def in_fault(self) -> bool:
        """The device itself has a fault (not only ones folded into it)."""
        return any(f.device is None for f in self.faults)

    @property
    def folds_below(self) -> bool:
        """Faults of the devices below this one are folded: it, or a branch above it, is in fault."""
        return self.in_fault or bool(self.under_fault)

    @model_validator(mode="after")
    def _restriction_iff_restricted(self) -> PresenceReport:
        if (self.state is DeviceState.RESTRICTED) != (self.restriction is not None):
            raise ValueError("a restriction note is required exactly when state is 'restricted'")
        return self

    def show(self) -> str | None:
        """Standard presence <show> so ordinary chat clients display the state sensibly."""
        return {DeviceState.ON: None, DeviceState.OFF: "away", DeviceState.RESTRICTED: "dnd"}.get(
            self.state
        )

    def status_text(self) -> str:
        """Human status line: the restriction note, or the state with the main reading."""
        if self.restriction is not None:
            until = f" (until {self.restriction.until:%H:%M:%S} UTC)" if self.restriction.until else ""
            return f"{self.restriction.note}{until}"
        t = self.telemetry
        parts = [self.state.value]
        if t.load_pct is not None:
            parts.append(f"load {t.load_pct:.0f}%")
        if t.kw is not None:
            parts.append(f"{t.kw:.1f} kW")
        if t.breaker is not None:
            parts.append(f"breaker {t.breaker.value}")
        return ", ".join(parts)


Answer = Literal["presence"]  # how the issuer asks for its outcome besides the message (Command.answer)
_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,64}$")


class Command(_Model):
    """A command: a fact with an id, an issuer, an issue time and an expiry."""

    id: str
    action: Action
    issuer: str = Field(min_length=3, max_length=300)
    issued: AwareDatetime
    expires: AwareDatetime
    args: dict[str, Annotated[str, Field(max_length=200)]] = Field(default_factory=dict)
    # The target device's serial number, bound into the signed content ([0045]).
    serial: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._:-]{1,64}$")
    # "presence": the issuer takes the outcome from the presence the command's change produces
    # (PROTOCOL.md, "Answered in presence"); a device that cannot answers with a message.
    answer: Answer | None = None

    @field_validator("id")
    @classmethod
    def _id_shape(cls, value: str) -> str:
        if not _ID.match(value):
            raise ValueError("command id must be 1-64 characters of [A-Za-z0-9._:-]")
        return value

    @field_validator("args")
    @classmethod
    def _few_args(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > 16 or any(not _ID.match(k) for k in value):
            raise ValueError("at most 16 args with names of [A-Za-z0-9._:-]")
        return value

    @model_validator(mode="after")
    def _expiry_after_issue(self) -> Command:
        if self.expires <= self.issued:
            raise ValueError("expires must be after issued")
        return self

    @classmethod
    def new(
        cls,
        action: Action | str,
        issuer: str,
        *,
        ttl_s: float = 30.0,
        args: dict[str, str] | None = None,
        now: dt.datetime | None = None,
        serial: str | None = None,
        answer: Answer | None = None,
    ) -> Command:
        issued = now or utcnow()
        return cls(
            id=uuid.uuid4().hex,
            action=Action(action),
            issuer=issuer,
            issued=issued,
            expires=issued + dt.timedelta(seconds=ttl_s),
            args=args or {},
            serial=serial,
            answer=answer,
        )

    def is_expired(self, now: dt.datetime | None = None) -> bool:
        return (now or utcnow()) >= self.expires


class Outcome(_Model):
    """The one outcome of a command, sent back to its issuer."""

    command_id: str
    device: str
    status: OutcomeStatus
    reason: RejectReason | None = None
    detail: str = Field(default="", max_length=500)
    report: PresenceReport | None = None  # the device's state after the command
    # Instead of ``report`` on the wire: the ``seq`` of the presence that carries the state after
    # the command, which the device broadcast just before the outcome (the issuer has it).
    report_seq: int | None = Field(default=None, ge=0)
    # With reason "replayed": the outcome the device gave when it first had this command, so
    # the issuer of a legitimate redelivery (XEP-0198 resend, relay after a crash) learns it.
    first: Outcome | None = None

    @model_validator(mode="after")
    def _reason_iff_rejected(self) -> Outcome:
        if (self.status is OutcomeStatus.REJECTED) != (self.reason is not None):
            raise ValueError("a reason is required exactly when status is 'rejected'")
        if self.first is not None and (self.reason is not RejectReason.REPLAYED or self.first.first is not None):
            raise ValueError("a first outcome goes only with reason 'replayed', one level deep")
        return self

    @property
    def ok(self) -> bool:
        return self.status is OutcomeStatus.EXECUTED

    def summary(self) -> str:
        text = self.status.value
        if self.reason:
            text += f" ({self.reason.value})"
        if self.detail:
            text += f": {self.detail}"
        return text


class OutcomeRecord(_Model):
    """A copy of a command's outcome for the grid's recorders (the historian): which command
    (its action and issuer) ended how. Data only: nobody waits on it."""

    action: Action
    issuer: str = Field(min_length=1, max_length=3071)
    outcome: Outcome


class TariffPeriod(_Model):
    """A price that applies from start_hour (inclusive) to end_hour (exclusive), UTC."""

    start_hour: int = Field(ge=0, le=23)
    end_hour: int = Field(ge=1, le=24)
    price_per_kwh: float = Field(ge=0, le=1e4, allow_inf_nan=False)

    def covers(self, hour: int) -> bool:
        if self.start_hour < self.end_hour:
            return self.start_hour <= hour < self.end_hour
        return hour >= self.start_hour or hour < self.end_hour  # wraps midnight


class Tariff(_Model):
    """A tariff (periods) or a real-time price (one period covering the day) ([00142], [0093])."""

    supplier: str = Field(min_length=1, max_length=100)
    kind: Literal["tariff", "real-time"] = "tariff"
    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    periods: tuple[TariffPeriod, ...] = Field(min_length=1, max_length=24)
    issued: AwareDatetime = Field(default_factory=utcnow)

    def price_at(self, when: dt.datetime | None = None) -> float:
        hour = (when or utcnow()).astimezone(dt.timezone.utc).hour
        for period in self.periods:
            if period.covers(hour):
                return period.price_per_kwh
        return max(p.price_per_kwh for p in self.periods)  # uncovered hour: assume the worst


class HealthStatus(StrEnum):
    OK = "ok"
    PRESENCE_ERROR = "presence-error"
    GONE = "gone"  # said goodbye
    UNKNOWN = "unknown"  # never seen


class Health(_Model):
    """The watchdog's view of one device ([00135], [00136])."""

    device: str
    status: HealthStatus
    reason: str = Field(default="", max_length=300)
    since: AwareDatetime = Field(default_factory=utcnow)
