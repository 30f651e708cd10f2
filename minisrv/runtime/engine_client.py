"""The API server's EngineHandle over the rings: submit requests, stream their text deltas back.

This is the API server process's side of the pipeline (tokenizer workers -> scheduler -> detokenizer):
PROMPT_REQUEST records out, one per request, round-robin over the tokenizer channels; TEXT_DELTAS and
ERROR records in from the detokenizer, fanned out to each request by its id.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable

from minisrv.ipc import PeerGone, RecordTooLarge, RingError, RingTimeout
from minisrv.runtime.channels import AsyncRecordReader, RecordWriter
from minisrv.runtime.status_block import ModelFacts, StatusBlock
from minisrv.server.engine_handle import OutputDelta, RequestError, TokenLogprob
from minisrv.wire.records import Abort, Error, FlushCache, PromptRequest, TextDeltas
from minisrv.wire.terms import (FINISH_API_NAMES, HistogramValues, SchedulerStats, api_base_ids, choice_rid,
                                split_rid)

logger = logging.getLogger(__name__)

# How long a request or an abort waits for room in a tokenizer's request ring. A ring of several MiB that
# stays full this long belongs to a tokenizer that is stuck or far behind: the client gets a 503 to retry
# rather than a wait with no end (the watchdog deals with a stuck worker).
SEND_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 30.0      # for every scheduler replica to apply a FLUSH_CACHE (one step of a long prefill first)
FLUSH_POLL_S = 0.002


@dataclass
class _Stream:
    """One request in flight: its choices' deltas, fanned in from TEXT_DELTAS rows, wait in `pending`.

    A delta that arrives while the previous one of its choice still waits is merged into it, so when the
    API process falls behind it frames, encodes and sends once for many tokens. A plain deque and one
    future rather than an asyncio.Queue: the queue's bookkeeping was a fifth of this process's time per
    token at saturation (bench/pipeline.py --profile-api)."""

    n: int
    channel: int                                # the tokenizer channel it went to; its aborts follow it
    pending: deque = field(default_factory=deque)   # OutputDelta | RequestError
    waiter: asyncio.Future | None = None        # the response waiting for `pending` to fill
    finished: set[int] = field(default_factory=set)
    counts: tuple[int, int, int] = (0, 0, 0)    # last (prompt, cached, output) token counts seen
    sent: bool = False                          # the request reached its tokenizer channel

    def post(self, item: OutputDelta | RequestError) -> None:
        pending = self.pending
        last = pending[-1] if pending else None
        if (isinstance(item, OutputDelta) and isinstance(last, OutputDelta) and last.index == item.index
                and last.finish_reason is None):
            pending[-1] = _merge(last, item)
        else:
            pending.append(item)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def next(self) -> OutputDelta | RequestError:
        while not self.pending:
            self.waiter = asyncio.get_running_loop().create_future()
            try:
                await self.waiter
            finally:
                self.waiter = None
        return self.pending.popleft()


class EngineClient:
    """The EngineHandle (minisrv/server/engine_handle.py) of `minisrv serve`, owned by the API server
    process; every method runs on its event loop. `dead_worker` names a worker that died ("scheduler",
    "detokenizer", "tokenizer-0"...)."""

    def __init__(self, to_tokenizers: list[RecordWriter], from_detokenizer: AsyncRecordReader, status: StatusBlock,
                 served_model_name: str | None = None, api_server: int = 0, api_server_count: int = 1) -> None:
        """`api_server` of `api_server_count`: which API server process this is (its requests' ids say so)."""
        self._ready = False
        self._ended = False
        self.dead_worker: str | None = None
        self.unresponsive_worker: str | None = None   # set and cleared by the launcher's watchdog
        self.model_name = served_model_name or ""
        self.max_model_len = 0
        self.vocab_size = 0
        self._served_model_name = served_model_name
        self._to_tokenizers = to_tokenizers
        self._from_detokenizer = from_detokenizer
        self._status = status
        self._streams: dict[int, _Stream] = {}
        self._base_ids = api_base_ids(api_server, api_server_count)
        self._channels = itertools.cycle(range(len(to_tokenizers)))
        self._background: set[asyncio.Task] = set()
        self._dispatcher: asyncio.Task | None = None

    # -- lifecycle (the launcher calls these) ----------------------------------------------------
    def start(self, on_failure: Callable[[str], None]) -> None:
        """Start consuming the detokenizer's channel on the running loop; `on_failure(reason)` if that stops."""
        self._dispatcher = asyncio.get_running_loop().create_task(self._dispatch())

        def done(task: asyncio.Task) -> None:
            if not task.cancelled():
                on_failure(f"the text channel consumer stopped: {task.exception() or 'the detokenizer closed it'}")

        self._dispatcher.add_done_callback(done)

    def mark_ready(self, facts: ModelFacts) -> None:
        self.model_name = self._served_model_name or facts.name
        self.max_model_len = facts.max_model_len
        self.vocab_size = facts.vocab_size
        self._ready = True

    @property
    def ready(self) -> bool:
        """Every worker has reported ready and no stream was ended. Until then each look reads the status block
        (plain memory loads): an API server process is ready the moment the last worker is, not when the
        launcher's watch next polls, so /health never says 200 from one process and 503 from another."""
        if not self._ready and not self._ended and all(self._status.ready_slots()):
            self.mark_ready(self._status.model())
        return self._ready

    def worker_died(self, name: str) -> None:
        if self.dead_worker is None:
            self.dead_worker = name
        self.end_streams(RequestError(503, f"worker {name} died; the server is going down"))

    def end_streams(self, error: RequestError | None = None) -> None:
        """Stop taking requests and end every stream in flight: on a shutdown with finish_reason "abort"; when
        something broke with `error`, so a client sees an error (an error event, a 5xx) and never mistakes
        a truncated output for a finished one."""
        self._ready, self._ended = False, True
        for stream in self._streams.values():
            if error is not None:
                stream.post(error)
            else:
                _finish_with_abort(stream)

    async def close(self) -> None:
        """Stop consuming the text channel. The channels themselves belong to whoever created them."""
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            await asyncio.gather(self._dispatcher, return_exceptions=True)

    # -- the app's side ---------------------------------------------------------------------------
    async def stream(self, request: PromptRequest) -> AsyncIterator[OutputDelta]:
        """EngineHandle.stream: closing or cancelling the generator aborts the request, and the scheduler
        frees its KV pages within a step."""
        if self.dead_worker is not None or not self.ready:
            raise RequestError(503, "the server is not ready (starting, shutting down, or a worker died)")
        base, channel = next(self._base_ids), next(self._channels)
        stream = self._streams[base] = _Stream(request.n, channel)
        want_logprobs = request.params.logprobs is not None
        try:
            arrival_ns = request.arrival_ns or time.monotonic_ns()   # the scheduler's latency metrics start here
            await self._send(channel, replace(request, rid=base, arrival_ns=arrival_ns))
            stream.sent = True
            while len(stream.finished) < stream.n:
                delta = await stream.next()
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

    def stats(self) -> SchedulerStats:
        """The scheduler's latest published stats, read from shared memory (cheap: no syscall)."""
        return self._status.total_stats()

    def histograms(self) -> HistogramValues:
        """The scheduler's request and step histograms, as last published (every replica's added up)."""
        return self._status.total_histograms()

    async def flush_cache(self) -> None:
        """Have every scheduler replica evict its idle cached prefixes; returns once each has (its published
        count of flushes moved past what it was)."""
        if not self._ready:
            raise RequestError(503, "the server is starting or shutting down")
        replicas = range(self._status.spec.num_replicas)
        before = [self._status.stats(r).prefix_cache_flushes for r in replicas]
        try:   # one tokenizer worker forwards it to every replica
            await self._to_tokenizers[0].send_async(FlushCache(), timeout=SEND_TIMEOUT_S)
        except RingError as exc:
            raise RequestError(503, f"the tokenizer worker is not taking requests: {exc}") from None
        deadline = time.monotonic() + FLUSH_TIMEOUT_S
        while any(self._status.stats(r).prefix_cache_flushes <= before[r] for r in replicas):
            if time.monotonic() > deadline:
                raise RequestError(504, f"the schedulers did not flush their prefix caches within "
                                        f"{FLUSH_TIMEOUT_S:g} s")
            await asyncio.sleep(FLUSH_POLL_S)

    # -- channels ---------------------------------------------------------------------------------
    async def _send(self, channel: int, request: PromptRequest) -> None:
        try:
            await self._to_tokenizers[channel].send_async(request, timeout=SEND_TIMEOUT_S)
        except RecordTooLarge as exc:
            field = "messages" if request.messages is not None else "prompt"
            raise RequestError(413, f"{field}: the request takes {exc.length} bytes once encoded, more than the "
                                    f"{exc.limit} bytes one request may", field) from None
        except RingTimeout:
            raise RequestError(503, f"the tokenizer worker is not taking requests: its queue has been full for "
                                    f"{SEND_TIMEOUT_S:g} s; retry later") from None
        except RingError as exc:
            raise RequestError(503, f"the tokenizer worker is not taking requests: {exc}") from None
        except ValueError as exc:   # a value the schemas let through that a record cannot carry
            raise RequestError(400, str(exc), "messages" if request.messages is not None else "prompt") from None

    def _abort_choices(self, base: int, stream: _Stream) -> None:
        """Tell the engine to drop the choices still running (on the request's own channel, so an abort
        can never overtake the request). A full channel is retried in the background."""
        if self.dead_worker is not None or not stream.sent:
            return
        writer = self._to_tokenizers[stream.channel]
        for index in range(stream.n):
            if index in stream.finished:
                continue
            record = Abort(choice_rid(base, index))
            if not writer.try_send(record):
                task = asyncio.get_running_loop().create_task(writer.send_async(record, timeout=SEND_TIMEOUT_S))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def _dispatch(self) -> None:
        try:
            while True:
                for record in await self._from_detokenizer.drain():
                    if isinstance(record, TextDeltas):
                        self._deliver(record)
                    elif isinstance(record, Error):
                        stream = self._streams.get(split_rid(record.rid)[0])
                        if stream is not None:
                            stream.post(RequestError(record.status, record.message))
        except PeerGone:
            logger.debug("the detokenizer's channel closed")

    def _deliver(self, deltas: TextDeltas) -> None:
        ids, logprobs, raw = deltas.token_ids.tolist(), deltas.token_logprobs.tolist(), deltas.token_bytes
        top_counts, top_ids = deltas.top_counts.tolist(), deltas.top_ids.tolist()
        top_logprobs, top_raw = deltas.top_logprobs.tolist(), deltas.top_bytes
        in_prompt, ranks = deltas.token_in_prompt.tolist(), deltas.token_ranks.tolist()
        token, top = 0, 0
        rows = zip(deltas.rids.tolist(), deltas.emitted_ns.tolist(), deltas.finish_reasons.tolist(),
                   deltas.num_prompt_tokens.tolist(), deltas.num_cached_tokens.tolist(),
                   deltas.num_output_tokens.tolist(), deltas.texts, deltas.num_tokens.tolist())
        for rid, emitted_ns, finish, prompt, cached, output, delta_text, count in rows:
            entries, prompt_entries, output_ids = [], [], []
            for t in range(token, token + count):
                alts = range(top, top + top_counts[t])
                top = alts.stop
                if not in_prompt[t]:
                    output_ids.append(ids[t])
                if in_prompt[t] or not math.isnan(logprobs[t]):
                    (prompt_entries if in_prompt[t] else entries).append(TokenLogprob(
                        _as_text(raw[t]), ids[t], logprobs[t], raw[t],
                        [TokenLogprob(_as_text(top_raw[a]), top_ids[a], top_logprobs[a], top_raw[a], rank=i + 1)
                         for i, a in enumerate(alts)], ranks[t]))
            base, index = split_rid(rid)
            stream = self._streams.get(base)
            if stream is not None:
                stream.counts = (prompt, cached, output)
                stream.post(OutputDelta(
                    index, delta_text, output_ids, entries or None,
                    FINISH_API_NAMES[finish], prompt, cached, output, emitted_ns, prompt_entries or None))
            token += count


def _merge(first: OutputDelta, then: OutputDelta) -> OutputDelta:
    """One choice's two consecutive deltas as one."""
    logprobs = None if first.logprobs is None and then.logprobs is None else \
        (first.logprobs or []) + (then.logprobs or [])
    return OutputDelta(first.index, first.text + then.text, first.token_ids + then.token_ids, logprobs,
                       then.finish_reason, then.num_prompt_tokens, then.num_cached_tokens, then.num_output_tokens,
                       first.emitted_ns, first.prompt_logprobs)


def _finish_with_abort(stream: _Stream) -> None:
    prompt, cached, output = stream.counts
    for index in range(stream.n):
        if index not in stream.finished:
            stream.post(OutputDelta(index, "", [], None, "abort", prompt, cached, output))


def _as_text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")
