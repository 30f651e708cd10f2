"""One small shared-memory block per server instance: worker readiness and heartbeats, model facts, scheduler stats.

The launcher creates it; every worker attaches, marks itself ready, and beats (its loop writes the
monotonic clock, which every process on the host shares, a few times a second, idle or busy); the
scheduler writes the model's facts once and its stats after every step. The API server reads it on
/health, its watchdog and each /metrics scrape with plain memory loads (no message, no syscall).
Layout, u64 words (64-byte lines):

    line 0   magic, layout version, worker count, scheduler replica count (--dp-size)
    line 3   max_model_len, vocab_size, model name length; then lines 4-7: the model name (UTF-8)
    line 8+  per worker: attached pid, ready pid, last heartbeat (time.monotonic_ns) (one word each)
    then, per scheduler replica: a line holding its sequence number (odd while the scheduler writes: a
             seqlock); SchedulerStats (minisrv/wire/terms.py), one word per field in its order (floats as f64
             bits); the bucket counts of REQUEST_HISTOGRAMS (minisrv/scheduler/metrics.py's flat array), then
             one f64 sum per histogram; each part from a line of its own

Like the rings, the name is unlinked as soon as every worker has attached, so no exit leaves it behind.
"""
from __future__ import annotations

import dataclasses
import mmap
import threading
import time
import typing
from dataclasses import dataclass
from typing import Callable, TypeVar

import posix_ipc

from minisrv.ipc.wakeup import full_fence
from minisrv.scheduler.metrics import RequestMetrics
from minisrv.wire.terms import NUM_HISTOGRAM_COUNTS, REQUEST_HISTOGRAMS, HistogramValues, SchedulerStats

T = TypeVar("T")

MAGIC = int.from_bytes(b"MSRVSTAT", "little")
LAYOUT_VERSION = 5
WORKER_WORDS = 3              # attached pid, ready pid, heartbeat
LINE = 8                      # words per 64-byte line
MODEL, NAME, WORKERS = 3 * LINE, 4 * LINE, 8 * LINE
NAME_BYTES = 4 * LINE * 8
# (word after a replica's stats line start, is a float) per SchedulerStats field, in declaration order
STATS_WORDS = [(i, typing.get_type_hints(SchedulerStats)[f.name] is float)
               for i, f in enumerate(dataclasses.fields(SchedulerStats))]


def _lines(words: int) -> int:
    return -(-words // LINE)


# A replica's part, in words from its sequence number: stats, histogram counts, histogram sums.
STATS_AT = LINE
COUNTS_AT = STATS_AT + LINE * _lines(len(STATS_WORDS))
SUMS_AT = COUNTS_AT + LINE * _lines(NUM_HISTOGRAM_COUNTS)
REPLICA_WORDS = SUMS_AT + LINE * _lines(len(REQUEST_HISTOGRAMS))



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
    num_replicas: int = 1

    def replica_seq(self, replica: int) -> int:
        """The word of a replica's stats sequence number; its stats start a line later."""
        workers_end = WORKERS + WORKER_WORDS * self.num_workers
        return _lines(workers_end) * LINE + REPLICA_WORDS * replica

    @property
    def size(self) -> int:
        return self.replica_seq(self.num_replicas) * 8


class StatusBlock:
    def __init__(self, spec: StatusBlockSpec, create: bool = False) -> None:
        self.spec = spec
        size = spec.size
        flags = posix_ipc.O_CREX if create else 0
        shm = posix_ipc.SharedMemory(spec.name, flags, mode=0o600, size=size if create else 0)
        mapped = shm.size   # attaching: the creator's size, checked below
        self._mmap = mmap.mmap(shm.fd, mapped)
        shm.close_fd()
        self._words = memoryview(self._mmap).cast("Q")
        self._doubles = memoryview(self._mmap).cast("d")   # the same words, for the one f64 field
        self._fence_lock = threading.Lock()   # private and never contended: see full_fence
        header = (MAGIC, LAYOUT_VERSION, spec.num_workers, spec.num_replicas)
        if create:
            self._words[1], self._words[2], self._words[3] = header[1:]
            self._words[0] = MAGIC
        elif mapped != size or tuple(self._words[0:4]) != header:
            raise ValueError(f"status block {spec.name}: header does not match this build (layout version "
                             f"{LAYOUT_VERSION}, {spec.num_workers} workers, {spec.num_replicas} replicas)")

    @classmethod
    def create(cls, name: str, num_workers: int, num_replicas: int = 1) -> StatusBlock:
        return cls(StatusBlockSpec(name, num_workers, num_replicas), create=True)

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

    def publish_stats(self, stats: SchedulerStats, metrics: RequestMetrics | None = None, replica: int = 0) -> None:
        words, at = self._words, self.spec.replica_seq(replica)
        seq, base = words[at], at + STATS_AT
        words[at] = seq + 1          # odd: a write is in progress
        for (word, is_float), value in zip(STATS_WORDS, dataclasses.astuple(stats)):
            (self._doubles if is_float else words)[base + word] = value
        if metrics is not None:      # two slice copies: a few microseconds
            words[at + COUNTS_AT : at + COUNTS_AT + NUM_HISTOGRAM_COUNTS] = memoryview(metrics.counts)
            self._doubles[at + SUMS_AT : at + SUMS_AT + len(REQUEST_HISTOGRAMS)] = memoryview(metrics.sums)
        words[at] = seq + 2          # x86-64 keeps these stores in order (TSO); ARM needs a release fence

    # -- API server, tokenizers -------------------------------------------------------------------
    def _consistent(self, replica: int, read: Callable[[int], T]) -> T:
        """read(the replica's first word), retried while its scheduler is mid-write (a seqlock read)."""
        words, at = self._words, self.spec.replica_seq(replica)
        while True:
            seq = words[at]
            if seq & 1:
                continue
            snapshot = read(at)
            if words[at] == seq:
                return snapshot

    def stats(self, replica: int = 0) -> SchedulerStats:
        """A consistent snapshot of one replica's stats."""
        words, doubles = self._words, self._doubles
        return self._consistent(replica, lambda at: SchedulerStats(*(
            (doubles if is_float else words)[at + STATS_AT + word] for word, is_float in STATS_WORDS)))

    def total_stats(self) -> SchedulerStats:
        """Every replica's stats together: counts added, the KV cache usage averaged (replicas' pools are alike)."""
        each = [self.stats(r) for r in range(self.spec.num_replicas)]
        if len(each) == 1:
            return each[0]
        sums = [sum(values) for values in zip(*(dataclasses.astuple(s) for s in each))]
        total = SchedulerStats(*sums)
        return dataclasses.replace(total, kv_cache_usage=total.kv_cache_usage / len(each))

    def histograms(self, replica: int = 0) -> HistogramValues:
        """A consistent snapshot of one replica's histograms."""
        words, doubles = self._words, self._doubles
        return self._consistent(replica, lambda at: HistogramValues(
            words[at + COUNTS_AT : at + COUNTS_AT + NUM_HISTOGRAM_COUNTS].tolist(),
            doubles[at + SUMS_AT : at + SUMS_AT + len(REQUEST_HISTOGRAMS)].tolist()))

    def total_histograms(self) -> HistogramValues:
        each = [self.histograms(r) for r in range(self.spec.num_replicas)]
        return HistogramValues([sum(c) for c in zip(*(h.counts for h in each))],
                               [sum(s) for s in zip(*(h.sums for h in each))])

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.spec.name)
        except posix_ipc.ExistentialError:
            pass

    def close(self) -> None:
        self._words.release()
        self._doubles.release()
        self._mmap.close()
