"""The scheduler's request and step metrics: what each histogram counts, and that times come from the arrival."""
from __future__ import annotations

import time

import pytest

from minisrv.scheduler.metrics import RequestMetrics
from minisrv.wire.terms import HISTOGRAM_OFFSETS
from minisrv.scheduler.request import RequestTimes
from minisrv.wire.terms import HISTOGRAM_INDEX, REQUEST_HISTOGRAMS, FinishReason
from tests.scheduler.sched_harness import FakeEngine, drive, make_scheduler, request


def count(metrics: RequestMetrics, name: str) -> int:
    i = HISTOGRAM_INDEX[name]
    return sum(metrics.counts[HISTOGRAM_OFFSETS[i] : HISTOGRAM_OFFSETS[i + 1]])


def total(metrics: RequestMetrics, name: str) -> float:
    return metrics.sums[HISTOGRAM_INDEX[name]]


def test_buckets_are_less_than_or_equal() -> None:
    m, i = RequestMetrics(), HISTOGRAM_INDEX["request_prompt_tokens"]
    spec = REQUEST_HISTOGRAMS[i]
    for value in (spec.buckets[0], spec.buckets[0] + 0.5, spec.buckets[-1] + 1):
        m.observe(i, value)
    counts = m.counts[HISTOGRAM_OFFSETS[i] : HISTOGRAM_OFFSETS[i + 1]]
    assert counts[0] == 1 and counts[1] == 1 and counts[-1] == 1 and sum(counts) == 3


@pytest.mark.parametrize("speculative", [0, 3], ids=["plain", "drafting"])
def test_a_run_counts_every_request_token_and_step(speculative: int) -> None:
    # Drafting: a vocabulary of 2 makes outputs repeat, so steps give several tokens (one latency each, as vLLM's).
    sched = make_scheduler(num_pages=64, budget=16, speculative=speculative, vocab_size=2 if speculative else 50)
    arrived = time.monotonic() - 2.0   # the API server got these two seconds ago
    reqs = [request(rid, [(t * 7) % sched.vocab_size for t in range(1, 3 + 5 * rid)], max_tokens=8 + rid,
                    ignore_eos=True) for rid in range(4)]
    for r in reqs:
        r.times = RequestTimes(arrived)
    run = drive(FakeEngine(sched), arrivals={0: reqs[:3], 2: reqs[3:]}, aborts={3: [3]})
    m = sched.metrics
    finished = [rid for rid in range(4) if run.finish_reason(rid) is not FinishReason.ABORT]
    generated = sum(len(run.tokens(rid)) for rid in range(4))
    first_tokens = sum(1 for rid in range(4) if run.tokens(rid))
    assert m.generation_tokens == generated and m.prompt_tokens == sum(r.num_prompt_tokens for r in reqs)
    assert m.finished == {FinishReason.STOP: 0, FinishReason.LENGTH: len(finished), FinishReason.ABORT: 1}
    assert count(m, "time_to_first_token_seconds") == first_tokens
    steps_with_tokens = sum(1 for rid in range(4) for out in run.outputs[rid] if out.new_token_ids)
    assert count(m, "inter_token_latency_seconds") == steps_with_tokens - first_tokens
    assert (steps_with_tokens < generated) == bool(speculative)
    assert count(m, "e2e_request_latency_seconds") == 4 == count(m, "request_generation_tokens")
    assert count(m, "request_queue_time_seconds") == 4   # each was scheduled before it finished
    # Latencies run from the API server's arrival: every one of them is at least the two seconds.
    assert total(m, "time_to_first_token_seconds") >= 2.0 * first_tokens
    assert total(m, "e2e_request_latency_seconds") >= 2.0 * 4
    assert total(m, "request_generation_tokens") == generated
    steps = [b for b in run.batches if b]
    assert count(m, "iteration_tokens_total") == len(steps)
    assert total(m, "iteration_tokens_total") == sum(n for b in steps for _, _, n, _ in b)
    stats = sched.stats()
    assert (stats.generation_tokens, stats.finished_length, stats.finished_abort) == (generated, len(finished), 1)


@pytest.mark.parametrize("name", [h.name for h in REQUEST_HISTOGRAMS])
def test_every_histogram_has_increasing_buckets(name: str) -> None:
    buckets = REQUEST_HISTOGRAMS[HISTOGRAM_INDEX[name]].buckets
    assert list(buckets) == sorted(set(buckets)) and buckets[0] > 0
