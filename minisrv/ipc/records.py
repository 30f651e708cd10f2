"""Every record that travels between minisrv's processes, defined once (codec: minisrv/ipc/codec.py).

All little-endian. Common header (8 bytes): size u32 (whole record), kind word u16 = layout version
<< 8 | kind code (a reader refuses any other version), flags u16. Fixed fields follow at byte 8; then
one u32 count per array, then the arrays (raw, each 8-byte aligned), read in place with
numpy.frombuffer. "strs" = offsets u32[n+1] + blob u8[] (string i = blob[off[i]:off[i+1]], UTF-8).

SAMPLING (72 bytes, inside GENERATE and TEXT_REQUEST): +0 temperature f64, +8 top_p f64, +16 min_p
f64, +24 repetition_penalty f64, +32 presence_penalty f64, +40 frequency_penalty f64, +48 seed u64,
+56 top_k i32, +60 max_tokens u32, +64 min_tokens u32, +68 logprobs i16 (-1 = none), +70 flags u16
(1 has_seed, 2 ignore_eos). stop_token_ids travel as an array.

| kind (code)       | route                      | fixed fields (byte offset)             | arrays, in order
|-------------------|----------------------------|----------------------------------------|---------------------------------
| GENERATE (1)      | tokenizer -> scheduler     | rid u64 @8, SAMPLING @16               | prompt_ids i32, stop_token_ids i32
| TEXT_REQUEST (2)  | api -> tokenizer           | rid u64 @8, n u16 @16, SAMPLING @24    | stop_token_ids i32, prompt_ids i32,
|                   |  flags: RequestFlag        |                                        | roles u8, prompt strs, stop strs
| DETOK_REQUEST (3) | tokenizer -> detokenizer   | rid u64 @8, prompt tokens u32 @16,     | stop strs, prompt_ids i32 (for echo)
|                   |  flags: ECHO, SKIP_SPECIAL | n u16 @20                              |
| ABORT (4)         | api -> tok -> sched; detok | rid u64 @8                             | -
| TOKENS (5)        | scheduler 0 -> detokenizer | -                                      | per row: rids u64, token_ids i32,
|                   |  one per step              |                                        | finish u8, prompt/cached/output
|                   |                            |                                        | tokens u32 x3, logprobs f32, top
|                   |                            |                                        | counts u8; flat: top ids i32, f32
| TEXT (6)          | detokenizer -> api         | -                                      | per row: rids u64, finish u8,
|                   |  one per batch             |                                        | prompt/cached/completion u32 x3,
|                   |                            |                                        | text strs, new-token counts u32;
|                   |                            |                                        | per token: ids i32, logprobs f32,
|                   |                            |                                        | top counts u8; top ids i32, f32;
|                   |                            |                                        | token texts strs (raw bytes)
| ERROR (7)         | any -> api via detokenizer | rid u64 @8, http status u16 @16        | message u8 (UTF-8)
| SHUTDOWN (8)      | launcher -> any            | -                                      | -

A TEXT_REQUEST prompt is text (one prompt string), token ids (PROMPT_IDS, in prompt_ids) or a chat
(CHAT: prompt strs are the message contents, roles their CHAT_ROLES codes). Finish codes are
minisrv/scheduler/request.py FinishReason. A TOKENS row with token id -1 only reports a finish.
Decoded arrays are views into the buffer: copy them before releasing a ring view (RingReader.release).
"""
from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Union

import numpy as np
from numpy.typing import ArrayLike

from minisrv.ipc.codec import HEADER, RecordError, RecordLayout, pack_strings, unpack_bytes, unpack_strings
from minisrv.sampling_params import SamplingParams

LAYOUT_VERSION = 1
SAMPLING = "6dQiIIhH"
CHAT_ROLES = ("system", "user", "assistant", "tool", "developer")
_HAS_SEED, _IGNORE_EOS = 1, 2


class Kind(enum.IntEnum):
    GENERATE = 1
    TEXT_REQUEST = 2
    DETOK_REQUEST = 3
    ABORT = 4
    TOKENS = 5
    TEXT = 6
    ERROR = 7
    SHUTDOWN = 8


