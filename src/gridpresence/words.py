"""Every sentence and table the grid shows to people, in one place: the CLI's tables and outcome
lines, the devices' chat answers and ad-hoc notes, the console's replies, alarm titles.

Wording is a rule like any other: one phrasing per fact, so what an operator reads in a chat
client, on the terminal and in the console agrees. Functions here take the wire's models (or the
operator library's device views, through their JSON form) and return text; nothing here does I/O.
May import: protocol.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from gridpresence.protocol.alarm import Alarm, AlarmKind
from gridpresence.protocol.models import Outcome, OutcomeStatus, PresenceReport, RejectReason

MAX_CHARS = 500  # commands are short; anything longer is refused, not parsed


# -- tables and outcome lines (CLI, console, demo) ---------------------------------------------


PROGRESS_FROM = 50  # fan-outs to this many devices or more show their progress


def progress_line(action: str, done: int, total: int) -> str | None:
    """`shed: 500/1000 outcomes back` for a long fan-out (PROGRESS_FROM devices or more), at each
    tenth and at the end (None between, and for a short one)."""
    if total < PROGRESS_FROM:
        return None
    step = max(1, total // 10)
    return f"{action}: {done}/{total} outcomes back" if done % step == 0 or done == total else None



def _fmt(value: float | None, unit: str = "") -> str:
    return "-" if value is None else f"{value:.1f}{unit}"


class _Described(Protocol):
    def as_dict(self) -> dict[str, Any]: ...


def status_rows(devices: Mapping[str, _Described]) -> list[list[str]]:
    """The status table of the operator library's device views (``DeviceView``)."""
    return status_rows_of([v.as_dict() for v in devices.values()])


def status_rows_of(devices: Sequence[dict[str, Any]]) -> list[list[str]]:
    """The status table, from the devices' JSON form (`DeviceView.as_dict`) alone: the JSON
    output then carries everything the table shows."""
    rows = [["DEVICE", "KIND", "STATE", "TRANSPORT", "LOAD", "KW", "DETAIL"]]
    for d in sorted(devices, key=lambda d: d["name"]):
        t = d["telemetry"]
        detail = []
        if d["health_reason"] and d["state"] in ("presence-error", "unknown", "gone"):
            detail.append(d["health_reason"])
        elif d["restriction"]:
            detail.append(d["restriction"]["text"])
        if "fuel_pct" in t:
            detail.append(f"fuel {t['fuel_pct']:.0f}%")
        if "temperature_c" in t:
            detail.append(f"{t['temperature_c']:.0f}°C")
        if "breaker" in t:
            detail.append(f"breaker {t['breaker']}")
        if "energy_kwh" in t:
            detail.append(f"{t['energy_kwh']:.2f} kWh")
        if d["critical"]:
            detail.append("critical")
        rows.append([d["name"], d["kind"] or "?", d["state"], d["transport"] or "-", _fmt(t.get("load_pct"), "%"),
                     _fmt(t.get("kw")), ", ".join(detail)])
    return rows


def summary_line(total: int, present: int, by_kind: Mapping[str, int], by_state: Mapping[str, int]) -> str:
    """`status`'s last line: ``1000 devices (998 present): 820 load, 80 generator; 950 on, 30 off``."""
    kinds = ", ".join(f"{n} {k}" for k, n in by_kind.items()) or "none"
    states = ", ".join(f"{n} {s}" for s, n in by_state.items()) or "none"
    return f"{total} device{'' if total == 1 else 's'} ({present} present): {kinds}; {states}"


def table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


# Telemetry as a person reads it: field -> (label, unit, decimals); a field not named here
# still shows, under its own name.
READINGS: dict[str, tuple[str, str, int]] = {
    "load_pct": ("load", "%", 1), "kw": ("", " kW", 1), "capacity_kw": ("capacity", " kW", 1),
    "fuel_pct": ("fuel", "%", 0), "temperature_c": ("", " °C", 1), "energy_kwh": ("", " kWh", 2),
    "breaker": ("breaker", "", 0),
}


def readings_text(report: PresenceReport) -> str:
    """Every value of a report, e.g. "on, load 70.9%, 85.1 kW, capacity 120.0 kW, critical"."""
    parts = [report.status_text() if report.restriction else report.state.value]
    for field, value in report.telemetry.model_dump(mode="json", exclude_none=True).items():
        label, unit, decimals = READINGS.get(field, (field, "", 2))
        shown = f"{value:.{decimals}f}" if isinstance(value, float) else str(value)
        parts.append(f"{label} {shown}{unit}".strip())
    if report.critical:
        parts.append("critical")
    return ", ".join(parts)


def outcome_line(name: str, outcome: Outcome, readings: bool = False) -> str:
    """One outcome for a person; `readings`: show every value the device sent (for `read`)."""
    state = ""
    if outcome.report and outcome.ok:
        state = f" -> {readings_text(outcome.report) if readings else outcome.report.status_text()}"
    return f"{name}: {outcome.summary()}{state}"


# -- chat (devices, console) ---------------------------------------------------------------

