"""Continuous batching: which tokens of which requests the engine computes each step.

Each step spends a token budget (max_num_batched_tokens): first one token for every running request
that is decoding, then prefill chunks (running requests part-way through their prompt, then newly
admitted ones) fill what is left, so a long prompt is chunked. While some request decodes, prefill
chunks take at most max_prefill_tokens of it: a decoding stream's next token waits for the whole step.

Under overlap scheduling (minisrv/engine/llm_engine.py) the next step is scheduled before the previous
one's tokens are known: a request's in-flight tokens count as tokens to compute (the model runner takes
their ids from the previous step's output on the device), and a request those tokens will certainly
finish (max_tokens, the context length) is not scheduled again. One whose in-flight token turns out to
stop it has computed one row for nothing; postprocess drops that row's result.

Admission is optimistic: a request gets pages only for the tokens it computes now. When the pool runs
dry, idle prefix-cache pages are evicted first; then a running request is preempted: the most recently
admitted (--scheduling-policy fcfs), or the one of the highest priority value, then the latest
(priority; waiting.py keeps both orders). It drops its pages (their full pages stay cached) and waits at
the head of the queue (of its priority) to recompute its prompt and output so far. A request is never
preempted for a later one of its priority, nor for one of a higher value, and add_request refuses any
request that could not run alone in the whole pool, so the scheduler always makes progress.

With speculative decoding (--speculative-config), a decoding request may also get drafts (ngram.py): guessed
tokens computed after its newest one in the same step, each sampled after. The samples are kept while each
matches the draft it follows (_accepted); the K/V of the drafts after the first miss is left to be overwritten.
Drafts take pages and budget only where they are free: they never preempt nor hold back another request.
"""
from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

from minisrv.config import EngineConfig
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.kv_pages import PagePool, pages_for_tokens
from minisrv.scheduler.metrics import RequestMetrics
from minisrv.scheduler.ngram import NgramDrafter
from minisrv.scheduler.prefix_cache import CacheNode, PrefixCache
from minisrv.scheduler.request import Request, RequestOutput, RequestStatus, SampleResult, grammar_failure
from minisrv.scheduler.waiting import WaitingQueue
from minisrv.wire.terms import FinishReason, SchedulerStats

logger = logging.getLogger(__name__)


@dataclass
class _Step:
    """The step being planned: its seqs in batch order, the token budget left and, of it, what prefill may take."""

    budget: int
    prefill_cap: int | None = None      # max_prefill_tokens, applied once a decode is in the step
    prefill_used: int = 0
    num_decodes: int = 0
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: bool = False

    def room(self, num_tokens: int) -> int:
        """How many of `num_tokens` uncomputed tokens of one request fit (a single one is a decode)."""
        if num_tokens == 1 or self.prefill_cap is None or not self.num_decodes:
            return min(num_tokens, self.budget)
        return max(0, min(num_tokens, self.budget, self.prefill_cap - self.prefill_used))


def prompt_leaves_no_room(num_prompt_tokens: int, max_model_len: int) -> str | None:
    """Why a prompt this long cannot be served, or None."""
    if num_prompt_tokens < max_model_len:
        return None
    return (f"the prompt has {num_prompt_tokens} tokens, which leaves no room to generate: the context length is "
            f"{max_model_len}")


