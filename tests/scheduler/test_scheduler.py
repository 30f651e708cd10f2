from __future__ import annotations

import random

import pytest
from sched_harness import (FakeEngine, check_drained, check_invariants, drive, make_scheduler, reference_generate,
                           request)

from minisrv.config import EngineConfig
from minisrv.scheduler.request import FinishReason, RequestStatus, SampleResult
from minisrv.scheduler.scheduler import Scheduler

VOCAB = 50


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def assert_matches_reference(run, reqs, eos=(), max_model_len=4096):
    for req in reqs:
        want, reason = reference_generate(req.prompt_ids, req.params, list(eos), max_model_len, VOCAB)
        assert run.tokens(req.rid) == want, f"request {req.rid}"
        assert run.finish_reason(req.rid) is reason
        last = run.outputs[req.rid][-1]
        assert last.num_output_tokens == len(want) and last.num_prompt_tokens == req.num_prompt_tokens


def test_long_prompt_is_chunked_and_shares_steps_with_decodes():
    rng = random.Random(10)
    sched = make_scheduler(num_pages=64, budget=8)
    engine = FakeEngine(sched)
    short = request(1, tokens(rng, 5), max_tokens=12)
    long = request(2, tokens(rng, 30), max_tokens=3)
    run = drive(engine, {0: [short], 2: [long]})
    chunks = [seq for batch in run.batches for seq in batch if seq[0] == 2 and seq[1] < 30]
    assert [n for _, _, n, _ in chunks] == [7, 7, 7, 7, 2]          # one budget slot per step went to the decode
    assert [sample for *_, sample in chunks] == [False] * 4 + [True]
    for batch in run.batches[2:7]:
        assert batch[0][0] == 1 and batch[0][2] == 1                # the decode comes first, every step
    assert [sum(n for _, _, n, _ in batch) for batch in run.batches[2:7]] == [8, 8, 8, 8, 3]
    assert_matches_reference(run, [short, long])
    check_drained(sched)


def test_prefill_is_capped_while_others_decode_and_uncapped_when_none_does():
    """max_prefill_tokens: with a decode in the step, prefill chunks take at most the cap (streams stay steady);
    alone, a prompt takes the whole budget. Outputs are unchanged either way."""
    rng = random.Random(12)
    sched = make_scheduler(num_pages=64, budget=16, max_prefill_tokens=3)
    engine = FakeEngine(sched)
    first = request(1, tokens(rng, 20), max_tokens=10)
    second, third = request(2, tokens(rng, 9), max_tokens=2), request(3, tokens(rng, 4), max_tokens=2)
    run = drive(engine, {0: [first], 3: [second, third]})
    first_chunks = [n for batch in run.batches for rid, start, n, _ in batch if rid == 1 and start < 20]
    assert first_chunks == [16, 4]                                  # nothing decodes yet: the whole budget
    for batch in run.batches:
        decodes = [seq for seq in batch if seq[2] == 1 and seq[3]]
        prefill = sum(n for _, _, n, sample in batch if not (n == 1 and sample))
        assert prefill <= (3 if decodes else 16), batch
    later = [n for batch in run.batches[3:] for rid, start, n, _ in batch if rid in (2, 3) and n > 1]
    assert later and max(later) <= 3                               # chunks of the cap beside the decode
    assert_matches_reference(run, [first, second, third])
    check_drained(sched)


def test_prefix_hits_are_counted_and_output_pages_are_cached_for_the_next_turn():
    rng = random.Random(11)
    sched = make_scheduler(num_pages=64, page_size=4)
    engine = FakeEngine(sched)
    first = request(1, tokens(rng, 10), max_tokens=7)
    run = drive(engine, {0: [first]})
    assert first.num_cached_tokens == 0
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (10, 0)

    history = first.prompt_ids + run.tokens(1)                     # 17 tokens; 16 of them computed
    second = request(2, history + tokens(rng, 5), max_tokens=4)
    run2 = drive(engine, {0: [second]})
    assert second.num_cached_tokens == 16 and run2.outputs[2][-1].num_cached_tokens == 16
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (10 + 22, 16)
    assert run2.batches[0] == [(2, 16, 6, True)]
    assert_matches_reference(run2, [second])
    check_drained(sched)


