"""A ring's shared-memory segment: the header layout, creating, attaching and unlinking it.

The segment is one POSIX shared-memory object: a header of 64-byte cache lines, then the data area.
Header fields are little-endian u64 words, accessed through a `memoryview.cast("Q")`: an item load
or store is one aligned 8-byte memcpy, which compiles to a single mov (atomic on x86-64), with no
system call (24 ns, against 40-80 ns through a numpy view).

    line 0              magic, layout version, capacity, reader count, wake-up kind, producer pid
    lines 1..P          reader pids, 8 per line (static after attach)
    next line           write index                (written by the producer)
    next line           producer-waiting flag      (producer sets it when the ring is full)
    per reader i:       read index i, then sleeping flag i, each on its own line

Indices are monotonically increasing byte counters (offset = index % capacity), so "empty" is
read == write and "full" needs no extra slot. A pid word is 0 until its process attaches; closing an
end sets CLOSED_BIT in it so the peer can tell a clean close from a crash.
"""
from __future__ import annotations

import enum
import mmap
import os
import threading
from dataclasses import dataclass

import posix_ipc

from minisrv.ipc.wakeup import Doorbell, FifoDoorbell, SemaphoreDoorbell, full_fence

MAGIC = int.from_bytes(b"MSRVRING", "little")
LAYOUT_VERSION = 1
CACHE_LINE_WORDS = 8          # 64-byte lines of u64 words
MAX_READERS = 64
CLOSED_BIT = 1 << 63
FIFO_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else "/tmp"


class Wakeup(enum.IntEnum):
    SEMAPHORE = 0   # consumers that block in a thread
    FIFO = 1        # consumers inside an event loop (see minisrv/ipc/aio.py)


class Role(str, enum.Enum):
    PRODUCER = "producer"
    READER = "reader"


@dataclass(frozen=True)
class HeaderLayout:
    """Word indices of every header field of a ring with `num_readers` readers."""

    num_readers: int
    MAGIC = 0
    VERSION = 1
    CAPACITY = 2
    NUM_READERS = 3
    WAKEUP = 4
    PRODUCER_PID = 5

    def reader_pid(self, reader: int) -> int:
        return CACHE_LINE_WORDS + reader

    @property
    def write_index(self) -> int:
        pid_lines = -(-self.num_readers // CACHE_LINE_WORDS)
        return (1 + pid_lines) * CACHE_LINE_WORDS

    @property
    def producer_waiting(self) -> int:
        return self.write_index + CACHE_LINE_WORDS

    def read_index(self, reader: int) -> int:
        return self.producer_waiting + (1 + 2 * reader) * CACHE_LINE_WORDS

    def sleeping(self, reader: int) -> int:
        return self.read_index(reader) + CACHE_LINE_WORDS

    @property
    def header_bytes(self) -> int:
        return (self.sleeping(self.num_readers - 1) + CACHE_LINE_WORDS) * 8


@dataclass(frozen=True)
class RingNames:
    """Every name one ring owns, derived from its segment name (so a spec only carries that)."""

    segment: str

    @property
    def space(self) -> str:
        return f"{self.segment}-space"

    def doorbell(self, reader: int, wakeup: Wakeup) -> str:
        if wakeup is Wakeup.FIFO:
            return f"{FIFO_DIR}{self.segment}-r{reader}.fifo"
        return f"{self.segment}-r{reader}"

    def unlink_all(self, num_readers: int, wakeup: Wakeup) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.segment)
        except posix_ipc.ExistentialError:
            pass
        SemaphoreDoorbell.unlink(self.space)
        unlink = FifoDoorbell.unlink if wakeup is Wakeup.FIFO else SemaphoreDoorbell.unlink
        for reader in range(num_readers):
            unlink(self.doorbell(reader, wakeup))


@dataclass(frozen=True)
class RingSpec:
    """What a process needs to attach to a ring: small and picklable, for children started with spawn."""

    name: str            # shared-memory name, /minisrv-<pid>-<random>-<ring>
    capacity: int        # data-area bytes, checked against the header on attach
    role: Role
    reader: int = 0      # which read index a READER owns

    @property
    def label(self) -> str:
        """The ring's short name (the part after the instance prefix), for error messages."""
        return self.name.split("-", 3)[-1]


def open_doorbell(name: str, wakeup: Wakeup, create: bool = False) -> Doorbell:
    if wakeup is Wakeup.FIFO:
        return FifoDoorbell(name, create=create)
    return SemaphoreDoorbell(name, create=create)


