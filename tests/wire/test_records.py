"""Every record kind survives encode -> (ring ->) decode; bad input gets errors that name the problem."""
from __future__ import annotations

import dataclasses
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minisrv.ipc import RingReader, RingSet, RingWriter
from minisrv.sampling_params import MAX_TOP_LOGPROBS, SamplingParams
from minisrv.wire import records
from minisrv.wire.codec import CHAT_ROLES, RecordError
from minisrv.wire.records import (Abort, DetokenizeRequest, Error, PromptRequest, Shutdown, StepTokens, TextDeltas,
                                  TokenizedRequest, decode, layout_table, peek_kind)

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
u32 = st.integers(0, 2**32 - 1)
i32 = st.integers(-(2**31), 2**31 - 1)
f32 = st.floats(width=32, allow_nan=False)
texts = st.text(max_size=20)


@st.composite
def sampling_params(draw: st.DrawFn) -> SamplingParams:
    max_tokens = draw(st.none() | st.integers(1, 2**32 - 1))
    return SamplingParams(
        temperature=draw(st.floats(0, 2)), top_p=draw(st.floats(0, 1, exclude_min=True)),
        top_k=draw(st.integers(-1, 2**31 - 1)), min_p=draw(st.floats(0, 1)),
        repetition_penalty=draw(st.floats(0, 2, exclude_min=True)), presence_penalty=draw(st.floats(-2, 2)),
        frequency_penalty=draw(st.floats(-2, 2)), seed=draw(st.none() | st.integers(0, 2**63 - 1)),
        max_tokens=max_tokens, min_tokens=draw(st.integers(0, 2**32 - 1 if max_tokens is None else max_tokens)),
        stop_token_ids=draw(st.lists(i32, max_size=8)), ignore_eos=draw(st.booleans()),
        logprobs=draw(st.none() | st.integers(0, MAX_TOP_LOGPROBS)),
        logit_bias=draw(st.dictionaries(st.integers(0, 2**31 - 1), st.floats(-100, 100, width=32), max_size=6)))


