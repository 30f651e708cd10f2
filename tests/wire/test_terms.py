"""Terms every process shares: the request-id scheme and how chat template values travel."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from minisrv.wire.terms import MAX_CHOICES, choice_rid, pack_template_value, split_rid, unpack_template_value


@given(st.one_of(st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=40)))
def test_template_values_round_trip_with_their_type(value) -> None:
    back = unpack_template_value(pack_template_value(value))
    assert back == value and type(back) is type(value)


def test_a_value_without_a_known_tag_is_refused() -> None:
    with pytest.raises(ValueError, match="not a packed chat template value"):
        unpack_template_value("x:1")


@given(st.integers(0, 2**59), st.integers(0, MAX_CHOICES - 1))
def test_choice_ids_split_back(base: int, index: int) -> None:
    assert split_rid(choice_rid(base, index)) == (base, index)
