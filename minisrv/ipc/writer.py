"""The producer end of a ring (frame format and publication rules: minisrv/ipc/ring.py)."""
from __future__ import annotations

import time
from array import array
from bisect import bisect_right
from collections.abc import Iterable
from itertools import accumulate, repeat
from operator import add

from minisrv.ipc.ring import (BATCH_BIT, BATCH_COUNT_SHIFT, LIVENESS_INTERVAL_S, WRAP_MARKER, Buffer, PeerGone,
                              RecordTooLarge, RingEndpoint, RingTimeout, frame_bytes, peer_state)
from minisrv.ipc.segment import CLOSED_BIT, RingSpec, Role, open_doorbell
from minisrv.ipc.wakeup import SemaphoreDoorbell, full_fence, process_alive

# Slack for a batch's two paddings and its word, so a batch sized by raw bytes always fits one frame.
BATCH_OVERHEAD = 24


class RingWriter(RingEndpoint):
    """The producer end. `try_write` never blocks; `write` waits for space; `write_many` streams batches.
    Records are bytes-like objects with 1-byte items (bytes, bytearray, memoryview.cast("B"))."""

    def __init__(self, spec: RingSpec) -> None:
        if spec.role is not Role.PRODUCER:
            raise ValueError(f"ring {spec.label!r}: RingWriter needs a producer spec, got {spec.role.value}")
        super().__init__(spec)
        layout, names, wakeup = self._layout, self.segment.names, self.segment.wakeup
        readers = range(layout.num_readers)
        self._doorbells = [open_doorbell(names.doorbell(r, wakeup), wakeup) for r in readers]
        self._space = SemaphoreDoorbell(names.space)
        self._read_words = [layout.read_index(r) for r in readers]
        self._sleepers = [(layout.sleeping(r), self._doorbells[r]) for r in readers]   # (flag word, doorbell)
        self._write_word = layout.write_index
        self._waiting_word = layout.producer_waiting
        self._pos = self._header[self._write_word]
        self._seen_read = min(self._header[w] for w in self._read_words)
        self.segment.announce_attach(self._fence)

    def try_write(self, record: Buffer) -> bool:
        """Append one record and publish it; False (nothing written) when the ring lacks space."""
        length = len(record)
        frame = 8 + ((length + 7) & ~7)
        pos, capacity = self._pos, self.capacity
        offset, end = pos & self._mask, pos + frame
        # The common case inline (a polled ping-pong is made of this): no wrap, space already known.
        if not (offset + frame <= capacity and end - self._seen_read <= capacity and frame <= self._max_frame):
            if length > self.max_record_bytes:
                self._refuse(length)
            place = self._claim(frame)
            if place is None:
                return False
            offset, end = place
        self._data[offset + 8 : offset + 8 + length] = record   # first: a failed copy leaves no trace
        self._frames[offset >> 3] = length
        self._pos = end
        # _publish(), inlined: a Python call is ~5% of a polled round trip
        header = self._header
        header[self._write_word] = end
        self._fence.acquire()
        self._fence.release()
        for word, doorbell in self._sleepers:
            if header[word]:
                header[word] = 0
                doorbell.ring()
        return True

    def write(self, record: Buffer, timeout: float | None = None) -> None:
        """Append one record, waiting up to `timeout` seconds (None: forever) for space."""
        while not self.try_write(record):
            self._wait_for_space(frame_bytes(len(record)), timeout)

    def write_many(self, records: Iterable[Buffer], timeout: float | None = None) -> None:
        """Append records in order as batch frames (as many records per frame as half the capacity holds),
        publishing the write index once per call, or before waiting for space. Stream mode: costs a few
        C-level calls per batch rather than Python work per record. A too-large record fails the whole
        call before anything is written; `timeout` bounds each wait for space."""
        records = records if isinstance(records, list) else list(records)
        if not records:
            return
        lengths = list(map(len, records))
        if max(lengths) > self.max_record_bytes:
            self._refuse(max(lengths))
        # Each record adds its bytes and a u32 length; cut the list where a batch would outgrow one frame.
        ends = list(accumulate(map(add, lengths, repeat(4))))
        budget = self._max_frame - BATCH_OVERHEAD
        start = 0
        try:
            while start < len(records):
                stop = bisect_right(ends, (ends[start - 1] if start else 0) + budget)
                if stop <= start + 1:
                    stop = start + 1
                    self._write_frame(records[start], None, timeout)
                else:
                    body = b"".join(records[start:stop])
                    if len(body) != sum(lengths[start:stop]):   # len() counted items, not bytes
                        raise TypeError(f"ring {self.name!r}: records must be bytes-like with 1-byte items")
                    self._write_frame(body, array("I", lengths[start:stop]), timeout)
                start = stop
        finally:
            self._publish()

    def _write_frame(self, body: Buffer, table: array | None, timeout: float | None) -> None:
        """Copy one record (table None) or one batch (its u32 length table, then `body`) in, unpublished."""
        table_bytes = 0 if table is None else (4 * len(table) + 7) & ~7
        payload = table_bytes + len(body)
        frame = frame_bytes(payload)
        place = self._claim(frame)
        while place is None:
            self._publish()                                  # let the readers drain what is there
            self._wait_for_space(frame, timeout)
            place = self._claim(frame)
        offset, end = place
        self._data[offset + 8 + table_bytes : offset + 8 + payload] = body   # first: a failed copy leaves no trace
        if table is None:
            self._frames[offset >> 3] = payload
        else:
            self._frames[offset >> 3] = BATCH_BIT | len(table) << BATCH_COUNT_SHIFT | payload
            self._data[offset + 8 : offset + 8 + 4 * len(table)] = memoryview(table).cast("B")
        self._pos = end

    def _fits(self, frame: int) -> tuple[int, int] | None:
        """(bytes to skip to the end of the data area, 0 if none; offset) where a frame of `frame`
        bytes goes next, or None while the slowest reader leaves too little space."""
        offset = self._pos & self._mask
        skip = self.capacity - offset if offset + frame > self.capacity else 0
        end = self._pos + skip + frame
        if end - self._seen_read > self.capacity:
            self._seen_read = min([self._header[w] for w in self._read_words])
            if end - self._seen_read > self.capacity:
                return None
        return skip, 0 if skip else offset

    def _refuse(self, length: int) -> None:
        raise RecordTooLarge(self.describe(
            f"record of {length} bytes exceeds the limit of {self.max_record_bytes} (half the capacity)",
            "split it or give the ring a larger capacity"), length, self.max_record_bytes)

    def _claim(self, frame: int) -> tuple[int, int] | None:
        """(data offset, write index after it) for a frame of `frame` bytes, marking a wrap if it needs
        one, or None while the ring is full. The caller copies the frame in, then commits the index."""
        place = self._fits(frame)
        if place is None:
            return None
        skip, offset = place
        if skip:   # unpublished space: harmless if the copy that follows fails
            self._frames[(self._pos & self._mask) >> 3] = WRAP_MARKER
        return offset, self._pos + skip + frame

    def _publish(self) -> None:
        # Frames first, then this one 8-byte store (TSO; ARM needs `dmb ish` before it, see ring.py).
        header = self._header
        header[self._write_word] = self._pos
        self._fence.acquire()   # full fence (wakeup.full_fence), inlined: this is the hot path
        self._fence.release()
        for word, doorbell in self._sleepers:
            if header[word]:
                # Clearing the flag here means a burst of writes rings a sleeper once, not per record.
                header[word] = 0
                doorbell.ring()

    def _wait_for_space(self, frame: int, timeout: float | None) -> None:
        now = time.monotonic()
        deadline = None if timeout is None else now + timeout
        next_liveness_check = now + LIVENESS_INTERVAL_S
        header = self._header
        while True:
            header[self._waiting_word] = 1
            full_fence(self._fence)
            if self._fits(frame) is not None:
                header[self._waiting_word] = 0
                return
            now = time.monotonic()
            if now >= next_liveness_check:
                self.check_readers()
                next_liveness_check = now + LIVENESS_INTERVAL_S
            if deadline is not None and now >= deadline:
                header[self._waiting_word] = 0
                raise RingTimeout(self.describe(
                    f"timed out after {timeout} s waiting for space (ring full)", self.readers_state()))
            self._space.wait(LIVENESS_INTERVAL_S if deadline is None else min(LIVENESS_INTERVAL_S, deadline - now))

    def readers_state(self) -> str:
        words = [self._header[self._layout.reader_pid(r)] for r in range(self._layout.num_readers)]
        return "; ".join(f"reader {r} {peer_state(word)}" for r, word in enumerate(words))

    def check_readers(self) -> None:
        """Raise PeerGone if a reader exited or closed its end (then the full ring would never drain)."""
        for reader in range(self._layout.num_readers):
            word = self._header[self._layout.reader_pid(reader)]
            if word and (word & CLOSED_BIT or not process_alive(word)):
                raise PeerGone(self.describe("a reader is gone while the ring is full", self.readers_state()))

    def _close_doorbells(self) -> None:
        for doorbell in self._doorbells:
            doorbell.close()
        self._space.close()
