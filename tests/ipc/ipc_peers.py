"""Child-process bodies for the multi-process ring tests (importable by spawn children)."""
from __future__ import annotations

import os
import random
import sys
import time
import zlib

from minisrv.ipc import PeerGone, RingReader, RingSpec, RingWriter

PEER_GONE_EXIT = 3          # a child exits with this when it saw its peer die
STRESS_BLOBS = 1024


def stress_blobs(seed: int) -> list[bytes]:
    """Payloads both sides derive from one seed: record `seq` is seq (u64) + blobs[seq % STRESS_BLOBS]."""
    rng = random.Random(seed)
    return [rng.randbytes(rng.randrange(0, 57)) for _ in range(STRESS_BLOBS)]


def stress_producer(spec: RingSpec, count: int, seed: int) -> None:
    """Send records 0..count-1 in random batches (write_many) or singly (write), pausing at random,
    then one b"crc" record carrying the CRC32 of everything sent."""
    blobs = stress_blobs(seed)
    rng = random.Random(seed + 1)
    crc = 0
    with RingWriter(spec) as writer:
        seq = 0
        while seq < count:
            batch = min(rng.randrange(1, 200), count - seq)
            records = [seq_i.to_bytes(8, "little") + blobs[seq_i % STRESS_BLOBS] for seq_i in range(seq, seq + batch)]
            for record in records:
                crc = zlib.crc32(record, crc)
            if rng.random() < 0.5:
                writer.write_many(records, timeout=30)
            else:
                for record in records:
                    writer.write(record, timeout=30)
            seq += batch
            if rng.random() < 0.01:
                time.sleep(rng.random() * 0.002)
        writer.write(b"crc" + crc.to_bytes(4, "little"), timeout=30)


def attach_and_serve(spec: RingSpec, attached: object, hold_s: float = 60.0) -> None:
    """Attach as `spec.role`, set the `attached` event, then produce or consume until the peer is gone
    (exit PEER_GONE_EXIT) or `hold_s` passes."""
    endpoint = RingWriter(spec) if spec.role.value == "producer" else RingReader(spec)
    attached.set()
    deadline = time.monotonic() + hold_s
    try:
        while time.monotonic() < deadline:
            if isinstance(endpoint, RingWriter):
                endpoint.write(os.urandom(32), timeout=hold_s)   # fills the ring, then waits for space
            else:
                endpoint.read(timeout=hold_s)
    except PeerGone:
        sys.exit(PEER_GONE_EXIT)


def write_then_linger(spec: RingSpec, records: list[bytes], written: object, close: bool) -> None:
    """Write `records`, set `written`, then close the writer and exit (close=True) or hang until killed."""
    writer = RingWriter(spec)
    writer.write_many(records, timeout=10)
    written.set()
    if close:
        writer.close()
        return
    time.sleep(60)


def attach_then_raise(spec: RingSpec, attached: object) -> None:
    """Attach, then die of an exception, as a crashing worker would."""
    RingReader(spec)
    attached.set()
    raise RuntimeError("worker crashed on purpose (test)")


def paced_producer(spec: RingSpec, batches: int, seed: int) -> None:
    """Write `batches` batches of 1..20 numbered records (one publication each), pausing between them."""
    rng = random.Random(seed)
    seq = 0
    with RingWriter(spec) as writer:
        for _ in range(batches):
            size = rng.randrange(1, 21)
            writer.write_many([(seq + i).to_bytes(8, "little") for i in range(size)], timeout=30)
            seq += size
            time.sleep(rng.random() * 0.003)