def test_a_flush_evicts_the_idle_cached_pages_and_keeps_those_a_request_holds():
    rng = random.Random(14)
    sched = make_scheduler(num_pages=64, page_size=4)
    engine = FakeEngine(sched)
    prompt = tokens(rng, 12)
    drive(engine, {0: [request(1, prompt, max_tokens=3)]})
    cached = sched.prefix_cache.num_cached_pages
    holder = request(2, tokens(rng, 9), max_tokens=30)
    sched.add_request(holder)
    sched.postprocess(batch := sched.schedule(), engine.execute(batch))   # running, its pages in use
    assert sched.flush_prefix_cache() == cached and sched.stats().prefix_cache_flushes == 1
    assert sched.prefix_cache.num_cached_pages == 2 and sched.pool.num_in_use == len(holder.pages)
    again = request(3, prompt, max_tokens=3)
    run = drive(engine, {0: [again]})
    assert again.num_cached_tokens == 0   # computed afresh, and to the same tokens
    assert_matches_reference(run, [again])
    check_drained(sched)


def test_a_fully_cached_prompt_recomputes_its_last_page_and_then_shares_it():
    rng = random.Random(12)
    sched = make_scheduler(num_pages=32, page_size=4)
    engine = FakeEngine(sched)
    prompt = tokens(rng, 12)
    a, b = request(1, prompt, max_tokens=3), request(2, prompt, max_tokens=5)
    drive(engine, {0: [a]})
    cached_prompt_pages, _ = sched.prefix_cache.match(prompt)
    sched.pool.release(cached_prompt_pages)
    sched.add_request(b)
    batch = sched.schedule()
    assert [(s.start, s.num_tokens) for s in batch.seqs] == [(8, 4)] and b.num_cached_tokens == 8
    recomputed_page = b.pages[2]
    outputs = sched.postprocess(batch, engine.execute(batch))
    # Its recomputed copy of the third page was swapped for the cached one and freed: one copy, shared.
    assert b.pages[:3] == cached_prompt_pages and recomputed_page in sched.pool.free_pages()
    run = drive(engine)
    assert [o.new_token_ids[0] for o in outputs] + run.tokens(2) == reference_generate(
        prompt, b.params, [], 4096, VOCAB)[0]
    check_drained(sched)


def test_disabled_prefix_cache_caches_nothing():
    rng = random.Random(13)
    sched = make_scheduler(num_pages=32, prefix_cache=False)
    engine = FakeEngine(sched)
    prompt = tokens(rng, 12)
    reqs = [request(i, prompt, max_tokens=4) for i in range(3)]
    run = drive(engine, {0: reqs[:1], 5: reqs[1:]})
    assert sched.prefix_cache is None and all(r.num_cached_tokens == 0 for r in reqs)
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (0, 0)
    assert sched.pool.num_free == 32
    assert_matches_reference(run, reqs)


def test_max_running_requests_is_respected_and_capped_by_the_budget():
    rng = random.Random(14)
    sched = make_scheduler(num_pages=64, budget=32, max_running=2)
    engine = FakeEngine(sched)
    reqs = [request(i, tokens(rng, rng.randint(2, 9)), max_tokens=rng.randint(1, 6)) for i in range(6)]
    run = drive(engine, {0: reqs})
    assert max(len(batch) for batch in run.batches) == 2
    assert_matches_reference(run, reqs)
    assert make_scheduler(num_pages=8, budget=3, max_running=10).max_running == 3


