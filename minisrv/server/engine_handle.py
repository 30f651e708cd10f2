"""What the HTTP layer needs from the engine: a handle that streams a request's deltas, and the deltas.

The runtime's EngineClient (minisrv/runtime/engine_client.py) is the handle in `minisrv serve`, over the
rings; the server tests use a fake. Nothing here knows about processes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol

from minisrv.wire.records import PromptRequest
from minisrv.wire.terms import HistogramValues, SchedulerStats


@dataclass
class TokenLogprob:
    """One token's log probability; `top_logprobs` holds the alternatives (whose own list is empty)."""

    token: str            # the token's text; a token that is only part of a UTF-8 character decodes with U+FFFD
    token_id: int
    logprob: float
    token_bytes: bytes    # the token's exact bytes, for OpenAI's `bytes` field
    top_logprobs: list[TokenLogprob] = field(default_factory=list)
    rank: int = 0         # among all tokens, 1 the likeliest (computed for prompt tokens; 0: not computed)


@dataclass
class OutputDelta:
    """New output of one choice."""

    index: int                              # choice index in [0, n)
    text: str                               # new text (UTF-8 safe, stop strings removed)
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None     # one per new token when logprobs were asked for, else None
    finish_reason: str | None               # "stop" | "length" | "abort" | None while running
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int                  # tokens generated so far for this choice (cumulative)
    emitted_ns: int = 0                     # time.monotonic_ns() when the scheduler sent its first token (0: unknown)
    # With prompt_logprobs: one per prompt token after the first, all in the choice's first delta.
    prompt_logprobs: list[TokenLogprob] | None = None


class RequestError(Exception):
    """A request the engine refused; the app turns it into an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


class EngineHandle(Protocol):
    """ready: every worker is ready and the server is not shutting down. dead_worker: the name of a worker
    process that died, else None; unresponsive_worker: one that is alive but silent (see --watchdog-timeout). model_name / max_model_len / vocab_size: known once ready."""

    ready: bool
    dead_worker: str | None
    unresponsive_worker: str | None    # a worker whose heartbeat is late, with how late, while it lasts
    model_name: str
    max_model_len: int
    vocab_size: int

    def stream(self, request: PromptRequest) -> AsyncIterator[OutputDelta]:
        """Deltas of all of the request's choices until each has a finish_reason. Raises RequestError when
        the request is refused (503 while not ready, 400 for a prompt longer than the context...); closing
        the iterator aborts the request."""
        ...

    def stats(self) -> SchedulerStats: ...

    async def flush_cache(self) -> None:
        """Evict every cached prompt prefix that no request holds, on every scheduler replica; returns once
        done. RequestError when the engine cannot (503 while not ready, 504 when it takes too long)."""
        ...

    def histograms(self) -> HistogramValues:
        """The scheduler's request and step histograms (REQUEST_HISTOGRAMS), as last published."""
        ...