class Scheduler:
    def __init__(self, config: EngineConfig, num_pages: int, eos_token_ids: list[int], max_model_len: int,
                 vocab_size: int, max_prefill_tokens: int | None = None) -> None:
        """max_prefill_tokens: the resolved cap (EngineConfig.resolved_max_prefill_tokens); None: none."""
        for name, value in [("max_model_len", max_model_len), ("vocab_size", vocab_size)]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.pool = PagePool(num_pages, config.page_size)
        self.prefix_cache = PrefixCache(self.pool) if config.enable_prefix_caching else None
        self.page_size = config.page_size
        self.token_budget = config.max_num_batched_tokens
        self.prefill_cap = max_prefill_tokens
        # Capped by the budget so that every running request can decode in every step.
        self.max_running = min(config.max_running_requests, config.max_num_batched_tokens)
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size

        self.waiting = WaitingQueue(by_priority=config.scheduling_policy == "priority")
        self.running: dict[int, Request] = {}         # in admission order
        self._requests: dict[int, Request] = {}       # every unfinished request, by id
        self._cursors: dict[int, CacheNode] = {}      # running request -> deepest cached page on its path
        self._preempted_rids: set[int] = set()        # so a resumed request keeps its first cache report
        self._arrivals = itertools.count()             # Request.arrival_order
        self.prefix_cache_queries = 0                 # prompt tokens looked up at first admission
        self.prefix_cache_hits = 0                    # of those, tokens whose K/V came from the cache
        self.prefix_cache_flushes = 0
        self.num_preemptions = 0
        self.metrics = RequestMetrics()
        self.speculative = config.speculative
        self._drafters: dict[int, NgramDrafter] = {}  # by request id, for requests that speculate
        self.num_drafts = 0                           # decode seqs scheduled with drafts (cumulative)
        self.num_draft_tokens = 0                     # tokens drafted (cumulative)
        self.num_accepted_tokens = 0                  # of those, tokens the model agreed with (cumulative)

    # ---- stats for metrics
    def stats(self) -> SchedulerStats:
        # Idle cached pages are evictable, so they count as free.
        m = self.metrics
        return SchedulerStats(len(self.running), len(self.waiting), self.pool.num_in_use / self.pool.num_pages,
                              self.prefix_cache_queries, self.prefix_cache_hits, self.num_preemptions,
                              m.prompt_tokens, m.generation_tokens, m.finished[FinishReason.STOP],
                              m.finished[FinishReason.LENGTH], m.finished[FinishReason.ABORT],
                              self.prefix_cache_flushes, self.num_drafts, self.num_draft_tokens,
                              self.num_accepted_tokens)

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def flush_prefix_cache(self) -> int:
        """Evict every cached page that no request holds, so that later prompts are computed afresh (pages of
        running requests stay: they are evictable once those finish). Returns the pages freed."""
        self.prefix_cache_flushes += 1
        return 0 if self.prefix_cache is None else self.prefix_cache.evict(self.pool.num_pages)

    # ---- requests in and out
    def add_request(self, req: Request) -> None:
        rid, prompt, params = req.rid, req.prompt_ids, req.params
        if rid in self._requests:
            raise ValueError(f"request id {rid} is already queued or running")
        if req.status is not RequestStatus.WAITING or req.pages or req.output_ids or req.num_computed:
            raise ValueError(f"request {rid} is not new: it already has a status, pages or output")
        if not prompt:
            raise ValueError(f"request {rid}: the prompt is empty; it needs at least one token")
        for field_name, ids in [("prompt", prompt), ("stop_token_ids", params.stop_token_ids),
                                ("logit_bias", list(params.logit_bias))]:
            bad = next((i for i, t in enumerate(ids) if not 0 <= t < self.vocab_size), None)
            if bad is not None:
                raise ValueError(f"request {rid}: {field_name} token id {ids[bad]} at position {bad} is "
                                 f"outside the vocabulary [0, {self.vocab_size})")
        if params.max_tokens is None:   # up to the context length
            problem = prompt_leaves_no_room(len(prompt), self.max_model_len)
            if problem:
                raise ValueError(f"request {rid}: {problem}")
            req.max_tokens = self.max_model_len - len(prompt)
        else:
            req.max_tokens = params.max_tokens
            if len(prompt) + req.max_tokens > self.max_model_len:
                raise ValueError(f"request {rid}: the prompt has {len(prompt)} tokens and max_tokens is "
                                 f"{req.max_tokens}, but the context length is {self.max_model_len}; "
                                 "shorten the prompt or lower max_tokens")
        # The last output token is never fed back, so its K/V never needs a slot.
        pages_needed = pages_for_tokens(len(prompt) + req.max_tokens - 1, self.page_size)
        if pages_needed > self.pool.num_pages:
            raise ValueError(f"request {rid}: the prompt has {len(prompt)} tokens and max_tokens is "
                             f"{req.max_tokens}, which needs {pages_needed} KV pages of {self.page_size} "
                             f"tokens, but the KV cache holds only {self.pool.num_pages} pages; lower "
                             "max_tokens or give the KV cache more memory")
        self._requests[rid] = req
        req.arrival_order = next(self._arrivals)
        self.waiting.add(req)
        self.metrics.admitted(req)

    def abort(self, rid: int) -> RequestOutput | None:
        """Finish a waiting or running request now and free its pages; None if it is not here."""
        req = self._requests.get(rid)
        if req is None:
            return None
        self._finish(req, FinishReason.ABORT)
        return self._output(req, [])

    # ---- one step
    def schedule(self) -> ScheduledBatch:
        step = _Step(budget=self.token_budget, prefill_cap=self.prefill_cap)
        # Admission order is decodes first: a request is admitted only with budget left after every
        # running one got all its remaining tokens, so only the newest running request can still be
        # prefilling. It also means preemption victims (the newest) are never already in this step.
        running = list(self.running.values())
        for i, req in enumerate(running):
            if step.budget == 0:
                break
            if req.status is RequestStatus.RUNNING:     # not preempted earlier in this step
                self._schedule_running(req, step, len(running) - 1 - i)
        # Memory is short when someone was just preempted: admitting more would only thrash.
        while (self.waiting and step.budget > 0 and not step.preempted
               and len(self.running) < self.max_running
               and not self._prefix_being_computed(self.waiting[0], step) and self._admit(self.waiting[0], step)):
            pass
        self.metrics.step(self.token_budget - step.budget)
        return ScheduledBatch(step.seqs)

    def postprocess(self, batch: ScheduledBatch, results: list[SampleResult],
                    grammars_advanced: Callable[[], None] | None = None) -> list[RequestOutput]:
        """Record the step's sampled tokens (each seq's num_samples results, in batch order). Every token kept is
        appended and fed to its grammar first; then `grammars_advanced` is called, if given (the engine starts
        filling the next step's grammar masks there, beside the rest of this), and the outputs are made."""
        counts = [seq.num_samples for seq in batch.seqs]
        if len(results) != sum(counts):
            raise ValueError(f"postprocess got {len(results)} sample results for a batch that samples "
                             f"{sum(counts)} tokens")
        recorded: list[tuple[ScheduledSeq, list[SampleResult], FinishReason]] = []
        first = 0
        for seq, count in zip(batch.seqs, counts):
            samples, first, req = results[first: first + count], first + count, seq.request
            if req.finished:   # aborted, or stopped by the token before, after it was scheduled
                continue
            if req.grammar_complete:   # by the token before: what this step sampled for it is not kept
                req.num_in_flight -= len(samples)
                recorded.append((seq, [], FinishReason.ABORT if req.grammar_error else FinishReason.STOP))
                continue
            recorded.append((seq, *self._record_all(seq, samples)))
        if grammars_advanced is not None:
            grammars_advanced()
        outputs: list[RequestOutput] = []
        now = time.monotonic()
        for seq, kept, reason in recorded:
            req = seq.request
            cursor = self._cursors.get(req.rid)
            if cursor is not None:
                # A drafted seq's K/V holds from its start up to the last draft that was right.
                num_full_pages = (seq.start + (len(kept) if seq.draft_ids else seq.num_tokens)) // self.page_size
                if num_full_pages > cursor.depth:
                    self._cursors[req.rid] = self.prefix_cache.insert(cursor, req.token_ids, req.pages,
                                                                      num_full_pages)
            prompt_samples = self._new_prompt_logprobs(seq) if seq.prompt_logprobs else []
            if not kept:
                if reason is not FinishReason.NONE:
                    self._finish(req, reason)
                if prompt_samples or reason is not FinishReason.NONE:
                    outputs.append(self._output(req, [], prompt_samples))
                continue
            self.metrics.sampled(req, now, len(kept))
            if reason is not FinishReason.NONE:
                self._finish(req, reason)
            outputs.append(self._output(req, kept, prompt_samples))
        return outputs

    def _record_all(self, seq: ScheduledSeq, samples: list[SampleResult]) -> tuple[list[SampleResult], FinishReason]:
        """Record the samples of `seq` that hold (_accepted) up to the first that finishes the request; the rest,
        and the drafts they follow, are forgotten (the scheduler computes from the first position not kept)."""
        if not seq.draft_ids:   # most seqs: a decode's one sample, or a prefill chunk's none
            return samples, self._record(seq.request, samples[0]) if samples else FinishReason.NONE
        req, accepted, kept = seq.request, self._accepted(seq, samples), []
        reason = FinishReason.NONE
        for sample in accepted:
            kept.append(sample)
            reason = self._record(req, sample)
            if reason is not FinishReason.NONE:
                break
        self.num_accepted_tokens += len(accepted) - 1
        self._drafters[req.rid].checked(len(seq.draft_ids), len(accepted) - 1)
        # Computing resumes at the first position whose K/V is not known to be right.
        unused = seq.num_samples - len(kept)
        req.num_in_flight -= unused
        req.num_computed -= unused
        return kept, reason

    @staticmethod
    def _accepted(seq: ScheduledSeq, samples: list[SampleResult]) -> list[SampleResult]:
        """The samples of a step that hold: the one after the newest token, then, while each sampled token equals
        the draft computed after it, the one sampled after that draft. Every sample is drawn as it would have been
        without drafts (the same logits, seed and output position), so the output is the same, only sooner."""
        kept = samples[:1]
        for draft, sample in zip(seq.draft_ids, samples[1:]):
            if kept[-1].token_id != draft:
                break
            kept.append(sample)
        return kept

    def _record(self, req: Request, result: SampleResult) -> FinishReason:
        """Append a sampled token to the request's output and feed it to its grammar; whether and why it ends the
        request."""
        token_id = result.token_id
        req.num_in_flight -= 1
        req.output_ids.append(token_id)
        params, num_output = req.params, len(req.output_ids)
        if num_output >= params.min_tokens and (
                (token_id in self.eos_token_ids and not params.ignore_eos) or token_id in params.stop_token_ids):
            reason = FinishReason.STOP
        elif num_output >= req.max_tokens or req.num_prompt_tokens + num_output >= self.max_model_len:
            reason = FinishReason.LENGTH
        else:
            reason = FinishReason.NONE
        # Fed every token, an end too: a grammar whose matcher failed allows only an end, which it then refuses.
        if req.grammar is not None and self._grammar_complete(req, result):
            # A complete grammar ends the output, min_tokens or not; one that cannot go on fails the request.
            reason = FinishReason.ABORT if req.grammar_error else FinishReason.STOP
        return reason

    @staticmethod
    def _new_prompt_logprobs(seq: ScheduledSeq) -> list[SampleResult]:
        """The prompt logprobs `seq` computed that have not gone out yet (a recomputation after preemption
        computes some again)."""
        req = seq.request
        skip = req.num_prompt_logprobs - seq.start   # seq.prompt_logprobs[0] is for prompt token seq.start + 1
        new = seq.prompt_logprobs[max(0, skip):]
        req.num_prompt_logprobs += len(new)
        return new

    # ---- internals
    def _schedule_running(self, req: Request, step: _Step, num_after: int) -> None:
        """num_after: running requests still to schedule in this step; drafts leave each a token of budget."""
        uncomputed = req.num_tokens - req.num_computed
        num_tokens = step.room(uncomputed)
        if num_tokens == 0 or self._length_reached(req):
            return
        drafts = (self._drafts(req, step.budget - 1 - num_after)
                  if self.speculative is not None and num_tokens == uncomputed == 1 else [])
        if drafts and self._grow(req, req.num_computed + 1 + len(drafts), evict=False):
            self._add_seq(req, req.num_computed, 1, step, drafts)
            return
        while not self._grow(req, req.num_computed + num_tokens):
            victim = self.waiting.preemption_victim(self.running)
            self._preempt(victim, step)
            if victim is req:
                return
        self._add_seq(req, req.num_computed, num_tokens, step)

    def _drafts(self, req: Request, budget: int) -> list[int]:
        """Guesses at the tokens after a decoding request's newest (none for requests whose sampling reads the
        output so far: penalties, grammars), as many as its max_tokens, the context and `budget` leave."""
        spec = self.speculative
        if spec is None or req.num_in_flight or req.grammar is not None or req.params.penalised:
            return []
        room = min(budget, req.max_tokens - req.num_output_tokens - 1,
                   self.max_model_len - req.num_tokens - 1)
        if room <= 0:
            return []
        drafter = self._drafters.get(req.rid)
        if drafter is None:
            drafter = self._drafters[req.rid] = NgramDrafter(spec.prompt_lookup_min, spec.prompt_lookup_max,
                                                             spec.num_speculative_tokens)
        return drafter.propose(req.token_ids, room)

    def _admit(self, req: Request, step: _Step) -> bool:
        cursor = None
        if self.prefix_cache is not None and req.params.prompt_logprobs is None:
            # The last token is always computed, so that the step has logits to sample from. Its page
            # is never taken from the cache, even when the whole prompt is there: recomputing up to a
            # page of tokens is cheaper than a request writing into a page that others are reading.
            req.pages, cursor = self.prefix_cache.match(req.token_ids[:-1])
        start = len(req.pages) * self.page_size
        num_tokens = step.room(req.num_tokens - start)
        if num_tokens == 0 or not self._grow(req, start + num_tokens):
            self.pool.release(req.pages)
            req.pages = []
            return False
        self.waiting.pop_first()
        req.status = RequestStatus.RUNNING
        self.running[req.rid] = req
        if cursor is not None:
            self._cursors[req.rid] = cursor
        if req.rid not in self._preempted_rids:
            req.num_cached_tokens = start
            if self.prefix_cache is not None:
                self.prefix_cache_queries += req.num_prompt_tokens
                self.prefix_cache_hits += start
        self._add_seq(req, start, num_tokens, step)
        return True

    def _prefix_being_computed(self, req: Request, step: _Step) -> bool:
        """Whether a prefill in this step computes req's first prompt page (not cached yet).

        Then req waits: after the step those pages are in the prefix cache and req attaches them instead of
        computing a copy. This is how the n choices of one request (n TOKENIZED_REQUEST records with one prompt,
        arriving together) and concurrent requests with one system prompt share their prompt's KV pages.
        """
        if (self.prefix_cache is None or req.num_prompt_tokens <= self.page_size
                or req.params.prompt_logprobs is not None):   # it never attaches cached pages
            return False
        first_page = req.prompt_ids[:self.page_size]
        return any(seq.start < self.page_size <= seq.request.num_prompt_tokens
                   and seq.request.prompt_ids[:self.page_size] == first_page for seq in step.seqs)

    def _add_seq(self, req: Request, start: int, num_tokens: int, step: _Step,
                 draft_ids: list[int] | None = None) -> None:
        # Runs for every request of every step: counts are kept in locals, not re-read through ScheduledSeq's
        # properties.
        self.metrics.scheduled(req)
        sample = start + num_tokens == req.num_tokens
        num_drafts = len(draft_ids) if draft_ids else 0
        step.seqs.append(ScheduledSeq(req, start, num_tokens + num_drafts, sample, draft_ids=draft_ids or []))
        req.num_computed = start + num_tokens + num_drafts
        step.budget -= num_tokens + num_drafts
        if sample:
            req.num_in_flight += 1 + num_drafts
        if sample and num_tokens == 1:
            step.num_decodes += 1
        else:
            step.prefill_used += num_tokens
        if num_drafts:
            self.num_drafts += 1
            self.num_draft_tokens += num_drafts

    def _grow(self, req: Request, num_tokens: int, evict: bool = True) -> bool:
        """Give req pages for its first num_tokens tokens, evicting idle cached pages if needed (and allowed)."""
        if num_tokens <= len(req.pages) * self.page_size:   # most steps: the last page has room
            return True
        need = pages_for_tokens(num_tokens, self.page_size) - len(req.pages)
        if need > self.pool.num_free + (self.pool.num_idle if evict else 0):
            return False
        if need > self.pool.num_free:
            assert self.prefix_cache is not None
            self.prefix_cache.evict(need - self.pool.num_free)
        req.pages.extend(self.pool.allocate(need))
        return True

    def _preempt(self, req: Request, step: _Step) -> None:
        self._unschedule(req, step)
        self._drop_pages(req)
        req.status = RequestStatus.WAITING
        self.waiting.add(req, preempted=True)
        self._preempted_rids.add(req.rid)
        self.num_preemptions += 1
        step.preempted = True

    def _unschedule(self, req: Request, step: _Step) -> None:
        """Take req's seq out of the step being planned, if it has one (only a victim chosen by priority can: by
        admission order, the newest is never scheduled before the request that needs its pages)."""
        seq = next((s for s in step.seqs if s.request is req), None)
        if seq is None:
            return
        step.seqs.remove(seq)
        step.budget += seq.num_tokens
        req.num_in_flight -= seq.num_samples
        if seq.is_decode:
            step.num_decodes -= 1
        else:
            step.prefill_used -= seq.num_tokens
        if seq.draft_ids:
            self.num_drafts -= 1
            self.num_draft_tokens -= len(seq.draft_ids)

    def _drop_pages(self, req: Request) -> None:
        """Free the request's pages; full ones it cached stay in the prefix cache as idle pages."""
        self.running.pop(req.rid, None)
        self._cursors.pop(req.rid, None)
        self.pool.release(req.pages)
        req.pages = []
        req.num_computed = 0

    @staticmethod
    def _grammar_complete(req: Request, result: SampleResult) -> bool:
        try:
            return req.grammar.advance(result.token_id)
        except ValueError as exc:   # only a row whose every token was masked can sample a refused one
            logger.error("request %d: %s; it fails here", req.rid, exc)
            req.grammar_error = grammar_failure(str(exc), len(req.output_ids) - 1)
            return True

    def _length_reached(self, req: Request) -> bool:
        """Whether the request's in-flight tokens already bring it to max_tokens or the context length."""
        return req.num_output_tokens >= req.max_tokens or req.num_tokens >= self.max_model_len

    def _finish(self, req: Request, reason: FinishReason) -> None:
        if req.status is RequestStatus.WAITING:
            self.waiting.remove(req)
        self._drop_pages(req)
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        self.metrics.finished_request(req, reason)
        del self._requests[req.rid]
        self._preempted_rids.discard(req.rid)
        self._drafters.pop(req.rid, None)

    def _output(self, req: Request, samples: list[SampleResult],
                prompt_samples: list[SampleResult] | None = None) -> RequestOutput:
        return RequestOutput(rid=req.rid, new_token_ids=[s.token_id for s in samples], new_samples=samples,
                             finish_reason=req.finish_reason, num_prompt_tokens=req.num_prompt_tokens,
                             num_cached_tokens=req.num_cached_tokens, num_output_tokens=len(req.output_ids),
                             prompt_samples=prompt_samples or [], error=req.grammar_error)
