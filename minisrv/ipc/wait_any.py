"""Sleeping on several rings at once, for processes that consume more than one (scheduler, detokenizer).

Each ring's reader has its own doorbell, so a process with several input rings creates them with
Wakeup.FIFO and blocks in one select() over all their descriptors, after advertising that it sleeps
on every ring (the usual flag / re-check handshake of minisrv/ipc/wakeup.py, once per ring).
"""
from __future__ import annotations

import select
from collections.abc import Sequence

from minisrv.ipc.reader import RingReader
from minisrv.ipc.segment import Wakeup


def check_fifo_readers(readers: Sequence[RingReader]) -> None:
    for reader in readers:
        if reader.wakeup is not Wakeup.FIFO:
            raise ValueError(f"ring {reader.name!r}: waiting on several rings needs rings created with "
                             f"wakeup=Wakeup.FIFO, this one uses {reader.wakeup.name}")


def wait_any(readers: Sequence[RingReader], timeout: float) -> bool:
    """Block until one of `readers` has a record or `timeout` seconds pass; True when one has a record.

    Raises PeerGone when a ring is empty and its producer is gone. Readers must be FIFO-woken
    (check_fifo_readers)."""
    for armed, reader in enumerate(readers):
        if reader.prepare_to_sleep():   # a record arrived: undo the flags already set and return
            for other in readers[:armed]:
                other.cancel_sleep()
            return True
    try:
        select.select([r.doorbell.fileno() for r in readers], [], [], timeout)
    finally:
        for reader in readers:
            reader.cancel_sleep()
            reader.doorbell.clear()
    for reader in readers:
        if reader.poll():
            return True
    for reader in readers:
        reader.check_producer()
    return False
