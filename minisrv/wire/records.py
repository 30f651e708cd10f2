"""Every record that travels between minisrv's processes, each declared once (byte layout: codec.py).

The header's kind word is LAYOUT_VERSION << 8 | kind; a reader refuses any other version. Route of
each record, and the field each column belongs to, are in the declarations below; `python -m
minisrv.wire.records` prints the byte layout of every record as a table (ARCHITECTURE.md holds it).
Decoded columns are numpy views into the buffer: copy them before releasing a ring view.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Callable, ClassVar, TypeVar

from minisrv.sampling_params import SamplingParams
from minisrv.wire.codec import (HEADER, Column, RecordError, RecordLayout, column, flag, messages, sampling, scalar,
                                strings, text)
from minisrv.wire.codec import text as text_field   # for a field declared after PromptRequest's own `text`

LAYOUT_VERSION = 12


class Kind(enum.IntEnum):
    PROMPT_REQUEST = 1
    TOKENIZED_REQUEST = 2
    DETOKENIZE_REQUEST = 3
    ABORT = 4
    STEP_TOKENS = 5
    TEXT_DELTAS = 6
    ERROR = 7
    SHUTDOWN = 8
    STEP = 9
    FLUSH_CACHE = 10


class Record:
    """Base of every record class: `encode()` to bytes, `decode(buffer)` back."""

    KIND: ClassVar[Kind]
    ROUTE: ClassVar[str]
    LAYOUT: ClassVar[RecordLayout]

    def encode(self) -> bytearray:
        return self.LAYOUT.encode(self)

    @classmethod
    def decode(cls: type[R], buffer: bytes | bytearray | memoryview) -> R:
        return cls.LAYOUT.decode(buffer)


R = TypeVar("R", bound=Record)
RECORD_TYPES: dict[Kind, type[Record]] = {}


def record(kind: Kind, route: str, counts: dict[str, str] | None = None) -> Callable[[type], type]:
    """Make a dataclass of `cls` and derive its layout; `counts` as in codec.py's docstring."""

    def declare(cls: type) -> type:
        cls = dataclass(cls)
        cls.KIND, cls.ROUTE = kind, route
        cls.LAYOUT = RecordLayout(cls, kind.name, LAYOUT_VERSION << 8 | kind, counts or {})
        RECORD_TYPES[kind] = cls
        return cls

    return declare


@record(Kind.PROMPT_REQUEST, "api -> tokenizer")
class PromptRequest(Record):
    """One API request before tokenization. Its prompt is exactly one of text, prompt_ids (token ids)
    and messages (a chat, rendered by the tokenizer worker's chat template)."""

    rid: int = scalar("Q")
    n: int = scalar("H", 1)
    params: SamplingParams = sampling()
    text: str | None = text()
    prompt_ids: Column | None = column("<i4", optional=True)
    messages: list[tuple[str, str]] | None = messages()
    stop: list[str] = strings()
    echo: bool = flag()                        # completions: the prompt's text comes before the output
    add_generation_prompt: bool = flag(True)   # chat: end the rendered prompt with the assistant's header
    continue_final_message: bool = flag()      # chat: leave the last message open, the output continues it
    skip_special_tokens: bool = flag(True)
    include_stop_str_in_output: bool = flag()  # a matched stop string ends the output instead of being cut
    truncate_prompt_tokens: int = scalar("I")  # > 0: keep only the prompt's last this many tokens
    # chat_template_kwargs: names, and values packed by wire.terms.pack_template_value
    template_kwarg_names: list[str] = strings("template_kwarg")
    template_kwarg_values: list[str] = strings("template_kwarg")
    # Tool calling, for the chat template. Function definitions and call arguments are JSON documents by nature
    # (templates render them as JSON), so they travel as their JSON text: the tools list, and per message (none,
    # or one entry for each of messages) its tool_calls and the tool_call_id it answers ("" where it has none).
    tools: str | None = text_field()
    # When the API server received the request (time.monotonic_ns, one clock per host): the scheduler's
    # latency metrics start here.
    arrival_ns: int = scalar("Q")
    message_tool_calls: list[str] = strings("message_extra")
    message_tool_call_ids: list[str] = strings("message_extra")
    priority: int = scalar("i")   # --scheduling-policy priority: lower values are admitted first

    def __post_init__(self) -> None:
        given = [name for name in ("text", "prompt_ids", "messages") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"PROMPT_REQUEST needs exactly one of text, prompt_ids and messages, got {given}")


@record(Kind.TOKENIZED_REQUEST, "tokenizer -> scheduler (rank 0 -> the other tensor-parallel ranks)")
class TokenizedRequest(Record):
    """One choice of a request, as the engine runs it."""

    rid: int = scalar("Q")
    params: SamplingParams = sampling()
    prompt_ids: Column = column("<i4")
    arrival_ns: int = scalar("Q")   # PromptRequest.arrival_ns
    priority: int = scalar("i")     # PromptRequest.priority


@record(Kind.DETOKENIZE_REQUEST, "tokenizer -> detokenizer")
class DetokenizeRequest(Record):
    """What the detokenizer must know of a request before its first tokens arrive."""

    rid: int = scalar("Q")
    n: int = scalar("H", 1)
    stop: list[str] = strings()
    echo: bool = flag()
    skip_special_tokens: bool = flag(True)
    include_stop_str_in_output: bool = flag()
    prompt_ids: Column = column("<i4")            # only with echo
    echo_logprobs: bool = flag()                  # echo with prompt logprobs: the first prompt token leads them
    stop_token_ids: Column = column("<i4")        # params.stop_token_ids: stopping on one, it is not rendered


