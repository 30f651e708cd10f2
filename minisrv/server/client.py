"""The API server's handle on the engine: submit requests and stream their text deltas over the rings.

This module is the boundary between the HTTP layer (routes, schemas, SSE) and the process pipeline
(tokenizer workers -> scheduler -> detokenizer). The app only ever sees the dataclasses below and
`EngineClient`; how records move between processes stays behind it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator

from minisrv.sampling_params import SamplingParams

ChatMessages = list[tuple[str, str]]   # (role, content) pairs, rendered by the tokenizer worker's chat template
MAX_CHOICES = 16                       # n is in [1, MAX_CHOICES]: each choice is one engine request


@dataclass
class GenerateInput:
    """What the app submits; mirrors the TEXT_REQUEST record."""

    prompt: str | list[int] | ChatMessages   # text, token ids, or chat messages
    is_chat: bool
    params: SamplingParams                    # already validated (SamplingParams validates on construction)
    n: int = 1
    stop: list[str] = field(default_factory=list)
    echo: bool = False                        # completions: return the prompt text before the completion
    add_generation_prompt: bool = True        # chat: end the rendered prompt with the assistant header
    # The client gave no max_tokens (chat's default, OpenAI semantics: generate up to the context length).
    # Only the tokenizer worker knows the prompt's length, so it sets params.max_tokens to
    # max_model_len - prompt tokens; until then params.max_tokens holds max_model_len. (Added by HTTP.)
    max_tokens_from_context: bool = False


@dataclass
class TokenLogprob:
    """One token's log probability; `top_logprobs` holds the alternatives (whose own list is empty)."""

    token: str            # the token's text; a token that is only part of a UTF-8 character decodes with U+FFFD
    token_id: int
    logprob: float
    token_bytes: bytes    # the token's exact bytes, for OpenAI's `bytes` field
    top_logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class OutputDelta:
    """New output of one choice: one row of a TEXT record."""

    index: int                              # choice index in [0, n)
    text: str                               # new text (UTF-8 safe, stop strings removed)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None     # one per new token when logprobs were asked for, else None
    finish_reason: str | None               # "stop" | "length" | "abort" | None while running
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int                  # tokens generated so far for this choice (cumulative)


@dataclass
class SchedulerStats:
    """The scheduler's gauges and counters for /metrics, as scheduler rank 0 last published them."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0      # 0..1: pages held by requests / all pages
    prefix_cache_queries: int = 0    # prompt tokens looked up in the prefix cache (cumulative)
    prefix_cache_hits: int = 0       # of those, tokens found (cumulative)


class RequestError(Exception):
    """A request the pipeline refused; the app turns it into an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class EngineClient:
    """Ring-backed client owned by the API server process. All methods run on its event loop.

    ready: every worker reported ready and the server is not shutting down.
    dead_worker: the name of a worker process that died ("scheduler", "detokenizer", "tokenizer-0"...),
    else None. model_name / max_model_len / vocab_size: known once ready.
    """

    ready: bool
    dead_worker: str | None
    model_name: str
    max_model_len: int
    vocab_size: int

    async def generate(self, inp: GenerateInput) -> AsyncIterator[OutputDelta]:
        """Yield deltas of all n choices until each has a finish_reason.

        Raises RequestError(status, message, param) when the request is refused (e.g. 400 for a prompt
        longer than the context, 503 while not ready). Closing or cancelling the generator aborts the
        request: the scheduler frees its KV pages within a step.
        """
        raise NotImplementedError  # the ring-backed implementation lands in the next commit
        yield  # pragma: no cover - makes this an async generator for type checkers and the app

    async def abort(self, request_id: int) -> None:
        """Abort a request by id (ids are internal; the app normally just closes the generator)."""
        raise NotImplementedError

    def stats(self) -> SchedulerStats:
        """The scheduler's latest published stats, read from shared memory (cheap: no syscall)."""
        raise NotImplementedError
