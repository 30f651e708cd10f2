"""Doorbells and the liveness check."""
from __future__ import annotations

import os
import select
import subprocess
import sys
import time

from minisrv.ipc.segment import FIFO_DIR
from minisrv.ipc.wakeup import FifoDoorbell, SemaphoreDoorbell, process_alive


def test_process_alive_counts_a_zombie_as_dead() -> None:
    assert process_alive(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    assert process_alive(child.pid) or child.poll() is not None
    deadline = time.monotonic() + 30
    while process_alive(child.pid):          # exits, then lingers unreaped as a zombie
        assert time.monotonic() < deadline
        time.sleep(0.01)
    with open(f"/proc/{child.pid}/stat", "rb") as stat:
        assert b") Z " in stat.read()        # still a zombie: reaping is what we have not done
    child.wait()
    assert not process_alive(child.pid)


def test_fifo_doorbell_rings_clears_and_never_blocks() -> None:
    path = f"{FIFO_DIR}/minisrv-test-{os.getpid()}-{time.monotonic_ns()}.fifo"
    producer, consumer = FifoDoorbell(path, create=True), FifoDoorbell(path)
    try:
        FifoDoorbell.unlink(path)
        assert select.select([consumer.fileno()], [], [], 0)[0] == []
        for _ in range(100_000):             # far more than a pipe holds: extra rings are dropped, no blocking
            producer.ring()
        consumer.wait(5)                     # returns at once and swallows every pending ring
        assert select.select([consumer.fileno()], [], [], 0)[0] == []
        producer.ring()
        assert select.select([consumer.fileno()], [], [], 5)[0] == [consumer.fileno()]
    finally:
        producer.close()
        consumer.close()


def test_semaphore_doorbell_wait_returns_on_ring_or_timeout() -> None:
    name = f"/minisrv-test-{os.getpid()}-{time.monotonic_ns()}"
    bell = SemaphoreDoorbell(name, create=True)
    try:
        SemaphoreDoorbell.unlink(name)
        bell.wait(0.01)                      # times out quietly
        bell.ring()
        bell.wait(5)                         # consumes the ring
        assert bell._sem.value == 0
    finally:
        bell.close()
