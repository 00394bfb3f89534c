"""A filter never takes a device that has not reported for one that matches: `shed --filter
kind=load critical=no` must not shed a critical load only because nothing was heard from it,
and what a filter leaves out for want of a report is said, not silent."""

from __future__ import annotations

import fnmatch
import json
import random
from collections.abc import AsyncIterator, Iterator

import pytest_asyncio

from conftest import run_cli, running_grid
from gridpresence.config import synthetic_fleet
from gridpresence.host.grid import Grid
from gridpresence.operator.selection import DeviceFilter, parse_term
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol import DeviceKind, DeviceState
from gridpresence.protocol.models import HealthStatus, PresenceReport

FLEET = synthetic_fleet(30, seed=7, refresh_s=300)
CRITICAL = next(d.name for d in FLEET.devices if d.kind is DeviceKind.LOAD and d.critical)
PLAIN = next(d.name for d in FLEET.devices if d.kind is DeviceKind.LOAD and not d.critical)
ABSENT = {CRITICAL, PLAIN}  # in every roster, never logged in: gone without a report


@pytest_asyncio.fixture(scope="module")
async def grid(tmp_path_factory) -> AsyncIterator[Grid]:  # type: ignore[no-untyped-def]
    only = [d.name for d in FLEET.devices if d.name not in ABSENT] + ["watchdog"]
    async with running_grid(FLEET, tmp_path_factory.mktemp("unreported"), only=only) as g:
        yield g


def _conn(grid: Grid) -> list[str]:
    return ["--connection", str(grid.connection_file), "--settle", "10"]


async def test_a_critical_load_not_heard_from_is_not_shed_as_not_critical(grid: Grid) -> None:
    running = sorted(d.name for d in FLEET.devices
                     if d.kind is DeviceKind.LOAD and not d.critical and d.name not in ABSENT)
    try:
        code, out, err = await run_cli("shed", "--filter", "kind=load", "critical=no", "--json", *_conn(grid))
        assert code == 0, err
        shed = sorted(o["name"] for o in json.loads(out))
        assert shed == running  # neither absent load: one is critical, and neither has said which
        note = next(line for line in err.splitlines() if line.startswith("note: "))
        assert note.startswith("note: 2 devices have not reported yet, so the filter kind=load critical=no")
        assert CRITICAL in note and PLAIN in note and "not selected" in note
    finally:
        await run_cli("restore", "--filter", "kind=load", "critical=no", *_conn(grid))

    # `status` says the same, and --json counts them.
    code, out, err = await run_cli("status", "--json", "--filter", "kind=load", "critical=yes", *_conn(grid))
    assert code == 0, err
    data = json.loads(out)
    assert [d["name"] for d in data["devices"]] == []  # the only critical load has not reported
    assert data["not_reported"] == 2 and "note: 2 devices have not reported yet" in err
    # A filter on what is known without a report (name, kind, presence) needs no note.
    code, out, err = await run_cli("status", "--json", "--filter", "kind=load", "present=no", *_conn(grid))
    assert code == 0, err
    assert sorted(d["name"] for d in json.loads(out)["devices"]) == sorted(ABSENT) and "note:" not in err


def _views(rng: random.Random) -> Iterator[DeviceView]:
    for i in range(600):
        kind = rng.choice(list(DeviceKind))
        report = None if rng.random() < 0.4 else PresenceReport(
            kind=kind, state=rng.choice([DeviceState.ON, DeviceState.OFF, DeviceState.GONE]), critical=rng.random() < 0.3)
        health = rng.choice(list(HealthStatus))
        yield DeviceView(name=f"d{i:03}", jid=f"d{i:03}@x", kind=kind, report=report, health=health,
                         full_jid=f"d{i:03}@x/r" if rng.random() < 0.7 else None)


def test_verdicts_are_told_only_from_what_a_device_said() -> None:
    """Seeded: True only when every term holds on what the view knows; False only when a term
    fails on a known value; None (left out, and said) otherwise."""
    rng = random.Random(2026)
    choices = {"kind": [k.value for k in DeviceKind], "state": ["on", "off", "restricted", "unknown", "gone"],
               "critical": ["yes", "no"], "present": ["yes", "no"], "name": ["d0*", "d1?3", "*"]}
    views = list(_views(rng))
    seen: set[bool | None] = set()
    for _ in range(300):
        keys = rng.sample(sorted(choices), rng.randrange(1, 4))
        terms = [f"{k}={','.join(rng.sample(choices[k], rng.randrange(1, 3)))}" for k in keys]
        chosen = DeviceFilter.parse(terms)
        for view in views:
            verdict = chosen.verdict(view)
            known = {"kind": view.kind.value, "present": "yes" if view.present else "no",
                     "critical": None if view.report is None else ("yes" if view.report.critical else "no"),
                     "state": view.label}
            fails = untold = False
            for text in terms:
                key, wanted = parse_term(text)
                if key == "name":
                    fails |= not any(fnmatch.fnmatchcase(view.name, p) for p in wanted)
                elif known[key] is None or (key == "state" and known[key] == "unknown" and "unknown" not in wanted):
                    untold = True
                elif known[key] not in wanted:
                    fails = True
            assert verdict is (False if fails else None if untold else True), (terms, view)
            assert chosen.matches(view) is (verdict is True)
            seen.add(verdict)
    assert seen == {True, False, None}
