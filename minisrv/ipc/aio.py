"""Rings from inside an asyncio event loop (the API server's uvloop loop), never blocking it.

The reader's doorbell is a FIFO whose descriptor the loop watches, so a producer's ring wakes the
loop directly. A reader thread blocking on a semaphore and posting into the loop measured twice as
slow (two wake-ups and a GIL hand-off instead of one; numbers in minisrv/ipc/wakeup.py). Each
wake-up drains every available record.
"""
from __future__ import annotations

import asyncio
import time

from minisrv.ipc.reader import RingReader
from minisrv.ipc.ring import LIVENESS_INTERVAL_S, Buffer, RingTimeout
from minisrv.ipc.segment import Wakeup
from minisrv.ipc.writer import RingWriter


class AsyncRingReader:
    """Awaitable draining of one RingReader whose ring was created with Wakeup.FIFO."""

    def __init__(self, reader: RingReader) -> None:
        if reader.wakeup is not Wakeup.FIFO:
            raise ValueError(f"ring {reader.name!r}: an AsyncRingReader needs a ring created with "
                             f"wakeup=Wakeup.FIFO, this one uses {reader.wakeup.name}")
        self.reader = reader
        self._loop: asyncio.AbstractEventLoop | None = None
        self._waiter: asyncio.Future[None] | None = None

    async def drain(self, timeout: float | None = None) -> list[bytes]:
        """Copies of every available record, waiting (without blocking the loop) until there is one."""
        records = self.reader.drain()
        while not records:
            await self.wait(timeout)
            records = self.reader.drain()
        return records

    async def wait(self, timeout: float | None = None) -> None:
        """Return once a record is available (then use reader.drain_views()/release() for zero copy).
        Raises RingTimeout, or PeerGone once the ring is empty and its producer is gone."""
        reader = self.reader
        if reader.poll():
            return
        loop = self._attach_loop()
        deadline = None if timeout is None else time.monotonic() + timeout
        while not reader.prepare_to_sleep():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                reader.cancel_sleep()
                raise RingTimeout(reader.describe(f"timed out after {timeout} s waiting for a record",
                                                  reader.producer_state()))
            slice_s = LIVENESS_INTERVAL_S if deadline is None else min(LIVENESS_INTERVAL_S, deadline - now)
            self._waiter = loop.create_future()
            timer = loop.call_later(slice_s, self._wake)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not reader.poll():   # the liveness timer, not the doorbell
                reader.check_producer()

    def _attach_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                raise RuntimeError(f"ring {self.reader.name!r}: AsyncRingReader is bound to another event loop")
            # Registered once: the callback empties the FIFO each time, so level-triggered polling cannot spin.
            loop.add_reader(self.reader.doorbell.fileno(), self._on_doorbell)
            self._loop = loop
        return loop

    def _on_doorbell(self) -> None:
        self.reader.doorbell.clear()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def close(self) -> None:
        """Unregister from the loop and close the reader."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self.reader.doorbell.fileno())
        self._loop = None
        self.reader.close()


async def write_async(writer: RingWriter, record: Buffer, timeout: float | None = None) -> None:
    """Append a record from inside an event loop. A full ring is retried with growing sleeps rather than
    a doorbell: request rings fill only under bursts the tokenizer clears in milliseconds."""
    delay = 1e-4
    deadline = None if timeout is None else time.monotonic() + timeout
    while not writer.try_write(record):
        writer.check_readers()
        if deadline is not None and time.monotonic() >= deadline:
            raise RingTimeout(writer.describe(f"timed out after {timeout} s waiting for space (ring full)",
                                              writer.readers_state()))
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.01)
