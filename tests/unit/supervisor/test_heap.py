"""supervisor.heap: the start-up heap is frozen, and garbage made afterwards is still collected."""

from __future__ import annotations

import gc
import weakref

from supervisor.heap import GEN0_THRESHOLD, freeze_startup_heap


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def test_freeze_moves_the_live_heap_out_of_the_collector_and_keeps_collecting_new_cycles() -> None:
    kept = [_Node() for _ in range(100)]
    thresholds = gc.get_threshold()
    try:
        frozen = freeze_startup_heap()
        assert frozen >= len(kept)
        assert gc.get_freeze_count() == frozen
        assert gc.get_threshold() == (GEN0_THRESHOLD, *thresholds[1:])
        # a cycle made after the freeze is garbage the collector still finds
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        probe = weakref.ref(a)
        del a, b
        gc.collect()
        assert probe() is None
    finally:
        gc.unfreeze()  # the test process goes on: give its heap back to the collector
        gc.set_threshold(*thresholds)
    assert gc.get_freeze_count() == 0
