"""The reader end against a real producer process: timeouts, a killed producer, a clean close."""
from __future__ import annotations

import multiprocessing
import os
import random
import signal

import pytest
from ipc_peers import write_then_linger

from minisrv.ipc import PeerGone, RingReader, RingSet, RingTimeout

SPAWN = multiprocessing.get_context("spawn")


def test_read_timeout_names_the_ring_and_the_producer_state(make_ring, ring_set: RingSet) -> None:
    writer, (reader,) = make_ring(name="tokens")
    with pytest.raises(RingTimeout, match=rf"ring 'tokens' .*timed out after 0.05 s.*producer pid {os.getpid()} is alive"):
        reader.read(timeout=0.05)
    lonely = RingReader(ring_set.create("lonely", 256).reader)
    with pytest.raises(RingTimeout, match="producer has not attached"):
        lonely.wait(timeout=0.05)
    lonely.close()


@pytest.mark.parametrize("close", [False, True], ids=["killed", "closed"])
def test_reader_gets_every_record_then_learns_the_producer_is_gone(ring_set: RingSet, close: bool) -> None:
    specs = ring_set.create("t", 4096)
    rng = random.Random(7)
    records = [rng.randbytes(rng.randrange(0, 100)) for _ in range(20)]
    written = SPAWN.Event()
    producer = SPAWN.Process(target=write_then_linger, args=(specs.producer, records, written, close))
    with RingReader(specs.reader) as reader:
        producer.start()
        assert written.wait(30)
        if not close:
            os.kill(producer.pid, signal.SIGKILL)   # a zombie until joined: must still count as dead
        received = [reader.read(timeout=30) for _ in records]
        # 30 s would end in RingTimeout; PeerGone means the death was noticed within a liveness interval.
        with pytest.raises(PeerGone, match="closed its end" if close else rf"pid {producer.pid} is dead"):
            reader.read(timeout=30)
    producer.join(30)
    assert received == records


def test_prepare_to_sleep_sees_a_record_that_raced_in(make_ring) -> None:
    writer, (reader,) = make_ring()
    assert not reader.prepare_to_sleep()     # empty: sleep; the flag is now up
    writer.try_write(b"late")                # sees the flag, clears it and rings
    assert reader._header[reader._sleeping_word] == 0
    assert reader.prepare_to_sleep()         # data: do not sleep
    reader.wait(timeout=0)
    assert reader.try_read() == b"late"


def test_writer_close_then_reader_drains_before_peer_gone(make_ring) -> None:
    writer, (reader,) = make_ring()
    writer.write_many([b"a", b"b"])
    writer.close()
    assert reader.drain() == [b"a", b"b"]
    with pytest.raises(PeerGone, match="closed its end"):
        reader.read(timeout=5)
