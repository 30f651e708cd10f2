"""The record byte layout derived from declarations: alignment of every array, flags and optional fields,
string lists, row groups, and malformed input."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.wire.codec import (HEADER, Column, RecordError, RecordLayout, column, flag, pack_strings, scalar,
                                strings, text, unpack_bytes, unpack_strings)


@dataclasses.dataclass
class Sample:
    rid: int = scalar("Q")
    small: int = scalar("H")
    maybe: int | None = scalar("I", None)
    on: bool = flag()
    a: Column = column("<u8", "row")
    b: Column = column("u1")
    c: Column = column("<i4", "token")
    d: Column = column("<f4", "row")
    e: Column = column("<u4", "row")
    names: list[str] = strings("row")
    note: str | None = text()


LAYOUT = RecordLayout(Sample, "TEST", 0x0101, {"token": "e"})


@settings(max_examples=50, deadline=None, derandomize=True)
@given(rows=st.integers(0, 20), b=st.integers(0, 20), seed=st.integers(0, 2**32 - 1),
       maybe=st.none() | st.integers(0, 2**32 - 1), on=st.booleans(), note=st.none() | st.text(max_size=10))
def test_every_array_is_aligned_and_read_in_place(rows: int, b: int, seed: int, maybe: int | None, on: bool,
                                                  note: str | None) -> None:
    rng = np.random.default_rng(seed)
    e = rng.integers(0, 4, rows, dtype=np.uint32)
    tokens = rng.integers(-(2**31), 2**31, int(e.sum()), dtype=np.int32)
    record = Sample(123, 7, maybe, on, rng.integers(0, 2**63, rows, dtype=np.uint64),
                    rng.integers(0, 256, b, dtype=np.uint8), tokens, rng.standard_normal(rows).astype(np.float32), e,
                    [f"n{i}" for i in range(rows)], note)
    encoded = LAYOUT.encode(record)
    assert len(encoded) % 8 == 0 and HEADER.unpack_from(encoded)[:2] == (len(encoded), 0x0101)
    decoded = LAYOUT.decode(encoded)
    assert (decoded.rid, decoded.small, decoded.maybe, decoded.on, decoded.names, decoded.note) == (
        123, 7, maybe, on, record.names, note)
    base = np.frombuffer(encoded, np.uint8).ctypes.data
    for name in ("a", "b", "c", "d", "e"):
        original, array = getattr(record, name), getattr(decoded, name)
        assert array.tolist() == original.tolist()
        assert (array.ctypes.data - base) % 8 == 0 and array.flags.aligned
        assert np.shares_memory(array, np.frombuffer(encoded, np.uint8)) or array.size == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(items=st.lists(st.text(max_size=10), max_size=10))
def test_string_lists_round_trip(items: list[str]) -> None:
    offsets, blob = (np.frombuffer(b, dtype) for b, dtype in zip(pack_strings(items), (np.uint32, np.uint8)))
    assert len(offsets) == len(items) + 1
    assert unpack_strings(offsets, blob) == items


def test_raw_bytes_need_not_be_utf8() -> None:
    offsets, blob = (np.frombuffer(b, dtype) for b, dtype in zip(pack_strings([b"\xff\xfe", b"", "é"]),
                                                                 (np.uint32, np.uint8)))
    assert unpack_bytes(offsets, blob) == [b"\xff\xfe", b"", "é".encode()]
    with pytest.raises(RecordError, match="not valid UTF-8"):
        unpack_strings(offsets, blob)


def test_malformed_input_is_refused_with_the_reason() -> None:
    with pytest.raises(RecordError, match="do not cover"):
        unpack_bytes(np.array([0, 5, 3], np.uint32), np.zeros(3, np.uint8))
    with pytest.raises(RecordError, match="shorter than the layout"):
        LAYOUT.decode(b"\0" * 8)
    with pytest.raises(RecordError, match="kind word 0x0102, expected 0x0101"):
        LAYOUT.decode(RecordLayout(Sample, "OTHER", 0x0102, {}).encode(Sample()))
    with pytest.raises(RecordError, match="TEST: the row columns differ in length"):
        LAYOUT.encode(Sample(a=[1], d=[], e=[], names=[]))
    with pytest.raises(RecordError, match="TEST: e adds up to 2, but the token columns have 0 entries"):
        LAYOUT.encode(Sample(a=[1], d=[0.5], e=[2], names=["x"]))
    with pytest.raises(ValueError, match="TEST: a field is out of range"):
        LAYOUT.encode(Sample(rid=-1))


def test_more_flags_than_the_header_holds_is_a_declaration_error() -> None:
    many = dataclasses.make_dataclass("Many", [(f"f{i}", bool, flag()) for i in range(17)])
    with pytest.raises(TypeError, match="more than 16 flags"):
        RecordLayout(many, "MANY", 0x0103, {})