def plain(value: object) -> object:
    """A record as nested plain values (arrays as lists, NaN as a marker) for == comparisons."""
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (np.ndarray, list, tuple)):
        return [plain(v) for v in (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return value


def assert_round_trip(record: object) -> None:
    encoded = record.encode()
    assert len(encoded) % 8 == 0 and peek_kind(encoded) is record.KIND
    assert plain(decode(encoded)) == plain(record)
    assert plain(decode(memoryview(bytes(encoded)))) == plain(record)


@SETTINGS
@given(rid=st.integers(0, 2**64 - 1), params=sampling_params(), prompt=st.lists(i32, max_size=50))
def test_tokenized_request(rid: int, params: SamplingParams, prompt: list[int]) -> None:
    assert_round_trip(TokenizedRequest(rid, params, np.array(prompt, np.int32)))


@SETTINGS
@given(rid=st.integers(0, 2**64 - 1), params=sampling_params(), n=st.integers(1, 2**16 - 1),
       prompt=st.one_of(texts.map(lambda t: {"text": t}),
                        st.lists(i32, max_size=30).map(lambda ids: {"prompt_ids": np.array(ids, np.int32)}),
                        st.lists(st.tuples(st.sampled_from(CHAT_ROLES), texts), max_size=5)
                        .map(lambda m: {"messages": m})),
       flags=st.lists(st.booleans(), min_size=5, max_size=5), stop=st.lists(texts, max_size=4),
       truncate=st.integers(0, 2**32 - 1), kwargs=st.lists(st.tuples(texts, texts), max_size=3))
def test_prompt_request(rid: int, params: SamplingParams, n: int, prompt: dict, flags: list[bool],
                        stop: list[str], truncate: int, kwargs: list[tuple[str, str]]) -> None:
    echo, add_generation_prompt, continue_final, skip_special, include_stop = flags
    assert_round_trip(PromptRequest(rid, n, params, echo=echo, add_generation_prompt=add_generation_prompt,
                                    continue_final_message=continue_final, skip_special_tokens=skip_special,
                                    include_stop_str_in_output=include_stop, truncate_prompt_tokens=truncate,
                                    template_kwarg_names=[k for k, _ in kwargs],
                                    template_kwarg_values=[v for _, v in kwargs], stop=stop, **prompt))


@SETTINGS
@given(rid=st.integers(0, 2**64 - 1), n=st.integers(1, 2**16 - 1), echo=st.booleans(),
       skip=st.booleans(), include_stop=st.booleans(), stop=st.lists(texts, max_size=4),
       ids=st.lists(i32, max_size=30))
def test_detokenize_request(rid: int, n: int, echo: bool, skip: bool, include_stop: bool, stop: list[str],
                            ids: list[int]) -> None:
    assert_round_trip(DetokenizeRequest(rid, n, stop, echo, skip, include_stop, np.array(ids, np.int32)))


@SETTINGS
@given(rid=st.integers(0, 2**64 - 1), status=st.integers(100, 599), message=st.text(max_size=200))
def test_abort_error_shutdown(rid: int, status: int, message: str) -> None:
    assert_round_trip(Abort(rid))
    assert_round_trip(Error(rid, status, message))
    assert_round_trip(Shutdown())


@st.composite
def step_tokens_records(draw: st.DrawFn) -> StepTokens:
    rows = draw(st.integers(0, 40))
    column = lambda elements, n=rows: draw(st.lists(elements, min_size=n, max_size=n))  # noqa: E731
    with_logprobs = draw(st.booleans())
    top_counts = column(st.integers(0, MAX_TOP_LOGPROBS) if with_logprobs else st.just(0))
    tops = sum(top_counts)
    return StepTokens(column(st.integers(0, 2**64 - 1)), column(i32), column(st.integers(0, 3)), column(u32),
                      column(u32), column(u32), column(f32 if with_logprobs else st.just(math.nan)), top_counts,
                      column(i32, tops), column(f32, tops), draw(st.integers(0, 2**64 - 1)), column(st.booleans()),
                      column(u32))


@SETTINGS
@given(record=step_tokens_records())
def test_step_tokens(record: StepTokens) -> None:
    assert_round_trip(record)


@st.composite
def text_deltas_records(draw: st.DrawFn) -> TextDeltas:
    rows = draw(st.integers(0, 20))
    column = lambda elements, n=rows: draw(st.lists(elements, min_size=n, max_size=n))  # noqa: E731
    num_tokens = column(st.integers(0, 4))
    tokens = sum(num_tokens)
    with_logprobs = draw(st.booleans())
    top_counts = column(st.integers(0, 5) if with_logprobs else st.just(0), tokens)
    tops = sum(top_counts)
    return TextDeltas(column(st.integers(0, 2**64 - 1)), column(st.integers(0, 3)), column(u32), column(u32),
                      column(u32), column(texts), num_tokens, column(i32, tokens),
                      column(f32 if with_logprobs else st.just(math.nan), tokens),
                      column(st.binary(max_size=8) if with_logprobs else st.just(b""), tokens), top_counts,
                      column(i32, tops), column(f32, tops), column(st.binary(max_size=8), tops),
                      column(st.integers(0, 2**64 - 1)), column(st.booleans(), tokens), column(u32, tokens))


@SETTINGS
@given(record=text_deltas_records())
def test_text_deltas(record: TextDeltas) -> None:
    assert_round_trip(record)


def test_records_decode_in_place_from_a_ring_view() -> None:
    with RingSet() as rings:
        specs = rings.create("t", 1 << 15)
        with RingWriter(specs.producer) as writer, RingReader(specs.reader) as reader:
            rng = np.random.default_rng(3)
            prompt = rng.integers(0, 50_000, 2048, dtype=np.int32)   # an 8 KiB token-id array
            writer.write(TokenizedRequest(7, SamplingParams(seed=5), prompt).encode())
            (view,) = reader.drain_views()
            decoded = decode(view)
            assert np.shares_memory(decoded.prompt_ids, np.frombuffer(view, np.uint8))   # zero copy
            assert decoded.prompt_ids.tolist() == prompt.tolist() and decoded.params.seed == 5
            reader.release()


def test_reader_refuses_another_layout_version() -> None:
    encoded = Abort(1).encode()
    struct.pack_into("<H", encoded, 4, (records.LAYOUT_VERSION + 1) << 8 | records.Kind.ABORT)
    with pytest.raises(RecordError, match=rf"layout version {records.LAYOUT_VERSION + 1}, this build reads version "
                                          rf"{records.LAYOUT_VERSION}"):
        decode(encoded)
    struct.pack_into("<H", encoded, 4, records.LAYOUT_VERSION << 8 | 99)
    with pytest.raises(RecordError, match="unknown record kind 99"):
        decode(encoded)


def test_torn_or_corrupt_records_are_refused() -> None:
    encoded = TokenizedRequest(1, SamplingParams(), np.arange(10, dtype=np.int32)).encode()
    with pytest.raises(RecordError, match="TOKENIZED_REQUEST: header says"):
        decode(encoded + bytes(8))
    with pytest.raises(RecordError, match="overruns"):
        decode(encoded[:-40])
    struct.pack_into("<d", encoded, 16, -1.0)                  # temperature, byte 16
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        decode(encoded)
    bad = StepTokens([1, 2], [3, 4], [0, 0], [1, 1], [0, 0], [1, 1], [math.nan] * 2, [0, 0], in_prompt=[0, 0],
                     ranks=[0, 0]).encode()
    struct.pack_into("<I", bad, 8 + 8 + 4, 1)                  # after emitted_ns: token_ids count 1, not 2
    with pytest.raises(RecordError):
        decode(bad)


def test_bad_fields_are_named() -> None:
    with pytest.raises(ValueError, match="exactly one of text, prompt_ids and messages"):
        PromptRequest(1, params=SamplingParams(), text="a", prompt_ids=[1])
    with pytest.raises(ValueError, match="unknown role 'wizard'"):
        PromptRequest(1, params=SamplingParams(), messages=[("wizard", "hi")]).encode()
    with pytest.raises(RecordError, match="STEP_TOKENS: the row columns differ in length"):
        StepTokens([1, 2], [3], [0, 0], [1, 1], [0, 0], [1, 1], [math.nan] * 2, [0, 0]).encode()
    with pytest.raises(RecordError, match="STEP_TOKENS: top_counts adds up to 3, but the top columns have 1"):
        StepTokens([1], [3], [0], [1], [0], [1], [0.5], [3], [7], [0.25], in_prompt=[0], ranks=[0]).encode()
    with pytest.raises(ValueError, match="PROMPT_REQUEST: a field is out of range"):
        PromptRequest(1, n=70_000, text="a").encode()


def test_the_layout_table_in_architecture_md_is_current() -> None:
    """ARCHITECTURE.md carries the table `python -m minisrv.wire.records` prints; regenerate it when this fails."""
    text = (Path(__file__).parents[2] / "ARCHITECTURE.md").read_text()
    assert layout_table() in text
