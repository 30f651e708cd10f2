"""Ring semantics in one process: framing, wrap-around, sizes, backpressure, draining, broadcast."""
from __future__ import annotations

import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.ipc import RecordTooLarge, RingReader, RingWriter
from minisrv.ipc.segment import HeaderLayout

SIZE_CLASSES = [0, 1, 7, 8, 9, 15, 16, 17, 63, 64, 65, 100]


def move_to_offset(writer: RingWriter, reader: RingReader, offset: int) -> None:
    """Advance both ends with empty records (8-byte frames) until the write offset is `offset`."""
    while writer._pos % writer.capacity != offset:
        assert writer.try_write(b"")
        assert reader.try_read() == b""


def test_wrap_around_at_every_offset(make_ring) -> None:
    rng = random.Random(1)
    writer, (reader,) = make_ring(capacity=256)
    for offset in range(0, 256, 8):
        for length in SIZE_CLASSES + [writer.max_record_bytes]:
            move_to_offset(writer, reader, offset)
            record = rng.randbytes(length)
            assert writer.try_write(record)
            assert reader.try_read() == record
            assert reader.try_read() is None


def test_several_records_in_flight_across_the_wrap(make_ring) -> None:
    rng = random.Random(2)
    writer, (reader,) = make_ring(capacity=256)
    for offset in range(0, 256, 8):
        move_to_offset(writer, reader, offset)
        records = [rng.randbytes(rng.randrange(0, 40)) for _ in range(4)]
        for record in records:
            assert writer.try_write(record)
        assert reader.drain() == records


@pytest.mark.parametrize("length", SIZE_CLASSES + [1000, 2040])
def test_every_size_class_round_trips(make_ring, length: int) -> None:
    writer, (reader,) = make_ring(capacity=4096)
    assert writer.max_record_bytes == 2040
    record = random.Random(length).randbytes(length)
    writer.write(record, timeout=1)
    assert reader.read(timeout=1) == record


def test_record_over_half_the_capacity_is_refused(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=4096)
    with pytest.raises(RecordTooLarge, match=r"ring 't' .*2041 bytes exceeds the limit of 2040"):
        writer.try_write(bytes(2041))
    with pytest.raises(RecordTooLarge, match="4000 bytes"):
        writer.write_many([b"ok", bytes(4000)])
    assert reader.drain() == []                   # write_many is all or nothing on a too-large record


def test_full_ring_refuses_then_producer_waits_for_space(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=256)
    rng = random.Random(3)
    written = []
    while True:
        record = rng.randbytes(rng.randrange(1, 30))
        if not writer.try_write(record):
            break
        written.append(record)
    late = rng.randbytes(24)
    done = threading.Event()

    def blocked_write() -> None:
        writer.write(late, timeout=10)
        done.set()

    thread = threading.Thread(target=blocked_write)
    thread.start()
    assert not done.wait(0.05)          # full: the producer waits, nothing is dropped or overwritten
    received = []
    while not done.is_set():            # each read frees space and wakes the producer to re-check
        received.append(reader.read(timeout=1))
        done.wait(0.01)
    thread.join(10)
    received += reader.drain()
    assert received == written + [late]


def test_write_many_publishes_every_record_in_order(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=512)
    rng = random.Random(4)
    records = [rng.randbytes(rng.randrange(0, 60)) for _ in range(500)]
    received: list[bytes] = []
    consumer = threading.Thread(target=lambda: [received.append(reader.read(timeout=5)) for _ in records])
    consumer.start()
    writer.write_many(records, timeout=5)
    consumer.join(10)
    assert received == records


def test_batch_frames_wrap_at_every_offset_and_split_for_every_read_style(make_ring) -> None:
    rng = random.Random(6)
    writer, (reader,) = make_ring(capacity=512)
    for offset in range(0, 512, 8):
        for style in ("try_read", "drain", "views", "mixed"):
            move_to_offset(writer, reader, offset)
            batch = [rng.randbytes(rng.randrange(0, 30)) for _ in range(rng.randrange(2, 9))]
            writer.write_many(batch)
            if style == "try_read":
                received = [reader.try_read() for _ in batch]
            elif style == "drain":
                received = reader.drain()
            elif style == "views":
                received = [bytes(v) for v in reader.drain_views()]
                reader.release()
            else:   # one record, then the rest of the batch through the other paths
                received = [reader.try_read()] + [bytes(v) for v in reader.drain_views()]
                reader.release()
            assert received == batch
            assert reader.try_read() is None and not reader.poll()


def test_write_many_splits_a_stream_larger_than_the_ring(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=1024)
    rng = random.Random(8)
    records = [rng.randbytes(rng.choice([0, 5, 60, writer.max_record_bytes])) for _ in range(300)]
    received: list[bytes] = []

    def consume() -> None:
        while len(received) < len(records):
            reader.wait(timeout=10)
            received.extend(reader.drain())

    consumer = threading.Thread(target=consume)
    consumer.start()
    writer.write_many(iter(records), timeout=10)
    consumer.join(10)
    assert received == records


