"""A device's check of a signed command before it acts: signature, role, serial, freshness.

The replay check and the effect itself stay with the device (device/agent.py); everything
here is pure and raises :class:`Refusal` with the reason that goes into the outcome.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple
from xml.etree import ElementTree as ET

from gridpresence.protocol.codec import PayloadError, command_from_xml
from gridpresence.protocol.models import Action, Command, RejectReason
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.signed import Sealed, SignatureFailure, check_envelope, open_signed
from gridpresence.security.pgp import pgpy


class Refusal(Exception):
    """A command refused before it could act: the reason, words, and its id if it had one."""

    def __init__(self, reason: RejectReason, detail: str, command_id: str = "") -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.command_id = command_id


class SignedCommand(NamedTuple):  # a tuple: a third of a frozen dataclass's making, per command
    """A signed ``<command/>`` opened for checking; ``command`` is what it claims, unverified."""

    sealed: Sealed
    command: Command


def open_sealed(el: ET.Element | None) -> Sealed:
    """:func:`open_signed`, refusing as a command would be refused."""
    try:
        return open_signed(el)
    except SignatureFailure as exc:
        raise Refusal(exc.reason, exc.detail) from None


def open_command(el: ET.Element | None) -> SignedCommand:
    """Parse a signed command without trusting it (the issuer names the key to check with)."""
    sealed = open_sealed(el)
    return SignedCommand(sealed, parse_command(sealed.payload))


def parse_command(raw: ET.Element) -> Command:
    """The ``<command/>`` element as a model; a Refusal says what is wrong with it."""
    try:
        return command_from_xml(raw)
    except PayloadError as exc:
        unknown = raw.get("action") not in {a.value for a in Action}
        reason = RejectReason.NOT_SUPPORTED if unknown else RejectReason.INVALID_ARGUMENTS
        detail = f"unknown command {raw.get('action')!r}" if unknown else str(exc)
        raise Refusal(reason, detail, (raw.get("id") or "")[:64]) from None


@dataclass(frozen=True)
class CommandGate:
    """What one device checks. ``roles``: bare JID -> role; ``relays``: who may carry others'
    signed commands (never sign them)."""

    device: str
    serial: str
    security: SecuritySettings
    roles: Mapping[str, Role]
    relays: frozenset[str]

    def may_send(self, sender: str) -> bool:
        """Whether ``sender`` (bare JID) may hand this device commands at all."""
        return sender in self.roles or sender in self.relays

    def may_issue(self, signed: SignedCommand) -> None:
        """Before any key is looked up: the claimed issuer must have a role at all (a relay or a
        device has none, so there is no key worth fetching for it)."""
        cmd = signed.command
        if cmd.issuer not in self.roles:
            raise Refusal(RejectReason.NOT_AUTHORISED, f"{cmd.issuer} has no role that may issue commands", cmd.id)
        self._role_allows(cmd)  # nor for a role that may not issue this action

    def check(self, sender: str, signed: SignedCommand, key: pgpy.PGPKey, now: dt.datetime, *,
              carriers: frozenset[str] = frozenset()) -> Command:
        """The command if ``key`` (the issuer's pinned key) signed it and it may act now.
        ``carriers``: who else may hand it over (operators carry a manufacturer's firmware offer)."""
        cmd = signed.command
        try:
            signed.sealed.check(key, cmd.issuer)
        except SignatureFailure as exc:
            raise Refusal(exc.reason, exc.detail, cmd.id) from None
        if sender != cmd.issuer and sender not in self.relays and sender not in carriers:
            raise Refusal(RejectReason.NOT_AUTHORISED, f"{sender} is neither the issuer nor a relay", cmd.id)
        try:
            check_envelope(signed.sealed.content, self.device, now, self.security.clock_skew_s)
        except SignatureFailure as exc:
            raise Refusal(exc.reason, exc.detail, cmd.id) from None
        self._authorised(cmd)
        self._fresh(cmd, signed.sealed.content.time)
        return cmd

    def check_unsigned(self, sender: str, cmd: Command) -> Command:
        """With ``require_signatures = false`` only: the same rules minus the signature."""
        if sender != cmd.issuer and sender not in self.relays:
            raise Refusal(RejectReason.NOT_AUTHORISED, f"{sender} is neither the issuer nor a relay", cmd.id)
        if cmd.issuer not in self.roles:
            raise Refusal(RejectReason.NOT_AUTHORISED, f"{cmd.issuer} has no role that may issue commands", cmd.id)
        self._authorised(cmd)
        return cmd

    def _authorised(self, cmd: Command) -> None:
        if cmd.serial != self.serial:
            raise Refusal(RejectReason.WRONG_SERIAL,
                          f"signed for serial {cmd.serial or '(none)'}, this device is {self.serial}", cmd.id)
        self._role_allows(cmd)

    def _role_allows(self, cmd: Command) -> None:
        role = self.roles.get(cmd.issuer)
        if not self.security.allows(role, cmd.action):
            may = " or ".join(self.security.roles_for(cmd.action)) or "nobody"
            raise Refusal(RejectReason.NOT_AUTHORISED, f"{cmd.issuer} ({role.value if role else 'no role'}) may not "
                                                       f"{cmd.action.value}; only {may} may", cmd.id)

    def _fresh(self, cmd: Command, signed_at: dt.datetime) -> None:
        skew = dt.timedelta(seconds=self.security.clock_skew_s)
        if abs(signed_at - cmd.issued) > skew:
            raise Refusal(RejectReason.STALE, "signing time and issue time disagree", cmd.id)
        if (cmd.expires - cmd.issued).total_seconds() > self.security.max_ttl_s:
            raise Refusal(RejectReason.STALE, f"valid for longer than {self.security.max_ttl_s:g} s", cmd.id)
