"""A worker process's life cycle (tokenizer, detokenizer, scheduler): start, attach, ready, run, exit.

Workers are started with multiprocessing `spawn` by minisrv/runtime/pipeline.py. The API server (the parent)
decides when the server stops, so a worker ignores SIGINT (a terminal's Ctrl-C reaches the whole
process group) and leaves when a SHUTDOWN record reaches it, or when it notices its parent is gone:
the kernel kills it at once where it can (Linux PR_SET_PDEATHSIG), and every wait loop also checks.
"""
from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, NoReturn, Protocol, TypeVar

from tqdm import tqdm

from minisrv.ipc import PeerGone
from minisrv.ipc.process import die_with_parent, set_process_name
from minisrv.runtime.status_block import StatusBlock, StatusBlockSpec

PARENT_CHECK_INTERVAL_S = 0.25   # workers notice a dead parent within this (plus one model step)
IDLE_WAIT_S = 0.25               # a sleeping worker wakes this often to check on its parent


class ParentGone(SystemExit):
    """Raised in a worker whose parent died: it unwinds like sys.exit, with a non-zero code."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{name}: the API server process is gone; exiting")


@dataclass(frozen=True)
class WorkerInfo:
    """Picklable identity of one worker, passed to it at spawn."""

    name: str              # "scheduler", "detokenizer", "tokenizer-0", ...
    slot: int              # its slot in the status block
    parent_pid: int
    status: StatusBlockSpec
    log_level: str


class ParentWatch:
    """Cheap, rate-limited check that the parent still lives, and this worker's heartbeat in the status block
    (a time read per call; a syscall and a shared-memory store per interval). Every loop calls it each
    iteration, busy or idle, so a heartbeat older than a few intervals means a stopped or stuck worker."""

    def __init__(self, info: WorkerInfo, status: StatusBlock | None = None) -> None:
        self.name = info.name
        self.parent_pid = info.parent_pid
        self._status, self._slot = status, info.slot
        self._next_check = 0.0

    def check(self) -> None:
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + PARENT_CHECK_INTERVAL_S
        if os.getppid() != self.parent_pid:   # re-parented: the parent exited or was killed
            raise ParentGone(self.name)
        if self._status is not None:
            self._status.beat(self._slot)


def start_process(name: str, log_level: str) -> None:
    """Signals and logging of a freshly spawned process of ours; it dies with its parent."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a named multiprocessing semaphore, which a killed worker would leave in
    # /dev/shm; progress bars of one process need only a thread lock.
    tqdm.set_lock(threading.RLock())
    faulthandler.register(signal.SIGUSR1)   # `kill -USR1 <pid>` prints every thread's stack, for diagnosis
    die_with_parent()   # without it, the wait loops' ParentWatch still notices, within PARENT_CHECK_INTERVAL_S
    set_process_name(name)
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr, force=True,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s")


def start_worker(info: WorkerInfo) -> tuple[StatusBlock, ParentWatch]:
    """start_process, and the status block of a server's worker."""
    start_process(info.name, info.log_level)
    ParentWatch(info).check()   # the parent may have died before PR_SET_PDEATHSIG took effect
    status = StatusBlock(info.status)
    status.attach_worker(info.slot, os.getpid())
    return status, ParentWatch(info, status)


def run_until_peers_leave(run: Callable[[], None]) -> None:
    """Run a worker's loop; a neighbour that closed its ring end (it got SHUTDOWN first) or died ends it
    quietly: at shutdown that is the normal order of things, and a death is reported by the launcher."""
    try:
        run()
    except PeerGone as exc:
        logging.getLogger(__name__).info("%s; exiting", exc)
    else:
        logging.getLogger(__name__).debug("shut down; exiting")


def exit_quickly() -> NoReturn:
    """End a worker whose rings and status block are closed. Tearing down an interpreter that has loaded
    torch and transformers takes seconds (measured 1.4-7 s here), and nothing of ours is left to run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@contextmanager
def startup_errors() -> Iterator[None]:
    """Bad settings found while loading (a missing --model, a broken --chat-template) end the worker with
    the message alone, which names the flag, instead of a traceback."""
    try:
        yield
    except ValueError as exc:
        raise SystemExit(f"minisrv serve: error: {exc}") from None


class WorkerLoop(Protocol):
    """A worker's process loop: `run()` until shutdown, then `close()` its ring ends."""

    def run(self) -> None: ...
    def close(self) -> None: ...


W = TypeVar("W", bound=WorkerLoop)


def freeze_start_up_objects() -> None:
    """Put what start-up made (modules, the model, a tokenizer) beyond the garbage collector, so that a full
    collection walks only what serving made since: in a process holding the embedded model's engine a full
    collection took 174-183 ms without this, 1.8-2.0 ms with it (vLLM and SGLang freeze theirs too)."""
    gc.collect()
    gc.freeze()


def serve_worker(info: WorkerInfo, attach: Callable[[StatusBlock, ParentWatch], W],
                 set_up: Callable[[W, StatusBlock], None]) -> NoReturn:
    """The life of every spawned worker. Its ring ends attach first, before the slow set-up (loading a
    tokenizer or a model), because every ring's name is unlinked as soon as all its ends have attached;
    then it reports ready, runs until shutdown or a neighbour leaves, closes its ends and exits."""
    status, watch = start_worker(info)
    worker = None
    try:
        worker = attach(status, watch)
        with startup_errors():
            set_up(worker, status)
        freeze_start_up_objects()
        status.mark_ready(info.slot, os.getpid())
        run_until_peers_leave(worker.run)
    finally:
        if worker is not None:
            worker.close()
        status.close()
    exit_quickly()
