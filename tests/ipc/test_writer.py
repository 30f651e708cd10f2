"""The producer end: waiting for space, its timeout message, and a reader that dies while the ring is full."""
from __future__ import annotations

import multiprocessing
import os
import signal

import pytest
from ipc_peers import attach_and_serve

from minisrv.ipc import PeerGone, RingReader, RingSet, RingTimeout, RingWriter

SPAWN = multiprocessing.get_context("spawn")


def fill(writer: RingWriter) -> int:
    count = 0
    while writer.try_write(os.urandom(24)):
        count += 1
    return count


def test_write_timeout_names_the_ring_and_the_readers(make_ring) -> None:
    writer, readers = make_ring(name="text", num_readers=2)
    assert fill(writer) > 0
    with pytest.raises(RingTimeout, match=rf"ring 'text' .*waiting for space.*reader 0 pid {os.getpid()} is alive; "
                                          rf"reader 1 pid {os.getpid()} is alive"):
        writer.write(b"x" * 24, timeout=0.05)


@pytest.mark.parametrize("how", ["kill", "close"])
def test_writer_waiting_on_a_full_ring_notices_a_gone_reader(ring_set: RingSet, how: str) -> None:
    specs = ring_set.create("t", 1024)
    attached = SPAWN.Event()
    with RingWriter(specs.producer) as writer:
        if how == "kill":
            reader = SPAWN.Process(target=attach_and_serve, args=(specs.reader, attached, 0.0))  # attaches, returns
            reader.start()
            assert attached.wait(30)
            reader.join(30)                  # exited without closing: as good as killed
            expected = rf"pid {reader.pid} is dead"
        else:
            RingReader(specs.reader).close()
            expected = "closed its end"
        fill(writer)
        with pytest.raises(PeerGone, match=expected):
            writer.write(b"y" * 24, timeout=30)


def test_killed_reader_mid_stream(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024)
    attached = SPAWN.Event()
    reader = SPAWN.Process(target=attach_and_serve, args=(specs.reader, attached))
    reader.start()
    assert attached.wait(30)
    with RingWriter(specs.producer) as writer:
        for _ in range(200):                 # the reader keeps up: no error while it lives
            writer.write(os.urandom(24), timeout=30)
        os.kill(reader.pid, signal.SIGKILL)
        with pytest.raises(PeerGone, match=rf"reader 0 pid {reader.pid} is dead"):
            for _ in range(1000):
                writer.write(os.urandom(24), timeout=30)
    reader.join(30)
