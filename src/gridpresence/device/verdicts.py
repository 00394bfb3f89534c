"""Operators' verdicts on alarms, and threshold adjustment over chat (second document).

An operator replies to an alarm with ``not a fault [ID]`` (or ``fault [ID]``), or uses the
"Judge an alarm" ad-hoc command. The verdict feeds the device's threshold adjustment; when it
proposes a new threshold (confirm or hybrid mode) the operator who judged hears it and answers
``accept N``, ``set N VALUE`` (hybrid) or ``reject N``; ``revert N`` undoes a change and
``thresholds`` lists them. Every change is in the device's audit: who, when, old, new, why.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from slixmpp import Iq

from gridpresence.device.adhoc import AdhocCommands
from gridpresence.device.alarms import AlarmDesk
from gridpresence.device.chat import ChatDesk, unsigned_refusal
from gridpresence.device.host import DeviceHost
from gridpresence.rules.model import AdjustMode
from gridpresence.rules.thresholds import SYSTEM, AdjustError, Change, Proposal
from gridpresence.security.policy import ThresholdAct


log = logging.getLogger(__name__)

JUDGE = "judge-alarm"
NOT_FAULT = ("not a fault", "not fault", "not_fault", "no fault", "false alarm")
FAULT = ("fault", "real fault", "a fault")
WORDS: tuple[str, ...] = ("not a fault [ID]", "fault [ID]", "accept N", "set N VALUE", "reject N", "revert N", "thresholds")


def describe_adjustment(device: str, outcome: Change | Proposal) -> str:
    if isinstance(outcome, Change):
        undo = "" if outcome.reverts else f" Reply 'revert {outcome.id}' to undo."
        return (f"{device}: threshold {outcome.rule}.{outcome.param} changed {outcome.old:g} -> {outcome.new:g} "
                f"by {outcome.by} (change {outcome.id}): {outcome.why}.{undo}")
    other = f", 'set {outcome.id} VALUE'" if outcome.mode is AdjustMode.HYBRID else ""
    return (f"{device}: threshold proposal {outcome.id}: {outcome.rule}.{outcome.param} {outcome.current:g} -> "
            f"{outcome.proposed:g} ({outcome.why}). Reply 'accept {outcome.id}'{other} or 'reject {outcome.id}'.")


class VerdictDesk:
    """One device's verdicts, proposals and threshold changes, over chat and ad-hoc commands."""

    WORDS: tuple[str, ...] = WORDS  # for the chat help

    def __init__(self, agent: DeviceHost) -> None:
        self.agent = agent
        self.desk = agent.desk(AlarmDesk)
        self._judged_by: dict[str, str] = {}  # rule -> the operator who judged its last alarm
        self.desk.on_adjustment = self._tell
        agent.desk(ChatDesk).add_verbs(self)
        JudgeCommand(agent, self)

    def close(self) -> None:
        pass

    @property
    def name(self) -> str:
        return self.agent.spec.name

    # -- chat ---------------------------------------------------------------------------

    def answer(self, who: str, text: str, *, signed: bool = False) -> str | None:
        """The reply to a verdict or threshold command; None if the text is neither. Each one
        acts on thresholds, so unsigned it is refused unless the lab setting allows it."""
        line = " ".join(text.strip().rstrip(".!?").lower().split())
        for phrases, fault in ((NOT_FAULT, False), (FAULT, True)):
            for phrase in phrases:
                if line == phrase or line.startswith(phrase + " "):
                    rest = line[len(phrase):].split()
                    if len(rest) <= 1:
                        if not self.agent.security.may_act(ThresholdAct.JUDGE, signed):
                            return unsigned_refusal(phrase)
                        return self.judge(who, rest[0] if rest else None, fault)
        words = line.split()
        if not words:
            return None
        verb, rest = words[0], words[1:]
        if (verb in ("accept", "reject", "revert") and len(rest) == 1) or (verb == "set" and len(rest) == 2):
            if not self.agent.security.may_act(ThresholdAct(verb), signed):
                return unsigned_refusal(verb)
        try:
            if verb == "thresholds" and not rest:
                return self._list()
            if verb in ("accept", "reject", "revert") and len(rest) == 1:
                number = _number(rest[0])
                if verb == "accept":
                    return describe_adjustment(self.name, self.desk.adjuster.confirm(number, who))
                if verb == "reject":
                    p = self.desk.adjuster.reject(number)
                    return f"{self.name}: proposal {p.id} rejected; {p.rule}.{p.param} stays {p.current:g}."
                return describe_adjustment(self.name, self.desk.thresholds.revert(number, who))
            if verb == "set" and len(rest) == 2:
                value = float(rest[1])
                if not math.isfinite(value):
                    raise AdjustError(f"{rest[1][:20]!r} is not a number")
                return describe_adjustment(self.name, self.desk.adjuster.confirm(_number(rest[0]), who, value))
        except AdjustError as exc:
            return f"{self.name}: {exc}."
        except ValueError:
            return f"{self.name}: {rest[-1][:20]!r} is not a number. Usage: set N VALUE."
        return None

    def judge(self, who: str, alarm_id: str | None, fault: bool) -> str:
        """Record a verdict on an alarm (the latest if no id) and say what it led to."""
        known = self.desk.rule_alarms
        if not known:
            return f"{self.name} has raised no alarm to judge."
        if alarm_id is None:
            alarm_id = max(known, key=int)
        if alarm_id not in known:
            return f"{self.name} raised no alarm {alarm_id[:20]!r}; its alarms: {', '.join(sorted(known, key=int)[-10:])}."
        rule, raised_ts = known[alarm_id]
        self._judged_by[rule] = who
        try:
            outcome = self.desk.adjuster.verdict(self.name, rule, fault, raised_ts=raised_ts)
        except AdjustError as exc:
            return f"{self.name}: {exc}."
        log.info("%s: alarm %s judged %s by %s", self.name, alarm_id, "a fault" if fault else "not a fault", who)
        said = f"Recorded: alarm {alarm_id} ({rule}) is {'a fault' if fault else 'not a fault'}."
        return said if outcome is None else f"{said} {describe_adjustment(self.name, outcome)}"

    def _list(self) -> str:
        lines = [describe_adjustment(self.name, c) for c in self.desk.thresholds.audit[-5:]]
        lines += [describe_adjustment(self.name, p) for p in self.desk.adjuster.pending.values()]
        return "\n".join(lines) if lines else f"{self.name}: all thresholds as in the rule set; nothing proposed."

    def _tell(self, outcome: Change | Proposal) -> None:
        """A proposal or automatic change made as an alarm came or went: tell who judged it."""
        who = self._judged_by.get(outcome.rule)
        targets = [who] if who else [op for op in self.desk.duty if self.desk.available(op)]
        if isinstance(outcome, Change) and outcome.by != SYSTEM:
            return
        if not self.agent.client.is_connected():
            return
        for op in targets:
            self.agent.client.make_message(mto=op, mbody=describe_adjustment(self.name, outcome), mtype="chat").send()