@record(Kind.ABORT, "api -> tokenizer -> scheduler; detokenizer -> scheduler (rank 0 -> the other ranks)")
class Abort(Record):
    rid: int = scalar("Q")


@record(Kind.STEP_TOKENS, "scheduler -> detokenizer", counts={"top": "top_counts"})
class StepTokens(Record):
    """One scheduler step: a row per new token of a request (token -1: the row only reports a finish).
    Rows of requests that asked for no logprobs have logprob NaN and no alternatives. Rows with in_prompt
    set carry a prompt token's logprobs (SamplingParams.prompt_logprobs) and come before the request's
    output rows; rank is the token's among all (0: not computed, as for output tokens)."""

    rids: Column = column("<u8", "row")
    token_ids: Column = column("<i4", "row")
    finish_reasons: Column = column("u1", "row")
    num_prompt_tokens: Column = column("<u4", "row")
    num_cached_tokens: Column = column("<u4", "row")
    num_output_tokens: Column = column("<u4", "row")
    logprobs: Column = column("<f4", "row")
    top_counts: Column = column("u1", "row")
    top_ids: Column = column("<i4", "top")
    top_logprobs: Column = column("<f4", "top")
    emitted_ns: int = scalar("Q")   # time.monotonic_ns() as the scheduler sent it (latency tracing)
    in_prompt: Column = column("u1", "row")
    ranks: Column = column("<u4", "row")


@record(Kind.TEXT_DELTAS, "detokenizer -> api", counts={"token": "num_tokens", "top": "top_counts"})
class TextDeltas(Record):
    """One detokenizer batch: a row per request with news, its text delta and the tokens behind it, each
    token with its logprob (NaN when not asked for), its bytes (b"" then) and its alternatives. The API
    server has no tokenizer: token texts travel as bytes. A choice's prompt tokens with logprobs (flagged
    token_in_prompt) come in its first row, before its output tokens."""

    rids: Column = column("<u8", "row")
    finish_reasons: Column = column("u1", "row")
    num_prompt_tokens: Column = column("<u4", "row")
    num_cached_tokens: Column = column("<u4", "row")
    num_output_tokens: Column = column("<u4", "row")
    texts: list[str] = strings("row")
    num_tokens: Column = column("<u4", "row")
    token_ids: Column = column("<i4", "token")
    token_logprobs: Column = column("<f4", "token")
    token_bytes: list[bytes] = strings("token", raw=True)
    top_counts: Column = column("u1", "token")
    top_ids: Column = column("<i4", "top")
    top_logprobs: Column = column("<f4", "top")
    top_bytes: list[bytes] = strings("top", raw=True)
    emitted_ns: Column = column("<u8", "row")   # the STEP_TOKENS emitted_ns of each row's first token
    token_in_prompt: Column = column("u1", "token")
    token_ranks: Column = column("<u4", "token")


@record(Kind.ERROR, "tokenizer, scheduler -> detokenizer -> api")
class Error(Record):
    rid: int = scalar("Q")
    status: int = scalar("H")      # HTTP status code
    message: str = text("")


@record(Kind.SHUTDOWN, "api -> tokenizer -> scheduler (rank 0 -> the other ranks), detokenizer")
class Shutdown(Record):
    pass


@record(Kind.STEP, "scheduler rank 0 -> the other tensor-parallel ranks")
class Step(Record):
    """Run one engine step. The ranks compare digests of their previous steps (batch and results)."""

    previous_digest: int = scalar("Q")


@record(Kind.FLUSH_CACHE, "api -> tokenizer -> every scheduler replica")
class FlushCache(Record):
    """Evict every cached prefix no request holds (SGLang's /flush_cache, vLLM's /reset_prefix_cache)."""


def peek_kind(buffer: bytes | bytearray | memoryview) -> Kind:
    """The kind of a record, after checking its layout version."""
    if len(buffer) < HEADER.size:
        raise RecordError(f"a record needs at least {HEADER.size} bytes, got {len(buffer)}")
    kind_word = HEADER.unpack_from(buffer, 0)[1]
    if kind_word >> 8 != LAYOUT_VERSION:
        raise RecordError(f"record layout version {kind_word >> 8}, this build reads version {LAYOUT_VERSION}")
    try:
        return Kind(kind_word & 0xFF)
    except ValueError:
        raise RecordError(f"unknown record kind {kind_word & 0xFF}") from None


def decode(buffer: bytes | bytearray | memoryview) -> Record:
    """Any record, by its kind."""
    return RECORD_TYPES[peek_kind(buffer)].decode(buffer)


def layout_table() -> str:
    """Every record's bytes as a Markdown table, derived from the declarations above."""
    lines = ["| kind (code) | route | fixed fields after the header | flag bits | arrays |", "|---|---|---|---|---|"]
    for kind, cls in RECORD_TYPES.items():
        lines.append(f"| {kind.name} ({kind.value}) | {cls.ROUTE} | {' | '.join(cls.LAYOUT.describe())} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(layout_table())
