"""The watchdog's pass at fleet size (operator/tracker.py `_watch_pass`): what one pass costs
the loop that takes presence (every tracker runs one a second: the operator's, the watchdog
service's, the console's), against the walk over every view it replaced, same run, same views.

    ../.venv/bin/python watchdog_pass.py --devices 10000 --passes 200
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from xml.etree import ElementTree as ET

from common import summary

from gridpresence.operator.tracker import DeviceView, PresenceTracker
from gridpresence.protocol import DeviceKind, DeviceState, HealthStatus, PresenceReport
from gridpresence.protocol.codec import report_to_xml
from gridpresence.xmpp.session import Endpoint, make_client


def walk(tracker: PresenceTracker, now: float) -> int:
    """The pass before the deadline queue: every view's deadline worked out, every second."""
    due = 0
    for view in list(tracker.views.values()):
        deadline = tracker._deadline(view)
        if deadline is not None and now > deadline and view.jid not in tracker._pinging:
            due += 1
        elif view.health is HealthStatus.UNKNOWN and now - tracker._started_at > 2 * tracker.grace_s:
            due += 1
    return due


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=10000)
    parser.add_argument("--passes", type=int, default=200)
    args = parser.parse_args()
    tracker = PresenceTracker(make_client("op@localhost/x", "secret", Endpoint()), grace_s=15.0)
    rng = random.Random(5)
    for i in range(args.devices):
        jid = f"d-{i:05d}@devices.localhost"
        tracker.views[jid] = DeviceView(name=jid.split("@")[0], jid=jid, kind=DeviceKind.LOAD)
        xml = ET.Element("{jabber:client}presence", {"from": f"{jid}/r"})
        xml.append(report_to_xml(PresenceReport(kind=DeviceKind.LOAD, state=DeviceState.ON,
                                                refresh_s=rng.choice((60.0, 300.0)))))
        tracker._intake(xml, f"{jid}/r", jid, "r")
    now = asyncio.get_running_loop().time() + 1.0  # one second on: nothing is due, as most seconds
    old: list[float] = []
    new: list[float] = []
    for _ in range(args.passes):
        t = time.process_time()
        walk(tracker, now)
        old.append(time.process_time() - t)
        t = time.process_time()
        tracker._watch_pass(now)
        new.append(time.process_time() - t)
    print(f"{args.devices} devices, {args.passes} passes, CPU per pass:")
    before = summary("walk over every view (baseline)", old)
    after = summary("deadline queue", new)
    print(f"  ratio to baseline: median {after['median_ms'] / before['median_ms']:.4f}x, "
          f"p99 {after['p99_ms'] / before['p99_ms']:.4f}x")

if __name__ == "__main__":
    asyncio.run(main())
