"""A device's OpenPGP for XMPP desk for the tests, keyed with the grid's provisioned keys."""

from __future__ import annotations

from conftest import Env
from gridpresence.agents.ox_chat import OxDesk
from gridpresence.security.keyring import StaticKeys

_desks: dict[str, OxDesk] = {}


def ox_desk(env: Env, name: str) -> OxDesk:
    """The OX desk of device ``name``, made once per session. The operators' public keys are
    the ones the grid provisioned (what a PEP key lookup would find and pin)."""
    if name not in _desks:
        assert env.grid.bots is not None
        pinned = StaticKeys({env.fleet.jid(o.name): env.grid.keys.secret(o.name) for o in env.fleet.operators})
        _desks[name] = OxDesk(env.grid.bots.devices[name], env.grid.keys.secret(name), pinned)
    return _desks[name]
