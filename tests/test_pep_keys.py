"""Public keys over PEP (XEP-0373 §4), pinned on first use, against the real Prosody."""

from __future__ import annotations

import json

from gridpresence.agents.operator import GridOperator
from gridpresence.security.keys import fingerprint
from conftest import Env


def _fpr(env: Env, name: str) -> str:
    return fingerprint(env.grid.keys.secret(name))


async def test_parties_see_each_others_keys_over_pep(env: Env, alice: GridOperator) -> None:
    bots = env.grid.bots
    assert bots is not None
    master = bots.devices["master"]
    key = await alice.keyring.key_for(env.fleet.jid("master"))
    assert fingerprint(key) == _fpr(env, "master")
    key = await master.keyring.key_for(env.fleet.jid("alice"))
    assert fingerprint(key) == _fpr(env, "alice")
    billing = await alice.keyring.key_for(env.fleet.jid("billing"))
    assert fingerprint(billing) == _fpr(env, "billing")
    pins = json.loads((env.data / "pins" / "master.json").read_text())
    assert pins[env.fleet.jid("alice")] == _fpr(env, "alice")
