"""Shared-memory rings between minisrv's processes (the records they carry: minisrv/wire/)."""
from __future__ import annotations

from minisrv.ipc.aio import AsyncRingReader, write_async
from minisrv.ipc.lifecycle import RingSet, RingSpecs, instance_prefix, sweep_dead_instances
from minisrv.ipc.reader import RingReader
from minisrv.ipc.ring import PeerGone, RecordTooLarge, RingError, RingTimeout
from minisrv.ipc.segment import RingSpec, Role, Wakeup
from minisrv.ipc.writer import RingWriter

__all__ = ["AsyncRingReader", "PeerGone", "RecordTooLarge", "RingError", "RingReader", "RingSet", "RingSpec", "sweep_dead_instances",
           "RingSpecs", "RingTimeout", "RingWriter", "Role", "Wakeup", "instance_prefix", "write_async"]
