"""What both ends of a ring share: the frame format, the publication rules, errors, the endpoint base.

A ring has one producer (RingWriter, minisrv/ipc/writer.py) and K readers (RingReader,
minisrv/ipc/reader.py), each reader with its own read index; K=1 is the single-consumer ring.

Frames, each starting 8-byte aligned in the data area, begin with one u64 word:
  * a record: the word is its length, the payload follows (padded to 8);
  * a batch (RingWriter.write_many): BATCH_BIT | count << 32 | payload bytes; the payload is the
    count records' lengths (u32 each, padded to 8) then the records back to back. Building it takes
    a few C-level calls (map, join) instead of Python work per record, which is what stream
    throughput is made of; readers hand the records out one by one as usual;
  * WRAP_MARKER: the next frame did not fit before the end and starts at offset 0.
Frames larger than half the capacity are refused, which guarantees an emptied ring always has room
after a wrap. Words are native-endian: a ring never leaves its host.

Publication: the producer writes the frame (length word and payload), then stores the new write
index with one aligned 8-byte store; a reader loads the write index, then reads the frames below
it. x86-64 (TSO) keeps both pairs in program order. On a weakly ordered CPU a release fence
(`dmb ish`) is needed before the index store in `_publish`, and an acquire fence after the index
load in `RingReader._available`; readers publishing their read index need the same pairing.

A full ring makes the producer wait (never drop or overwrite); with several readers the slowest
bounds it. The endpoints are not thread-safe: one thread per endpoint.
"""
from __future__ import annotations

import threading

from minisrv.ipc.segment import CLOSED_BIT, RingSpec, Segment
from minisrv.ipc.wakeup import process_alive

WRAP_MARKER = (1 << 64) - 1
BATCH_BIT = 1 << 62
BATCH_COUNT_SHIFT = 32
PAYLOAD_MASK = (1 << 32) - 1     # frame payload bytes (capacities stop at 4 GiB, so this never overflows)
LIVENESS_INTERVAL_S = 0.05   # how often a blocked wait checks that its peer still lives
# A blocking reader polls this long before it sleeps. Waking a sleeping process costs ~22 us on an idle
# 2-vCPU VM (the vCPU halts), so a record that follows within the window is taken without that cost;
# spinning no longer than about two wake-ups bounds the CPU spent at a few % of a core's idle time.
SPIN_BEFORE_SLEEP_S = 50e-6
Buffer = bytes | bytearray | memoryview


class RingError(RuntimeError):
    """Base of every ring failure; messages name the ring and the state of its peers."""


class RingTimeout(RingError, TimeoutError):
    """A blocking call ran out of time while its peers live."""


class PeerGone(RingError):
    """The process at the other end exited, was killed, or closed its end."""


class RecordTooLarge(RingError, ValueError):
    """A record needs more than half the ring's capacity."""

    def __init__(self, message: str, length: int = 0, limit: int = 0) -> None:
        super().__init__(message)
        self.length, self.limit = length, limit


def peer_state(pid_word: int) -> str:
    """A pid word of the header, in words: for error messages and liveness checks."""
    if pid_word == 0:
        return "has not attached"
    if pid_word & CLOSED_BIT:
        return f"pid {pid_word & ~CLOSED_BIT} closed its end"
    return f"pid {pid_word} is alive" if process_alive(pid_word) else f"pid {pid_word} is dead"


def frame_bytes(payload: int) -> int:
    """Bytes a frame of `payload` bytes takes: its word, the payload, the padding to 8."""
    return 8 + ((payload + 7) & ~7)


class RingEndpoint:
    """State shared by both ends: the mapping, the fence and the header layout."""

    def __init__(self, spec: RingSpec) -> None:
        self.segment = Segment(spec)
        self.spec = spec
        self.capacity = spec.capacity
        self._mask = spec.capacity - 1   # offset = index & mask (capacities are powers of two)
        self.max_record_bytes = spec.capacity // 2 - 8
        self._max_frame = spec.capacity // 2
        self._closed = False
        self._header = self.segment.header
        self._frames = self.segment.frames
        self._data = self.segment.data
        self._fence = threading.Lock()   # only ever used as a full fence: wakeup.full_fence
        self._layout = self.segment.layout

    @property
    def name(self) -> str:
        return self.spec.label

    def describe(self, what: str, peers: str) -> str:
        return f"ring {self.name!r} ({self.spec.name}): {what}; {peers}"

    def close(self) -> None:
        """Mark this end closed (the peer sees a clean close, not a crash) and unmap."""
        if self._closed:
            return
        self._closed = True
        self.segment.release_slot()
        self._close_doorbells()
        self.segment.close()

    def _close_doorbells(self) -> None:
        raise NotImplementedError  # each end owns different doorbells

    def __enter__(self) -> RingEndpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
