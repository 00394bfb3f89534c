"""SCRAM with the salted-password step (PBKDF2) done by hashlib in C.

slixmpp computes SCRAM's Hi() in a pure-Python loop: ~30 ms per login at 4096 iterations,
which is most of the time it takes a thousand device identities to log in. Registering this
subclass through slixmpp's own SASL registry (``sasl_mech``) swaps only that step; the result is
bit-for-bit the same (RFC 5802: Hi is PBKDF2 with HMAC of the mechanism's hash).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

from slixmpp.util import bytes as to_bytes
from slixmpp.util.sasl import client as _sasl_client
from slixmpp.util.sasl.client import sasl_mech
from slixmpp.util.sasl.mechanisms import SCRAM


@sasl_mech(SCRAM.score)
class FastSCRAM(SCRAM):
    def Hi(self, text: str, salt: bytes, iterations: int) -> bytes:  # noqa: N802 (slixmpp's name)
        return _salted(self.hash().name, to_bytes(text), salt, iterations)


@lru_cache(maxsize=4096)
def _salted(hash_name: str, password: bytes, salt: bytes, iterations: int) -> bytes:
    """An account's salt and count stay the same from login to login (the server stores them):
    a reconnect, or a fleet of them after a server restart, reuses the result (RFC 5802 §5.1
    lets a client cache SaltedPassword)."""
    return hashlib.pbkdf2_hmac(hash_name, password, salt, iterations)


# SASLprep (RFC 4013) is pure-Python stringprep, ~0.3 ms a credential and three per login; a
# pure function of its text, so its result is kept (a refused text raises again: not cached).
_sasl_client.saslprep = lru_cache(maxsize=4096)(_sasl_client.saslprep)
