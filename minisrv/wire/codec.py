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
                        bits, its token-id lists become arrays, a {token id: float} map two (ids, values)

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
from array import array
from collections.abc import Callable, Sequence
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


# numpy dtype -> array-module typecode: small columns are packed with `array`, ~10x cheaper than numpy there.
ARRAY_CODES = {"<u8": "Q", "<i4": "i", "<u4": "I", "<f4": "f", "u1": "B", "<i8": "q", "<f8": "d"}


class RecordLayout:
    """The byte layout of one record class, derived from its fields.

    `encode` and `decode` are generated from the layout once, as straight-line Python (as `dataclasses`
    generates `__init__`): a record is a few dozen lines of code with no loop over the declarations, about
    3x faster than interpreting them per record, which every token pays several times on its way out."""

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
                    kind = {"ids": "column", "bias": "bias", "?": "flag", "text": "text"}.get(code, "scalar")
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
        self.encode = self._generate(_encoder_source(self), "encode")
        self.decode = self._generate(_decoder_source(self), "decode")

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
                      "messages": ["u1", "<u4", "u1"], "bias": ["<i4", "<f4"]}[kind]
            slot.arrays = range(len(self.dtypes), len(self.dtypes) + len(dtypes))
            self.dtypes += [np.dtype(d) for d in dtypes]
        self.slots.append(slot)

    def _next_bit(self) -> int:
        if self._bits == FLAG_BITS:
            raise TypeError(f"{self.name}: more than {FLAG_BITS} flags and optional fields")
        self._bits += 1
        return 1 << (self._bits - 1)

    def _generate(self, source: str, function: str) -> Callable:
        namespace = dict(
            layout=self, cls=self.cls, HEAD=self.head, COUNTS=self.counts_struct, SamplingParams=SamplingParams,
            RecordError=RecordError, frombuffer=np.frombuffer, DTYPES=self.dtypes, column_bytes=_column_bytes,
            total=_total, pack_strings=pack_strings, pack_messages=_pack_messages, unpack_bytes=unpack_bytes,
            unpack_strings=unpack_strings, unpack_messages=_unpack_messages, utf8=_utf8, struct_error=struct.error)
        exec(compile(source, f"<{self.name} {function}>", "exec"), namespace)
        return namespace[function]

    def groups_error(self, group: str, found: dict[str, int]) -> RecordError:
        return RecordError(f"{self.name}: the {group} columns differ in length: {found}")

    def count_error(self, group: str, total: int, size: int) -> RecordError:
        return RecordError(f"{self.name}: {self.counts[group]} adds up to {total}, but the {group} columns have "
                           f"{size} entries")

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


def _path(slot: _Slot) -> str:
    return f"record.{slot.owner}.{slot.name}" if slot.owner else f"record.{slot.name}"


def _group_checks(layout: RecordLayout, counts: list[str], values: dict[int, str]) -> list[str]:
    """Lines checking that a group's columns agree in length and that count columns add up to their group.
    `counts[i]` names array i's element count, `values[i]` the expression holding array i's values."""
    lines = []
    for group, members in layout.groups.items():
        sizes = [f"{counts[m.arrays.start]}{' - 1' if m.wire.kind == 'strings' else ''}" for m in members]
        lines.append(f"    size_{group} = {sizes[0]}")
        if len(sizes) > 1:
            names = ", ".join(f"{m.name!r}: {size}" for m, size in zip(members, sizes))
            condition = " or ".join(f"{size} != size_{group}" for size in sizes[1:])
            lines.append(f"    if {condition}:")
            lines.append(f"        raise layout.groups_error({group!r}, {{{names}}})")
        if group in layout.counts:
            index = next(s.arrays.start for s in layout.slots if s.name == layout.counts[group])
            lines.append(f"    counted = total({values[index]})")
            lines.append(f"    if counted != size_{group}:")
            lines.append(f"        raise layout.count_error({group!r}, counted, size_{group})")
    return lines


