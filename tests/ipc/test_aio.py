"""The asyncio consumer on uvloop: drains everything per wake-up, never blocks the loop, detects a gone peer."""
from __future__ import annotations

import asyncio
import multiprocessing
import threading

import pytest
import uvloop
from ipc_peers import paced_producer

from minisrv.ipc import PeerGone, RingReader, RingSet, RingTimeout, Wakeup
from minisrv.ipc.aio import AsyncRingReader, write_async


def test_consumer_drains_a_whole_batch_per_wake_up_and_the_loop_keeps_running(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=4096, wakeup=Wakeup.FIFO)
    consumer = AsyncRingReader(reader)
    batches = [[bytes([b, i]) for i in range(1 + b % 7)] for b in range(30)]

    async def main() -> tuple[list[list[bytes]], int]:
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        received = []
        for batch in batches:
            # The producer publishes the batch once, from another thread, while the consumer sleeps.
            loop = asyncio.get_running_loop()
            loop.call_later(0.002, threading.Thread(target=writer.write_many, args=(batch,)).start)
            received.append(await consumer.drain(timeout=10))
        tick_task.cancel()
        return received, ticks

    received, ticks = uvloop.run(main())
    assert received == batches          # each wake-up returned its whole batch, in order
    assert ticks > len(batches)         # other tasks ran while the consumer waited
    consumer.close()


def test_consumer_receives_everything_from_another_process(ring_set: RingSet) -> None:
    specs = ring_set.create("t", 1024, wakeup=Wakeup.FIFO)
    producer = multiprocessing.get_context("spawn").Process(target=paced_producer, args=(specs.producer, 150, 9))
    consumer = AsyncRingReader(RingReader(specs.reader))
    producer.start()

    async def main() -> list[int]:
        seqs: list[int] = []
        try:
            while True:
                seqs += [int.from_bytes(r, "little") for r in await consumer.drain(timeout=30)]
        except PeerGone:
            return seqs

    seqs = uvloop.run(main())
    producer.join(30)
    consumer.close()
    assert seqs == list(range(len(seqs))) and len(seqs) >= 150


def test_timeout_and_wrong_wakeup_are_clear_errors(make_ring) -> None:
    _, (semaphore_reader,) = make_ring(name="blocking")
    with pytest.raises(ValueError, match="ring 'blocking'.*Wakeup.FIFO"):
        AsyncRingReader(semaphore_reader)
    _, (reader,) = make_ring(name="text", wakeup=Wakeup.FIFO)
    consumer = AsyncRingReader(reader)
    with pytest.raises(RingTimeout, match="ring 'text' .*timed out after 0.05 s.*is alive"):
        uvloop.run(consumer.drain(timeout=0.05))


def test_write_async_waits_for_space_without_blocking_the_loop(make_ring) -> None:
    writer, (reader,) = make_ring(capacity=256, name="requests")
    while writer.try_write(b"z" * 24):
        pass

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, reader.drain)          # frees the ring later, on the loop itself
        await write_async(writer, b"late", timeout=10)
        with pytest.raises(RingTimeout, match="ring 'requests' .*waiting for space"):
            while True:
                await write_async(writer, b"w" * 24, timeout=0.05)
        return reader.drain()

    received = uvloop.run(main())
    assert received[0] == b"late" and set(received[1:]) == {b"w" * 24}