class Segment:
    """One process's mapping of a ring segment: header words, data area, and the attach handshake."""

    def __init__(self, spec: RingSpec) -> None:
        self.spec = spec
        self.names = RingNames(spec.name)
        try:
            shm = posix_ipc.SharedMemory(spec.name)
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(
                f"ring {spec.label!r}: shared memory {spec.name} does not exist (already unlinked because "
                "every process attached, or never created)") from None
        self.mmap = mmap.mmap(shm.fd, shm.size)
        shm.close_fd()
        words = memoryview(self.mmap).cast("Q")
        self._check_header(words, spec)
        self.layout = HeaderLayout(int(words[HeaderLayout.NUM_READERS]))
        self.wakeup = Wakeup(words[HeaderLayout.WAKEUP])
        self.capacity = spec.capacity
        self.header = words
        self.data_offset = self.layout.header_bytes
        self.data = memoryview(self.mmap)[self.data_offset : self.data_offset + spec.capacity]
        self.frames = self.data.cast("Q")

    @staticmethod
    def _check_header(words: memoryview, spec: RingSpec) -> None:
        found = (words[HeaderLayout.MAGIC], words[HeaderLayout.VERSION], words[HeaderLayout.CAPACITY])
        if found != (MAGIC, LAYOUT_VERSION, spec.capacity):
            raise ValueError(
                f"ring {spec.label!r}: header (magic {found[0]:#x}, layout version {found[1]}, capacity "
                f"{found[2]}) does not match this build (magic {MAGIC:#x}, version {LAYOUT_VERSION}) and the "
                f"spec (capacity {spec.capacity})")

    @property
    def num_readers(self) -> int:
        return self.layout.num_readers

    def pid_word(self, role: Role, reader: int = 0) -> int:
        return HeaderLayout.PRODUCER_PID if role is Role.PRODUCER else self.layout.reader_pid(reader)

    def announce_attach(self, fence: threading.Lock) -> None:
        """Record this process in its pid slot; the last process to attach unlinks every name.

        Each attacher stores its pid, fences, then loads all slots, so of two that attach at once at
        least one sees the other (two may both unlink; the second unlink finds nothing, harmlessly).
        The launcher unlinks too, once every child reported ready, in case a child died before this.
        """
        spec = self.spec
        if spec.role is Role.READER and not 0 <= spec.reader < self.num_readers:
            raise ValueError(f"ring {spec.label!r}: reader {spec.reader} out of range (ring has {self.num_readers})")
        slot = self.pid_word(spec.role, spec.reader)
        if self.header[slot] != 0 and not self.header[slot] & CLOSED_BIT:
            raise RuntimeError(f"ring {spec.label!r}: {spec.role.value} {spec.reader} already attached by "
                               f"pid {self.header[slot]}")
        self.header[slot] = os.getpid()
        full_fence(fence)
        slots = [HeaderLayout.PRODUCER_PID] + [self.layout.reader_pid(r) for r in range(self.num_readers)]
        if all(self.header[s] != 0 for s in slots):
            self.names.unlink_all(self.num_readers, self.wakeup)

    def release_slot(self) -> None:
        slot = self.pid_word(self.spec.role, self.spec.reader)
        self.header[slot] = self.header[slot] | CLOSED_BIT

    def close(self) -> None:
        for view in (self.frames, self.data, self.header):
            view.release()
        try:
            self.mmap.close()
        except BufferError:
            pass  # a caller still holds a record view; the mapping goes when that view does


def create_segment(name: str, capacity: int, num_readers: int, wakeup: Wakeup) -> None:
    """Create the segment (mode 0600) and its semaphores/FIFOs, and initialise the header."""
    if not 64 <= capacity <= 1 << 32 or capacity & (capacity - 1):
        raise ValueError(f"ring capacity must be a power of two in [64 B, 4 GiB], got {capacity}")
    if not 1 <= num_readers <= MAX_READERS:
        raise ValueError(f"ring num_readers must be in [1, {MAX_READERS}], got {num_readers}")
    layout = HeaderLayout(num_readers)
    names = RingNames(name)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=layout.header_bytes + capacity)
    try:
        with mmap.mmap(shm.fd, shm.size) as mapped:
            words = memoryview(mapped).cast("Q")
            words[HeaderLayout.VERSION] = LAYOUT_VERSION
            words[HeaderLayout.CAPACITY] = capacity
            words[HeaderLayout.NUM_READERS] = num_readers
            words[HeaderLayout.WAKEUP] = wakeup
            words[HeaderLayout.MAGIC] = MAGIC   # last: a header with the magic is complete
            words.release()
        SemaphoreDoorbell(names.space, create=True).close()
        for reader in range(num_readers):
            open_doorbell(names.doorbell(reader, wakeup), wakeup, create=True).close()
    except BaseException:
        names.unlink_all(num_readers, wakeup)
        raise
    finally:
        shm.close_fd()
