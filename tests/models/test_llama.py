"""Our Llama-family model == transformers' on equal random weights: prefill, chunked prefill, decode, mixed batches."""
from __future__ import annotations

import random

import pytest
import torch
from hf_tiny import TINY_CONFIGS, hf_logits, make_hf_model, make_loaded, make_request, make_runner, tiny_config

from minisrv.layers.forward_context import ForwardContext, forward_context
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq

ATOL = RTOL = 2e-5   # float32; observed differences are ~1e-6
SEQ_LEN = 40


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request):
    spec = tiny_config(request.param)
    return spec, make_hf_model(spec, seed=len(request.param))


def random_tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(97) for _ in range(n)]


def random_pages(rng: random.Random, num_pages: int, count: int) -> list[list[int]]:
    """`count` disjoint, shuffled page tables: a sequence's pages are in no particular order."""
    pool = list(range(num_pages))
    rng.shuffle(pool)
    per = num_pages // count
    return [pool[i * per:(i + 1) * per] for i in range(count)]


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_prefill_every_row_matches(pair, page_size):
    spec, hf = pair
    rng = random.Random(page_size)
    tokens = random_tokens(rng, 23)
    runner, _ = make_runner(make_loaded(spec, hf), page_size)
    request = make_request(0, tokens, random_pages(rng, runner.num_pages, 1)[0])
    step = runner.prepare(ScheduledBatch([ScheduledSeq(request, 0, len(tokens), True)]))
    with torch.inference_mode(), forward_context(ForwardContext(step.attn)):
        logits = runner.model.compute_logits(runner.model(step.input_ids, step.positions))
    torch.testing.assert_close(logits, hf_logits(hf, tokens), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_chunked_prefill_then_decode(pair, page_size):
    """Prefill in uneven chunks over a cached prefix, then decode the rest token by token (teacher-forced)."""
    spec, hf = pair
    rng = random.Random(100 + page_size)
    tokens = random_tokens(rng, SEQ_LEN)
    reference = hf_logits(hf, tokens)
    runner, sampler = make_runner(make_loaded(spec, hf), page_size)
    prompt_len = 19
    request = make_request(0, tokens[:prompt_len], random_pages(rng, runner.num_pages, 1)[0])
    for start, end in [(0, 5), (5, 6), (6, prompt_len)]:
        results = runner.execute(ScheduledBatch([ScheduledSeq(request, start, end - start, True)]))
        assert len(results) == 1
        torch.testing.assert_close(sampler.rows[0], reference[end - 1], atol=ATOL, rtol=RTOL)
    for pos in range(prompt_len, SEQ_LEN):
        request.output_ids.append(tokens[pos])   # the "sampled" token is the reference's next one
        seq = ScheduledSeq(request, pos, 1, True)
        assert seq.num_tokens == 1 and seq.start == request.num_tokens - 1   # a decode step
        runner.execute(ScheduledBatch([seq]))
        torch.testing.assert_close(sampler.rows[0], reference[pos], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_mixed_batches(pair, page_size):
    """Decodes, fresh prefills and chunks continuing a prefix, of different lengths, share each step."""
    spec, hf = pair
    rng = random.Random(200 + page_size)
    sequences = [random_tokens(rng, SEQ_LEN) for _ in range(4)]
    references = [hf_logits(hf, t) for t in sequences]
    runner, sampler = make_runner(make_loaded(spec, hf), page_size)
    tables = random_pages(rng, runner.num_pages, 4)
    requests = [make_request(i, t, p) for i, (t, p) in enumerate(zip(sequences, tables))]
    # Per step: (request index, start, num_tokens), in batch order; decodes deliberately interleaved.
    steps = [
        [(0, 0, 14), (1, 0, 6), (3, 0, 11)],
        [(1, 6, 9), (0, 14, 1), (2, 0, 9), (3, 11, 1)],
        [(2, 9, 1), (0, 15, 1), (1, 15, 1), (3, 12, 20)],
        [(3, 32, 1), (2, 10, 1), (1, 16, 12), (0, 16, 1)],
    ]
    for step in steps:
        sample = [rng.random() < 0.8 for _ in step]
        batch = ScheduledBatch([ScheduledSeq(requests[i], s, n, want) for (i, s, n), want in zip(step, sample)])
        results = runner.execute(batch)
        expected = [(i, s + n - 1) for (i, s, n), want in zip(step, sample) if want]
        assert len(results) == len(sampler.rows) == len(expected)
        for row, (i, pos) in zip(sampler.rows, expected):
            torch.testing.assert_close(row, references[i][pos], atol=ATOL, rtol=RTOL)


def test_bfloat16_tracks_float32(pair):
    spec, hf = pair
    rng = random.Random(7)
    tokens = random_tokens(rng, 12)
    runner, sampler = make_runner(make_loaded(spec, hf, dtype=torch.bfloat16), page_size=4)
    request = make_request(0, tokens, random_pages(rng, runner.num_pages, 1)[0])
    runner.execute(ScheduledBatch([ScheduledSeq(request, 0, len(tokens), True)]))
    reference = hf_logits(hf, tokens)[-1]
    assert sampler.rows[0].dtype == torch.float32
    assert (sampler.rows[0] - reference).abs().max() < 0.05 * reference.abs().max()