def test_finish_reasons_and_min_tokens():
    rng = random.Random(15)
    prompt = tokens(rng, 6)
    free_run, _ = reference_generate(prompt, request(0, prompt, max_tokens=30).params, [], 4096, VOCAB)
    eos = free_run[0]
    stop = free_run[2] if free_run[2] != eos else free_run[3]
    reqs = [
        request(1, prompt, max_tokens=30),                          # EOS first token: STOP with 1 token
        request(2, prompt, max_tokens=5, ignore_eos=True),          # LENGTH
        # No stop before 4 tokens, although the first one is EOS; free_run[5] stops it at the latest.
        request(3, prompt, max_tokens=30, min_tokens=4, stop_token_ids=[free_run[5]]),
        request(4, prompt, max_tokens=30, ignore_eos=True, stop_token_ids=[stop]),
        request(5, prompt, max_tokens=30, ignore_eos=True),         # ends exactly at the context length
    ]
    sched = make_scheduler(num_pages=64, eos=(eos,), max_model_len=36)
    engine = FakeEngine(sched)
    run = drive(engine, {0: reqs})
    assert run.tokens(1) == [eos] and run.finish_reason(1) is FinishReason.STOP
    assert len(run.tokens(2)) == 5 and run.finish_reason(2) is FinishReason.LENGTH
    assert 4 <= len(run.tokens(3)) <= 6 and run.finish_reason(3) is FinishReason.STOP
    assert run.tokens(3) == free_run[:len(run.tokens(3))]
    assert run.tokens(4)[-1] == stop and stop not in run.tokens(4)[:-1]
    assert run.finish_reason(4) is FinishReason.STOP
    assert len(prompt) + len(run.tokens(5)) == 36 and run.finish_reason(5) is FinishReason.LENGTH
    assert_matches_reference(run, reqs, eos=(eos,), max_model_len=36)
    check_drained(sched)


def test_validation_errors_name_the_problem():
    sched = make_scheduler(num_pages=4, page_size=4, max_model_len=40, vocab_size=VOCAB)
    with pytest.raises(ValueError, match="prompt is empty"):
        sched.add_request(request(1, [], max_tokens=2))
    with pytest.raises(ValueError, match=r"prompt token id 50 at position 2 is outside the vocabulary \[0, 50\)"):
        sched.add_request(request(1, [3, 4, 50], max_tokens=2))
    with pytest.raises(ValueError, match="prompt token id -1 at position 0"):
        sched.add_request(request(1, [-1], max_tokens=2))
    with pytest.raises(ValueError, match="stop_token_ids token id 77"):
        sched.add_request(request(1, [1], max_tokens=2, stop_token_ids=[77]))
    with pytest.raises(ValueError, match="prompt has 30 tokens and max_tokens is 11, but the context length is 40"):
        sched.add_request(request(1, [1] * 30, max_tokens=11))
    with pytest.raises(ValueError, match="the prompt has 40 tokens, which leaves no room to generate: the context "
                                         "length is 40"):
        sched.add_request(request(1, [1] * 40, max_tokens=None))
    # 10 + 8 tokens need 17 K/V slots: 5 pages of 4, but the pool has 4 (16 slots).
    with pytest.raises(ValueError, match="needs 5 KV pages of 4 tokens, but the KV cache holds only 4 pages"):
        sched.add_request(request(1, [1] * 10, max_tokens=8))
    sched.add_request(request(1, [2] * 10, max_tokens=7))          # 16 slots: fits exactly
    with pytest.raises(ValueError, match="request id 1 is already queued or running"):
        sched.add_request(request(1, [2], max_tokens=1))
    assert sched.stats().num_waiting == 1
    with pytest.raises(ValueError, match="max_num_batched_tokens must be >= 1, got 0"):
        Scheduler(EngineConfig(max_num_batched_tokens=0), num_pages=4, eos_token_ids=[], max_model_len=8,
                  vocab_size=8)


