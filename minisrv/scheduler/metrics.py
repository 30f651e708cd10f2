"""Request and step metrics, observed where the scheduler sees things happen (vLLM's histograms and counters).

Times are time.monotonic() seconds, the clock every process on a host shares; a request's arrival is the API
server's, carried in its records, so time to first token and end-to-end latency include tokenization and
queueing, yet no client, slow or gone, changes them. Counts live in one flat array (each histogram of
REQUEST_HISTOGRAMS in turn, one slot per bucket, +Inf last) and sums in another (one per histogram): the
scheduler process copies both into the status block after each step.
"""
from __future__ import annotations

import time
from array import array
from bisect import bisect_left

from minisrv.scheduler.request import Request
from minisrv.wire.terms import (HISTOGRAM_INDEX, HISTOGRAM_OFFSETS, NUM_HISTOGRAM_COUNTS, REQUEST_HISTOGRAMS,
                                FinishReason)

TTFT, ITL, E2E, QUEUE, PREFILL, DECODE, PROMPT_TOKENS, GENERATION_TOKENS, ITERATION = (
    HISTOGRAM_INDEX[name] for name in (
        "time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
        "request_queue_time_seconds", "request_prefill_time_seconds", "request_decode_time_seconds",
        "request_prompt_tokens", "request_generation_tokens", "iteration_tokens_total"))


class RequestMetrics:
    def __init__(self) -> None:
        self.counts = array("Q", bytes(8 * NUM_HISTOGRAM_COUNTS))
        self.sums = array("d", bytes(8 * len(REQUEST_HISTOGRAMS)))
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished = {FinishReason.STOP: 0, FinishReason.LENGTH: 0, FinishReason.ABORT: 0}

    def observe(self, histogram: int, value: float) -> None:
        # Prometheus buckets are "less than or equal": the first bound >= value.
        self.counts[HISTOGRAM_OFFSETS[histogram] + bisect_left(REQUEST_HISTOGRAMS[histogram].buckets, value)] += 1
        self.sums[histogram] += value

    def admitted(self, req: Request) -> None:
        self.prompt_tokens += req.num_prompt_tokens

    def step(self, num_tokens: int) -> None:
        if num_tokens:
            self.observe(ITERATION, num_tokens)

    def scheduled(self, req: Request) -> None:
        t = req.times
        if t.first_scheduled is None:
            t.first_scheduled = time.monotonic()
            self.observe(QUEUE, t.first_scheduled - t.queued)

    def sampled(self, req: Request, now: float, num_tokens: int = 1) -> None:
        """A step gave `req` num_tokens tokens (several when drafts held): one inter-token latency, as vLLM observes
        one per request and step."""
        t = req.times
        if t.first_token is None:
            t.first_token = now
            self.observe(TTFT, now - t.arrival)
            self.observe(PREFILL, now - (t.first_scheduled if t.first_scheduled is not None else t.queued))
        else:
            self.observe(ITL, now - t.last_token)
        t.last_token = now
        self.generation_tokens += num_tokens

    def finished_request(self, req: Request, reason: FinishReason) -> None:
        t, now = req.times, time.monotonic()
        self.finished[reason] += 1
        self.observe(E2E, now - t.arrival)
        if t.first_token is not None:
            self.observe(DECODE, now - t.first_token)
        self.observe(PROMPT_TOKENS, req.num_prompt_tokens)
        self.observe(GENERATION_TOKENS, len(req.output_ids))