def _encoder_source(layout: RecordLayout) -> str:
    lines = ["def encode(record):", "    flags = 0"]
    fixed = ["0"] * layout.num_fixed
    values: dict[int, str] = {}
    for i, slot in enumerate(layout.slots):
        kind, first, value = slot.wire.kind, slot.arrays.start, f"v{i}"
        lines.append(f"    {value} = {_path(slot)}")
        if kind == "flag":
            lines.append(f"    if {value}:")
            lines.append(f"        flags |= {slot.bit}")
            continue
        indent = "    "
        if slot.presence_bit:
            empty = {"scalar": f"{value} = 0", "column": f"a{first} = b''", "text": f"a{first} = b''",
                     "strings": f"a{first}, a{first + 1} = pack_strings(())",
                     "messages": f"a{first}, a{first + 1}, a{first + 2} = pack_messages(())"}[kind]
            lines += [f"    if {value} is None:", f"        {empty}", "    else:", f"        flags |= {slot.presence_bit}"]
            indent = "        "
        if kind == "scalar":
            fixed[slot.fixed] = value
            if not slot.presence_bit:
                lines.append(f"    if {value} is None:")
                lines.append(f"        {value} = 0")
        elif kind == "column":
            code = ARRAY_CODES[slot.wire.code]
            lines.append(f"{indent}a{first} = column_bytes({value}, {code!r}, DTYPES[{first}], layout, {slot.name!r})")
            values[first] = value
        elif kind == "strings":
            lines.append(f"{indent}a{first}, a{first + 1} = pack_strings({value})")
        elif kind == "text":
            lines.append(f"{indent}a{first} = {value}.encode()")
        elif kind == "bias":
            lines.append(f"{indent}a{first} = column_bytes(list({value}), 'i', DTYPES[{first}], layout, {slot.name!r})")
            lines.append(f"{indent}a{first + 1} = column_bytes(list({value}.values()), 'f', DTYPES[{first + 1}], "
                         f"layout, {slot.name!r})")
        else:
            lines.append(f"{indent}a{first}, a{first + 1}, a{first + 2} = pack_messages({value})")
    n = len(layout.dtypes)
    counts = [f"c{k}" for k in range(n)]
    for k, dtype in enumerate(layout.dtypes):
        lines.append(f"    c{k} = len(a{k})" + (f" // {dtype.itemsize}" if dtype.itemsize > 1 else ""))
    lines += _group_checks(layout, counts, values)
    padded = " + ".join(f"((len(a{k}) + 7) & ~7)" for k in range(n)) or "0"
    lines.append(f"    size = {layout.arrays_at} + {padded}")
    lines.append("    out = bytearray(size)")
    lines.append("    try:")
    lines.append(f"        HEAD.pack_into(out, 0, size, {layout.kind_word}, flags{''.join(', ' + f for f in fixed)})")
    if n:
        lines.append(f"        COUNTS.pack_into(out, {layout.counts_at}, {', '.join(counts)})")
    lines.append("    except struct_error as exc:")
    lines.append(f"        raise ValueError(f'{layout.name}: a field is out of range for its layout ({{exc}}): '")
    lines.append(f"                         f'{{[{', '.join(fixed)}]!r}}') from None")
    lines.append(f"    offset = {layout.arrays_at}")
    for k in range(n):
        lines.append(f"    out[offset:offset + len(a{k})] = a{k}")
        if k < n - 1:
            lines.append(f"    offset += (len(a{k}) + 7) & ~7")
    lines.append("    return out")
    return "\n".join(lines) + "\n"