def test_views_stay_unwritten_until_release(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=256)
    records = [bytes([i]) * 40 for i in range(1, 6)]
    writer.write_many(records)
    assert not writer.try_write(bytes(40))        # full
    views = reader.drain_views()
    assert [bytes(v) for v in views] == records
    assert reader.drain_views() == []             # a second call continues after what it returned
    assert not writer.try_write(bytes(40))        # still full: views not released
    reader.release()
    assert writer.try_write(b"x" * 40)
    assert reader.drain() == [b"x" * 40]


def test_polling_an_empty_ring_never_touches_a_doorbell(make_ring) -> None:
    class Untouchable:
        def __getattr__(self, name: str) -> object:
            raise AssertionError(f"an empty poll used the doorbell ({name})")

    writer, (reader,) = make_ring()
    doorbells = reader.doorbell, reader._space
    reader.doorbell, reader._space = Untouchable(), Untouchable()
    for _ in range(100):
        assert reader.try_read() is None
        assert reader.drain() == []
        assert reader.drain_views() == []
    reader.doorbell, reader._space = doorbells


def test_broadcast_ring_delivers_everything_to_every_reader_at_the_slowest_pace(make_ring) -> None:
    writer, readers = make_ring(capacity=512, num_readers=3)
    rng = random.Random(5)
    records = [rng.randbytes(rng.randrange(0, 50)) for _ in range(600)]
    received: list[list[bytes]] = [[] for _ in readers]
    slow = readers[2]
    max_lead = 0

    def consume(index: int) -> None:
        pause = random.Random(index)
        for _ in records:
            received[index].append(readers[index].read(timeout=10))
            if index == 2 and pause.random() < 0.05:
                threading.Event().wait(0.002)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    slow_index = slow._read_word
    for record in records:
        writer.write(record, timeout=10)
        max_lead = max(max_lead, writer._pos - writer._header[slow_index])
    for thread in threads:
        thread.join(10)
    assert received == [records] * 3
    assert max_lead <= writer.capacity           # the slow reader bounded the producer


def test_header_puts_every_hot_field_on_its_own_cache_line() -> None:
    for readers in (1, 3, 8, 9, 64):
        layout = HeaderLayout(readers)
        hot = [layout.write_index, layout.producer_waiting]
        hot += [w for r in range(readers) for w in (layout.read_index(r), layout.sleeping(r))]
        static_lines = {HeaderLayout.PRODUCER_PID // 8} | {layout.reader_pid(r) // 8 for r in range(readers)}
        lines = [word // 8 for word in hot]
        assert len(set(lines)) == len(lines) and not set(lines) & static_lines
        assert all(word % 8 == 0 for word in hot)
        assert layout.header_bytes % 64 == 0 and layout.header_bytes >= (max(hot) + 1) * 8


def test_a_record_that_cannot_be_copied_leaves_no_trace(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=256)
    not_bytes = memoryview(bytearray(16)).cast("I")         # 4 items of 4 bytes: not a byte buffer
    for offset in (0, 200):                                  # in place, and where it would have to wrap
        move_to_offset(writer, reader, offset)
        with pytest.raises((ValueError, TypeError)):
            writer.try_write(not_bytes)
        with pytest.raises((ValueError, TypeError)):
            writer.write_many([b"a", not_bytes, b"b"])
        writer.write_many([b"after"])
        assert reader.drain() == [b"after"]


def ring_steps(max_record_bytes: int) -> st.SearchStrategy[list]:
    """A producer's and a consumer's calls on one ring, interleaved at random: a record of up to the largest
    length, a small batch (one frame of an empty ring, so it never waits), or a read in one of the reader's
    styles."""
    return st.lists(st.one_of(
        st.tuples(st.just("try_write"), st.integers(0, max_record_bytes)),
        st.tuples(st.just("write_many"), st.lists(st.integers(0, 12), min_size=1, max_size=6)),
        st.tuples(st.just("read"), st.sampled_from(["try_read", "drain", "views"])),
    ), max_size=80)


def test_any_interleaving_delivers_every_record_once_in_order(make_ring) -> None:
    """The ring against a list: every record a write accepted comes out once, intact and in order; a write is
    refused only while records are pending. One ring serves every example, so they start at any offset."""
    writer, (reader,) = make_ring(capacity=256)

    @settings(max_examples=300, deadline=None)
    @given(steps=ring_steps(writer.max_record_bytes), seed=st.integers(0, 2**32 - 1))
    def check(steps: list, seed: int) -> None:
        reader.drain()
        rng = random.Random(seed)
        sent: list[bytes] = []
        received: list[bytes] = []
        for action, arg in steps:
            if action == "try_write":
                record = rng.randbytes(arg)
                if writer.try_write(record):
                    sent.append(record)
                else:
                    assert len(received) < len(sent), f"an empty ring refused {arg} bytes"
            elif action == "write_many":
                received += reader.drain()
                batch = [rng.randbytes(n) for n in arg]
                writer.write_many(batch, timeout=0)
                sent += batch
            elif arg == "views":
                received += [bytes(v) for v in reader.drain_views()]
                reader.release()
            elif arg == "drain":
                received += reader.drain()
            elif (record := reader.try_read()) is not None:
                received.append(record)
            assert received == sent[: len(received)]
        received += reader.drain()
        assert received == sent

    check()
