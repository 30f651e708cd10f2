"""Rank 0's records to the tensor-parallel ranks on other hosts, which cannot read its shared-memory ring.

Each record is a gloo broadcast of its length, then of its bytes, over the group of rank 0 and the other
hosts' ranks (TensorParallel.remote_group, minisrv/layers/parallel.py). A separate module so that the
processes that never need torch (the API server) do not import it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from minisrv.wire.records import Record, decode


class RemoteRanks:
    """Rank 0's records to (or, on another host, from) the ranks on other hosts: a gloo broadcast of its length,
    then of its bytes. The ends of the RecordWriter / RecordReader interfaces the loops use."""

    def __init__(self, group: object) -> None:
        self.group = group

    def send(self, record: Record) -> None:
        payload = torch.frombuffer(record.encode(), dtype=torch.uint8)
        dist.broadcast(torch.tensor([payload.numel()]), 0, group=self.group)
        dist.broadcast(payload, 0, group=self.group)

    def try_send(self, record: Record) -> bool:
        try:
            self.send(record)
        except RuntimeError:   # a rank already gone
            return False
        return True

    def drain(self) -> list[Record]:
        """The next record, waiting as long as it takes (a remote rank has nothing else to do)."""
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.group)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        dist.broadcast(payload, 0, group=self.group)
        return [decode(payload.numpy().tobytes())]

    def wait(self, timeout: float) -> bool:
        return True

    def close(self) -> None:
        pass
