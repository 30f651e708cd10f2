"""Two processes, a million records through a small ring: no loss, no duplicate, no torn record."""
from __future__ import annotations

import multiprocessing
import random
import time
import zlib

from ipc_peers import STRESS_BLOBS, stress_blobs, stress_producer

from minisrv.ipc import RingReader

RECORDS = 1_000_000


def test_million_records_with_random_pauses_arrive_intact_and_in_order(ring_set) -> None:
    seed = 20240611
    specs = ring_set.create("stress", capacity=4096)
    producer = multiprocessing.get_context("spawn").Process(target=stress_producer, args=(specs.producer, RECORDS, seed))
    producer.start()
    blobs = stress_blobs(seed)
    rng = random.Random(seed + 2)
    expected, crc, final = 0, 0, None
    try:
        with RingReader(specs.reader) as reader:
            while final is None:
                mode = rng.random()
                if mode < 0.4:
                    reader.wait(timeout=30)
                    records = [bytes(v) for v in reader.drain_views()]
                    reader.release()
                elif mode < 0.8:
                    reader.wait(timeout=30)
                    records = reader.drain()
                else:
                    records = [reader.read(timeout=30)]
                for record in records:
                    assert final is None, "a record after the final one"
                    if len(record) < 8:                     # the producer's closing CRC record
                        final = record
                        continue
                    seq = int.from_bytes(record[:8], "little")
                    assert seq == expected, f"record {seq} arrived where {expected} was due"
                    assert record[8:] == blobs[seq % STRESS_BLOBS], f"record {seq} is torn"
                    crc = zlib.crc32(record, crc)
                    expected += 1
                if rng.random() < 0.001:
                    time.sleep(rng.random() * 0.002)
            assert expected == RECORDS
            assert final == b"crc" + crc.to_bytes(4, "little")
            assert reader.drain() == []
    finally:
        producer.join(30)
    assert producer.exitcode == 0
