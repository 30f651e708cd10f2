"""Pythonic tool calls: any call of literal keyword arguments, written as Python writes it, reads back equal."""
from __future__ import annotations

import json
import keyword
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minisrv.server.pythonic_calls import PythonicCallReader, parse_call

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=8)
CALLS = st.lists(st.tuples(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,12}", fullmatch=True),
                           st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True), JSON_VALUES,
                                           max_size=4)), min_size=1, max_size=3)


def python_call(name: str, arguments: dict) -> str:
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(calls=CALLS, seed=st.integers(0, 2**32))
def test_calls_written_by_python_read_back_equal_however_the_text_is_cut(calls, seed: int) -> None:
    calls = [(n, a) for n, a in calls if not keyword.iskeyword(n)]   # `if(...)` is no Python call
    text = "[" + ", ".join(python_call(n, a) for n, a in calls) + "]"
    rng, reader, i = random.Random(seed), PythonicCallReader(), 0
    while i < len(text):
        step = rng.randint(1, 8)
        reader.feed(text[i : i + step])
        i += step
    assert reader.closed == bool(calls) and not reader.broken
    assert [(n, json.loads(reader.arguments(j))) for j, n in enumerate(reader.names)] == \
        [(n, json.loads(json.dumps(a))) for n, a in calls]


@pytest.mark.parametrize("text, parsed", [
    ('f(a=1, b="x", c=[1, 2.5], d={"k": None})', ("f", {"a": 1, "b": "x", "c": [1, 2.5], "d": {"k": None}})),
    ("f(flag=true, other=false, nothing=null)", ("f", {"flag": True, "other": False, "nothing": None})),
    ("f(pair=(1, 2), negative=-3)", ("f", {"pair": [1, 2], "negative": -3})),
    ("f()", ("f", {})),
    ("f(1)", None), ("f(a=g())", None), ("f(**kw)", None), ("obj.f(a=1)", None), ("f(a=b'x')", None),
    ("f(a=1j)", None), ("f(a={[1]: 2})", None), ("f(a=", None), ("x = 1", None), ("import(a=1)", None),
])
def test_only_a_call_of_literal_keyword_arguments_is_a_call(text: str, parsed) -> None:
    assert parse_call(text) == parsed