class RequestFlag(enum.IntFlag):
    CHAT = 1
    ECHO = 2
    ADD_GENERATION_PROMPT = 4
    PROMPT_IDS = 8
    SKIP_SPECIAL_TOKENS = 16
    MAX_TOKENS_FROM_CONTEXT = 32   # no max_tokens given: the tokenizer sets it to context length - prompt


def _layout(kind: Kind, fixed: str, arrays: Sequence[str] = ()) -> RecordLayout:
    return RecordLayout(kind.name, LAYOUT_VERSION << 8 | kind, fixed, arrays)


LAYOUTS = {
    Kind.GENERATE: _layout(Kind.GENERATE, "Q" + SAMPLING, ["<i4", "<i4"]),
    Kind.TEXT_REQUEST: _layout(Kind.TEXT_REQUEST, "QH6x" + SAMPLING,
                               ["<i4", "<i4", "u1", "<u4", "u1", "<u4", "u1"]),
    Kind.DETOK_REQUEST: _layout(Kind.DETOK_REQUEST, "QIH2x", ["<u4", "u1", "<i4"]),
    Kind.ABORT: _layout(Kind.ABORT, "Q"),
    Kind.TOKENS: _layout(Kind.TOKENS, "", ["<u8", "<i4", "u1", "<u4", "<u4", "<u4", "<f4", "u1", "<i4", "<f4"]),
    Kind.TEXT: _layout(Kind.TEXT, "", ["<u8", "u1", "<u4", "<u4", "<u4", "<u4", "u1", "<u4",
                                       "<i4", "<f4", "u1", "<i4", "<f4", "<u4", "u1"]),
    Kind.ERROR: _layout(Kind.ERROR, "QH6x", ["u1"]),
    Kind.SHUTDOWN: _layout(Kind.SHUTDOWN, ""),
}


def _sampling_fields(p: SamplingParams) -> tuple:
    flags = (_HAS_SEED if p.seed is not None else 0) | (_IGNORE_EOS if p.ignore_eos else 0)
    return (p.temperature, p.top_p, p.min_p, p.repetition_penalty, p.presence_penalty, p.frequency_penalty,
            p.seed or 0, p.top_k, p.max_tokens, p.min_tokens, -1 if p.logprobs is None else p.logprobs, flags)


def _sampling_params(fields: Sequence, stop_token_ids: np.ndarray) -> SamplingParams:
    temperature, top_p, min_p, rep, presence, frequency, seed, top_k, max_tokens, min_tokens, logprobs, flags = fields
    return SamplingParams(
        temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p, repetition_penalty=rep,
        presence_penalty=presence, frequency_penalty=frequency, seed=seed if flags & _HAS_SEED else None,
        max_tokens=max_tokens, min_tokens=min_tokens, stop_token_ids=stop_token_ids.tolist(),
        ignore_eos=bool(flags & _IGNORE_EOS), logprobs=None if logprobs < 0 else logprobs)


def _same_rows(kind: Kind, rows: int, **arrays: np.ndarray | list) -> None:
    for name, values in arrays.items():
        if len(values) != rows:
            raise RecordError(f"{kind.name}: {name} has {len(values)} entries, expected {rows} (one per row)")


@dataclass
class Generate:
    KIND: ClassVar[Kind] = Kind.GENERATE
    rid: int
    params: SamplingParams
    prompt_ids: ArrayLike            # int32 token ids; decoded: a view into the record

    def encode(self) -> bytearray:
        return LAYOUTS[self.KIND].encode(0, (self.rid, *_sampling_fields(self.params)),
                                         [self.prompt_ids, self.params.stop_token_ids])

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Generate:
        _, (rid, *sampling), (prompt_ids, stop_ids) = LAYOUTS[cls.KIND].decode(record)
        return cls(rid, _sampling_params(sampling, stop_ids), prompt_ids)


