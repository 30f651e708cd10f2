"""A reader end of a ring (framing and publication rules: minisrv/ipc/ring.py).

Polling (`try_read`, `drain`, `drain_views`) touches only shared memory: no system call when the
ring is empty, so the scheduler can poll between steps for free. Blocking (`read`, `wait`) polls
for SPIN_BEFORE_SLEEP_S, then sleeps on the reader's doorbell after advertising it in the header
(minisrv/ipc/wakeup.py explains the handshake), waking every LIVENESS_INTERVAL_S to check that the
producer still lives.
"""
from __future__ import annotations

import time
from collections import deque

from minisrv.ipc.ring import (BATCH_BIT, BATCH_COUNT_SHIFT, LIVENESS_INTERVAL_S, PAYLOAD_MASK, SPIN_BEFORE_SLEEP_S,
                              WRAP_MARKER, PeerGone, RingEndpoint, RingTimeout, frame_bytes, peer_state)
from minisrv.ipc.segment import CLOSED_BIT, HeaderLayout, RingSpec, Role, open_doorbell
from minisrv.ipc.wakeup import SemaphoreDoorbell, full_fence, process_alive


class RingReader(RingEndpoint):
    """Reads records in order. Copies (`try_read`, `read`, `drain`) are the reader's to keep; views
    (`drain_views`) point into the ring and stay valid only until `release()`."""

    def __init__(self, spec: RingSpec) -> None:
        if spec.role is not Role.READER:
            raise ValueError(f"ring {spec.label!r}: RingReader needs a reader spec, got {spec.role.value}")
        super().__init__(spec)
        layout, names, self.wakeup = self._layout, self.segment.names, self.segment.wakeup
        self.doorbell = open_doorbell(names.doorbell(spec.reader, self.wakeup), self.wakeup)
        self._space = SemaphoreDoorbell(names.space)
        self._write_word = layout.write_index
        self._read_word = layout.read_index(spec.reader)
        self._sleeping_word = layout.sleeping(spec.reader)
        self._waiting_word = layout.producer_waiting
        self._mmap = self.segment.mmap
        self._record_base = self.segment.data_offset + 8   # mmap index of a frame's payload, less its offset
        self._pos = self._header[self._read_word]
        self._seen_write = self._header[self._write_word]
        self._pending: deque[bytes] = deque()   # the rest of a batch frame that try_read split up
        self.segment.announce_attach(self._fence)

    def _available(self) -> bool:
        if self._pending or self._pos != self._seen_write:
            return True
        # One aligned 8-byte load; a weakly ordered CPU needs an acquire fence after it.
        self._seen_write = self._header[self._write_word]
        return self._pos != self._seen_write

    def try_read(self) -> bytes | None:
        """The next record, copied, or None when the ring is empty."""
        if self._pending:
            return self._pending.popleft()
        pos = self._pos
        if pos == self._seen_write:
            self._seen_write = self._header[self._write_word]   # see _available
            if pos == self._seen_write:
                return None
        offset = pos & self._mask
        word = self._frames[offset >> 3]
        if word < BATCH_BIT:   # the common case inline: one record (batches and wrap markers are >= BATCH_BIT)
            start = self._record_base + offset
            record = self._mmap[start : start + word]
            self._pos = pos + 8 + ((word + 7) & ~7)
        else:
            records = self._collect(self._next_frame_end(), copy=True)
            record = records[0]
            self._pending.extend(records[1:])   # the rest of a batch, handed out one by one
        # release(), inlined: a Python call is ~5% of a polled round trip
        header = self._header
        header[self._read_word] = self._pos
        self._fence.acquire()
        self._fence.release()
        if header[self._waiting_word]:
            header[self._waiting_word] = 0
            self._space.ring()
        return record

    def read(self, timeout: float | None = None, spin_s: float = SPIN_BEFORE_SLEEP_S) -> bytes:
        """The next record, copied, waiting up to `timeout` seconds (None: forever); see `wait`."""
        record = self.try_read()
        while record is None:
            self.wait(timeout, spin_s)
            record = self.try_read()
        return record

    def drain(self) -> list[bytes]:
        """Copies of every available record, in order (maybe none), with one read-index publication."""
        records = self._take_pending()
        self._seen_write = end = self._header[self._write_word]   # all of them, not just those seen before
        if end != self._pos:
            records += self._collect(end, copy=True)
            self.release()
        return records

    def drain_views(self) -> list[memoryview]:
        """Zero-copy views of every available record, in order (maybe none). The producer cannot
        overwrite them until `release()`; a second call continues after the records already returned."""
        views = [memoryview(record) for record in self._take_pending()]
        self._seen_write = end = self._header[self._write_word]
        if end != self._pos:
            views += self._collect(end, copy=False)
        return views

    def _take_pending(self) -> list[bytes]:
        if not self._pending:
            return []
        records = list(self._pending)
        self._pending.clear()
        return records

    def _next_frame_end(self) -> int:
        pos = self._pos
        offset = pos & (self.capacity - 1)
        word = self._frames[offset >> 3]
        if word == WRAP_MARKER:
            pos += self.capacity - offset
            word = self._frames[0]
        return pos + frame_bytes(word & PAYLOAD_MASK)

    def _collect(self, end: int, copy: bool) -> list:
        """The records of every frame from the read position to `end`: bytes copies (slices of the mmap)
        or memoryviews into the ring. Advances the read position but does not publish it."""
        records: list = []
        append, pos, capacity, frames = records.append, self._pos, self.capacity, self._frames
        source, base = (self._mmap, self._record_base) if copy else (self._data, 8)
        while pos != end:
            offset = pos & (capacity - 1)
            word = frames[offset >> 3]
            if word == WRAP_MARKER:
                pos += capacity - offset
                continue
            if word & BATCH_BIT:
                payload = word & PAYLOAD_MASK
                count = (word & ~BATCH_BIT) >> BATCH_COUNT_SHIFT
                start = base + offset + ((4 * count + 7) & ~7)
                for length in self._data[offset + 8 : offset + 8 + 4 * count].cast("I").tolist():
                    append(source[start : start + length])
                    start += length
            else:
                payload = word
                append(source[base + offset : base + offset + word])
            pos += 8 + ((payload + 7) & ~7)
        self._pos = pos
        return records

    def release(self) -> None:
        """Give the space of every record read so far back to the producer, waking it if it waits."""
        self._header[self._read_word] = self._pos
        self._fence.acquire()   # full fence (wakeup.full_fence), inlined: this is the hot path
        self._fence.release()
        if self._header[self._waiting_word]:
            self._header[self._waiting_word] = 0
            self._space.ring()

    def wait(self, timeout: float | None = None, spin_s: float = SPIN_BEFORE_SLEEP_S) -> None:
        """Block until a record is available: poll for `spin_s` seconds, then sleep on the doorbell.
        Raises RingTimeout, or PeerGone once the ring is empty and the producer has exited or closed its end."""
        if self._available():
            return
        if spin_s > 0:
            spin_end = time.perf_counter() + spin_s
            while time.perf_counter() < spin_end:
                if self._available():
                    return
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.prepare_to_sleep():
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                self.cancel_sleep()
                raise RingTimeout(self.describe(f"timed out after {timeout} s waiting for a record",
                                                self.producer_state()))
            self.doorbell.wait(LIVENESS_INTERVAL_S if deadline is None else min(LIVENESS_INTERVAL_S, deadline - now))
            if not self._available():   # a timeout, not a ring: time to check on the producer
                self.check_producer()

    def poll(self) -> bool:
        """Whether a record is available (shared-memory loads only)."""
        return self._available()

    def prepare_to_sleep(self) -> bool:
        """Advertise that this reader is about to sleep on its doorbell, then re-check. True: a record
        arrived meanwhile, do not sleep. False: sleep; the producer's next publication rings."""
        header = self._header
        header[self._sleeping_word] = 1
        full_fence(self._fence)
        if self._available():
            header[self._sleeping_word] = 0
            return True
        if header[HeaderLayout.PRODUCER_PID] & CLOSED_BIT:
            self.check_producer()
        return False

    def cancel_sleep(self) -> None:
        self._header[self._sleeping_word] = 0

    def check_producer(self) -> None:
        """Raise PeerGone when the ring is empty and its producer has exited or closed its end."""
        word = self._header[HeaderLayout.PRODUCER_PID]
        if word and (word & CLOSED_BIT or not process_alive(word)) and not self._available():
            self.cancel_sleep()
            raise PeerGone(self.describe("the ring is empty and its producer is gone", self.producer_state()))

    def producer_state(self) -> str:
        return f"producer {peer_state(self._header[HeaderLayout.PRODUCER_PID])}"

    def _close_doorbells(self) -> None:
        self.doorbell.close()
        self._space.close()
