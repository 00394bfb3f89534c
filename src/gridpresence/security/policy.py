"""Who may issue what: the ``[security]`` section of the fleet file.

Roles come from the fleet (its operators, billing parties and manufacturers); the policy maps
each role to the actions a device accepts from a command that role's key signed. Defaults are
the issue's ([0085]: a billing reset only from the billing party). ``unsigned_chat_actions``
lists what a plain, unsigned chat line or ad-hoc form may still do — a test/lab setting: by
default nothing that acts, so an operator account whose password leaked but whose key did not
can change neither a device's state nor its alarm thresholds (nor what they learn from).
:meth:`SecuritySettings.may_act` is the one place that decides.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gridpresence.protocol.models import Action


class Role(StrEnum):
    OPERATOR = "operator"
    BILLING = "billing"
    MANUFACTURER = "manufacturer"


DEFAULT_ALLOW: dict[Role, tuple[Action, ...]] = {
    Role.OPERATOR: (Action.SHED, Action.RESTORE, Action.START, Action.STOP, Action.OPEN, Action.CLOSE, Action.READ,
                    Action.SET_TIME),
    Role.BILLING: (Action.TARIFF, Action.PRICE, Action.BILLING_RESET),
    Role.MANUFACTURER: (Action.FIRMWARE_UPGRADE,),
}
# Chat and ad-hoc words that only look: always allowed without a signature.
READ_ONLY_ACTIONS = frozenset({Action.READ})


class ThresholdAct(StrEnum):
    """Chat and ad-hoc verbs that act on alarm thresholds: as much acting as a command (raising a
    threshold silences alarms), so they need a signature too."""

    ACCEPT = "accept"  # accept N: apply a proposed threshold
    SET = "set"  # set N VALUE: apply another value
    REJECT = "reject"  # reject N: drop a proposal (and the evidence for it)
    REVERT = "revert"  # revert N: undo a change
    JUDGE = "judge"  # fault / not a fault: a verdict that teaches the adjustment (it may change a threshold)


ChatAct = Action | ThresholdAct


class SecuritySettings(BaseModel):
    """``[security]``: the authorisation policy and the replay window."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    allow: dict[Role, tuple[Action, ...]] = Field(default_factory=lambda: dict(DEFAULT_ALLOW))
    # A signed command's time stamp may be this far from the device's clock (either way).
    clock_skew_s: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False)
    # A command may be valid at most this long after it was issued (relay-queued ones included).
    max_ttl_s: float = Field(default=86400.0, gt=0, le=30 * 86400, allow_inf_nan=False)
    # Lab/test setting: what an operator's unsigned chat line or ad-hoc form may do (actions
    # and threshold verbs, e.g. ["shed", "accept", "judge"]).
    unsigned_chat_actions: tuple[ChatAct, ...] = ()
    # Benchmark/migration setting only: false lets devices also take a bare <command/> from a
    # party with a role (still under `allow`, the serial and the replay guard) — with it, a
    # stolen password commands the grid again. bench/fanout.py --signatures both uses it.
    require_signatures: bool = True

    @model_validator(mode="after")
    def _every_role(self) -> SecuritySettings:
        missing = [r.value for r in Role if r not in self.allow]
        if missing:  # a partial table would silently leave a role with nothing
            raise ValueError(f"allow must list every role; missing: {', '.join(missing)}")
        return self

    def allows(self, role: Role | None, action: Action) -> bool:
        return role is not None and action in self.allow.get(role, ())

    def may_act(self, act: ChatAct, signed: bool) -> bool:
        """Whether a chat line or ad-hoc form doing `act` may go ahead: it came signed by the
        operator's key, it only looks, or the lab setting lets it through unsigned."""
        return signed or act in READ_ONLY_ACTIONS or act in self.unsigned_chat_actions

    def roles_for(self, action: Action) -> list[str]:
        return [r.value for r, actions in self.allow.items() if action in actions]
