"""Record layouts derived from dataclass declarations (the records themselves: minisrv/wire/records.py).

Bytes of a record: header (size u32, kind word u16, flags u16); the fixed fields as one little-endian
struct; padding to 8; one u32 element count per array; padding to 8; then each array's raw
little-endian bytes, each padded to 8. Records start 8-byte aligned in a ring, so every array is
aligned for its dtype and `numpy.frombuffer` reads it in place. Encoding builds one bytearray.

A record is a dataclass whose fields say how they travel:

    scalar(code)        one fixed field (a struct code: "Q", "H", "d", ...)
    flag()              a bool: one bit of the header's flags
    column(dtype, per)  an array: a list while a record is built, a numpy view once decoded
    strings(per)        a list of str (UTF-8), or of bytes with raw=True: u32 offsets[n+1] + a u8 blob
    text()              one str: a u8 array
    messages()          chat messages, (role, content) pairs: role codes u8 + strings
    sampling()          a SamplingParams: its scalar options join the fixed fields, its bools take flag
                        bits, its token-id lists become arrays

A field whose type admits None is optional: a flag bit says whether it is there. Arrays that share a
`per` group have one entry per member of the group; a record's `counts` name the column that holds,
per row, the size of another group (sum(num_tokens) == len of the "token" group). Both are checked
when a record is encoded and when it is decoded.
"""
from __future__ import annotations

import dataclasses
import struct
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import numpy as np

from minisrv.sampling_params import OPTIONS, SamplingParams

HEADER = struct.Struct("<IHH")   # size, kind word, flags
FLAG_BITS = 16
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")


Column = Any   # a column: a list while a record is built, a numpy array once decoded


class RecordError(ValueError):
    """A buffer that is not a valid record of the expected kind and layout version."""


def align8(nbytes: int) -> int:
    return (nbytes + 7) & ~7


@dataclass(frozen=True)
class Wire:
    """How one field travels: `kind` is one of the declarations in the module docstring."""

    kind: str
    code: str = ""            # struct code (scalar) or numpy dtype (column)
    per: str | None = None    # the group an array-like field belongs to
    raw: bool = False         # strings: bytes, not str


def scalar(code: str, default: Any = 0) -> Any:
    return field(default=default, metadata={"wire": Wire("scalar", code)})


def flag(default: bool = False) -> Any:
    return field(default=default, metadata={"wire": Wire("flag")})


def column(dtype: str, per: str | None = None, optional: bool = False) -> Any:
    wire = {"wire": Wire("column", dtype, per)}
    return field(default=None, metadata=wire) if optional else field(default_factory=list, metadata=wire)


def strings(per: str | None = None, raw: bool = False) -> Any:
    return field(default_factory=list, metadata={"wire": Wire("strings", per=per, raw=raw)})


def text(default: str | None = None) -> Any:
    return field(default=default, metadata={"wire": Wire("text")})


def messages() -> Any:
    return field(default=None, metadata={"wire": Wire("messages")})


def sampling() -> Any:
    return field(default_factory=SamplingParams, metadata={"wire": Wire("sampling")})


@dataclass
class _Slot:
    """One flattened field: `owner` is None for the record's own fields, else the SamplingParams field."""

    name: str
    wire: Wire
    owner: str | None = None
    presence_bit: int = 0          # optional fields: the flag bit set when the value is there
    bit: int = 0                   # flags: their bit
    fixed: int = -1                # scalars: index in the fixed struct
    arrays: range = range(0)       # array-like fields: their arrays' indices


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)