def test_no_max_tokens_generates_up_to_the_context_length():
    rng = random.Random(21)
    sched = make_scheduler(num_pages=64, max_model_len=48)
    prompt = tokens(rng, 19)
    req = request(1, prompt, max_tokens=None, ignore_eos=True)
    run = drive(FakeEngine(sched), {0: [req]})
    assert req.max_tokens == 48 - 19
    assert len(run.tokens(1)) == 48 - 19 and run.finish_reason(1) is FinishReason.LENGTH
    check_drained(sched)


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_request_that_exactly_fills_the_pool_runs_to_completion(prefix_cache):
    rng = random.Random(16)
    sched = make_scheduler(num_pages=4, page_size=4, budget=5, prefix_cache=prefix_cache)
    engine = FakeEngine(sched)
    reqs = [request(1, tokens(rng, 10), max_tokens=7, ignore_eos=True),
            request(2, tokens(rng, 9), max_tokens=8, ignore_eos=True)]
    run = drive(engine, {0: reqs})
    assert sched.num_preemptions > 0
    assert_matches_reference(run, reqs)
    check_drained(sched)


def test_abort_frees_pages_at_once_whether_waiting_running_or_in_flight():
    rng = random.Random(17)
    sched = make_scheduler(num_pages=16, budget=64, max_running=1)
    engine = FakeEngine(sched)
    a, b = request(1, tokens(rng, 9), max_tokens=20), request(2, tokens(rng, 5), max_tokens=20)
    sched.add_request(a)
    sched.add_request(b)
    sched.postprocess(batch := sched.schedule(), engine.execute(batch))
    assert a.status is RequestStatus.RUNNING and b.status is RequestStatus.WAITING and sched.stats().kv_cache_usage > 0

    out = sched.abort(2)
    assert out.finish_reason is FinishReason.ABORT and out.new_token_ids == [] and b.finished
    assert sched.stats().num_waiting == 0 and sched.abort(2) is None and sched.abort(99) is None

    batch = sched.schedule()
    results = engine.execute(batch)
    out = sched.abort(1)                                           # between schedule and postprocess
    assert out.num_output_tokens == 1 and sched.stats().kv_cache_usage == 0.0 and not a.pages
    assert sched.postprocess(batch, results) == []                 # the in-flight result is dropped
    check_drained(sched)


def test_preemption_takes_the_most_recently_admitted_and_it_resumes_from_the_cache():
    rng = random.Random(18)
    # 11 pages: both fit until the newer needs its 6th page; the older needs no eviction to finish.
    sched = make_scheduler(num_pages=11, page_size=4, budget=16)
    older = request(1, tokens(rng, 8), max_tokens=14, ignore_eos=True)
    newer = request(2, tokens(rng, 8), max_tokens=14, ignore_eos=True)
    engine = FakeEngine(sched)
    sched.add_request(older)
    sched.add_request(newer)
    outputs: dict[int, list[int]] = {1: [], 2: []}
    newer_seqs_after_preemption = []
    while sched.has_unfinished():
        preempted_before = sched.num_preemptions
        batch = sched.schedule()
        check_invariants(sched, batch)
        if not older.finished:
            assert older.status is RequestStatus.RUNNING               # the earliest admitted is never preempted
        if sched.num_preemptions > preempted_before:
            assert newer.status is RequestStatus.WAITING and not newer.pages and sched.waiting[0] is newer
            assert len(newer.output_ids) > 0                          # it keeps what it generated
            computed_when_preempted = newer.num_tokens - 1
        if sched.num_preemptions:
            newer_seqs_after_preemption += [s for s in batch.seqs if s.request is newer]
        for out in sched.postprocess(batch, engine.execute(batch)):
            outputs[out.rid] += out.new_token_ids
    assert sched.num_preemptions >= 1
    # Its full pages stayed in the prefix cache, so it resumed after them instead of from scratch.
    assert newer_seqs_after_preemption[0].start == computed_when_preempted // 4 * 4 >= 16
    assert newer.num_cached_tokens == 0                                # what its first admission found
    for req in (older, newer):
        want, _ = reference_generate(req.prompt_ids, req.params, [], 4096, VOCAB)
        assert outputs[req.rid] == want
    check_drained(sched)


