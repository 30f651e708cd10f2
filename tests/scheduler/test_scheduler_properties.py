"""Random workloads under tiny pools and budgets: no leaks, no double use, same tokens as an unconstrained run."""
from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sched_harness import FakeEngine, check_drained, drive, make_scheduler, reference_generate, request

from minisrv.scheduler.kv_pages import pages_for_tokens
from minisrv.scheduler.request import FinishReason, Request

VOCAB = 12
EOS = (0,)


@dataclass
class Workload:
    page_size: int
    num_pages: int
    budget: int
    max_running: int
    prefix_cache: bool
    max_model_len: int
    arrivals: dict[int, list[Request]]
    aborts: dict[int, list[int]]
    policy: str
    speculative: int   # n-gram drafts of up to this many tokens (0: none)


@st.composite
def workloads(draw) -> Workload:
    token = st.integers(1, VOCAB - 1)          # prompts without EOS; outputs hit it now and then
    # Prompts share stems so that prefix-cache hits, duplicates and evictions all happen.
    stems = draw(st.lists(st.lists(token, min_size=1, max_size=14), min_size=1, max_size=2))
    page_size = draw(st.sampled_from([1, 2, 3, 4]))
    reqs, arrivals, aborts = [], {}, {}
    for rid in range(draw(st.integers(1, 8))):
        stem = draw(st.sampled_from(stems))
        cut = draw(st.one_of(st.just(len(stem)), st.integers(0, len(stem))))
        prompt = stem[:cut] + draw(st.lists(token, min_size=1, max_size=6))
        max_tokens = draw(st.integers(1, 10))
        req = request(rid, prompt, priority=draw(st.integers(-2, 2)), max_tokens=max_tokens,
                      min_tokens=draw(st.integers(0, max_tokens)), ignore_eos=draw(st.booleans()),
                      stop_token_ids=draw(st.lists(token, max_size=1)))
        reqs.append(req)
        arrivals.setdefault(draw(st.integers(0, 4)), []).append(req)
        if draw(st.integers(0, 4)) == 0:
            aborts.setdefault(draw(st.integers(0, 14)), []).append(rid)
    biggest = max(pages_for_tokens(r.num_prompt_tokens + r.params.max_tokens - 1, page_size) for r in reqs)
    longest = max(r.num_prompt_tokens + r.params.max_tokens for r in reqs)
    return Workload(page_size=page_size, num_pages=draw(st.integers(biggest, biggest + 8)),
                    budget=draw(st.integers(1, 24)), max_running=draw(st.integers(1, 6)),
                    prefix_cache=draw(st.booleans()), max_model_len=longest + draw(st.integers(0, 3)),
                    arrivals=arrivals, aborts=aborts, policy=draw(st.sampled_from(["fcfs", "priority"])),
                    speculative=draw(st.sampled_from([0, 1, 3])))


@settings(max_examples=400, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=workloads())
def test_random_workloads_match_an_unconstrained_run(work: Workload):
    sched = make_scheduler(num_pages=work.num_pages, page_size=work.page_size, budget=work.budget,
                           max_running=work.max_running, prefix_cache=work.prefix_cache, eos=EOS,
                           max_model_len=work.max_model_len, vocab_size=VOCAB, policy=work.policy,
                           speculative=work.speculative)
    reqs = [r for batch in work.arrivals.values() for r in batch]
    # drive() checks after every step: pages in exactly one place, refcounts = holders, budget kept.
    run = drive(FakeEngine(sched), work.arrivals, work.aborts)
    check_drained(sched)
    for req in reqs:
        want, reason = reference_generate(req.prompt_ids, req.params, list(EOS), work.max_model_len, VOCAB)
        got = run.tokens(req.rid)
        if run.finish_reason(req.rid) is FinishReason.ABORT:
            assert got == want[:len(got)] and len(got) < len(want)
        else:
            assert (got, run.finish_reason(req.rid)) == (want, reason)
        assert sum(o.finished for o in run.outputs[req.rid]) == 1


@settings(max_examples=120, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(work=workloads())
def test_shortage_of_pages_or_budget_does_not_change_results(work: Workload):
    """The same workload with a roomy pool and budget gives the same tokens, step timing aside."""
    outcomes = []
    for num_pages, budget in [(work.num_pages, work.budget), (256, 4096)]:  # 256 pages hold them all
        sched = make_scheduler(num_pages=num_pages, page_size=work.page_size, budget=budget,
                               max_running=64, prefix_cache=work.prefix_cache, eos=EOS,
                               max_model_len=work.max_model_len, vocab_size=VOCAB, policy=work.policy,
                               speculative=work.speculative)
        fresh = {step: [Request(rid=r.rid, prompt_ids=list(r.prompt_ids), params=r.params, seed=r.seed,
                                priority=r.priority) for r in batch] for step, batch in work.arrivals.items()}
        run = drive(FakeEngine(sched), fresh)
        check_drained(sched)
        assert num_pages < 256 or sched.num_preemptions == 0
        outcomes.append({rid: (run.tokens(rid), run.finish_reason(rid)) for rid in run.outputs})
    assert outcomes[0] == outcomes[1]
