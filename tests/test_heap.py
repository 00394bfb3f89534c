"""xmpp/heap.py: a party with a big fleet freezes its settled heap out of the cyclic GC after
its login, so full collections scan only what came since (no stalls of tens of milliseconds on
the loop that takes every presence); a small one leaves the GC as it was."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gridpresence.xmpp import heap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    try:
        yield
    finally:
        gc.unfreeze()  # the rest of the test session's GC as it was


class Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only the cyclic GC can tell it is garbage
        self.data = [{"k": i} for i in range(4)]


class Leaf:
    pass


def test_a_small_party_leaves_the_gc_alone(unfrozen: None) -> None:
    assert heap.settle(heap.SETTLE_MIN_CONTACTS - 1) is False
    assert gc.get_freeze_count() == 0


def test_after_settling_a_full_collection_skips_the_settled_heap_and_still_frees_new_garbage(unfrozen: None) -> None:
    kept = [Node() for _ in range(60_000)]  # a login's worth of long-lived objects
    kept[0].data = Leaf()
    scanned = {id(o) for o in gc.get_objects()}  # what a full collection walks
    assert id(kept[1]) in scanned
    assert heap.settle(heap.SETTLE_MIN_CONTACTS) is True
    assert gc.get_freeze_count() >= len(kept) * 2
    scanned = {id(o) for o in gc.get_objects()}
    assert not any(id(n) in scanned or id(n.data) in scanned for n in kept)  # frozen: never walked again
    # Garbage made after the freeze is still found and freed.
    gc.disable()  # so that only this collection finds them
    try:
        for _ in range(1000):
            Node()
        assert gc.collect() >= 1000
    finally:
        gc.enable()
    # A frozen object without a cycle is still freed when its last reference goes.
    probe = weakref.ref(kept[0].data)  # the Leaf, frozen with the rest
    kept[0].data = []
    assert probe() is None


def test_the_threshold_is_read_at_the_call(unfrozen: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(heap, "SETTLE_MIN_CONTACTS", 3)
    assert heap.settle(3) is True
    assert heap.settle(2, min_contacts=5) is False
