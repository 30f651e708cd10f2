"""The API server's handle on the engine: submit requests and stream their text deltas over the rings.

This module is the boundary between the HTTP layer (routes, schemas, SSE) and the process pipeline
(tokenizer workers -> scheduler -> detokenizer). The app only ever sees the dataclasses below and
`EngineClient`; how records move between processes stays behind it.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from minisrv.ipc import PeerGone, RecordTooLarge, RingError, RingWriter
from minisrv.ipc.aio import AsyncRingReader, write_async
from minisrv.ipc.records import Abort, Error, Kind, Text, TextRequest, peek_kind
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import FinishReason
from minisrv.status_block import ModelFacts, SchedulerStats, StatusBlock
from minisrv.tokenizer.choices import MAX_CHOICES, choice_rid, split_rid

logger = logging.getLogger(__name__)

ChatMessages = list[tuple[str, str]]   # (role, content) pairs, rendered by the tokenizer worker's chat template
__all__ = ["ChatMessages", "EngineClient", "GenerateInput", "MAX_CHOICES", "OutputDelta", "RequestError",
           "SchedulerStats", "TokenLogprob"]


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


class RequestError(Exception):
    """A request the pipeline refused; the app turns it into an OpenAI error body with this status."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


@dataclass
class _Stream:
    """One request in flight: its choices' deltas arrive on `queue`, fanned in from TEXT rows."""

    n: int
    ring: int                                   # the tokenizer ring it went to; its aborts follow it
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)   # OutputDelta | RequestError
    finished: set[int] = field(default_factory=set)
    counts: tuple[int, int, int] = (0, 0, 0)    # last (prompt, cached, completion) tokens seen
    sent: bool = False                          # the request reached its tokenizer ring


