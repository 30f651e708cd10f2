"""The record byte layout: alignment of every array, string lists, and malformed input."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.ipc.codec import HEADER, RecordError, RecordLayout, pack_strings, unpack_bytes, unpack_strings

LAYOUT = RecordLayout("TEST", 0x0101, "QH", ["<u8", "u1", "<i4", "<f4", "<u4"])


@settings(max_examples=50, deadline=None, derandomize=True)
@given(lengths=st.lists(st.integers(0, 20), min_size=5, max_size=5), seed=st.integers(0, 2**32 - 1))
def test_every_array_is_aligned_and_read_in_place(lengths: list[int], seed: int) -> None:
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 2**63, lengths[0], dtype=np.uint64), rng.integers(0, 256, lengths[1], dtype=np.uint8),
              rng.integers(-(2**31), 2**31, lengths[2], dtype=np.int32), rng.standard_normal(lengths[3]).astype(np.float32),
              rng.integers(0, 2**32, lengths[4], dtype=np.uint32)]
    encoded = LAYOUT.encode(5, (123, 7), arrays)
    assert len(encoded) % 8 == 0 and HEADER.unpack_from(encoded) == (len(encoded), 0x0101, 5)
    flags, fixed, decoded = LAYOUT.decode(encoded)
    assert (flags, fixed) == (5, (123, 7))
    base = np.frombuffer(encoded, np.uint8).ctypes.data
    for original, array in zip(arrays, decoded):
        assert array.tolist() == original.tolist()
        assert (array.ctypes.data - base) % 8 == 0 and array.flags.aligned
        assert np.shares_memory(array, np.frombuffer(encoded, np.uint8)) or array.size == 0


@settings(max_examples=50, deadline=None, derandomize=True)
@given(strings=st.lists(st.text(max_size=10), max_size=10))
def test_string_lists_round_trip(strings: list[str]) -> None:
    offsets, blob = pack_strings(strings)
    assert offsets.dtype == np.uint32 and len(offsets) == len(strings) + 1
    assert unpack_strings(offsets, np.frombuffer(blob, np.uint8)) == strings


def test_raw_bytes_need_not_be_utf8() -> None:
    offsets, blob = pack_strings([b"\xff\xfe", b"", "é"])
    assert unpack_bytes(offsets, np.frombuffer(blob, np.uint8)) == [b"\xff\xfe", b"", "é".encode()]
    with pytest.raises(RecordError, match="not valid UTF-8"):
        unpack_strings(offsets, np.frombuffer(blob, np.uint8))


def test_malformed_input_is_refused_with_the_reason() -> None:
    with pytest.raises(RecordError, match="do not cover"):
        unpack_bytes(np.array([0, 5, 3], np.uint32), np.zeros(3, np.uint8))
    with pytest.raises(RecordError, match="shorter than the layout"):
        LAYOUT.decode(b"\0" * 8)
    with pytest.raises(RecordError, match="kind word 0x0102, expected 0x0101"):
        LAYOUT.decode(RecordLayout("OTHER", 0x0102, "QH", ["<u8", "u1", "<i4", "<f4", "<u4"]).encode(0, (1, 2), [()] * 5))
    with pytest.raises(ValueError, match="expected 5 arrays, got 1"):
        LAYOUT.encode(0, (1, 2), [[1]])
    with pytest.raises(ValueError, match="TEST: a field is out of range"):
        LAYOUT.encode(0, (-1, 2), [()] * 5)
