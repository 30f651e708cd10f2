"""Fixtures for the ring tests: a RingSet that is always unlinked, and a /dev/shm leftover check."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from minisrv.ipc import RingReader, RingSet, RingWriter, Wakeup
from minisrv.ipc.segment import FIFO_DIR


def leftovers(prefix: str) -> list[str]:
    """Names of this RingSet still present: segments and FIFOs by their name, semaphores as sem.<name>."""
    stem = prefix.lstrip("/")
    return sorted(f for f in os.listdir(FIFO_DIR) if f.startswith(stem) or f.startswith("sem." + stem))


@pytest.fixture
def ring_set() -> Iterator[RingSet]:
    rings = RingSet()
    try:
        yield rings
    finally:
        rings.unlink()
    assert leftovers(rings.prefix) == []


@pytest.fixture
def make_ring(ring_set: RingSet):
    """make_ring(capacity, num_readers, wakeup) -> (writer, [readers]), attached in this process."""
    opened: list[RingWriter | RingReader] = []

    def make(capacity: int = 256, num_readers: int = 1, wakeup: Wakeup = Wakeup.SEMAPHORE,
             name: str = "t") -> tuple[RingWriter, list[RingReader]]:
        specs = ring_set.create(name, capacity, num_readers, wakeup)
        writer = RingWriter(specs.producer)
        readers = [RingReader(spec) for spec in specs.readers]
        opened.extend([writer, *readers])
        return writer, readers

    yield make
    for endpoint in opened:
        endpoint.close()