def _number(text: str) -> int:
    if not text.isdigit() or len(text) > 9:
        raise AdjustError(f"{text[:20]!r} is not a proposal or change number")
    return int(text)


class JudgeCommand(AdhocCommands):
    """The "Judge an alarm" ad-hoc command (XEP-0050), next to the device's others."""

    def __init__(self, agent: DeviceHost, verdicts: VerdictDesk) -> None:
        self.verdicts = verdicts
        super().__init__(agent)

    def _add_commands(self, _event: object) -> None:
        self.add_command(JUDGE, "Judge an alarm", self._form)

    def _form(self, iq: Iq, session: dict[str, Any]) -> dict[str, Any]:
        self._authorise(iq["from"])
        known = self.verdicts.desk.rule_alarms
        if not known:
            return self._finish(session, None, f"{self.agent.spec.name} has raised no alarm to judge.")
        form = self.forms.make_form(ftype="form", title=f"Judge an alarm of {self.agent.spec.label}")
        alarm = form.add_field(var="alarm", ftype="list-single", label="Alarm", required=True)
        for aid in sorted(known, key=int)[-20:]:
            alarm.add_option(label=f"{aid}: {known[aid][0]}", value=aid)
        verdict = form.add_field(var="verdict", ftype="list-single", label="Verdict", required=True)
        verdict.add_option(label="not a fault", value="not_fault")
        verdict.add_option(label="a fault", value="fault")
        session.update(payload=form, next=self._submit, has_next=False, allow_complete=True)
        return session

    def _submit(self, payload: Any, session: dict[str, Any]) -> dict[str, Any]:
        who = self._authorise(session["from"])
        values = self._submitted(payload)
        wanted, verdict = str(values.get("alarm") or ""), str(values.get("verdict") or "")
        if wanted not in self.verdicts.desk.rule_alarms:
            return self._finish(session, None, f"no alarm {wanted[:20]!r}", "error")
        if verdict not in ("fault", "not_fault"):
            return self._finish(session, None, f"verdict must be fault or not_fault, not {verdict[:20]!r}", "error")
        if not self.agent.security.may_act(ThresholdAct.JUDGE, signed=False):  # a form is never signed
            return self._finish(session, None, unsigned_refusal("judge-alarm", form=True), "error")
        return self._finish(session, None, self.verdicts.judge(who, wanted, verdict == "fault"))
