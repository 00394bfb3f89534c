"""Mixing store-and-forward with presence ([00139], [00144]): alerts when a device becomes
available, messages kept until it is, and one command to a group with an outcome per member.

"Available" means present and not restricted: a restricted device ("on but unavailable to
receive commands") is present but would refuse.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping

from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol.models import Action, DeviceState, Outcome, OutcomeStatus, RejectReason


def available(view: DeviceView) -> bool:
    return view.present and view.state is not DeviceState.RESTRICTED


async def wait_available(grid: GridOperator, name: str, timeout: float) -> DeviceView:
    """The alert of [00144]: returns the device's view once it is available; TimeoutError if not in time."""
    grid.device(name)  # unknown names fail now, not at the time-out
    devices: Mapping[str, DeviceView] = await grid.wait_for(lambda d: available(d[name]), timeout=timeout)
    return devices[name]


async def command_when_available(grid: GridOperator, name: str, action: Action | str, *, timeout_s: float,
                                 args: dict[str, str] | None = None) -> Outcome:
    """The pre-stored message of [00144]: `action` reaches the device as soon as it is available
    (through the relay while it has no presence; retried while it is restricted). A device not
    available before the time-out ends as "expired"."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        remaining = deadline - loop.time()
        view = grid.device(name)
        if remaining <= 0:
            return Outcome(command_id="-", device=view.jid, status=OutcomeStatus.EXPIRED,
                           detail=f"not available within {timeout_s:g} s ({view.label})")
        if view.present and view.state is DeviceState.RESTRICTED:
            try:
                await grid.wait_for(lambda d: not (d[name].present and d[name].state is DeviceState.RESTRICTED),
                                    timeout=remaining)
            except TimeoutError:
                pass
            continue
        outcome = await grid.command(name, action, args=args, ttl_s=remaining, wait_final=True)
        if outcome.status is OutcomeStatus.REJECTED and outcome.reason is RejectReason.RESTRICTED:
            continue  # it became restricted on the way: wait for it again
        if outcome.status is OutcomeStatus.UNDELIVERABLE and grid.relay is None:
            try:  # no relay to hold it: wait for the presence ourselves
                await grid.wait_for(lambda d: d[name].present, timeout=remaining)
            except TimeoutError:
                pass
            continue
        return outcome


async def command_group(grid: GridOperator, names: Iterable[str], action: Action | str, *, timeout_s: float,
                        args: dict[str, str] | None = None) -> dict[str, Outcome]:
    """One command to many devices ([00139]): one outcome per member. Available members act at
    once; the others are retried when they become available, until `timeout_s` reports them
    "expired"."""
    names = list(dict.fromkeys(names))
    for name in names:
        grid.device(name)
    outcomes = await asyncio.gather(*(command_when_available(grid, n, action, timeout_s=timeout_s, args=args)
                                      for n in names))
    return dict(zip(names, outcomes))
