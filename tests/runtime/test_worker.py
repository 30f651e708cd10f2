from __future__ import annotations

import gc
import weakref

from minisrv.runtime.worker import freeze_start_up_objects


class Node:
    def __init__(self) -> None:
        self.me = self   # a reference cycle: only the collector frees it


def test_start_up_objects_are_frozen_and_later_cycles_still_collected() -> None:
    start_up = [Node() for _ in range(50_000)]
    try:
        freeze_start_up_objects()
        assert gc.get_freeze_count() >= len(start_up)
        later = Node()
        gone = weakref.ref(later)
        del later
        gc.collect()
        assert gone() is None
    finally:
        gc.unfreeze()
