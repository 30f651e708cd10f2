"""The byte-layout machinery that minisrv/ipc/records.py defines every record with.

A record is: common header (size u32, kind word u16, flags u16), fixed fields (a struct format),
padding to 8, one u32 element count per array, padding to 8, then each array's raw little-endian
bytes, each padded to 8. Records start 8-byte aligned in a ring, so every array is aligned for its
dtype and `numpy.frombuffer` reads it in place. Encoding builds exactly one bytearray per record.
"""
from __future__ import annotations

import struct
from collections.abc import Sequence
from itertools import accumulate

import numpy as np
from numpy.typing import ArrayLike

HEADER = struct.Struct("<IHH")   # size, kind word, flags


class RecordError(ValueError):
    """A buffer that is not a valid record of the expected kind and layout version."""


def align8(nbytes: int) -> int:
    return (nbytes + 7) & ~7


class RecordLayout:
    """One record kind's layout: `fixed` is a struct format (no byte-order prefix) for the fields after
    the header, `arrays` the little-endian dtypes of the arrays that follow, in order."""

    def __init__(self, name: str, kind_word: int, fixed: str, arrays: Sequence[str]) -> None:
        self.name = name
        self.kind_word = kind_word
        self.head = struct.Struct("<IHH" + fixed)
        self.dtypes = tuple(np.dtype(a) for a in arrays)
        if any(d.byteorder == ">" for d in self.dtypes):
            raise ValueError(f"{name}: record arrays are little-endian")
        self.counts = struct.Struct(f"<{len(self.dtypes)}I")
        self.counts_at = align8(self.head.size)
        self.arrays_at = self.counts_at + align8(self.counts.size)

    def encode(self, flags: int, fixed: Sequence[object], arrays: Sequence[ArrayLike] = ()) -> bytearray:
        if len(arrays) != len(self.dtypes):
            raise ValueError(f"{self.name}: expected {len(self.dtypes)} arrays, got {len(arrays)}")
        converted = [np.ascontiguousarray(a, dtype=d) for a, d in zip(arrays, self.dtypes)]
        size = self.arrays_at + sum(align8(a.nbytes) for a in converted)
        record = bytearray(size)
        try:
            self.head.pack_into(record, 0, size, self.kind_word, flags, *fixed)
            self.counts.pack_into(record, self.counts_at, *(a.size for a in converted))
        except struct.error as exc:
            raise ValueError(f"{self.name}: a field is out of range for its layout ({exc}): {fixed!r}") from None
        offset = self.arrays_at
        for array in converted:
            record[offset : offset + array.nbytes] = array.data.cast("B")
            offset += align8(array.nbytes)
        return record

    def decode(self, record: bytes | bytearray | memoryview) -> tuple[int, tuple, list[np.ndarray]]:
        """(flags, fixed fields, arrays); the arrays are views into `record`, not copies."""
        if len(record) < self.arrays_at:
            raise RecordError(f"{self.name}: {len(record)} bytes is shorter than the layout's {self.arrays_at}")
        size, kind_word, flags, *fixed = self.head.unpack_from(record, 0)
        if kind_word != self.kind_word:
            raise RecordError(f"{self.name}: kind word {kind_word:#06x}, expected {self.kind_word:#06x}")
        offset = self.arrays_at
        arrays = []
        for count, dtype in zip(self.counts.unpack_from(record, self.counts_at), self.dtypes):
            if offset + count * dtype.itemsize > len(record):
                raise RecordError(f"{self.name}: array of {count} x {dtype} overruns the {len(record)}-byte record")
            arrays.append(np.frombuffer(record, dtype, count, offset))
            offset += align8(count * dtype.itemsize)
        if offset != size or size != len(record):
            raise RecordError(f"{self.name}: header says {size} bytes, arrays end at {offset}, buffer has "
                              f"{len(record)} (torn or mis-framed record)")
        return flags, tuple(fixed), arrays


def pack_strings(strings: Sequence[str | bytes]) -> tuple[np.ndarray, bytes]:
    """A list of strings as (offsets u32[n+1], one blob): string i is blob[offsets[i]:offsets[i+1]].
    str items are stored as UTF-8; bytes items as they are (a token's bytes need not be valid UTF-8)."""
    encoded = [s.encode() if isinstance(s, str) else s for s in strings]
    offsets = np.fromiter(accumulate(map(len, encoded), initial=0), dtype=np.uint32, count=len(encoded) + 1)
    return offsets, b"".join(encoded)


def unpack_bytes(offsets: np.ndarray, blob: np.ndarray) -> list[bytes]:
    raw, bounds = blob.tobytes(), offsets.tolist()
    if bounds and (bounds[0] != 0 or bounds[-1] != len(raw) or any(a > b for a, b in zip(bounds, bounds[1:]))):
        raise RecordError(f"string offsets {bounds[:8]}... do not cover the {len(raw)}-byte blob in order")
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def unpack_strings(offsets: np.ndarray, blob: np.ndarray) -> list[str]:
    try:
        return [s.decode() for s in unpack_bytes(offsets, blob)]
    except UnicodeDecodeError as exc:
        raise RecordError(f"a string is not valid UTF-8: {exc}") from None
