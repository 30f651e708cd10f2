"""The producer end of a ring (framing and publication rules: minisrv/ipc/ring.py)."""
from __future__ import annotations

import time
from collections.abc import Iterable

from minisrv.ipc.ring import (LIVENESS_INTERVAL_S, WRAP_MARKER, Buffer, PeerGone, RecordTooLarge, RingTimeout,
                              RingEndpoint, frame_bytes, peer_state)
from minisrv.ipc.segment import CLOSED_BIT, RingSpec, Role, open_doorbell
from minisrv.ipc.wakeup import SemaphoreDoorbell, process_alive


class RingWriter(RingEndpoint):
    """The producer end. `try_write` never blocks; `write` waits for space; `write_many` publishes once."""

    def __init__(self, spec: RingSpec) -> None:
        if spec.role is not Role.PRODUCER:
            raise ValueError(f"ring {spec.label!r}: RingWriter needs a producer spec, got {spec.role.value}")
        super().__init__(spec)
        layout, names, wakeup = self._layout, self.segment.names, self.segment.wakeup
        readers = range(layout.num_readers)
        self._doorbells = [open_doorbell(names.doorbell(r, wakeup), wakeup) for r in readers]
        self._space = SemaphoreDoorbell(names.space)
        self._read_words = [layout.read_index(r) for r in readers]
        self._sleeping_words = [layout.sleeping(r) for r in readers]
        self._write_word = layout.write_index
        self._waiting_word = layout.producer_waiting
        self._pos = self._header[self._write_word]
        self._seen_read = min(self._header[w] for w in self._read_words)
        self.segment.claim(self._fence)

    def try_write(self, record: Buffer) -> bool:
        """Append one record and publish it; False (nothing written) when the ring lacks space."""
        if not self._put(record):
            return False
        self._publish()
        return True

    def write(self, record: Buffer, timeout: float | None = None) -> None:
        """Append one record, waiting up to `timeout` seconds (None: forever) for space."""
        while not self._put(record):
            self._wait_for_space(frame_bytes(len(record)), timeout)
        self._publish()

    def write_many(self, records: Iterable[Buffer], timeout: float | None = None) -> None:
        """Append records in order, publishing the write index once per batch that fits rather than per
        record. `timeout` bounds each wait for space."""
        pending = False
        try:
            for record in records:
                while not self._put(record):
                    if pending:
                        self._publish()
                        pending = False
                    self._wait_for_space(frame_bytes(len(record)), timeout)
                pending = True
        finally:  # records accepted before a failure (too large, timeout) are still delivered
            if pending:
                self._publish()

    def _put(self, record: Buffer) -> bool:
        """Copy a frame in without publishing it."""
        length = len(record)
        frame = 8 + ((length + 7) & ~7)
        if frame > self._max_frame:
            raise RecordTooLarge(self.describe(
                f"record of {length} bytes exceeds the limit of {self.max_record_bytes} (half the capacity)",
                "split it or give the ring a larger capacity"))
        pos = self._pos
        offset = pos & (self.capacity - 1)
        skip = self.capacity - offset if offset + frame > self.capacity else 0
        end = pos + skip + frame
        if end - self._seen_read > self.capacity:
            self._seen_read = min([self._header[w] for w in self._read_words])
            if end - self._seen_read > self.capacity:
                return False
        if skip:
            self._frames[offset >> 3] = WRAP_MARKER
            offset = 0
        self._frames[offset >> 3] = length
        self._data[offset + 8 : offset + 8 + length] = record
        self._pos = end
        return True

    def _publish(self) -> None:
        # Frames first, then this one 8-byte store (TSO; ARM needs `dmb ish` before it, see the docstring).
        self._header[self._write_word] = self._pos
        self._fence()
        header = self._header
        for reader, word in enumerate(self._sleeping_words):
            if header[word]:
                # Clearing the flag here means a burst of writes rings a sleeper once, not per record.
                header[word] = 0
                self._doorbells[reader].ring()

    def _wait_for_space(self, frame: int, timeout: float | None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        next_liveness_check = time.monotonic() + LIVENESS_INTERVAL_S
        while True:
            self._header[self._waiting_word] = 1
            self._fence()
            if self._has_space(frame):
                self._header[self._waiting_word] = 0
                return
            now = time.monotonic()
            if now >= next_liveness_check:
                self.check_readers()
                next_liveness_check = now + LIVENESS_INTERVAL_S
            if deadline is not None and now >= deadline:
                self._header[self._waiting_word] = 0
                raise RingTimeout(self.describe(
                    f"timed out after {timeout} s waiting for space (ring full)", self.readers_state()))
            wait = LIVENESS_INTERVAL_S if deadline is None else min(LIVENESS_INTERVAL_S, deadline - now)
            self._space.wait(max(wait, 0.0))

    def _has_space(self, frame: int) -> bool:
        self._seen_read = min([self._header[w] for w in self._read_words])
        offset = self._pos & (self.capacity - 1)
        skip = self.capacity - offset if offset + frame > self.capacity else 0
        return self._pos + skip + frame - self._seen_read <= self.capacity

    def readers_state(self) -> str:
        words = [self._header[self._layout.reader_pid(r)] for r in range(self._layout.num_readers)]
        return "; ".join(f"reader {r} {peer_state(word)}" for r, word in enumerate(words))

    def check_readers(self) -> None:
        for reader in range(self._layout.num_readers):
            word = self._header[self._layout.reader_pid(reader)]
            if word and (word & CLOSED_BIT or not process_alive(word)):
                raise PeerGone(self.describe("a reader is gone while the ring is full", self.readers_state()))

    def _close_doorbells(self) -> None:
        for doorbell in self._doorbells:
            doorbell.close()
        self._space.close()