class RecordLayout:
    """The byte layout of one record class, derived from its fields."""

    def __init__(self, cls: type, name: str, kind_word: int, counts: dict[str, str]) -> None:
        self.cls, self.name, self.kind_word, self.counts = cls, name, kind_word, counts
        self.slots: list[_Slot] = []
        codes: list[str] = []
        self.dtypes: list[np.dtype] = []
        self._bits = 0
        self.sampling_field: str | None = None
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            wire = f.metadata["wire"]
            if wire.kind == "sampling":
                self.sampling_field = f.name
                option_hints = typing.get_type_hints(SamplingParams)
                for option in OPTIONS:
                    code = option.metadata["wire"]
                    kind = "column" if code == "ids" else "flag" if code == "?" else "scalar"
                    self._add(_Slot(option.name, Wire(kind, "<i4" if code == "ids" else code), f.name),
                              _optional(option_hints[option.name]), codes)
            else:
                self._add(_Slot(f.name, wire), _optional(hints[f.name]), codes)
        self.num_fixed = len(codes)
        self.head = struct.Struct("<IHH" + "".join(codes))
        self.counts_struct = struct.Struct(f"<{len(self.dtypes)}I")
        self.counts_at = align8(self.head.size)
        self.arrays_at = self.counts_at + align8(self.counts_struct.size)
        self.groups: dict[str, list[_Slot]] = {}
        for slot in self.slots:
            if slot.wire.per is not None:
                self.groups.setdefault(slot.wire.per, []).append(slot)

    def _add(self, slot: _Slot, optional: bool, codes: list[str]) -> None:
        if optional:
            slot.presence_bit = self._next_bit()
        kind = slot.wire.kind
        if kind == "scalar":
            slot.fixed = len(codes)
            codes.append(slot.wire.code)
        elif kind == "flag":
            slot.bit = self._next_bit()
        else:
            dtypes = {"column": [slot.wire.code], "strings": ["<u4", "u1"], "text": ["u1"],
                      "messages": ["u1", "<u4", "u1"]}[kind]
            slot.arrays = range(len(self.dtypes), len(self.dtypes) + len(dtypes))
            self.dtypes += [np.dtype(d) for d in dtypes]
        self.slots.append(slot)

    def _next_bit(self) -> int:
        if self._bits == FLAG_BITS:
            raise TypeError(f"{self.name}: more than {FLAG_BITS} flags and optional fields")
        self._bits += 1
        return 1 << (self._bits - 1)

    # -- encode ---------------------------------------------------------------------------------------
    def encode(self, record: Any) -> bytearray:
        flags, fixed, arrays = 0, [0] * self.num_fixed, []
        for slot in self.slots:
            value = getattr(getattr(record, slot.owner) if slot.owner else record, slot.name)
            if slot.presence_bit and value is not None:
                flags |= slot.presence_bit
            kind = slot.wire.kind
            if kind == "scalar":
                fixed[slot.fixed] = 0 if value is None else value
            elif kind == "flag":
                flags |= slot.bit if value else 0
            elif kind == "column":
                arrays.append(np.ascontiguousarray(() if value is None else value, dtype=slot.wire.code))
            elif kind == "strings":
                arrays += pack_strings(value)
            elif kind == "text":
                arrays.append(np.frombuffer(b"" if value is None else value.encode(), np.uint8))
            else:
                arrays += _pack_messages(value or [])
        self._check_groups(arrays)
        size = self.arrays_at + sum(align8(a.nbytes) for a in arrays)
        out = bytearray(size)
        try:
            self.head.pack_into(out, 0, size, self.kind_word, flags, *fixed)
            self.counts_struct.pack_into(out, self.counts_at, *(a.size for a in arrays))
        except struct.error as exc:
            raise ValueError(f"{self.name}: a field is out of range for its layout ({exc}): {fixed!r}") from None
        offset = self.arrays_at
        for array in arrays:
            out[offset : offset + array.nbytes] = array.data.cast("B")
            offset += align8(array.nbytes)
        return out

    # -- decode ---------------------------------------------------------------------------------------
    def decode(self, buffer: bytes | bytearray | memoryview) -> Any:
        """The record; its columns are numpy views into `buffer`, not copies."""
        if len(buffer) < self.arrays_at:
            raise RecordError(f"{self.name}: {len(buffer)} bytes is shorter than the layout's {self.arrays_at}")
        size, kind_word, flags, *fixed = self.head.unpack_from(buffer, 0)
        if kind_word != self.kind_word:
            raise RecordError(f"{self.name}: kind word {kind_word:#06x}, expected {self.kind_word:#06x}")
        offset, arrays = self.arrays_at, []
        for count, dtype in zip(self.counts_struct.unpack_from(buffer, self.counts_at), self.dtypes):
            if offset + count * dtype.itemsize > len(buffer):
                raise RecordError(f"{self.name}: array of {count} x {dtype} overruns the {len(buffer)}-byte record")
            arrays.append(np.frombuffer(buffer, dtype, count, offset))
            offset += align8(count * dtype.itemsize)
        if offset != size or size != len(buffer):
            raise RecordError(f"{self.name}: header says {size} bytes, arrays end at {offset}, buffer has "
                              f"{len(buffer)} (torn or mis-framed record)")
        self._check_groups(arrays)
        values: dict[str, Any] = {}
        options: dict[str, Any] = {}
        for slot in self.slots:
            if slot.presence_bit and not flags & slot.presence_bit:
                value = None
            else:
                kind = slot.wire.kind
                if kind == "scalar":
                    value = fixed[slot.fixed]
                elif kind == "flag":
                    value = bool(flags & slot.bit)
                elif kind == "column":
                    value = arrays[slot.arrays.start]
                elif kind == "strings":
                    offsets, blob = arrays[slot.arrays.start : slot.arrays.stop]
                    value = unpack_bytes(offsets, blob) if slot.wire.raw else unpack_strings(offsets, blob)
                elif kind == "text":
                    value = _utf8(self.name, arrays[slot.arrays.start].tobytes())
                else:
                    value = _unpack_messages(self.name, *arrays[slot.arrays.start : slot.arrays.stop])
            (options if slot.owner else values)[slot.name] = value
        if options:
            options["stop_token_ids"] = options["stop_token_ids"].tolist()
            try:
                values[self.sampling_field] = SamplingParams(**options)
            except ValueError as exc:
                raise RecordError(f"{self.name}: {exc}") from None
        return self.cls(**values)

    def _check_groups(self, arrays: list[np.ndarray]) -> None:
        sizes: dict[str, int] = {}
        for group, members in self.groups.items():
            # A strings field is (offsets, blob): it holds one item fewer than it has offsets.
            found = {m.name: len(arrays[m.arrays.start]) - (m.wire.kind == "strings") for m in members}
            sizes[group] = next(iter(found.values()))
            if any(n != sizes[group] for n in found.values()):
                raise RecordError(f"{self.name}: the {group} columns differ in length: {found}")
        for group, count_column in self.counts.items():
            slot = next(s for s in self.slots if s.name == count_column)
            total = int(np.sum(arrays[slot.arrays.start], dtype=np.int64))
            if total != sizes[group]:
                raise RecordError(f"{self.name}: {count_column} adds up to {total}, but the {group} columns "
                                  f"have {sizes[group]} entries")

    # -- documentation ----------------------------------------------------------------------------------
    def describe(self) -> tuple[str, str, str]:
        """(fixed fields, flag bits, arrays) as text, for the layout table."""
        label = {id(s): f"{s.owner}.{s.name}" if s.owner else s.name for s in self.slots}
        fixed = ", ".join(f"{label[id(s)]} {s.wire.code}" for s in self.slots if s.wire.kind == "scalar")
        bits = [(s.bit, label[id(s)]) for s in self.slots if s.wire.kind == "flag"]
        bits += [(s.presence_bit, f"has {label[id(s)]}") for s in self.slots if s.presence_bit]
        flags = ", ".join(f"{bit.bit_length() - 1}: {name}" for bit, name in sorted(bits))
        arrays = []
        for s in self.slots:
            dtypes = " + ".join(str(d) for d in self.dtypes[s.arrays.start : s.arrays.stop])
            if dtypes:
                per = f" per {s.wire.per}" if s.wire.per else ""
                arrays.append(f"{label[id(s)]} {dtypes}{per}")
        return fixed or "-", flags or "-", ", ".join(arrays) or "-"


