"""The pipeline's channels over ZeroMQ + msgpack, as mini-sglang and SGLang connect their processes.

Only bench/pipeline.py uses this, to run the very same server processes with every shared-memory ring
replaced: each channel is a PUSH/PULL pair over ipc://, and each record travels as msgpack of its
fields (columns as lists, as those peers send their messages) instead of its binary layout. It
implements minisrv/runtime/channels.py's interfaces; nothing in the product imports it.

One difference needs handling: a ring publishes a record the moment it is written, so a tokenizer's
DETOKENIZE_REQUEST is visible to the detokenizer before the request's TOKENIZED_REQUEST even reaches the
scheduler, and the detokenizer relies on that to know every row's request. ZeroMQ delivers through I/O
threads, with no order between two sockets, so the tokenizer -> detokenizer channels ("detok*") here
wait for the reader's acknowledgement of each record: one round trip per request, none per token.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import msgpack
import numpy as np
import zmq
import zmq.asyncio

from minisrv.ipc import Role, Wakeup
from minisrv.runtime.channels import ChannelEnds
from minisrv.sampling_params import SamplingParams
from minisrv.wire.records import RECORD_TYPES, Kind, Record

SEND_LINGER_MS = 2000   # a closing writer still delivers what it sent (SHUTDOWN is the last record)
ACKED_PREFIX = "detok"  # channels whose writer waits for each record's acknowledgement (module docstring)


# --- records as msgpack -----------------------------------------------------------------------------------

def pack(record: Record) -> bytes:
    values = [record.KIND.value]
    for f in dataclasses.fields(record):
        value = getattr(record, f.name)
        kind = f.metadata["wire"].kind
        if kind == "column" and value is not None and not isinstance(value, list):
            value = value.tolist()
        elif kind == "sampling":
            value = [getattr(value, p.name) for p in dataclasses.fields(SamplingParams)]
        values.append(value)
    return msgpack.packb(values, use_bin_type=True)


def unpack(data: bytes) -> Record:
    kind, *values = msgpack.unpackb(data, raw=False)
    cls = RECORD_TYPES[Kind(kind)]
    fields = {}
    for f, value in zip(dataclasses.fields(cls), values):
        wire = f.metadata["wire"]
        if wire.kind == "column" and value is not None:
            value = np.asarray(value, dtype=wire.code)
        elif wire.kind == "sampling":
            value = SamplingParams(*value)
        elif wire.kind == "messages" and value is not None:
            value = [tuple(pair) for pair in value]
        fields[f.name] = value
    return cls(**fields)


# --- channels ---------------------------------------------------------------------------------------------

class ZmqChannels:
    """Channels.create / unlink over ipc:// sockets in a private directory."""

    def __init__(self) -> None:
        self.directory = tempfile.mkdtemp(prefix="minisrv-zmq-")

    def create(self, label: str, capacity: int, wakeup: Wakeup = Wakeup.SEMAPHORE, num_readers: int = 1) -> ChannelEnds:
        if num_readers != 1:
            raise ValueError(f"channel {label!r}: the ZeroMQ pipeline has PUSH/PULL channels only, no broadcast")
        address = f"ipc://{os.path.join(self.directory, label)}"
        ack = f"{address}-ack" if label.startswith(ACKED_PREFIX) else None
        return ChannelEnds(ZmqChannel(address, Role.PRODUCER, ack), (ZmqChannel(address, Role.READER, ack),))

    def unlink(self) -> None:
        """Remove the socket files; sockets already bound and connected keep working, as rings do."""
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass(frozen=True)
class ZmqChannel:
    address: str
    role: Role
    ack: str | None = None   # the reverse channel of an acknowledged channel

    def open(self) -> ZmqReader | ZmqWriter:
        context = zmq.Context.instance()
        if self.role is Role.READER:
            socket = context.socket(zmq.PULL)
            socket.bind(self.address)
            return ZmqReader(socket, self.address, self._ack_socket(context, zmq.PUSH))
        socket = context.socket(zmq.PUSH)
        socket.setsockopt(zmq.LINGER, SEND_LINGER_MS)
        socket.connect(self.address)
        return ZmqWriter(socket, self.address, self._ack_socket(context, zmq.PULL))

    def _ack_socket(self, context: zmq.Context, kind: int) -> zmq.Socket | None:
        if self.ack is None:
            return None
        socket = context.socket(kind)
        socket.setsockopt(zmq.LINGER, 0)
        (socket.connect if kind == zmq.PUSH else socket.bind)(self.ack)
        return socket

    def open_async(self) -> AsyncZmqReader:
        socket = zmq.asyncio.Context.instance().socket(zmq.PULL)
        socket.bind(self.address)
        return AsyncZmqReader(socket)


class ZmqWriter:
    def __init__(self, socket: zmq.Socket, name: str, acks: zmq.Socket | None = None) -> None:
        self.socket = socket
        self.name = name
        self.acks = acks

    def send(self, record: Record) -> None:
        self.socket.send(pack(record))
        if self.acks is not None:
            self.acks.recv()

    def send_many(self, records: Iterable[Record]) -> None:
        for record in records:
            self.send(record)

    def try_send(self, record: Record) -> bool:
        try:
            self.socket.send(pack(record), zmq.NOBLOCK)
        except zmq.Again:
            return False
        return True

    async def send_async(self, record: Record, timeout: float | None = None) -> None:
        data, delay = pack(record), 1e-4
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                self.socket.send(data, zmq.NOBLOCK)
                return
            except zmq.Again:
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"{self.name}: no room after {timeout} s") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.01)

    def close(self) -> None:
        self.socket.close()
        if self.acks is not None:
            self.acks.close()


class ZmqReader:
    def __init__(self, socket: zmq.Socket, name: str, acks: zmq.Socket | None = None) -> None:
        self.socket = socket
        self.name = name
        self.acks = acks

    def drain(self) -> list[Record]:
        records = []
        while True:
            try:
                records.append(unpack(self.socket.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return records
            if self.acks is not None:
                self.acks.send(b"")

    def wait(self, timeout: float) -> bool:
        return bool(self.socket.poll(int(timeout * 1000)))

    @staticmethod
    def wait_many(readers: Sequence[ZmqReader], timeout: float) -> bool:
        poller = zmq.Poller()
        for reader in readers:
            poller.register(reader.socket, zmq.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.acks is not None:
            self.acks.close()


class AsyncZmqReader:
    def __init__(self, socket: zmq.asyncio.Socket) -> None:
        self.socket = socket

    async def drain(self) -> list[Record]:
        records = [unpack(await self.socket.recv())]
        while True:
            try:
                records.append(unpack(await self.socket.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return records

    def close(self) -> None:
        self.socket.close(linger=0)
