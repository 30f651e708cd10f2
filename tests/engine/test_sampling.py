from __future__ import annotations

import math
import random

import pytest
import torch

from minisrv.engine.sampling import Sampler, _apply_top_k_top_p
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request

VOCAB = 64
PADDED_VOCAB = 72
EOS = [3]
NUM_DRAWS = 20_000
# Total-variation bound for NUM_DRAWS draws: the expected distance is below 0.02 for these supports.
MAX_TOTAL_VARIATION = 0.035


def fixed_logits(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, generator=generator) * 2.5


def reference_distribution(logits: torch.Tensor, temperature: float = 1.0, top_k: int = -1, top_p: float = 1.0,
                           min_p: float = 0.0) -> torch.Tensor:
    """vLLM V1's sampling distribution written plainly, in float64: temperature, min-p, top-k, top-p."""
    scaled = logits.double() / temperature
    if min_p > 0:
        probs = scaled.softmax(-1)
        scaled = scaled.masked_fill(probs < min_p * probs.max(), -math.inf)
    if top_k > 0:
        kth_largest = scaled.sort(descending=True).values[top_k - 1]
        scaled = scaled.masked_fill(scaled < kth_largest, -math.inf)
    if top_p < 1.0:
        descending = scaled.sort(descending=True).values
        mass_before = descending.softmax(-1).cumsum(-1) - descending.softmax(-1)
        last_kept = descending[(mass_before < top_p).sum() - 1]
        scaled = scaled.masked_fill(scaled < last_kept, -math.inf)
    return scaled.softmax(-1)


def make_requests(count: int, seed_base: int = 0, position: int = 0, **params: object) -> list[Request]:
    sampling_params = SamplingParams(**params)
    return [Request(rid=i, prompt_ids=[5, 9], params=sampling_params, seed=seed_base + i,
                    output_ids=[8] * position) for i in range(count)]


def draw_tokens(logits_row: torch.Tensor, **params: object) -> torch.Tensor:
    """NUM_DRAWS samples of one logits row: one batch of identical rows, each with its own seed."""
    padded = torch.full((NUM_DRAWS, PADDED_VOCAB), 50.0)   # a padded vocabulary's junk must never win
    padded[:, :VOCAB] = logits_row
    results = Sampler(VOCAB, EOS)(padded, make_requests(NUM_DRAWS, **params))
    return torch.tensor([r.token_id for r in results])


def assert_matches(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    empirical = torch.bincount(tokens, minlength=VOCAB).double() / len(tokens)
    outside_support = empirical[expected == 0].sum().item()
    assert outside_support == 0.0, f"sampled filtered tokens {torch.nonzero(empirical * (expected == 0)).tolist()}"
    total_variation = 0.5 * (empirical - expected).abs().sum().item()
    assert total_variation < MAX_TOTAL_VARIATION, f"total variation {total_variation:.4f}"


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.7])
def test_temperature_distribution(temperature: float) -> None:
    logits = fixed_logits(1)
    assert_matches(draw_tokens(logits, temperature=temperature), reference_distribution(logits, temperature))


@pytest.mark.parametrize("top_k", [1, 5, 20])
def test_top_k_distribution(top_k: int) -> None:
    logits = fixed_logits(2)
    expected = reference_distribution(logits, 0.9, top_k=top_k)
    assert int((expected > 0).sum()) == top_k
    assert_matches(draw_tokens(logits, temperature=0.9, top_k=top_k), expected)


@pytest.mark.parametrize("top_p", [0.3, 0.8, 0.95])
def test_top_p_distribution(top_p: float) -> None:
    logits = fixed_logits(3)
    assert_matches(draw_tokens(logits, temperature=1.2, top_p=top_p), reference_distribution(logits, 1.2, top_p=top_p))


@pytest.mark.parametrize("min_p", [0.05, 0.3])
def test_min_p_distribution(min_p: float) -> None:
    logits = fixed_logits(4)
    assert_matches(draw_tokens(logits, temperature=0.8, min_p=min_p), reference_distribution(logits, 0.8, min_p=min_p))


