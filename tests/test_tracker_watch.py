"""The watchdog's pass (operator/tracker.py) works from a deadline queue: the same devices
become due as a walk over every view finds, and a pass with nothing due looks at nothing."""

from __future__ import annotations

import asyncio
import random
from xml.etree import ElementTree as ET

from gridpresence.operator.tracker import OWN_OUTAGE, DeviceView, PresenceTracker
from gridpresence.protocol import DeviceKind, DeviceState, HealthStatus, PresenceReport
from gridpresence.protocol.codec import report_to_xml
from gridpresence.xmpp.session import Endpoint, make_client

GRACE = 5.0


def presence(jid: str, refresh_s: float) -> ET.Element:
    xml = ET.Element("{jabber:client}presence", {"from": f"{jid}/r", "to": "op@localhost/x"})
    xml.append(report_to_xml(PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.ON, refresh_s=refresh_s)))
    return xml


def walk(tracker: PresenceTracker, now: float) -> set[str]:
    """The rule as a walk over every view: overdue = last refresh + refresh period + grace < now."""
    return {j for j, v in tracker.views.items()
            if (d := tracker._deadline(v)) is not None and d < now and j not in tracker._pinging}


async def test_due_devices_are_what_a_walk_over_every_view_finds() -> None:
    client = make_client("op@localhost/x", "secret", Endpoint())
    tracker = PresenceTracker(client, grace_s=GRACE)
    probed: list[str] = []

    async def probe(view: DeviceView) -> None:  # the ping itself is tests/test_scale_operator's
        probed.append(view.jid)
        tracker._pinging.discard(view.jid)
        tracker._last_refresh.pop(view.jid, None)  # as a failed ping flags it

    tracker._probe = probe  # type: ignore[method-assign]
    jids = [f"d-{i:03d}@devices.localhost" for i in range(300)]
    for jid in jids:
        tracker.views[jid] = DeviceView(name=jid.split("@")[0], jid=jid, kind=DeviceKind.LOAD)
    rng = random.Random(2718)
    loop = asyncio.get_running_loop()
    base = loop.time()
    tracker._started_at = base
    for jid in jids:
        tracker._intake(presence(jid, rng.choice((1.0, 2.0, 3.0))), f"{jid}/r", jid, "r")
    clock = 0.0
    overdue = 0
    for _ in range(120):
        clock += rng.uniform(0.0, 0.5)
        for jid in rng.sample(jids, rng.randrange(0, 30)):  # some refresh, some change period
            if rng.random() < 0.1:  # it leaves: no longer watched (its queued deadlines are stale)
                gone = ET.Element("{jabber:client}presence", {"from": f"{jid}/r", "type": "unavailable"})
                tracker._intake(gone, f"{jid}/r", jid, "r")
                continue
            tracker._intake(presence(jid, rng.choice((1.0, 2.0, 3.0))), f"{jid}/r", jid, "r")
            # _intake stamped the loop's time (its entry now stale): move it onto the test's clock
            tracker._refreshed(tracker.views[jid], base + clock)
        now = base + clock
        expected = walk(tracker, now)
        probed.clear()
        tracker._watch_pass(now)
        await asyncio.sleep(0)  # the probes run
        assert sorted(probed) == sorted(expected)
        overdue += len(expected)
    assert overdue > 100  # the run did make devices overdue (not a pass over nothing)
    assert len(tracker._due) <= 4 * len(jids)  # stale entries leave as they come due


async def test_a_pass_with_nothing_due_looks_at_nothing_and_unknowns_are_flagged_after_the_grace() -> None:
    client = make_client("op@localhost/x", "secret", Endpoint())
    tracker = PresenceTracker(client, grace_s=GRACE)
    jids = [f"d-{i:04d}@devices.localhost" for i in range(2000)]
    for jid in jids:
        tracker.views[jid] = DeviceView(name=jid.split("@")[0], jid=jid, kind=DeviceKind.LOAD)
    tracker._unknown.update(jids)
    now = asyncio.get_running_loop().time()
    tracker._started_at = now
    for jid in jids[:-1]:
        tracker._intake(presence(jid, 60.0), f"{jid}/r", jid, "r")
    assert tracker._unknown == {jids[-1]}
    due = list(tracker._due)
    tracker._watch_pass(now + 1.0)
    assert tracker._due == due  # nothing popped: no view was looked at
    tracker._watch_pass(now + 2 * GRACE + 1.0)
    assert tracker.views[jids[-1]].health is HealthStatus.PRESENCE_ERROR
    assert tracker.views[jids[-1]].health_reason == "no presence since the watch began"
    assert all(tracker.views[j].health is HealthStatus.OK for j in jids[:-1])
    assert not tracker._unknown


async def test_nothing_is_flagged_while_our_own_session_is_down() -> None:
    """Our session lost: every device is unknown for that reason alone, however long it lasts;
    once back, the start-up grace runs again before a silent device is flagged."""
    from gridpresence.xmpp.reconnect import SessionChange, SessionEvent

    client = make_client("op@localhost/x", "secret", Endpoint())
    tracker = PresenceTracker(client, grace_s=GRACE)
    probed: list[str] = []

    async def probe(view: DeviceView) -> None:
        probed.append(view.jid)
        tracker._pinging.discard(view.jid)

    tracker._probe = probe  # type: ignore[method-assign]
    jids = [f"d-{i}@devices.localhost" for i in range(5)]
    for jid in jids:
        tracker.views[jid] = DeviceView(name=jid.split("@")[0], jid=jid, kind=DeviceKind.LOAD)
        tracker._intake(presence(jid, 1.0), f"{jid}/r", jid, "r")
    now = asyncio.get_running_loop().time()
    tracker._started_at = now
    tracker._on_session(SessionChange(SessionEvent.LOST, "op@localhost", 0.0, reason="cut"))
    assert {v.health for v in tracker.views.values()} == {HealthStatus.UNKNOWN}
    for later in (1.0, 2 * GRACE + 1, 10 * GRACE):  # long past every refresh and the grace
        tracker._watch_pass(now + later)
    assert {v.health for v in tracker.views.values()} == {HealthStatus.UNKNOWN} and not probed
    assert {v.health_reason for v in tracker.views.values()} == {OWN_OUTAGE}
    tracker._on_session(SessionChange(SessionEvent.BACK, "op@localhost", 0.0, down_s=50.0))
    back = tracker._started_at
    tracker._intake(presence(jids[0], 60.0), f"{jids[0]}/r", jids[0], "r")  # one comes back
    tracker._watch_pass(back + GRACE)  # within the new grace: nothing yet
    assert sum(v.health is HealthStatus.PRESENCE_ERROR for v in tracker.views.values()) == 0
    tracker._watch_pass(back + 2 * GRACE + 1)
    flagged = {j for j, v in tracker.views.items() if v.health is HealthStatus.PRESENCE_ERROR}
    assert flagged == set(jids[1:])