@dataclass
class TextRequest:
    """Exactly one of `text`, `prompt_ids` and `messages` ((role, content) pairs) is the prompt."""

    KIND: ClassVar[Kind] = Kind.TEXT_REQUEST
    rid: int
    params: SamplingParams
    text: str | None = None
    prompt_ids: ArrayLike | None = None
    messages: list[tuple[str, str]] | None = None
    n: int = 1
    echo: bool = False
    add_generation_prompt: bool = True
    skip_special_tokens: bool = True
    max_tokens_from_context: bool = False
    stop: list[str] = field(default_factory=list)

    def encode(self) -> bytearray:
        prompts = [self.text is not None, self.prompt_ids is not None, self.messages is not None]
        if sum(prompts) != 1:
            raise ValueError("TEXT_REQUEST needs exactly one of text, prompt_ids and messages")
        roles, contents = zip(*self.messages) if self.messages else ((), ())
        unknown = [r for r in roles if r not in CHAT_ROLES]
        if unknown:
            raise ValueError(f"TEXT_REQUEST messages: unknown role {unknown[0]!r}; known: {CHAT_ROLES}")
        flags = ((RequestFlag.CHAT if self.messages is not None else 0)
                 | (RequestFlag.PROMPT_IDS if self.prompt_ids is not None else 0)
                 | (RequestFlag.ECHO if self.echo else 0)
                 | (RequestFlag.ADD_GENERATION_PROMPT if self.add_generation_prompt else 0)
                 | (RequestFlag.SKIP_SPECIAL_TOKENS if self.skip_special_tokens else 0)
                 | (RequestFlag.MAX_TOKENS_FROM_CONTEXT if self.max_tokens_from_context else 0))
        prompt_offsets, prompt_blob = pack_strings([self.text] if self.text is not None else contents)
        stop_offsets, stop_blob = pack_strings(self.stop)
        role_codes = [CHAT_ROLES.index(r) for r in roles]
        arrays = [self.params.stop_token_ids, self.prompt_ids if self.prompt_ids is not None else (), role_codes,
                  prompt_offsets, np.frombuffer(prompt_blob, np.uint8), stop_offsets, np.frombuffer(stop_blob, np.uint8)]
        return LAYOUTS[self.KIND].encode(int(flags), (self.rid, self.n, *_sampling_fields(self.params)), arrays)

    @classmethod
    def decode(cls, record: bytes | memoryview) -> TextRequest:
        flags, (rid, n, *sampling), arrays = LAYOUTS[cls.KIND].decode(record)
        stop_ids, prompt_ids, roles, prompt_offsets, prompt_blob, stop_offsets, stop_blob = arrays
        prompts = unpack_strings(prompt_offsets, prompt_blob)
        flags = RequestFlag(flags)
        if RequestFlag.CHAT in flags:
            _same_rows(cls.KIND, len(prompts), roles=roles)
            if roles.size and roles.max() >= len(CHAT_ROLES):
                raise RecordError(f"TEXT_REQUEST: role code {roles.max()} unknown")
            prompt = {"messages": [(CHAT_ROLES[r], c) for r, c in zip(roles.tolist(), prompts)]}
        elif RequestFlag.PROMPT_IDS in flags:
            prompt = {"prompt_ids": prompt_ids}
        else:
            _same_rows(cls.KIND, 1, prompt=prompts)
            prompt = {"text": prompts[0]}
        return cls(rid, _sampling_params(sampling, stop_ids), n=n, echo=RequestFlag.ECHO in flags,
                   add_generation_prompt=RequestFlag.ADD_GENERATION_PROMPT in flags,
                   skip_special_tokens=RequestFlag.SKIP_SPECIAL_TOKENS in flags,
                   max_tokens_from_context=RequestFlag.MAX_TOKENS_FROM_CONTEXT in flags, stop=unpack_strings(stop_offsets, stop_blob), **prompt)