class EngineClient:
    """Ring-backed client owned by the API server process. All methods run on its event loop.

    ready: every worker reported ready and the server is not shutting down.
    dead_worker: the name of a worker process that died ("scheduler", "detokenizer", "tokenizer-0"...),
    else None. model_name / max_model_len / vocab_size: known once ready.
    """

    def __init__(self, to_tokenizers: list[RingWriter], from_detokenizer: AsyncRingReader, status: StatusBlock,
                 served_model_name: str | None = None) -> None:
        self.ready = False
        self.dead_worker: str | None = None
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.vocab_size = 0
        self._served_model_name = served_model_name
        self._to_tokenizers = to_tokenizers
        self._from_detokenizer = from_detokenizer
        self._status = status
        self._streams: dict[int, _Stream] = {}
        self._base_ids = itertools.count(1)
        self._rings = itertools.cycle(range(len(to_tokenizers)))
        self._background: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    # -- lifecycle (the launcher calls these) ----------------------------------------------------
    def start(self, on_failure: Callable[[str], None]) -> None:
        """Start consuming the detokenizer's ring on the running loop; `on_failure(reason)` if that stops."""
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

        def done(task: asyncio.Task) -> None:
            if not task.cancelled():
                on_failure(f"the text ring consumer stopped: {task.exception() or 'the detokenizer closed it'}")

        self._dispatcher.add_done_callback(done)

    def mark_ready(self, facts: ModelFacts) -> None:
        self.model_name = self._served_model_name or facts.name
        self.max_model_len = facts.max_model_len
        self.vocab_size = facts.vocab_size
        self.ready = True

    def worker_died(self, name: str) -> None:
        if self.dead_worker is None:
            self.dead_worker = name
        self.end_streams()

    def end_streams(self) -> None:
        """Stop taking requests and finish every stream in flight with finish_reason "abort"."""
        self.ready = False
        for stream in self._streams.values():
            _finish_with_abort(stream)

    async def close(self) -> None:
        """Stop consuming the text ring. The rings themselves belong to whoever created them."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)

    # -- the app's side ---------------------------------------------------------------------------
    async def generate(self, inp: GenerateInput) -> AsyncIterator[OutputDelta]:
        """Yield deltas of all n choices until each has a finish_reason.

        Raises RequestError(status, message, param) when the request is refused (e.g. 400 for a prompt
        longer than the context, 503 while not ready). Closing or cancelling the generator aborts the
        request: the scheduler frees its KV pages within a step.
        """
        if self.dead_worker is not None or not self.ready:
            raise RequestError(503, "the server is not ready (starting, shutting down, or a worker died)")
        if not 1 <= inp.n <= MAX_CHOICES:
            raise RequestError(400, f"n must be in [1, {MAX_CHOICES}], got {inp.n}", "n")
        base, ring = next(self._base_ids), next(self._rings)
        record = _text_request(base, inp)
        stream = self._streams[base] = _Stream(inp.n, ring)
        want_logprobs = inp.params.logprobs is not None
        try:
            await self._send(ring, record)
            stream.sent = True
            while len(stream.finished) < stream.n:
                delta = await stream.queue.get()
                if isinstance(delta, RequestError):
                    raise delta
                if delta.finish_reason is not None:
                    stream.finished.add(delta.index)
                if want_logprobs and delta.logprobs is None:
                    delta.logprobs = []
                yield delta
        finally:
            del self._streams[base]
            self._abort_choices(base, stream)

    async def abort(self, request_id: int) -> None:
        """Abort a request by its id: its generator ends with finish_reason "abort" (the app normally just
        closes the generator instead, which aborts it too)."""
        stream = self._streams.get(request_id)
        if stream is not None:
            self._abort_choices(request_id, stream)
            _finish_with_abort(stream)

    def stats(self) -> SchedulerStats:
        """The scheduler's latest published stats, read from shared memory (cheap: no syscall)."""
        return self._status.stats()

    # -- rings ------------------------------------------------------------------------------------
    async def _send(self, ring: int, record: bytes | bytearray) -> None:
        try:
            await write_async(self._to_tokenizers[ring], record)
        except RecordTooLarge as exc:
            raise RequestError(413, f"the request is too large to pass to the tokenizer ({exc})", "prompt") from None
        except RingError as exc:
            raise RequestError(503, f"the tokenizer worker is not taking requests: {exc}") from None

    def _abort_choices(self, base: int, stream: _Stream) -> None:
        """Tell the engine to drop the choices still running (on the request's own ring, so an abort
        can never overtake the request). A full ring is retried in the background."""
        if self.dead_worker is not None or not stream.sent:
            return
        writer = self._to_tokenizers[stream.ring]
        for index in range(stream.n):
            if index in stream.finished:
                continue
            record = Abort(choice_rid(base, index)).encode()
            if not writer.try_write(record):
                task = asyncio.get_running_loop().create_task(write_async(writer, record, timeout=5.0))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _dispatch(self) -> None:
        try:
            while True:
                for record in await self._from_detokenizer.drain():
                    kind = peek_kind(record)
                    if kind is Kind.TEXT:
                        self._deliver(Text.decode(record))
                    elif kind is Kind.ERROR:
                        error = Error.decode(record)
                        stream = self._streams.get(split_rid(error.rid)[0])
                        if stream is not None:
                            stream.queue.put_nowait(RequestError(error.status, error.message))
        except PeerGone:
            logger.debug("the detokenizer's ring closed")

    def _deliver(self, text: Text) -> None:
        ids, logprobs, raw = text.token_ids.tolist(), text.token_logprobs.tolist(), text.token_texts
        top_counts, top_ids, top_logprobs = text.top_counts.tolist(), text.top_ids.tolist(), text.top_logprobs.tolist()
        alt_raw = raw[len(ids):]
        token, top = 0, 0
        rows = zip(text.rids.tolist(), text.finish_reasons.tolist(), text.prompt_tokens.tolist(),
                   text.cached_tokens.tolist(), text.completion_tokens.tolist(), text.texts,
                   text.num_tokens.tolist())
        for rid, finish, prompt, cached, completion, delta_text, count in rows:
            entries = []
            for t in range(token, token + count):
                alts = range(top, top + top_counts[t])
                top = alts.stop
                if not math.isnan(logprobs[t]):
                    entries.append(TokenLogprob(
                        _as_text(raw[t]), ids[t], logprobs[t], raw[t],
                        [TokenLogprob(_as_text(alt_raw[a]), top_ids[a], top_logprobs[a], alt_raw[a]) for a in alts]))
            base, index = split_rid(rid)
            stream = self._streams.get(base)
            if stream is not None:
                stream.counts = (prompt, cached, completion)
                stream.queue.put_nowait(OutputDelta(
                    index, delta_text, ids[token : token + count], entries or None,
                    FinishReason(finish).api_name, prompt, cached, completion))
            token += count


def _finish_with_abort(stream: _Stream) -> None:
    prompt, cached, completion = stream.counts
    for index in range(stream.n):
        if index not in stream.finished:
            stream.queue.put_nowait(OutputDelta(index, "", [], None, "abort", prompt, cached, completion))


def _as_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _text_request(base: int, inp: GenerateInput) -> bytearray:
    prompt: dict = {}
    if inp.is_chat:
        prompt["messages"] = [(role, content) for role, content in inp.prompt]
    elif isinstance(inp.prompt, str):
        prompt["text"] = inp.prompt
    else:
        prompt["prompt_ids"] = inp.prompt
    try:
        return TextRequest(base, inp.params, n=inp.n, echo=inp.echo, add_generation_prompt=inp.add_generation_prompt,
                           stop=list(inp.stop), max_tokens_from_context=inp.max_tokens_from_context,
                           **prompt).encode()
    except ValueError as exc:   # e.g. a chat role the records cannot carry, a token id beyond int32
        raise RequestError(400, str(exc), "messages" if inp.is_chat else "prompt") from None
