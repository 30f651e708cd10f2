"""The launcher's side of ring lifecycles: create every ring, hand out specs, unlink every name.

    rings = RingSet()                                     # in the parent, before starting children
    tokens = rings.create("tokens", capacity=1 << 22)     # -> RingSpecs(producer=..., readers=(...,))
    Process(target=scheduler_main, args=(tokens.producer, ...)).start()    # spawn; specs pickle
    ...  every child attaches (RingWriter.attach / RingReader.attach) and reports ready ...
    rings.unlink()                                        # idempotent; also in the launcher's finally

Names are `/minisrv-<pid>-<random>-<ring>`: unique per server instance and unguessable (64 random
bits), created with mode 0600. The last process to attach a ring already unlinks its names, so once
everyone is attached a `kill -9` of anyone leaves nothing in /dev/shm; `unlink()` covers a child
that died before attaching. What no process of an instance can clean up is a parent killed (`kill -9`)
before every child attached: `sweep_dead_instances()`, run by the next start, removes the names whose
creator's pid no longer runs.
"""
from __future__ import annotations

import os
import re
import secrets
from dataclasses import dataclass

from minisrv.ipc.segment import FIFO_DIR, RingNames, RingSpec, Role, Wakeup, create_segment

RING_LABEL = re.compile(r"[a-z0-9][a-z0-9_]{0,31}")


@dataclass(frozen=True)
class RingSpecs:
    """The specs of one ring: one for its producer, one per reader."""

    producer: RingSpec
    readers: tuple[RingSpec, ...]

    @property
    def reader(self) -> RingSpec:
        """The only reader of a single-consumer ring."""
        if len(self.readers) != 1:
            raise ValueError(f"ring {self.producer.label!r} has {len(self.readers)} readers; pick one of .readers")
        return self.readers[0]


def instance_prefix() -> str:
    """A fresh `/minisrv-<pid>-<random>` for the shared-memory names of one server instance."""
    return f"/minisrv-{os.getpid()}-{secrets.token_hex(8)}"


# A name of some instance: shared memory and FIFOs as they are, semaphores with glibc's "sem." prefix.
_INSTANCE_NAME = re.compile(r"^(?:sem\.)?minisrv-(\d+)-[0-9a-f]{16}-")


def sweep_dead_instances(directories: tuple[str, ...] = ("/dev/shm", FIFO_DIR)) -> list[str]:
    """Remove this user's minisrv names whose creating process is gone; returns what was removed. Names of a
    living instance (its pid runs, even one still starting) are never touched."""
    removed = []
    for directory in dict.fromkeys(directories):
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            match = _INSTANCE_NAME.match(entry.name)
            if match is None or _alive(int(match.group(1))):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
                os.unlink(entry.path)
                removed.append(entry.path)
            except OSError:   # gone meanwhile, or not ours to remove
                pass
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # another user's process: alive
        return True
    return True


class RingSet:
    """Every ring of one server instance, so they can be unlinked together."""

    def __init__(self) -> None:
        self.prefix = instance_prefix()
        self._created: list[tuple[RingNames, int, Wakeup]] = []

    def create(self, ring: str, capacity: int, num_readers: int = 1,
               wakeup: Wakeup = Wakeup.SEMAPHORE) -> RingSpecs:
        """Create ring `ring` (a short label) with a data area of `capacity` bytes (a power of two).

        `wakeup` is how its readers sleep: SEMAPHORE for blocking readers, FIFO for a reader inside
        an event loop (AsyncRingReader); a FIFO reader can also block, a SEMAPHORE one cannot be async.
        """
        if not RING_LABEL.fullmatch(ring):
            raise ValueError(f"ring name must match {RING_LABEL.pattern}, got {ring!r}")
        name = f"{self.prefix}-{ring}"
        if any(names.segment == name for names, _, _ in self._created):
            raise ValueError(f"ring {ring!r} already exists in this RingSet")
        create_segment(name, capacity, num_readers, wakeup)
        self._created.append((RingNames(name), num_readers, wakeup))
        readers = tuple(RingSpec(name, capacity, Role.READER, r) for r in range(num_readers))
        return RingSpecs(RingSpec(name, capacity, Role.PRODUCER), readers)

    def unlink(self) -> None:
        """Remove every name this set created. Attached processes keep working; new attaches fail."""
        for names, num_readers, wakeup in self._created:
            names.unlink_all(num_readers, wakeup)

    def __enter__(self) -> RingSet:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.unlink()
