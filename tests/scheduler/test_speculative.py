"""The scheduler's side of speculative decoding: which requests get drafts, which samples it keeps, and where a
request resumes after a draft went wrong."""
from __future__ import annotations

from sched_harness import (FakeEngine, check_drained, check_invariants, drive, make_scheduler, reference_generate,
                           request)

from minisrv.scheduler.request import FinishReason, SampleResult

PROMPT = [1, 2, 3, 4, 1, 2, 3]   # its suffix "1 2 3" occurred before, followed by 4 1 2 3


def started(sched, req):
    """Admit `req` and record its first token (4, which the prompt's pattern predicts)."""
    sched.add_request(req)
    batch = sched.schedule()
    sched.postprocess(batch, [SampleResult(4)])
    return req


def samples(*token_ids):
    return [SampleResult(t) for t in token_ids]


def test_a_decode_step_carries_the_tokens_that_followed_the_suffix_and_keeps_the_samples_that_agree():
    sched = make_scheduler(num_pages=16, speculative=3)
    req = started(sched, request(1, PROMPT, max_tokens=20))
    batch = sched.schedule()
    (seq,) = batch.seqs
    # after "... 1 2 3 4", the suffix "2 3 4" occurred at the start, followed by 1 2 3
    assert (seq.start, seq.num_tokens, seq.draft_ids, seq.num_samples) == (7, 4, [1, 2, 3], 4)
    assert req.num_computed == 11 and req.num_in_flight == 4
    # the model agrees with 1 and 2, then samples 9 after 2 (not the drafted 3): the sample after 3 is dropped
    (out,) = sched.postprocess(batch, samples(1, 2, 9, 5))
    assert out.new_token_ids == [1, 2, 9] and out.num_output_tokens == 4
    assert req.output_ids == [4, 1, 2, 9] and req.num_in_flight == 0
    # K/V holds up to the last right draft (position 9); the next step computes 9 (the token at 10 is new)
    assert req.num_computed == 10
    (seq,) = sched.schedule().seqs
    assert seq.start == 10 and seq.draft_ids == []   # "2 9" never occurred before
    assert (sched.num_drafts, sched.num_draft_tokens, sched.num_accepted_tokens) == (1, 3, 2)
    check_invariants(sched)


def test_a_token_that_finishes_the_request_drops_the_rest():
    sched = make_scheduler(num_pages=16, speculative=3, eos=(2,))
    req = started(sched, request(1, PROMPT, max_tokens=20))
    batch = sched.schedule()
    (out,) = sched.postprocess(batch, samples(1, 2, 3, 4))   # all agree, but 2 is the end of sequence
    assert out.new_token_ids == [1, 2] and out.finish_reason is FinishReason.STOP
    assert req.output_ids == [4, 1, 2]
    check_drained(sched)


def test_drafts_never_overrun_max_tokens():
    # (add_request keeps the prompt and max_tokens within the context, so this bounds positions too)
    sched = make_scheduler(num_pages=16, speculative=4)
    req = started(sched, request(1, PROMPT, max_tokens=3))
    (seq,) = sched.schedule().seqs
    assert seq.draft_ids == [1]   # one token left after the one sampled from the newest
    assert req.num_computed == 9 and req.num_output_tokens == 3


def test_requests_whose_sampling_reads_their_output_get_no_drafts():
    for params in (dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(frequency_penalty=0.1)):
        sched = make_scheduler(num_pages=16, speculative=3)
        started(sched, request(1, PROMPT, max_tokens=20, **params))
        assert sched.schedule().seqs[0].draft_ids == []


def test_drafts_leave_every_running_request_a_token_of_the_budget():
    sched = make_scheduler(num_pages=32, speculative=8, budget=6)
    for rid, prompt in ((1, [1, 2, 3, 4, 5, 6, 7, 1, 2]), (2, [7]), (3, [8])):
        sched.add_request(request(rid, prompt, max_tokens=20))
    sched.postprocess(sched.schedule(), [])                   # the first 6 tokens of request 1
    sched.postprocess(sched.schedule(), samples(3, 5, 6))     # its last 3, and the other two
    batch = sched.schedule()
    # request 1 could draft 4 5 6 7 1 2 3, but the other two need a token each
    assert [(s.request.rid, s.draft_ids) for s in batch.seqs] == [(1, [4, 5, 6]), (2, []), (3, [])]
    assert batch.num_tokens == 6


def test_drafts_take_free_pages_only_never_cached_ones():
    sched = make_scheduler(num_pages=4, page_size=4, speculative=4)
    # a finished request leaves an idle cached page; then only it and the request's own page are left
    other = request(9, [5, 5, 5, 5, 6], max_tokens=1)
    sched.add_request(other)
    sched.postprocess(sched.schedule(), [SampleResult(0)])
    assert sched.pool.num_idle == 1
    req = started(sched, request(1, PROMPT, max_tokens=8))
    assert len(req.pages) == 2 and sched.pool.num_free == 1
    (seq,) = sched.schedule().seqs   # positions 7..11 need a third page: the free one, not the cached one
    assert seq.draft_ids == [1, 2, 3, 4] and sched.pool.num_idle == 1


def test_workloads_that_repeat_themselves_give_the_reference_tokens_in_fewer_steps():
    # A vocabulary of 2 makes the fake model's output repeat, so drafts are often right.
    steps = {}
    for speculative in (0, 2, 5):
        sched = make_scheduler(num_pages=64, page_size=2, budget=32, vocab_size=2, speculative=speculative)
        reqs = [request(rid, [rid % 2, 1, 0, 0, 1] * 2, max_tokens=30) for rid in range(4)]
        run = drive(FakeEngine(sched), {0: reqs[:2], 3: reqs[2:]})
        check_drained(sched)
        for req in reqs:
            assert run.tokens(req.rid) == reference_generate(req.prompt_ids, req.params, [], 4096, 2)[0]
        assert (sched.num_accepted_tokens > 20) == bool(speculative)
        steps[speculative] = len(run.batches)
    assert max(steps[2], steps[5]) < steps[0]
