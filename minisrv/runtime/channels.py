"""The channels between the pipeline's processes: decoded records in, decoded records out.

The process loops of this package and the API server's EngineClient send and receive records
(minisrv/wire/records.py) through the interfaces below and never see what carries them. The product's
carrier is the shared-memory ring (minisrv/ipc/): a record's binary encoding is copied in once and
decoded in place on the other side. bench/pipeline.py plugs ZeroMQ + msgpack in behind the same
interfaces to measure what the rings are worth; nothing else does.

    channels = RingChannels()                      # in the API server, before spawning the workers
    tokens = channels.create("tokens", 1 << 22)    # ChannelEnds: picklable specs of both ends
    writer = tokens.producer.open()                # in the process that owns each end
    reader = tokens.reader.open()
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from minisrv.ipc import RingReader, RingSet, RingSpec, RingTimeout, RingWriter, Role, Wakeup, write_async
from minisrv.ipc.aio import AsyncRingReader
from minisrv.ipc.wait_any import check_fifo_readers, wait_any as wait_any_ring
from minisrv.wire.records import Record, decode

MiB = 1 << 20


@dataclass(frozen=True)
class RingCapacities:
    """Bytes per ring (powers of two); a record may use half. Shared memory is touched only as used."""

    requests: int = 8 * MiB       # api -> tokenizer: prompt text or ids, chat messages
    tokenized: int = 4 * MiB      # tokenizer -> scheduler: prompt ids
    detokenize: int = 4 * MiB     # tokenizer -> detokenizer: prompt ids for echo
    tokens: int = 4 * MiB         # scheduler -> detokenizer: one step's rows
    # detokenizer -> scheduler: aborts. The only ring against the flow (scheduler -> detokenizer), so the
    # two could wait on each other only if this one filled: it holds ~10k aborts, far more than running requests.
    stops: int = 256 * 1024
    text: int = 8 * MiB           # detokenizer -> api: one batch's text (echo can be a whole prompt)
    tp: int = 4 * MiB             # scheduler -> the other tensor-parallel ranks: its requests, aborts and steps


class RecordWriter(Protocol):
    name: str

    def send(self, record: Record) -> None:
        """Send one record, waiting while the channel is full."""

    def send_many(self, records: Iterable[Record]) -> None: ...

    def try_send(self, record: Record) -> bool:
        """Send one record if there is room now; never waits."""

    async def send_async(self, record: Record, timeout: float | None = None) -> None:
        """Send from inside an event loop without blocking it."""

    def close(self) -> None: ...


class RecordReader(Protocol):
    name: str

    def drain(self) -> list[Record]:
        """Every record available now, in order (an empty list when none)."""

    def wait(self, timeout: float) -> bool:
        """Block until a record is available (True) or `timeout` seconds pass (False)."""

    @staticmethod
    def wait_many(readers: Sequence[RecordReader], timeout: float) -> bool:
        """wait() over several readers of this kind at once."""

    def close(self) -> None: ...


class AsyncRecordReader(Protocol):
    async def drain(self) -> list[Record]:
        """Every record available, waiting (without blocking the loop) until there is one."""

    def close(self) -> None: ...


class ChannelSpec(Protocol):
    """A picklable description of one end of a channel; the process that owns the end opens it."""

    def open(self) -> RecordReader | RecordWriter: ...

    def open_async(self) -> AsyncRecordReader: ...


@dataclass(frozen=True)
class ChannelEnds:
    producer: ChannelSpec
    readers: tuple[ChannelSpec, ...]

    @property
    def reader(self) -> ChannelSpec:
        """The only reader of a one-reader channel."""
        (only,) = self.readers
        return only


class Channels(Protocol):
    """Creates the channels of one server instance and removes their names when everyone has attached."""

    def create(self, label: str, capacity: int, wakeup: Wakeup = Wakeup.SEMAPHORE, num_readers: int = 1) -> ChannelEnds:
        """`capacity` bounds the bytes in flight (a record may use half); `wakeup`: FIFO for an end read by
        a process that waits on several channels or inside an event loop; with `num_readers` > 1 every reader
        gets every record (a broadcast)."""

    def unlink(self) -> None: ...


def wait_any(readers: Sequence[RecordReader], timeout: float) -> bool:
    """Block until one of `readers` (all of one kind) has a record, or `timeout` seconds pass."""
    return type(readers[0]).wait_many(readers, timeout)


# --- the rings --------------------------------------------------------------------------------------------

class RingChannels:
    def __init__(self) -> None:
        self.rings = RingSet()

    def create(self, label: str, capacity: int, wakeup: Wakeup = Wakeup.SEMAPHORE, num_readers: int = 1) -> ChannelEnds:
        specs = self.rings.create(label, capacity, num_readers, wakeup=wakeup)
        return ChannelEnds(RingChannel(specs.producer), tuple(RingChannel(r) for r in specs.readers))

    def unlink(self) -> None:
        self.rings.unlink()


@dataclass(frozen=True)
class RingChannel:
    """ChannelSpec of one end of a shared-memory ring."""

    spec: RingSpec

    def open(self) -> RingRecordReader | RingRecordWriter:
        if self.spec.role is Role.READER:
            return RingRecordReader(RingReader(self.spec))
        return RingRecordWriter(RingWriter(self.spec))

    def open_async(self) -> AsyncRingRecordReader:
        return AsyncRingRecordReader(AsyncRingReader(RingReader(self.spec)))


class RingRecordWriter:
    """Records as their binary encoding into a ring. Encoding refuses a value a record cannot carry
    (ValueError) and a record larger than half the ring (RecordTooLarge, a RingError and a ValueError)."""

    def __init__(self, ring: RingWriter) -> None:
        self.ring = ring
        self.name = ring.name

    def send(self, record: Record) -> None:
        self.ring.write(record.encode())

    def send_many(self, records: Iterable[Record]) -> None:
        self.ring.write_many([record.encode() for record in records])

    def try_send(self, record: Record) -> bool:
        return self.ring.try_write(record.encode())

    async def send_async(self, record: Record, timeout: float | None = None) -> None:
        await write_async(self.ring, record.encode(), timeout)

    def close(self) -> None:
        self.ring.close()


class RingRecordReader:
    """Records decoded from a ring. Waits raise PeerGone once the ring is empty and its producer is gone."""

    def __init__(self, ring: RingReader) -> None:
        self.ring = ring
        self.name = ring.name

    def drain(self) -> list[Record]:
        return [decode(buffer) for buffer in self.ring.drain()]

    def wait(self, timeout: float) -> bool:
        try:
            self.ring.wait(timeout)
        except RingTimeout:
            return False
        return True

    @staticmethod
    def wait_many(readers: Sequence[RingRecordReader], timeout: float) -> bool:
        rings = [reader.ring for reader in readers]
        check_fifo_readers(rings)
        return wait_any_ring(rings, timeout)

    def close(self) -> None:
        self.ring.close()


class AsyncRingRecordReader:
    def __init__(self, ring: AsyncRingReader) -> None:
        self.ring = ring

    async def drain(self) -> list[Record]:
        return [decode(buffer) for buffer in await self.ring.drain()]

    def close(self) -> None:
        self.ring.close()
