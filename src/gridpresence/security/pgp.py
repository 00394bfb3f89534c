"""The one import of pgpy, with the two things every user of it here needs.

* pgpy 0.6 warns about deprecated ``cryptography`` calls on every key operation; the calls
  still work with the pinned range, so the warnings are silenced here, once.
* pgpy recomputes a key packet's fingerprint (a SHA-1 over the re-serialised key material)
  about seven times per signature and five per verification: ~70 % of the time of both.
  Key material never changes after a key is built or parsed, so the fingerprint is cached
  per key packet, keyed on the key-material object so a rebuilt key is recomputed.
"""

from __future__ import annotations

import warnings
from typing import Any

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pgpy
    from pgpy.packet.packets import PubKeyV4

warnings.filterwarnings("ignore", module=r"pgpy(\..*)?")
warnings.filterwarnings("ignore", message=r".*(TripleDES|Blowfish|CAST5|IDEA|SEED).*")

_uncached_fingerprint = PubKeyV4.fingerprint.fget
_CACHE = "_gridpresence_fingerprint"


def _cached_fingerprint(packet: Any) -> Any:
    cached = packet.__dict__.get(_CACHE)
    if cached is not None and cached[0] is packet.keymaterial:
        return cached[1]
    value = _uncached_fingerprint(packet)
    packet.__dict__[_CACHE] = (packet.keymaterial, value)
    return value


PubKeyV4.fingerprint = property(_cached_fingerprint)  # type: ignore[method-assign,assignment]

__all__ = ["pgpy"]
