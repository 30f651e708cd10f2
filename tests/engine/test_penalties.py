from __future__ import annotations

import collections
import random

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor

from minisrv.engine.penalties import apply_logit_adjustments, banned_stop_ids
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request

VOCAB = 300
EOS = [7, 11]


def make_request(rng: random.Random, rid: int, **params: object) -> Request:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randrange(1, 40))]
    # Few distinct output ids, so tokens repeat and counts exceed 1.
    output = [rng.randrange(0, VOCAB, 7) for _ in range(rng.randrange(0, 30))]
    return Request(rid=rid, prompt_ids=prompt, params=SamplingParams(**params), seed=rid, output_ids=output)


def random_logits(rows: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 4


def test_repetition_penalty_matches_transformers() -> None:
    rng = random.Random(0)
    penalties = [1.3, 0.7, 1.0, 2.0, 1.05, 0.5]
    requests = [make_request(rng, i, repetition_penalty=p) for i, p in enumerate(penalties)]
    logits = random_logits(len(requests), 1)
    adjusted = apply_logit_adjustments(logits, requests, EOS)
    for i, request in enumerate(requests):
        processor = RepetitionPenaltyLogitsProcessor(penalty=request.params.repetition_penalty)
        expected = processor(torch.tensor([request.token_ids]), logits[i : i + 1].clone())
        torch.testing.assert_close(adjusted[i : i + 1], expected, rtol=0, atol=0)


def test_presence_and_frequency_penalties_match_openai_formula() -> None:
    rng = random.Random(1)
    settings = [(0.5, 0.0), (0.0, 1.5), (-1.0, 0.7), (2.0, -2.0), (0.3, 0.3)]
    requests = [make_request(rng, i, presence_penalty=p, frequency_penalty=f) for i, (p, f) in enumerate(settings)]
    logits = random_logits(len(requests), 2)
    adjusted = apply_logit_adjustments(logits, requests, EOS)
    for i, request in enumerate(requests):
        expected = logits[i].clone()
        # OUTPUT tokens only: prompt tokens are not penalised by these two.
        for token, count in collections.Counter(request.output_ids).items():
            expected[token] -= request.params.frequency_penalty * count + request.params.presence_penalty
        torch.testing.assert_close(adjusted[i], expected, rtol=0, atol=1e-5)


def test_all_penalties_together_in_a_mixed_batch() -> None:
    rng = random.Random(2)
    requests = [
        make_request(rng, 0, repetition_penalty=1.2, presence_penalty=0.4, frequency_penalty=0.3),
        make_request(rng, 1),                                           # no penalties: row untouched
        make_request(rng, 2, repetition_penalty=0.8, frequency_penalty=-0.5),
        make_request(rng, 3, presence_penalty=1.0),
    ]
    logits = random_logits(len(requests), 3)
    original = logits.clone()
    adjusted = apply_logit_adjustments(logits, requests, EOS)
    torch.testing.assert_close(logits, original, rtol=0, atol=0)       # the input is never modified
    torch.testing.assert_close(adjusted[1], logits[1], rtol=0, atol=0)
    for i in (0, 2, 3):
        params = requests[i].params
        # vLLM's order: repetition (prompt + output), then frequency, then presence (output only).
        expected = RepetitionPenaltyLogitsProcessor(penalty=params.repetition_penalty)(
            torch.tensor([requests[i].token_ids]), logits[i : i + 1].clone())[0]
        for token, count in collections.Counter(requests[i].output_ids).items():
            expected[token] = expected[token] - params.frequency_penalty * count - params.presence_penalty
        torch.testing.assert_close(adjusted[i], expected, rtol=0, atol=1e-5)


def test_no_adjustment_returns_the_input_itself() -> None:
    rng = random.Random(3)
    requests = [make_request(rng, i, temperature=0.5) for i in range(3)]
    logits = random_logits(3, 4)
    assert apply_logit_adjustments(logits, requests, EOS) is logits


def test_min_tokens_bans_eos_and_stop_ids_until_reached() -> None:
    rng = random.Random(4)
    short = make_request(rng, 0, min_tokens=5, max_tokens=10, stop_token_ids=[42, 43])
    short.output_ids = [1, 2]
    reached = make_request(rng, 1, min_tokens=2, max_tokens=10, stop_token_ids=[42])
    reached.output_ids = [1, 2]
    ignoring_eos = make_request(rng, 2, min_tokens=5, max_tokens=10, stop_token_ids=[99], ignore_eos=True)
    ignoring_eos.output_ids = [3]
    requests = [short, reached, ignoring_eos]
    logits = random_logits(3, 5)
    adjusted = apply_logit_adjustments(logits, requests, EOS)

    assert sorted(banned_stop_ids(short, EOS, 2)) == [7, 11, 42, 43]
    assert banned_stop_ids(reached, EOS, 2) == []
    assert banned_stop_ids(ignoring_eos, EOS, 1) == [99]
    # The ban follows the position the token will take, not what is recorded so far (overlap scheduling).
    assert banned_stop_ids(short, EOS, 5) == [] and banned_stop_ids(reached, EOS, 1) == [7, 11, 42]
    for row, request in enumerate(requests):
        banned = set(banned_stop_ids(request, EOS, len(request.output_ids)))
        for token in range(VOCAB):
            if token in banned:
                assert adjusted[row, token] == float("-inf")
            else:
                assert adjusted[row, token] == logits[row, token]


def test_min_tokens_ban_survives_penalties() -> None:
    rng = random.Random(5)
    request = make_request(rng, 0, min_tokens=3, max_tokens=8, repetition_penalty=1.5, frequency_penalty=-2.0)
    request.output_ids = [EOS[0]]          # EOS seen in the output: a negative frequency penalty raises it
    adjusted = apply_logit_adjustments(random_logits(1, 6), [request], EOS)
    assert adjusted[0, EOS[0]] == float("-inf") and adjusted[0, EOS[1]] == float("-inf")


def test_token_id_outside_vocabulary_is_a_clear_error() -> None:
    rng = random.Random(6)
    request = make_request(rng, 17, min_tokens=2, max_tokens=4, stop_token_ids=[VOCAB + 5])
    request.output_ids = []
    with pytest.raises(ValueError, match=r"request 17: stop_token_ids .* outside \[0, 300\)"):
        apply_logit_adjustments(random_logits(1, 7), [request], EOS)


def test_logit_bias_adds_to_its_tokens_after_bans_and_before_penalties() -> None:
    rng = random.Random(21)
    plain = make_request(rng, 0, max_tokens=10)
    biased = make_request(rng, 1, max_tokens=10, logit_bias={5: 2.5, 9: -100.0, 42: 1.0})
    both = make_request(rng, 2, max_tokens=10, min_tokens=3, stop_token_ids=[42], logit_bias={42: 50.0, 6: 3.0},
                        repetition_penalty=1.5)
    both.output_ids = [6]
    logits = random_logits(3, 8)
    adjusted = apply_logit_adjustments(logits, [plain, biased, both], EOS)
    torch.testing.assert_close(adjusted[0], logits[0])
    expected = logits[1].clone()
    expected[[5, 9, 42]] += torch.tensor([2.5, -100.0, 1.0])
    torch.testing.assert_close(adjusted[1], expected)
    assert adjusted[2, 42] == float("-inf")             # min_tokens' ban wins over any bias
    raised = logits[2, 6] + 3.0                         # bias first, then the repetition penalty on the result
    assert adjusted[2, 6] == (raised / 1.5 if raised > 0 else raised * 1.5)