def test_by_priority_the_lowest_value_is_admitted_first_then_the_earliest():
    rng = random.Random(20)
    sched = make_scheduler(num_pages=64, page_size=4, max_running=1, policy="priority")
    reqs = [request(rid, tokens(rng, 5), priority=p, max_tokens=2, ignore_eos=True)
            for rid, p in enumerate([2, 0, 1, 0, -1])]
    run = drive(FakeEngine(sched), {0: reqs[:4], 1: reqs[4:]})
    first_steps = {rid: next(i for i, batch in enumerate(run.batches) if any(s[0] == rid for s in batch))
                   for rid in range(5)}
    # 1 runs first; 4 (-1) arrives while 1 runs and goes before 3 (0, earlier) and 2 and 0.
    assert sorted(first_steps, key=first_steps.get) == [1, 4, 3, 2, 0]
    fcfs = make_scheduler(num_pages=64, page_size=4, max_running=1)
    run = drive(FakeEngine(fcfs), {0: [request(r.rid, r.prompt_ids, priority=r.priority, max_tokens=2,
                                               ignore_eos=True) for r in reqs]})
    assert [batch[0][0] for batch in run.batches if batch][::2] == [0, 1, 2, 3, 4]   # priorities do not count


def test_by_priority_the_highest_value_is_preempted_even_when_admitted_first():
    rng = random.Random(21)
    # As in the fcfs test above, but the older request has the higher value: it gives its pages to the newer one,
    # admitted a step later, whose seq is scheduled after its own in the same step (the older one's seq is taken
    # out of it).
    sched = make_scheduler(num_pages=10, page_size=4, budget=16, policy="priority")
    older = request(1, tokens(rng, 8), priority=5, max_tokens=14, ignore_eos=True)
    newer = request(2, tokens(rng, 10), priority=0, max_tokens=14, ignore_eos=True)   # the first to need a page
    engine = FakeEngine(sched)
    sched.add_request(older)
    outputs: dict[int, list[int]] = {1: [], 2: []}
    added: set[int] = set()
    while sched.has_unfinished():
        if older.output_ids and newer.rid not in added:
            sched.add_request(newer)   # admitted after the older one: second in the running order
            added.add(newer.rid)
        preempted_before = sched.num_preemptions
        batch = sched.schedule()
        check_invariants(sched, batch)
        if newer.output_ids and not newer.finished:
            assert newer.status is RequestStatus.RUNNING               # the lower value is never preempted
        if sched.num_preemptions > preempted_before:
            assert older.status is RequestStatus.WAITING and not older.pages
            assert all(s.request is not older for s in batch.seqs) and older.num_in_flight == 0
        for out in sched.postprocess(batch, engine.execute(batch)):
            outputs[out.rid] += out.new_token_ids
    assert sched.num_preemptions >= 1
    for req in (older, newer):
        assert outputs[req.rid] == reference_generate(req.prompt_ids, req.params, [], 4096, VOCAB)[0]
    check_drained(sched)


def test_lru_eviction_through_the_scheduler():
    rng = random.Random(19)
    sched = make_scheduler(num_pages=8, page_size=4)
    engine = FakeEngine(sched)
    prompts = [tokens(rng, 9) for _ in range(3)]
    for i in range(3):                                             # three cached 2-page prefixes, finishing in order
        drive(engine, {0: [request(i, prompts[i], max_tokens=1)]})
    assert sched.pool.num_idle == 6 and sched.pool.num_free == 2
    drive(engine, {0: [request(3, tokens(rng, 12), max_tokens=1)]})  # 3 pages: evicts prompt 0's second page
    oldest = request(4, prompts[0], max_tokens=1)
    drive(engine, {0: [oldest]})                                   # 2 pages more: evicts both of prompt 1's
    newest, middle = request(5, prompts[2], max_tokens=1), request(6, prompts[1], max_tokens=1)
    drive(engine, {0: [newest]})
    drive(engine, {0: [middle]})
    assert (oldest.num_cached_tokens, newest.num_cached_tokens, middle.num_cached_tokens) == (4, 8, 0)
    check_drained(sched)


def test_postprocess_rejects_a_wrong_number_of_results():
    sched = make_scheduler(num_pages=8)
    sched.add_request(request(1, [1, 2, 3], max_tokens=2))
    batch = sched.schedule()
    with pytest.raises(ValueError, match="got 2 sample results for a batch that samples 1 tokens"):
        sched.postprocess(batch, [SampleResult(1), SampleResult(2)])