def pack_strings(items: Sequence[str | bytes]) -> list[np.ndarray]:
    """[offsets u32[n+1], blob u8]: item i is blob[offsets[i]:offsets[i+1]]; str as UTF-8, bytes as they are."""
    encoded = [s.encode() if isinstance(s, str) else s for s in items]
    offsets = np.fromiter(accumulate(map(len, encoded), initial=0), dtype=np.uint32, count=len(encoded) + 1)
    return [offsets, np.frombuffer(b"".join(encoded), np.uint8)]


def unpack_bytes(offsets: np.ndarray, blob: np.ndarray) -> list[bytes]:
    raw, bounds = blob.tobytes(), offsets.tolist()
    if not bounds or bounds[0] != 0 or bounds[-1] != len(raw) or any(a > b for a, b in zip(bounds, bounds[1:])):
        raise RecordError(f"string offsets {bounds[:8]}... do not cover the {len(raw)}-byte blob in order")
    return [raw[a:b] for a, b in zip(bounds, bounds[1:])]


def unpack_strings(offsets: np.ndarray, blob: np.ndarray) -> list[str]:
    return [_utf8("a string", s) for s in unpack_bytes(offsets, blob)]


def _utf8(what: str, raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError as exc:
        raise RecordError(f"{what} is not valid UTF-8: {exc}") from None


def _pack_messages(pairs: Sequence[tuple[str, str]]) -> list[np.ndarray]:
    unknown = [role for role, _ in pairs if role not in CHAT_ROLES]
    if unknown:
        raise ValueError(f"messages: unknown role {unknown[0]!r}; known: {CHAT_ROLES}")
    codes = np.fromiter((CHAT_ROLES.index(role) for role, _ in pairs), np.uint8, len(pairs))
    return [codes, *pack_strings([content for _, content in pairs])]


def _unpack_messages(name: str, roles: np.ndarray, offsets: np.ndarray, blob: np.ndarray) -> list[tuple[str, str]]:
    contents = unpack_strings(offsets, blob)
    if len(roles) != len(contents) or (roles.size and roles.max() >= len(CHAT_ROLES)):
        raise RecordError(f"{name}: {len(roles)} role codes (largest {roles.max() if roles.size else '-'}) for "
                          f"{len(contents)} messages")
    return [(CHAT_ROLES[r], c) for r, c in zip(roles.tolist(), contents)]