def test_min_p_top_k_top_p_together_in_vllm_order() -> None:
    logits = fixed_logits(5)
    params = dict(temperature=1.3, top_k=12, top_p=0.7, min_p=0.02)
    expected = reference_distribution(logits, **params)
    # The order matters for these values: top-p over all tokens would keep a different set.
    assert not torch.equal(expected > 0, reference_distribution(logits, 1.3, top_p=0.7) > 0)
    assert_matches(draw_tokens(logits, **params), expected)


def test_top_k_keeps_ties_at_the_cut() -> None:
    logits = fixed_logits(6)
    logits[[10, 20, 30]] = logits.max() + 1.0                 # three tokens tie for first place
    tokens = draw_tokens(logits, temperature=1.0, top_k=1)
    assert set(tokens.tolist()) == {10, 20, 30}


def test_greedy_is_argmax_of_penalised_logits_and_ignores_padding() -> None:
    rows = 6
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(rows, PADDED_VOCAB, generator=generator)
    logits[:, VOCAB:] = 100.0
    requests = make_requests(rows, temperature=0.0, top_k=3, top_p=0.5)
    requests[0].params = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    requests[0].output_ids = [int(logits[0, :VOCAB].argmax())]   # a strong penalty on the raw winner
    penalised = logits[0, :VOCAB].clone()
    winner = requests[0].output_ids[0]
    penalised[winner] = penalised[winner] / 2.0 if penalised[winner] > 0 else penalised[winner] * 2.0
    results = Sampler(VOCAB, EOS)(logits, requests)
    assert results[0].token_id == int(penalised.argmax())
    assert [r.token_id for r in results[1:]] == logits[1:, :VOCAB].argmax(-1).tolist()
    assert all(r.logprob is None and r.top_ids == [] for r in results)


@pytest.mark.parametrize("vocab", [VOCAB, 49152])
def test_seeded_rows_do_not_depend_on_batch_or_order(vocab: int) -> None:
    # 49152 (SmolLM2's vocabulary): big rows take other code paths (threads, wider top-p searches).
    rng = random.Random(8)
    generator = torch.Generator().manual_seed(8)
    kinds = [dict(temperature=1.0), dict(temperature=0.7, top_p=0.9), dict(temperature=1.1, top_k=7),
             dict(temperature=0.9, min_p=0.1, top_k=20, top_p=0.8), dict(temperature=0.0),
             dict(temperature=1.0, repetition_penalty=1.3, presence_penalty=0.5, logprobs=2)]
    requests = []
    for i in range(24):
        params = SamplingParams(**kinds[i % len(kinds)])
        requests.append(Request(rid=i, prompt_ids=[rng.randrange(vocab) for _ in range(5)], params=params,
                                seed=rng.randrange(2**63), output_ids=[rng.randrange(vocab) for _ in range(i % 4)]))
    logits = torch.randn(len(requests), vocab, generator=generator) * 2
    sampler = Sampler(vocab, EOS)
    alone = [sampler(logits[i : i + 1], [r])[0].token_id for i, r in enumerate(requests)]

    together = [r.token_id for r in sampler(logits, requests)]
    assert together == alone
    order = list(range(len(requests)))
    rng.shuffle(order)
    strangers = make_requests(10, seed_base=999, temperature=0.8, top_p=0.5)
    mixed_logits = torch.cat([logits[order], torch.randn(10, vocab, generator=generator)])
    shuffled = sampler(mixed_logits, [requests[i] for i in order] + strangers)
    assert [shuffled[j].token_id for j in range(len(order))] == [alone[i] for i in order]


def test_seed_and_position_key_the_draw() -> None:
    logits = fixed_logits(9).expand(200, VOCAB)
    sampler = Sampler(VOCAB, EOS)

    def tokens(seed_base: int, position: int) -> list[int]:
        return [r.token_id for r in sampler(logits, make_requests(200, seed_base, position, temperature=2.0))]

    assert tokens(0, 0) == tokens(0, 0)
    assert tokens(0, 0) != tokens(1000, 0)
    assert tokens(0, 0) != tokens(0, 1)


