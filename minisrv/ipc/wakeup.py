"""How a waiting side of a ring sleeps and gets woken, and how it tells whether its peer still lives.

A consumer that sleeps advertises it with a flag in the ring header, re-checks the ring, and only
then blocks on its doorbell; the producer rings the doorbell only when it sees that flag (and a
producer waiting for space does the same with a "waiting" flag and a semaphore). Between
"store my flag" and "load the other side's index" each side needs a full (store-load) fence, or
both could read stale values and the wake-up would be lost: x86-64 keeps stores in order (TSO) but
lets a load pass an earlier store, and CPython has no fence primitive. `full_fence` gets one from an
uncontended `threading.Lock`: acquiring and releasing it executes locked read-modify-write
instructions (sem_trywait/sem_post in CPython 3.11, an atomic compare-exchange in 3.13+), which on
x86-64 are full barriers, and the opaque C call is also a compiler barrier. It costs about 70 ns.
On weakly ordered CPUs (ARM, POWER) those atomics are only acquire/release, so a real `dmb ish` /
`sync` would be needed there.

Doorbells: a POSIX semaphore for consumers that block in a thread, and a named FIFO for consumers
inside an event loop, which watches its file descriptor. bench/ipc.py's wake-up rows, p50 round
trip into a uvloop loop (2 pinned Xeon cores / the idle 2-vCPU dev VM): a reader thread blocked on
a semaphore that posts into the loop, 22 / 57 us; an eventfd the loop watches, 10.4 / 49 us; a FIFO
the loop watches, 10.8 / 50 us. The fd wins; a FIFO rather than an eventfd because a FIFO has a
name: it follows the same create / attach-by-name / unlink lifecycle as the segment, so no
descriptor has to be inherited across `spawn`.
"""
from __future__ import annotations

import errno
import os
import select
import threading

import posix_ipc


def full_fence(lock: threading.Lock) -> None:
    """A store-load barrier: `lock` is a private, never-contended threading.Lock (module docstring says
    why this works). Hot paths inline these two C calls: a Python-level wrapper doubles the cost."""
    lock.acquire()
    lock.release()


def process_alive(pid: int) -> bool:
    """Whether `pid` runs. A zombie counts as dead: it has exited and only waits for its parent to reap it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except FileNotFoundError:
        return False  # exited between the two checks
    except OSError:
        return True  # no /proc: os.kill is all we can know
    # The state letter follows the parenthesised command name, which may itself contain ") ".
    state = stat[stat.rindex(b")") + 2 : stat.rindex(b")") + 3]
    return state not in (b"Z", b"X")


class SemaphoreDoorbell:
    """A named POSIX semaphore: one post wakes one blocked waiter; extra posts only cause a re-check."""

    def __init__(self, name: str, create: bool = False) -> None:
        flags = posix_ipc.O_CREX if create else 0
        self.name = name
        self._sem = posix_ipc.Semaphore(name, flags, mode=0o600, initial_value=0)

    def ring(self) -> None:
        self._sem.release()

    def wait(self, timeout: float) -> None:
        """Block up to `timeout` seconds for a ring (the caller re-checks the ring either way)."""
        try:
            self._sem.acquire(timeout)
        except posix_ipc.BusyError:
            pass

    def close(self) -> None:
        self._sem.close()

    @staticmethod
    def unlink(name: str) -> None:
        try:
            posix_ipc.unlink_semaphore(name)
        except posix_ipc.ExistentialError:
            pass


class FifoDoorbell:
    """A named pipe opened read-write and non-blocking by both sides, so neither open nor write can block
    (Linux allows O_RDWR on a FIFO), and a write cannot fail because the other side is not open yet."""

    def __init__(self, path: str, create: bool = False) -> None:
        if create:
            os.mkfifo(path, 0o600)
        self.name = path
        self._fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def ring(self) -> None:
        try:
            os.write(self._fd, b"\0")
        except BlockingIOError:
            pass  # the pipe is full of earlier rings: the sleeper will wake anyway

    def wait(self, timeout: float) -> None:
        select.select([self._fd], [], [], timeout)
        self.clear()

    def clear(self) -> None:
        """Swallow pending rings so the next wait blocks until a new one."""
        try:
            # A short read means the pipe is empty: no second read (and its EAGAIN exception) needed.
            while len(os.read(self._fd, 4096)) == 4096:
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @staticmethod
    def unlink(path: str) -> None:
        try:
            os.unlink(path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                raise


Doorbell = SemaphoreDoorbell | FifoDoorbell
