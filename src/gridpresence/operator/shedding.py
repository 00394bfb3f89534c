"""Load shedding on presence ([00137]): one implementation for the load-shed script and the
fleet console. Sheds loads that are on, largest first, skipping critical and restricted ones,
until the net load is under a target; starts an off generator if shedding is not enough."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from gridpresence.operator.library import GridOperator
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol import Action, DeviceKind, DeviceState


def net_load_kw(devices: Mapping[str, DeviceView]) -> float:
    """What the loads draw minus what running generators supply."""
    total = 0.0
    for view in devices.values():
        if not view.present or view.report is None:
            continue
        kw = view.report.telemetry.kw or 0.0
        if view.kind is DeviceKind.LOAD:
            total += kw
        elif view.kind is DeviceKind.GENERATOR:
            total -= kw
    return total


def sheddable(devices: Mapping[str, DeviceView]) -> list[DeviceView]:
    """Loads that are on and may be shed, largest first."""
    loads = [v for v in devices.values()
             if v.kind is DeviceKind.LOAD and v.present and v.report is not None
             and v.report.state is DeviceState.ON and not v.report.critical]
    return sorted(loads, key=lambda v: _kw(v), reverse=True)


def _kw(view: DeviceView) -> float:
    return (view.report.telemetry.kw or 0.0) if view.report else 0.0


async def shed_to_target(grid: GridOperator, target_kw: float, price_limit: float | None,
                         progress: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Shed to `target_kw` (everything sheddable above `price_limit`); `progress(done, total)`
    follows each round's fan-out."""
    log: list[dict[str, object]] = []
    price = None
    if price_limit is not None:
        try:
            await grid.wait_tariff(timeout=3)
        except TimeoutError:
            pass
        price = grid.price_now()
        if price is not None and price > price_limit:
            target_kw = 0.0  # too expensive: take off every load we may
    devices = dict(grid.devices)
    skipped = sorted(v.name for v in devices.values() if v.kind is DeviceKind.LOAD and v.report is not None
                     and (v.report.critical or v.report.state is DeviceState.RESTRICTED))
    net = net_load_kw(devices)
    # Planned in rounds, each round's sheds sent at once (command_many): the fewest loads, largest
    # first, that would meet the target if all obey; loads that refuse are replaced by the next
    # ones in a further round. Ten thousand loads take a few rounds, not ten thousand round trips.
    candidates = sheddable(devices)
    nxt = 0
    while net > target_kw and nxt < len(candidates):
        plan: list[DeviceView] = []
        planned = net
        while nxt < len(candidates) and planned > target_kw:
            plan.append(candidates[nxt])
            planned -= _kw(candidates[nxt])
            nxt += 1
        outcomes = await grid.command_many([v.name for v in plan], Action.SHED, progress=progress)
        for view in plan:
            outcome = outcomes[view.name]
            log.append({"device": view.name, "action": "shed", "outcome": outcome.summary()})
            if outcome.ok:
                net -= _kw(view)
    started = None
    if net > target_kw:
        generators = sorted((v for v in grid.devices.values() if v.kind is DeviceKind.GENERATOR and v.present
                             and v.state is DeviceState.OFF),
                            key=lambda v: (v.report.telemetry.capacity_kw or 0.0) if v.report else 0.0, reverse=True)
        for gen in generators:
            outcome = await grid.command(gen.name, Action.START)
            log.append({"device": gen.name, "action": "start", "outcome": outcome.summary()})
            if outcome.ok:
                started = gen.name
                break
    return {"target_kw": target_kw, "net_kw_after": round(net, 1), "price": price, "actions": log,
            "skipped": skipped, "generator_started": started, "met": net <= target_kw or started is not None}
