"""The suite holds on any day: no test names a calendar date (instants come from timebase.NOW)."""

from __future__ import annotations

import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# An ISO date or a datetime(...) with a literal year: either ages out of a freshness window or
# predates a key made today.
CALENDAR = re.compile(r"\b(?:19|20)\d\d-[01]\d-[0-3]\d|\bdatetime\(\s*(?:19|20)\d\d\b")
# A recorded trace's rows, and lines that say so, carry the record's own times: data, not a clock.
RECORDED = re.compile(r"^\s*(?:19|20)\d\d-[01]\d-[0-3]\dT[^,]*,|# calendar: ")


def test_no_test_source_names_a_calendar_date() -> None:
    found = [f"{path.name}:{n}: {line.strip()}"
             for path in sorted(TESTS.rglob("*.py")) if path.name != Path(__file__).name
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
             if CALENDAR.search(line) and not RECORDED.search(line)]
    assert not found, "tests must take instants from timebase.NOW, not the calendar:\n" + "\n".join(found)


def test_the_pattern_catches_both_forms() -> None:
    assert CALENDAR.search("expires='2030-01-01T00:00:00Z'") and CALENDAR.search("dt.datetime(2026, 11, 22)")
    assert not CALENDAR.search("NOW + dt.timedelta(days=1)")
