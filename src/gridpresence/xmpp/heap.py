"""The cyclic garbage collector in a long-running party that tracks a fleet.

A party's heap after its login is mostly what lives as long as it does: its session, its
roster (an item, a JID and their dicts per contact) and what it tracks of each. CPython's full
collection scans every tracked object, and one comes whenever the objects promoted since the
last one reach a quarter of those it found: with 10,000 devices in the roster that is a stall
of tens of milliseconds on the loop that takes every presence, now and then, for nothing (none
of it is garbage). :func:`settle` freezes what exists (``gc.freeze``: later collections skip
it), as the device host does after its logins (host/fleet.py), so a full collection scans only
what came since. A frozen object is still freed when its last reference goes; only a reference
cycle among frozen objects would outlive its use, and the login leaves next to none.
"""

from __future__ import annotations

import gc

# Below this many contacts a full collection is short: leave the embedding program's GC alone.
SETTLE_MIN_CONTACTS = 1000


def settle(contacts: int, min_contacts: int | None = None) -> bool:
    """After a login that brought in ``contacts`` contacts: freeze every object alive out of
    later collections if there are enough for a full collection to stall the loop (True if so;
    ``min_contacts`` defaults to SETTLE_MIN_CONTACTS, read at the call)."""
    if contacts < (SETTLE_MIN_CONTACTS if min_contacts is None else min_contacts):
        return False
    gc.freeze()
    return True
