"""A model-free engine and invariant checks for the scheduler tests.

The fake engine keeps a real (tiny) KV cache: the "K/V" of position p is a hash of tokens 0..p, built
from the value stored at p-1 *in the cache*, and the next token is a function of every stored value the
sequence attends to. So a page that was freed too early, overwritten, attached after the wrong prefix or
never written changes the generated tokens, and comparing with `reference_generate` (no pages, no
batching) catches it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from minisrv.config import EngineConfig
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch
from minisrv.scheduler.kv_pages import pages_for_tokens
from minisrv.scheduler.request import FinishReason, Request, RequestOutput, RequestStatus, SampleResult
from minisrv.scheduler.scheduler import Scheduler

_MOD = (1 << 61) - 1


def extend_hash(prev: int, token: int) -> int:
    return (prev * 1_000_003 + token + 1) % _MOD


def next_token(context: list[int], vocab_size: int) -> int:
    return (hash(tuple(context)) * 0x9E3779B97F4A7C15 >> 20) % vocab_size


class FakeEngine:
    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.page_size = scheduler.page_size
        self.kv: list[list[int | None]] = [[None] * self.page_size for _ in range(scheduler.pool.num_pages)]

    def _slot(self, req: Request, pos: int) -> tuple[int, int]:
        return req.pages[pos // self.page_size], pos % self.page_size

    def execute(self, batch: ScheduledBatch) -> list[SampleResult]:
        pool = self.scheduler.pool
        results = []
        for seq in batch.seqs:
            req, end = seq.request, seq.start + seq.num_tokens
            assert end <= len(req.pages) * self.page_size, "scheduled tokens without pages for them"
            tokens = req.token_ids + seq.draft_ids
            assert len(tokens) == end or not seq.draft_ids, "drafts do not follow the newest token"
            prev = 0
            if seq.start > 0:
                page, slot = self._slot(req, seq.start - 1)
                prev = self.kv[page][slot]
                assert prev is not None, "attends to a slot nobody wrote"
            for pos in range(seq.start, end):
                prev = extend_hash(prev, tokens[pos])
                page, slot = self._slot(req, pos)
                assert not pool.is_cached(page) and pool.ref_count(page) == 1, f"wrote into shared page {page}"
                self.kv[page][slot] = prev
            context = [self.kv[p][s] for p, s in (self._slot(req, pos) for pos in range(end))]
            for last in range(end - seq.num_samples + 1, end + 1):   # a token after each draft too
                results.append(SampleResult(token_id=next_token(context[:last], self.scheduler.vocab_size)))
        return results


def reference_generate(prompt: list[int], params: SamplingParams, eos_ids: list[int], max_model_len: int,
                       vocab_size: int) -> tuple[list[int], FinishReason]:
    """What a request must produce: the same fake model run on its own, without pages or batching."""
    tokens, hashes, out = list(prompt), [], []
    prev = 0
    for token in tokens:
        prev = extend_hash(prev, token)
        hashes.append(prev)
    while True:
        token = next_token(hashes, vocab_size)
        out.append(token)
        tokens.append(token)
        prev = extend_hash(prev, token)
        hashes.append(prev)
        stops = (token in eos_ids and not params.ignore_eos) or token in params.stop_token_ids
        if len(out) >= params.min_tokens and stops:
            return out, FinishReason.STOP
        if len(out) >= params.max_tokens or len(tokens) >= max_model_len:
            return out, FinishReason.LENGTH


def check_invariants(sched: Scheduler, batch: ScheduledBatch | None = None) -> None:
    """Every page in exactly one place, refcounts equal holders, tree and page tables agree."""
    pool, cache, ps = sched.pool, sched.prefix_cache, sched.page_size
    free_list = pool.free_pages()
    free = set(free_list)
    assert len(free) == len(free_list) and not free & set(pool.idle_pages())
    holders = [0] * pool.num_pages
    for req in sched.waiting:
        assert req.status is RequestStatus.WAITING and not req.pages
    for req in sched.running.values():
        assert req.status is RequestStatus.RUNNING
        assert len(set(req.pages)) == len(req.pages), f"page twice in request {req.rid}'s page table"
        assert len(req.pages) >= pages_for_tokens(req.num_computed, ps)
        for page in req.pages:
            holders[page] += 1
    for page in range(pool.num_pages):
        assert pool.ref_count(page) == holders[page], f"page {page}: refcount != holders"
        if holders[page] > 1:
            assert pool.is_cached(page), f"page {page} shared by requests but not cached"
        state = (page in free) + pool.is_idle(page) + (holders[page] > 0)
        assert state == 1, f"page {page} is in {state} places"
        assert not (page in free and pool.is_cached(page))
        assert pool.is_idle(page) == (pool.is_cached(page) and holders[page] == 0)
    if cache is None:
        assert not any(pool.is_cached(p) for p in range(pool.num_pages))
    else:
        cached = [p for p in range(pool.num_pages) if pool.is_cached(p)]
        assert cache.num_cached_pages == len(cached)
        for page in cached:
            node = cache.node_of_page(page)
            assert node is not None and node.page == page and node.parent.children[node.key] is node
            assert node.depth == node.parent.depth + 1 and len(node.key) == ps
            if pool.is_idle(page):  # eviction relies on idle pages having only idle successors
                assert all(pool.is_idle(c.page) for c in node.children.values())
        for req in sched.running.values():  # page table = tree path, then private pages
            node, tokens = cache.root, req.token_ids
            for index, page in enumerate(req.pages):
                child = node.children.get(tuple(tokens[index * ps:(index + 1) * ps]))
                if child is None or child.page != page:
                    assert not any(pool.is_cached(p) for p in req.pages[index:])
                    break
                node = child
    if batch is not None:
        assert batch.num_tokens <= sched.token_budget
        assert len(sched.running) <= sched.max_running
        assert len({s.request.rid for s in batch.seqs}) == len(batch.seqs)
        for seq in batch.seqs:
            assert seq.num_tokens >= 1 and seq.start + seq.num_tokens == seq.request.num_computed
            # A sampling seq ends at the request's last token; the token it samples is in flight.
            assert seq.sample == (seq.start + seq.num_tokens == seq.request.num_tokens - seq.sample)
        # A partial prefill chunk takes the rest of the budget, so nothing can come after it.
        assert all(seq.sample for seq in batch.seqs[:-1])


def check_drained(sched: Scheduler) -> None:
    """After everything finished: no request holds a page; every page is free or idle-cached."""
    assert not sched.has_unfinished() and not sched.running and not sched.waiting
    check_invariants(sched)
    pool = sched.pool
    assert pool.num_in_use == 0 and pool.num_free + pool.num_idle == pool.num_pages
    assert all(pool.ref_count(p) == 0 for p in range(pool.num_pages))
    assert sched.stats().kv_cache_usage == 0.0


def make_scheduler(*, num_pages: int, page_size: int = 4, budget: int = 64, max_running: int = 16,
                   prefix_cache: bool = True, eos: tuple[int, ...] = (), max_model_len: int = 4096,
                   vocab_size: int = 50, max_prefill_tokens: int | None = None, policy: str = "fcfs",
                   speculative: int = 0) -> Scheduler:
    """speculative: n-gram drafts of up to that many tokens (0: none)."""
    spec = f'{{"method": "ngram", "num_speculative_tokens": {speculative}, "prompt_lookup_max": 3}}'
    config = EngineConfig(page_size=page_size, max_num_batched_tokens=budget, max_running_requests=max_running,
                          enable_prefix_caching=prefix_cache, scheduling_policy=policy,
                          speculative_config=spec if speculative else None)
    return Scheduler(config, num_pages=num_pages, eos_token_ids=list(eos), max_model_len=max_model_len,
                     vocab_size=vocab_size, max_prefill_tokens=max_prefill_tokens)


@dataclass
class Run:
    """The outcome of driving a scheduler with the fake engine."""

    outputs: dict[int, list[RequestOutput]] = field(default_factory=dict)
    batches: list[list[tuple[int, int, int, bool]]] = field(default_factory=list)  # (rid, start, n, sample)

    def tokens(self, rid: int) -> list[int]:
        return [t for o in self.outputs[rid] for t in o.new_token_ids]

    def finish_reason(self, rid: int) -> FinishReason:
        return self.outputs[rid][-1].finish_reason


def drive(engine: FakeEngine, arrivals: dict[int, list[Request]] | None = None,
          aborts: dict[int, list[int]] | None = None, max_steps: int = 10_000) -> Run:
    """Step until every request finished; arrivals/aborts happen before the step with that index.

    Reuse one engine for one scheduler: its KV cache must outlive a drive as the prefix cache does.
    """
    arrivals, aborts = arrivals or {}, aborts or {}
    sched, run = engine.scheduler, Run()
    last_event = max([*arrivals, *aborts], default=0)
    for step in range(max_steps):
        for req in arrivals.get(step, []):
            sched.add_request(req)
        for rid in aborts.get(step, []):
            out = sched.abort(rid)
            if out is not None:
                assert out.finish_reason is FinishReason.ABORT
                run.outputs.setdefault(rid, []).append(out)
            check_invariants(sched)
        if step > last_event and not sched.has_unfinished():
            return run
        decoding = [r for r in sched.running.values() if r.num_tokens - r.num_computed == 1]
        batch = sched.schedule()
        check_invariants(sched, batch)
        # Prefill never crowds out a running stream: each decodes unless it was preempted.
        in_batch = {seq.request.rid for seq in batch.seqs}
        assert all(r.rid in in_batch or r.status is RequestStatus.WAITING for r in decoding)
        run.batches.append([(s.request.rid, s.start, s.num_tokens, s.sample) for s in batch.seqs])
        if sched.has_unfinished():
            assert batch, "no progress: requests are unfinished but nothing was scheduled"
        drafted = {s.request.rid: len(s.draft_ids) for s in batch.seqs}
        for out in sched.postprocess(batch, engine.execute(batch)):
            assert 1 <= len(out.new_token_ids) <= 1 + drafted.get(out.rid, 0) or out.finish_reason is FinishReason.ABORT
            run.outputs.setdefault(out.rid, []).append(out)
        check_invariants(sched)
    raise AssertionError(f"not drained after {max_steps} steps")


def request(rid: int, prompt: list[int], priority: int = 0, **params) -> Request:
    return Request(rid=rid, prompt_ids=list(prompt), params=SamplingParams(temperature=0.0, **params), seed=rid,
                   priority=priority)
