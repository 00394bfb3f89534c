"""The fleet console: a bot an operator chats with for fleet-wide views and actions.

``fleet``, ``who is restricted``, ``shed 300kW``, ``restore load-1 load-2``, ``stop all
generators``. It is a :class:`GridOperator` — the library behind the CLI and the scripts —
with a chat front: the same views, the same commands, the same load-shed plan.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterable, Mapping

from slixmpp import JID, Message

from gridpresence.words import outcome_line, status_rows, table, unreadable
from gridpresence.operator.library import GridOperator
from gridpresence.xmpp.session import Endpoint
from gridpresence.operator.tracker import DeviceView
from gridpresence.protocol import Action, DeviceKind, DeviceState
from gridpresence.security.pep_keyring import PartyKeys, PepKeyring
from gridpresence.security.policy import SecuritySettings
from gridpresence.operator.shedding import net_load_kw, shed_to_target

log = logging.getLogger(__name__)

MAX_ROWS = 60  # a chat line per device is readable up to about this many
KIND_WORDS: dict[str, DeviceKind] = {
    "loads": DeviceKind.LOAD, "generators": DeviceKind.GENERATOR, "meters": DeviceKind.METER,
    "breakers": DeviceKind.BREAKER, "masters": DeviceKind.MASTER,
}
ACTIONS = ("shed", "restore", "start", "stop", "open", "close", "read")
_KW = re.compile(r"^(\d+(?:\.\d+)?)\s*kw$", re.IGNORECASE)
HELP = ("Fleet console commands: fleet (every device), who is restricted|on|off|presence-error, "
        "shed 300kW (shed loads until the net load is 300 kW lower), "
        "ACTION DEVICE... (e.g. restore load-1 load-2), ACTION all KIND (e.g. stop all generators), help. "
        f"Actions: {', '.join(ACTIONS)}.")


def fleet_summary(devices: Mapping[str, DeviceView]) -> str:
    """One line for the whole fleet: how many in each state, and the net load."""
    counts: dict[str, int] = {}
    for view in devices.values():
        counts[view.label] = counts.get(view.label, 0) + 1
    states = ", ".join(f"{n} {label}" for label, n in sorted(counts.items()))
    return f"{len(devices)} devices: {states}; net load {net_load_kw(devices):.1f} kW"


CONSOLE_STATUS = "fleet console: type help"


class ConsoleAgent:
    def __init__(self, jid: str, password: str, endpoint: Endpoint, operators: Iterable[str], *,
                 watchdog: str | None = None, grace_s: float = 15.0, keys: PartyKeys | None = None,
                 serials: Mapping[str, str] | None = None, security: SecuritySettings | None = None) -> None:
        self.operators = frozenset(JID(j).bare for j in operators)
        # The console signs with its own key, but an operator's chat line to it is unsigned: it
        # acts only where the fleet allows unsigned chat actions ([security]); reads always.
        self.security = security or SecuritySettings()  # its may_act is the one rule for chat
        self.grid = GridOperator(jid, password, endpoint, watchdog=watchdog, grace_s=grace_s, keys=keys,
                                 serials=serials)
        self.grid.presence_status = CONSOLE_STATUS  # also after a reconnect
        self.grid.client.add_event_handler("message", self._on_message)
        self._busy: set[asyncio.Task[None]] = set()

    @property
    def keyring(self) -> PepKeyring:
        return self.grid.keyring

    async def start(self, timeout: float = 20.0) -> None:
        await self.grid.connect(timeout=timeout, settle_s=0.2)

    login = start  # one console: no login herd to spread

    async def stop(self) -> None:
        for task in self._busy:
            task.cancel()
        await self.grid.close()

    def _on_message(self, msg: Message) -> None:
        if msg["type"] not in ("chat", "normal") or not msg["body"]:
            return
        task = asyncio.ensure_future(self._reply(msg))
        self._busy.add(task)
        task.add_done_callback(self._busy.discard)

    async def _reply(self, msg: Message) -> None:
        try:
            text = await self.answer(msg["from"].bare, msg["body"])
        except Exception:  # nothing typed may end the console
            log.exception("console: message from %s failed", msg["from"])
            text = "Sorry, that failed inside the console; it is logged. Type help."
        if text:
            self.grid.client.send_message(mto=msg["from"], mbody=text, mtype="chat")

    async def answer(self, sender: str, text: str) -> str | None:
        if sender not in self.operators:
            if sender.split("@")[0] and sender in self.grid.tracker.views:
                return None  # a device: never start a conversation between bots
            return "not authorised: only the utility's operators may use the fleet console."
        problem = unreadable(text)
        if problem:
            return f"{problem} {HELP}"
        words = text.strip().rstrip(".!?").lower().split()
        if not words or words[0] in ("help", "?"):
            return HELP
        if words[0] in ("fleet", "status") and len(words) == 1:
            return self.fleet()
        if words[:2] == ["who", "is"] and len(words) == 3:
            return self.who_is(words[2])
        if words[0] in ACTIONS and not self.security.may_act(Action(words[0]), signed=False):
            return (f"Refused {words[0]}: an unsigned chat line may not change devices' state here; "
                    "send a signed command (gridpresence CLI or the operator library).")
        if words[0] == "shed" and len(words) in (2, 3) and _KW.match("".join(words[1:])):
            return await self.shed_kw(float(_KW.match("".join(words[1:])).group(1)))  # type: ignore[union-attr]
        if words[0] in ACTIONS and len(words) >= 2:
            return await self.group_action(words[0], words[1:])
        return f"I do not understand {text.strip()[:40]!r}. {HELP}"

    # -- views ----------------------------------------------------------------------------

    def fleet(self) -> str:
        devices = dict(self.grid.devices)
        rows = status_rows(devices)
        more = len(rows) - 1 - MAX_ROWS
        shown = table(rows[: MAX_ROWS + 1]) + (f"\n… and {more} more" if more > 0 else "")
        return f"{fleet_summary(devices)}\n{shown}"

    def who_is(self, state: str) -> str:
        known = {s.value for s in DeviceState} | {"presence-error", "unknown"}
        if state not in known:
            return f"'{state[:20]}' is not a state; try one of: {', '.join(sorted(known))}."
        found = [v for v in self.grid.devices.values() if v.label == state]
        if not found:
            return f"No device is {state}."
        lines = [f"{v.name}: {v.report.status_text() if v.report else v.health_reason}" for v in found]
        return f"{len(found)} {'device is' if len(found) == 1 else 'devices are'} {state}:\n" + "\n".join(sorted(lines))

    # -- actions --------------------------------------------------------------------------

    async def shed_kw(self, kw: float) -> str:
        net = net_load_kw(self.grid.devices)
        report = await shed_to_target(self.grid, net - kw, None)
        lines = [f"{step['action']} {step['device']}: {step['outcome']}" for step in report["actions"]]  # type: ignore[union-attr,attr-defined]
        skipped = ", ".join(report["skipped"]) or "none"  # type: ignore[arg-type]
        started = f"; started {report['generator_started']}" if report["generator_started"] else ""
        verdict = "target met" if report["met"] else "target NOT met"
        return "\n".join([f"Shedding {kw:g} kW: net load was {net:.1f} kW, target {net - kw:.1f} kW.", *lines,
                          f"Skipped (critical or restricted): {skipped}.",
                          f"Net load now {report['net_kw_after']} kW{started}: {verdict}."])

    async def group_action(self, action: str, targets: list[str]) -> str:
        if len(targets) == 2 and targets[0] == "all":
            kind = KIND_WORDS.get(targets[1])
            if kind is None:
                return f"'all {targets[1][:20]}': name one of {', '.join(KIND_WORDS)}."
            names = sorted(n for n, v in self.grid.devices.items() if v.kind is kind)
        else:
            names = targets
        unknown = [n for n in names if n not in self.grid.devices]
        if unknown:
            return f"No device named {', '.join(repr(n[:40]) for n in unknown[:5])}. Type fleet for the list."
        if not names:
            return "No such devices."
        outcomes = await self.grid.command_many(names, Action(action))
        done = sum(o.ok for o in outcomes.values())
        return f"{action}: {done} of {len(names)} executed.\n" + "\n".join(outcome_line(n, o) for n, o in outcomes.items())