def _decoder_source(layout: RecordLayout) -> str:
    n = len(layout.dtypes)
    fixed = [f"s{k}" for k in range(layout.num_fixed)]
    lines = ["def decode(buffer):", "    length = len(buffer)", f"    if length < {layout.arrays_at}:",
             f"        raise RecordError(f'{layout.name}: {{length}} bytes is shorter than the layout\\'s "
             f"{layout.arrays_at}')",
             f"    size, kind_word, flags{''.join(', ' + f for f in fixed)} = HEAD.unpack_from(buffer, 0)",
             f"    if kind_word != {layout.kind_word}:",
             f"        raise RecordError(f'{layout.name}: kind word {{kind_word:#06x}}, expected "
             f"{layout.kind_word:#06x}')"]
    counts = [f"c{k}" for k in range(n)]
    if n:
        lines.append(f"    {', '.join(counts)}, = COUNTS.unpack_from(buffer, {layout.counts_at})")
    lines.append(f"    offset = {layout.arrays_at}")
    for k, dtype in enumerate(layout.dtypes):
        lines.append(f"    end = offset + c{k}" + (f" * {dtype.itemsize}" if dtype.itemsize > 1 else ""))
        lines.append("    if end > length:")
        lines.append(f"        raise RecordError(f'{layout.name}: array of {{c{k}}} x {dtype} overruns the "
                     f"{{length}}-byte record')")
        lines.append(f"    a{k} = frombuffer(buffer, DTYPES[{k}], c{k}, offset)")
        lines.append("    offset = (end + 7) & ~7")
    lines.append("    if offset != size or size != length:")
    lines.append(f"        raise RecordError(f'{layout.name}: header says {{size}} bytes, arrays end at {{offset}}, "
                 f"buffer has {{length}} (torn or mis-framed record)')")
    lines += _group_checks(layout, counts, {k: f"a{k}" for k in range(n)})
    for slot in layout.slots:
        if slot.wire.kind == "bias":
            first = slot.arrays.start
            lines.append(f"    if c{first} != c{first + 1}:")
            lines.append(f"        raise RecordError(f'{layout.name}: {slot.name} has {{c{first}}} ids but "
                         f"{{c{first + 1}}} values')")
    fields, options = [], []
    for slot in layout.slots:
        kind, first = slot.wire.kind, slot.arrays.start
        value = {"scalar": f"s{slot.fixed}", "flag": f"bool(flags & {slot.bit})", "column": f"a{first}",
                 "strings": f"{'unpack_bytes' if slot.wire.raw else 'unpack_strings'}(a{first}, a{first + 1})",
                 "text": f"utf8({layout.name!r}, a{first}.tobytes())",
                 "messages": f"unpack_messages({layout.name!r}, a{first}, a{first + 1}, a{first + 2})",
                 "bias": f"dict(zip(a{first}.tolist(), a{first + 1}.tolist()))"}[kind]
        if slot.owner and kind == "column":
            value = f"{value}.tolist()"
        if slot.presence_bit:
            value = f"({value} if flags & {slot.presence_bit} else None)"
        (options if slot.owner else fields).append(f"{slot.name}={value}")
    if options:
        lines.append("    try:")
        lines.append(f"        params = SamplingParams({', '.join(options)})")
        lines.append("    except ValueError as exc:")
        lines.append(f"        raise RecordError(f'{layout.name}: {{exc}}') from None")
        fields.append(f"{layout.sampling_field}=params")
    lines.append(f"    return cls({', '.join(fields)})")
    return "\n".join(lines) + "\n"


def _column_bytes(value: Any, code: str, dtype: np.dtype, layout: RecordLayout, name: str) -> bytes:
    """A column's bytes: a list through `array` (cheap for the few values most records carry), an ndarray
    through numpy."""
    if isinstance(value, np.ndarray):
        return value.astype(dtype, copy=False).tobytes()
    try:
        return array(code, value).tobytes()
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"{layout.name}: {name} holds a value its {dtype} column cannot: {exc}") from None


def _total(values: Any) -> int:
    return int(values.sum(dtype=np.int64)) if isinstance(values, np.ndarray) else sum(values)


def pack_strings(items: Sequence[str | bytes]) -> list[bytes]:
    """[offsets u32[n+1], blob u8] as bytes: item i is blob[offsets[i]:offsets[i+1]]; str as UTF-8, bytes as
    they are."""
    encoded = [s.encode() if isinstance(s, str) else s for s in items]
    return [array("I", accumulate(map(len, encoded), initial=0)).tobytes(), b"".join(encoded)]


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
    codes = bytes(CHAT_ROLES.index(role) for role, _ in pairs)
    return [codes, *pack_strings([content for _, content in pairs])]


def _unpack_messages(name: str, roles: np.ndarray, offsets: np.ndarray, blob: np.ndarray) -> list[tuple[str, str]]:
    contents = unpack_strings(offsets, blob)
    if len(roles) != len(contents) or (roles.size and roles.max() >= len(CHAT_ROLES)):
        raise RecordError(f"{name}: {len(roles)} role codes (largest {roles.max() if roles.size else '-'}) for "
                          f"{len(contents)} messages")
    return [(CHAT_ROLES[r], c) for r, c in zip(roles.tolist(), contents)]
