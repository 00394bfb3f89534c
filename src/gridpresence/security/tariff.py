"""The billing party's price, as every receiving side (devices and operators) takes it: signed,
by a billing party, for this recipient, allowed by the policy, and valid."""

from __future__ import annotations

from collections.abc import Callable

from slixmpp import Message

from gridpresence.protocol.codec import PayloadError, tariff_from_xml
from gridpresence.protocol.models import Action, Tariff, utcnow
from gridpresence.protocol.openpgp import OPENPGP_NS
from gridpresence.security.keyring import KeyLookup
from gridpresence.security.policy import Role, SecuritySettings
from gridpresence.security.signed import SignatureFailure, check_envelope, key_of, open_signed


class TariffRefused(ValueError):
    """A ``<tariff>`` that is not taken; `condition` is the stanza error the sender gets."""

    def __init__(self, condition: str, text: str) -> None:
        super().__init__(text)
        self.condition = condition


async def tariff_from_billing(msg: Message, is_billing: Callable[[str], bool], keys: KeyLookup,
                              security: SecuritySettings | None = None) -> Tariff:
    """The one gate for a price message, on every receiving side (devices and operators): a
    billing party's, signed with its key for this recipient (XEP-0373 ``<sign/>``, not older
    than ``max_ttl_s``: the server may have held it while the recipient was offline), allowed by
    the policy, and valid. A bare ``<tariff/>`` is refused: anyone with billing's password could
    send one."""
    security = security or SecuritySettings()
    sender, me = msg["from"].bare, msg["to"].bare
    if not is_billing(sender):
        raise TariffRefused("not-authorized", f"{sender} is not a billing party; only the billing party sets prices")
    sealed_el = msg.xml.find(f"{{{OPENPGP_NS}}}openpgp")
    if sealed_el is None:
        raise TariffRefused("not-authorized", "unsigned: a tariff must be signed with the billing party's key")
    try:
        sealed = open_signed(sealed_el)
        sealed.verify(await key_of(sender, keys), sender)
        check_envelope(sealed.content, me, utcnow(), security.clock_skew_s, security.max_ttl_s)
        tariff = tariff_from_xml(sealed.payload)
    except SignatureFailure as exc:
        raise TariffRefused("not-authorized", f"{exc.reason.value}: {exc.detail}") from None
    except PayloadError as exc:
        raise TariffRefused("bad-request", str(exc)) from None
    action = Action.TARIFF if tariff.kind == "tariff" else Action.PRICE
    if not security.allows(Role.BILLING, action):
        raise TariffRefused("not-authorized", f"the policy does not let billing send a {action.value}")
    return tariff