class CountingGrammar:
    """A TokenConstraint that allows every token and is complete after `length` of them."""

    def __init__(self, length: int) -> None:
        self.length, self.seen = length, []

    def fill_bitmask(self, address: int, num_bytes: int) -> None:
        raise AssertionError("the scheduler never fills masks")

    def advance(self, token_id: int) -> bool:
        self.seen.append(token_id)
        return len(self.seen) >= self.length


def test_postprocess_feeds_every_grammar_its_token_before_the_callback_and_finishes_requests_after():
    """The engine starts the next step's masks in the callback: every grammar must have seen its token by then."""
    sched = make_scheduler(num_pages=16)
    grammars = [CountingGrammar(1), CountingGrammar(5)]
    constrained = [request(i, [1, 2, 3], max_tokens=4) for i in range(2)]
    for req, grammar in zip(constrained, grammars):
        req.grammar = grammar
        sched.add_request(req)
    sched.add_request(free := request(2, [4, 5, 6], max_tokens=4))
    batch = sched.schedule()
    at_callback = []
    outputs = sched.postprocess(batch, [SampleResult(7), SampleResult(8), SampleResult(9)],
                                lambda: at_callback.append(([g.seen[:] for g in grammars],
                                                            [r.finished for r in constrained + [free]])))
    assert at_callback == [([[7], [8]], [False, False, False])]
    assert [(o.rid, o.new_token_ids, o.finish_reason) for o in outputs] == [
        (0, [7], FinishReason.STOP), (1, [8], FinishReason.NONE), (2, [9], FinishReason.NONE)]   # 0: grammar complete
    assert constrained[0].finished and not constrained[1].finished


class RefusingGrammar(CountingGrammar):
    """Refuses its `length`-th token, as llguidance does when it cannot go on (a lexer over its limits)."""

    def advance(self, token_id: int) -> bool:
        if super().advance(token_id):
            raise ValueError(f"the grammar refused token {token_id}: lexer error: too many expressions")
        return False


def test_a_grammar_that_cannot_go_on_fails_its_request_with_an_error_for_the_client():
    sched = make_scheduler(num_pages=16)
    failing = request(0, [1, 2, 3], max_tokens=8)
    failing.grammar = RefusingGrammar(2)
    sched.add_request(failing)
    sched.add_request(other := request(1, [4, 5, 6], max_tokens=8))
    first = sched.postprocess(sched.schedule(), [SampleResult(7), SampleResult(8)])
    assert [(o.rid, o.finish_reason, o.error) for o in first] == [(0, FinishReason.NONE, None),
                                                                 (1, FinishReason.NONE, None)]
    second = sched.postprocess(sched.schedule(), [SampleResult(9), SampleResult(10)])
    assert [(o.rid, o.finish_reason) for o in second] == [(0, FinishReason.ABORT), (1, FinishReason.NONE)]
    assert second[0].error.startswith("grammar: llguidance could not follow it after 1 output tokens (the grammar "
                                      "refused token 9: lexer error: too many expressions)")
    assert second[1].error is None and failing.finished and not other.finished
    assert sched.stats().num_running == 1   # its pages are free


def test_requests_arriving_together_with_one_prompt_share_its_pages():
    """n>1 choices arrive as n requests with the same prompt: the later ones wait one step and hit."""
    rng = random.Random(12)
    sched = make_scheduler(num_pages=64, page_size=4)
    engine = FakeEngine(sched)
    prompt = tokens(rng, 10)
    choices = [request(rid, prompt, max_tokens=5) for rid in (1, 2, 3)]
    other = request(4, tokens(rng, 6), max_tokens=5)
    run = drive(engine, {0: choices + [other]})
    assert run.batches[0] == [(1, 0, 10, True)]                     # the others wait for its pages
    assert [c.num_cached_tokens for c in choices] == [0, 8, 8]
    assert other.num_cached_tokens == 0
    assert_matches_reference(run, choices + [other])
    check_drained(sched)
