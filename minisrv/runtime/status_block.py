"""One small shared-memory block per server instance: worker readiness and heartbeats, model facts, scheduler stats.

The launcher creates it; every worker attaches, marks itself ready, and beats (its loop writes the
monotonic clock, which every process on the host shares, a few times a second, idle or busy); the
scheduler writes the model's facts once and its stats after every step. The API server reads it on
/health, its watchdog and each /metrics scrape with plain memory loads (no message, no syscall).
Layout, u64 words (64-byte lines):

    line 0   magic, layout version, worker count
    line 1   stats sequence number (odd while the scheduler writes: a seqlock)
    line 2   SchedulerStats (minisrv/wire/terms.py), one word per field in its order (floats as f64 bits)
    line 3   max_model_len, vocab_size, model name length; then lines 4-7: the model name (UTF-8)
    line 8+  per worker: attached pid, ready pid, last heartbeat (time.monotonic_ns) (one word each)

Like the rings, the name is unlinked as soon as every worker has attached, so no exit leaves it behind.
"""
from __future__ import annotations

import dataclasses
import mmap
import threading
import time
import typing
from dataclasses import dataclass

import posix_ipc

from minisrv.ipc.wakeup import full_fence
from minisrv.wire.terms import SchedulerStats

MAGIC = int.from_bytes(b"MSRVSTAT", "little")
LAYOUT_VERSION = 2
WORKER_WORDS = 3              # attached pid, ready pid, heartbeat
LINE = 8                      # words per 64-byte line
SEQ, STATS, MODEL, NAME, WORKERS = LINE, 2 * LINE, 3 * LINE, 4 * LINE, 8 * LINE
NAME_BYTES = 4 * LINE * 8
# (word, is a float) per SchedulerStats field, in declaration order
STATS_WORDS = [(STATS + i, typing.get_type_hints(SchedulerStats)[f.name] is float)
               for i, f in enumerate(dataclasses.fields(SchedulerStats))]
assert len(STATS_WORDS) <= LINE


@dataclass(frozen=True)
class ModelFacts:
    """What the API server needs to know about the model, from the scheduler that loaded it."""

    name: str
    max_model_len: int
    vocab_size: int


@dataclass(frozen=True)
class StatusBlockSpec:
    """Picklable handle for children started with spawn."""

    name: str
    num_workers: int


class StatusBlock:
    def __init__(self, spec: StatusBlockSpec, create: bool = False) -> None:
        self.spec = spec
        size = (WORKERS + WORKER_WORDS * spec.num_workers) * 8
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(spec.name, flags, mode=0o600, size=size if create else 0)
        mapped = shm.size   # attaching: the creator's size, checked below
        self._mmap = mmap.mmap(shm.fd, mapped)
        shm.close_fd()
        self._words = memoryview(self._mmap).cast("Q")
        self._doubles = memoryview(self._mmap).cast("d")   # the same words, for the one f64 field
        self._fence_lock = threading.Lock()   # private and never contended: see full_fence
        if create:
            self._words[1], self._words[2] = LAYOUT_VERSION, spec.num_workers
            self._words[0] = MAGIC
        elif mapped != size or (self._words[0], self._words[1], self._words[2]) != (MAGIC, LAYOUT_VERSION,
                                                                                      spec.num_workers):
            raise ValueError(f"status block {spec.name}: header does not match this build "
                             f"(layout version {LAYOUT_VERSION}, {spec.num_workers} workers)")

    @classmethod
    def create(cls, name: str, num_workers: int) -> StatusBlock:
        return cls(StatusBlockSpec(name, num_workers), create=True)

    # -- workers ----------------------------------------------------------------------------------
    def attach_worker(self, slot: int, pid: int) -> None:
        """Record that worker `slot` has mapped the block; the last of all unlinks the name."""
        self._words[WORKERS + WORKER_WORDS * slot] = pid
        full_fence(self._fence_lock)
        if all(self._words[WORKERS + WORKER_WORDS * s] for s in range(self.spec.num_workers)):
            self.unlink()

    def mark_ready(self, slot: int, pid: int) -> None:
        self.beat(slot)
        self._words[WORKERS + WORKER_WORDS * slot + 1] = pid

    def ready_slots(self) -> list[bool]:
        return [bool(self._words[WORKERS + WORKER_WORDS * s + 1]) for s in range(self.spec.num_workers)]

    def beat(self, slot: int) -> None:
        self._words[WORKERS + WORKER_WORDS * slot + 2] = time.monotonic_ns()

    def heartbeat_ages(self) -> list[float | None]:
        """Seconds since each worker's last heartbeat; None for one not ready yet."""
        now, ready = time.monotonic_ns(), self.ready_slots()
        return [(now - self._words[WORKERS + WORKER_WORDS * s + 2]) / 1e9 if ready[s] else None
                for s in range(self.spec.num_workers)]

    # -- scheduler --------------------------------------------------------------------------------
    def publish_model(self, facts: ModelFacts) -> None:
        """Written once, before the scheduler marks itself ready (readers look only after that)."""
        name = facts.name.encode()[:NAME_BYTES]
        self._mmap[NAME * 8 : NAME * 8 + len(name)] = name
        self._words[MODEL], self._words[MODEL + 1], self._words[MODEL + 2] = (
            facts.max_model_len, facts.vocab_size, len(name))

    def model(self) -> ModelFacts:
        max_model_len, vocab_size, name_len = self._words[MODEL : MODEL + 3]
        name = self._mmap[NAME * 8 : NAME * 8 + name_len].decode(errors="replace")
        return ModelFacts(name, max_model_len, vocab_size)

    def publish_stats(self, stats: SchedulerStats) -> None:
        words, seq = self._words, self._words[SEQ]
        words[SEQ] = seq + 1          # odd: a write is in progress
        for (word, is_float), value in zip(STATS_WORDS, dataclasses.astuple(stats)):
            (self._doubles if is_float else words)[word] = value
        words[SEQ] = seq + 2          # x86-64 keeps these stores in order (TSO); ARM needs a release fence

    # -- API server -------------------------------------------------------------------------------
    def stats(self) -> SchedulerStats:
        """A consistent snapshot: retried while the scheduler is mid-write (a seqlock read)."""
        words = self._words
        while True:
            seq = words[SEQ]
            if seq & 1:
                continue
            snapshot = SchedulerStats(*((self._doubles if is_float else words)[word] for word, is_float in STATS_WORDS))
            if words[SEQ] == seq:
                return snapshot

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.spec.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        self._words.release()
        self._doubles.release()
        self._mmap.close()