@dataclass
class DetokRequest:
    KIND: ClassVar[Kind] = Kind.DETOK_REQUEST
    rid: int
    num_prompt_tokens: int
    n: int = 1
    echo: bool = False
    skip_special_tokens: bool = True
    stop: list[str] = field(default_factory=list)
    prompt_ids: ArrayLike = ()       # only needed for echo

    def encode(self) -> bytearray:
        flags = (RequestFlag.ECHO if self.echo else 0) | (RequestFlag.SKIP_SPECIAL_TOKENS if self.skip_special_tokens else 0)
        stop_offsets, stop_blob = pack_strings(self.stop)
        return LAYOUTS[self.KIND].encode(int(flags), (self.rid, self.num_prompt_tokens, self.n),
                                         [stop_offsets, np.frombuffer(stop_blob, np.uint8), self.prompt_ids])

    @classmethod
    def decode(cls, record: bytes | memoryview) -> DetokRequest:
        flags, (rid, num_prompt_tokens, n), (stop_offsets, stop_blob, prompt_ids) = LAYOUTS[cls.KIND].decode(record)
        return cls(rid, num_prompt_tokens, n, bool(flags & RequestFlag.ECHO),
                   bool(flags & RequestFlag.SKIP_SPECIAL_TOKENS), unpack_strings(stop_offsets, stop_blob), prompt_ids)


@dataclass
class Abort:
    KIND: ClassVar[Kind] = Kind.ABORT
    rid: int

    def encode(self) -> bytearray:
        return LAYOUTS[self.KIND].encode(0, (self.rid,))

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Abort:
        return cls(LAYOUTS[cls.KIND].decode(record)[1][0])


@dataclass
class Tokens:
    """One scheduler step, one row per request with news. Leave the logprob fields out when no row asked
    for logprobs (then each row's logprob is NaN and it has no alternatives)."""

    KIND: ClassVar[Kind] = Kind.TOKENS
    rids: ArrayLike
    token_ids: ArrayLike
    finish_reasons: ArrayLike
    prompt_tokens: ArrayLike
    cached_tokens: ArrayLike
    output_tokens: ArrayLike
    logprobs: ArrayLike | None = None       # chosen token's logprob per row, NaN where not requested
    top_counts: ArrayLike | None = None     # alternatives per row
    top_ids: ArrayLike = ()                 # flat, row after row
    top_logprobs: ArrayLike = ()

    def __post_init__(self) -> None:
        rows = len(self.rids)
        if self.logprobs is None:
            self.logprobs = np.full(rows, math.nan, np.float32)
        if self.top_counts is None:
            self.top_counts = np.zeros(rows, np.uint8)
        _same_rows(self.KIND, rows, token_ids=self.token_ids, finish_reasons=self.finish_reasons,
                   prompt_tokens=self.prompt_tokens, cached_tokens=self.cached_tokens,
                   output_tokens=self.output_tokens, logprobs=self.logprobs, top_counts=self.top_counts)
        _same_rows(self.KIND, int(np.sum(self.top_counts)), top_ids=self.top_ids, top_logprobs=self.top_logprobs)

    def encode(self) -> bytearray:
        return LAYOUTS[self.KIND].encode(0, (), [
            self.rids, self.token_ids, self.finish_reasons, self.prompt_tokens, self.cached_tokens,
            self.output_tokens, self.logprobs, self.top_counts, self.top_ids, self.top_logprobs])

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Tokens:
        return cls(*LAYOUTS[cls.KIND].decode(record)[2])