def test_logprobs_come_from_raw_logits() -> None:
    generator = torch.Generator().manual_seed(10)
    logits = torch.randn(4, PADDED_VOCAB, generator=generator) * 3
    logits[:, VOCAB:] = 40.0
    requests = [
        Request(rid=0, prompt_ids=[1], params=SamplingParams(temperature=0.0, logprobs=5), seed=1),
        Request(rid=1, prompt_ids=[1], params=SamplingParams(temperature=0.6, top_k=3, logprobs=20), seed=2),
        Request(rid=2, prompt_ids=[1, 2], params=SamplingParams(temperature=1.0), seed=3),
        Request(rid=3, prompt_ids=[1, 2], params=SamplingParams(temperature=1.0, logprobs=0,
                                                                repetition_penalty=1.8), seed=4, output_ids=[2]),
    ]
    results = Sampler(VOCAB, EOS)(logits, requests)
    expected = torch.log_softmax(logits[:, :VOCAB], dim=-1)
    for row in (0, 1, 3):
        n = requests[row].params.logprobs
        result = results[row]
        assert result.logprob == pytest.approx(expected[row, result.token_id].item(), abs=1e-6)
        top = expected[row].topk(n) if n else None
        assert result.top_ids == (top.indices.tolist() if n else [])
        assert result.top_logprobs == pytest.approx(top.values.tolist() if n else [], abs=1e-6)
    assert results[2].logprob is None and results[2].top_ids == [] and results[2].top_logprobs == []


def test_top_p_candidate_search_widens_to_the_exact_nucleus() -> None:
    # Few candidates force the widening passes; the result must equal a full-sort reference.
    vocab, rows = 1000, 40
    generator = torch.Generator().manual_seed(11)
    logits = torch.randn(rows, vocab, generator=generator) * torch.linspace(0.2, 4.0, rows)[:, None]
    top_p = torch.rand(rows, generator=generator) * 0.9 + 0.05
    top_k = torch.where(torch.arange(rows) % 3 == 0, torch.randint(1, vocab, (rows,), generator=generator), vocab)
    masked = logits.clone()
    _apply_top_k_top_p(masked, top_k, top_p, num_candidates=4)
    checked = 0
    for row in range(rows):
        k = int(top_k[row]) if top_k[row] < vocab else -1
        expected = reference_distribution(logits[row], 1.0, top_k=k, top_p=float(top_p[row]))
        # Skip rows whose nucleus boundary sits within float32 rounding of top_p: either answer is right.
        descending = expected.sort(descending=True).values
        if (descending.cumsum(-1) - float(top_p[row])).abs().min() < 1e-5:
            continue
        checked += 1
        assert torch.equal(torch.isfinite(masked[row]), expected > 0), f"row {row}"
    assert checked >= rows - 2


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="eos_token_ids"):
        Sampler(VOCAB, [VOCAB])
    sampler = Sampler(VOCAB, EOS)
    with pytest.raises(ValueError, match="logits must be"):
        sampler(torch.randn(2, VOCAB - 1), make_requests(2))
    with pytest.raises(ValueError, match="logits must be"):
        sampler(torch.randn(3, VOCAB), make_requests(2))
    assert sampler(torch.randn(0, VOCAB), []) == []


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_nan_logits_are_never_chosen(temperature: float) -> None:
    """A NaN logit counts as -inf: the row chooses among its other tokens, and a row of only NaN still gets a
    token id in the vocabulary (greedy, the first); rows without NaN choose as they would alone."""
    logits = torch.stack([fixed_logits(seed) for seed in range(4)])
    clean = logits.clone()
    logits[0, logits[0].argmax()] = math.nan       # the row's best token becomes NaN
    logits[1] = math.nan
    requests = make_requests(4, temperature=temperature, ignore_eos=True)
    tokens = [r.token_id for r in Sampler(VOCAB, EOS)(logits, requests)]
    assert tokens[0] != int(clean[0].argmax()) and not math.isnan(logits[0, tokens[0]])
    if temperature == 0.0:
        assert tokens[0] == int(clean[0].where(~logits[0].isnan(), -math.inf).argmax())
        assert tokens[1] == 0
        assert tokens[2:] == [int(row.argmax()) for row in clean[2:]]
    else:
        assert 0 <= tokens[1] < VOCAB
        alone = [r.token_id for r in Sampler(VOCAB, EOS)(clean[2:], make_requests(4, temperature=1.0,
                                                                                 ignore_eos=True)[2:])]
        assert tokens[2:] == alone