REASONS: dict[RejectReason, str] = {
    RejectReason.RESTRICTED: "the device is restricted",
    RejectReason.CRITICAL: "it is a critical load",
    RejectReason.NOT_SUPPORTED: "not something this device can do",
    RejectReason.INVALID_ARGUMENTS: "the arguments are not valid",
    RejectReason.NOT_AUTHORISED: "not authorised",
    RejectReason.UNSIGNED: "an unsigned chat line may not change the device's state or its alarm thresholds",
    RejectReason.BAD_SIGNATURE: "the signature does not check out",
    RejectReason.UNKNOWN_KEY: "the issuer's key is unknown",
    RejectReason.KEY_CHANGED: "the issuer's key changed",
    RejectReason.REPLAYED: "the device had this command already",
    RejectReason.STALE: "the command is outside its time window",
    RejectReason.WRONG_SERIAL: "it was signed for another serial number",
    RejectReason.WRONG_RECIPIENT: "it was signed for another device",
    RejectReason.NO_ANSWER: "the IED did not answer",
    RejectReason.DEVICE_REFUSED: "the IED refused it",
    RejectReason.NOT_CONFIRMED: "the IED's read-back does not confirm it",
}


def unreadable(text: str) -> str | None:
    """Why a message cannot be a command (too long, binary), or None if it can be parsed."""
    if len(text) > MAX_CHARS:
        return f"That message is {len(text)} characters long; commands are at most {MAX_CHARS}."
    if any(unicodedata.category(c) in ("Cc", "Cs", "Co", "Cn") and c not in "\t\r\n" or c == "\ufffd" for c in text):
        return "That message holds control characters or binary data, not a command."
    return None


def describe_report(name: str, report: PresenceReport | None) -> str:
    """A device's state in one line a person reads at a glance."""
    if report is None:
        return f"{name}: no valid readings right now"
    t = report.telemetry
    parts = [f"{name} ({report.kind.value}) is {report.state.value}"]
    if report.restriction is not None:
        parts[0] += f" — {report.status_text()}"
    if t.kw is not None:
        parts.append(f"{t.kw:.1f} kW" + (f" of {t.capacity_kw:g} kW" if t.capacity_kw else ""))
    if t.load_pct is not None:
        parts.append(f"load {t.load_pct:.0f}%")
    if t.fuel_pct is not None:
        parts.append(f"fuel {t.fuel_pct:.0f}%")
    if t.temperature_c is not None:
        parts.append(f"{t.temperature_c:.0f} °C")
    if t.energy_kwh is not None:
        parts.append(f"{t.energy_kwh:.1f} kWh")
    if t.breaker is not None:
        parts.append(f"breaker {t.breaker.value}")
    if report.critical:
        parts.append("critical load")
    return ", ".join(parts)


def describe_outcome(name: str, action: str, outcome: Outcome) -> str:
    now = f" Now: {describe_report(name, outcome.report)}." if outcome.report else ""
    if outcome.status is OutcomeStatus.EXECUTED:
        return f"Done: {outcome.detail or action}.{now}"
    if outcome.status is OutcomeStatus.REJECTED and outcome.reason is not None:
        return f"Refused {action}: {REASONS[outcome.reason]} ({outcome.detail}).{now}"
    return f"{action}: {outcome.summary()}."


# -- alarms -----------------------------------------------------------------------------------

TITLES: dict[AlarmKind, str] = {
    AlarmKind.HIGH_LOADING: "high loading",
    AlarmKind.TRIP_IMMINENT: "trip point imminent",
    AlarmKind.BREAKER_TRIPPED: "breaker tripped",
    AlarmKind.LOW_FUEL: "generating with low fuel",
    AlarmKind.TEMPERATURE_EXCEEDED: "generator temperature exceeded",
    AlarmKind.SERVICE_REQUIRED: "service required",
    AlarmKind.BRANCH_NEAR_LIMIT: "branch near its limit",
}


def describe(alarm: Alarm) -> str:
    """The alarm as a line for a person."""
    units = {AlarmKind.TEMPERATURE_EXCEEDED: " °C", AlarmKind.SERVICE_REQUIRED: " running hours"}.get(alarm.kind, " %")
    reading = ""
    if alarm.value is not None and alarm.threshold is not None:
        reading = f" ({alarm.value:.1f}{units}, limit {alarm.threshold:g}{units})"
    return f"{TITLES[alarm.kind]}{reading}"


# -- rules replay ------------------------------------------------------------------------------


def replay_unanswered(pending: int, how: str) -> str:
    """Why a replay in confirm/hybrid mode changed nothing, and how to choose otherwise."""
    return (f"{pending} threshold proposal(s) wait for an operator ({how}): in a replay nobody answers them, "
            "so those thresholds and settling times stayed as they were and later alarms were raised as before. "
            "Use --adjust auto to apply each proposal when it is made (as an operator accepting it would), "
            "or --adjust off to replay the rules as written.")


def replay_kind_line(device: str, kind: str, how: str) -> str:
    return f"{device}: taken for a {kind} ({how})"