@dataclass
class Text:
    """One detokenizer batch, one row per request with news: its text delta and the ids of the tokens
    behind it, each with its logprob (NaN when not requested) and alternatives. `token_texts` is empty
    when no row asked for logprobs, else holds the raw bytes of every token then of every alternative
    (empty for rows without logprobs): the API server has no tokenizer."""

    KIND: ClassVar[Kind] = Kind.TEXT
    rids: ArrayLike
    finish_reasons: ArrayLike
    prompt_tokens: ArrayLike
    cached_tokens: ArrayLike
    completion_tokens: ArrayLike
    texts: list[str]
    num_tokens: ArrayLike                     # new tokens per row
    token_ids: ArrayLike                      # flat, row after row
    token_logprobs: ArrayLike | None = None
    top_counts: ArrayLike | None = None       # alternatives per token
    top_ids: ArrayLike = ()
    top_logprobs: ArrayLike = ()
    token_texts: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows, tokens = len(self.rids), len(self.token_ids)
        if self.token_logprobs is None:
            self.token_logprobs = np.full(tokens, math.nan, np.float32)
        if self.top_counts is None:
            self.top_counts = np.zeros(tokens, np.uint8)
        _same_rows(self.KIND, rows, finish_reasons=self.finish_reasons, prompt_tokens=self.prompt_tokens,
                   cached_tokens=self.cached_tokens, completion_tokens=self.completion_tokens, texts=self.texts,
                   num_tokens=self.num_tokens)
        _same_rows(self.KIND, int(np.sum(self.num_tokens)), token_ids=self.token_ids,
                   token_logprobs=self.token_logprobs, top_counts=self.top_counts)
        _same_rows(self.KIND, int(np.sum(self.top_counts)), top_ids=self.top_ids, top_logprobs=self.top_logprobs)
        if self.token_texts:
            _same_rows(self.KIND, tokens + len(self.top_ids), token_texts=self.token_texts)

    def encode(self) -> bytearray:
        text_offsets, text_blob = pack_strings(self.texts)
        token_offsets, token_blob = pack_strings(self.token_texts)
        return LAYOUTS[self.KIND].encode(0, (), [
            self.rids, self.finish_reasons, self.prompt_tokens, self.cached_tokens, self.completion_tokens,
            text_offsets, np.frombuffer(text_blob, np.uint8), self.num_tokens, self.token_ids,
            self.token_logprobs, self.top_counts, self.top_ids, self.top_logprobs, token_offsets,
            np.frombuffer(token_blob, np.uint8)])

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Text:
        (rids, finish, prompt, cached, completion, text_offsets, text_blob, num_tokens, token_ids, token_logprobs,
         top_counts, top_ids, top_logprobs, token_offsets, token_blob) = LAYOUTS[cls.KIND].decode(record)[2]
        return cls(rids, finish, prompt, cached, completion, unpack_strings(text_offsets, text_blob), num_tokens,
                   token_ids, token_logprobs, top_counts, top_ids, top_logprobs,
                   unpack_bytes(token_offsets, token_blob))


@dataclass
class Error:
    KIND: ClassVar[Kind] = Kind.ERROR
    rid: int
    status: int        # HTTP status code
    message: str

    def encode(self) -> bytearray:
        return LAYOUTS[self.KIND].encode(0, (self.rid, self.status), [np.frombuffer(self.message.encode(), np.uint8)])

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Error:
        _, (rid, status), (message,) = LAYOUTS[cls.KIND].decode(record)
        try:
            return cls(rid, status, message.tobytes().decode())
        except UnicodeDecodeError as exc:
            raise RecordError(f"ERROR: message is not valid UTF-8: {exc}") from None


@dataclass
class Shutdown:
    KIND: ClassVar[Kind] = Kind.SHUTDOWN

    def encode(self) -> bytearray:
        return LAYOUTS[self.KIND].encode(0, ())

    @classmethod
    def decode(cls, record: bytes | memoryview) -> Shutdown:
        LAYOUTS[cls.KIND].decode(record)
        return cls()


Record = Union[Generate, TextRequest, DetokRequest, Abort, Tokens, Text, Error, Shutdown]
RECORD_TYPES: dict[Kind, type[Record]] = {t.KIND: t for t in Record.__args__}


def peek_kind(record: bytes | bytearray | memoryview) -> Kind:
    """The kind of a record, after checking its layout version."""
    if len(record) < HEADER.size:
        raise RecordError(f"a record needs at least {HEADER.size} bytes, got {len(record)}")
    kind_word = HEADER.unpack_from(record, 0)[1]
    if kind_word >> 8 != LAYOUT_VERSION:
        raise RecordError(f"record layout version {kind_word >> 8}, this build reads version {LAYOUT_VERSION}")
    try:
        return Kind(kind_word & 0xFF)
    except ValueError:
        raise RecordError(f"unknown record kind {kind_word & 0xFF}") from None


def decode(record: bytes | bytearray | memoryview) -> Record:
    """Any record, by its kind."""
    return RECORD_TYPES[peek_kind(record)].decode(record)
