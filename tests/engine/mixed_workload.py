"""A workload that exercises every way a request ends, for comparing engine modes token for token.

Greedy and seeded sampled requests, n > 1 (one prompt, several seeds), max_tokens of 1, a stop token that
fires mid-stream, min_tokens holding off EOS, penalties (the overlap loop must wait for recorded tokens),
logprobs, and an abort once a request has streamed a few tokens.
"""
from __future__ import annotations

import random

from minisrv.engine.llm_engine import LLMEngine
from minisrv.sampling_params import SamplingParams

ABORTED_RID = 7
ABORT_AFTER_TOKENS = 4


def mixed_requests(vocab_size: int, seed: int, stop_token: int | None = None,
                   prompt_lens: tuple[int, ...] = (5, 40, 17, 3, 64, 9, 33, 12)) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(4, vocab_size) for _ in range(n)] for n in prompt_lens]
    shared = prompts[1]
    return [
        (prompts[0], SamplingParams(temperature=0.0, max_tokens=24,
                                    stop_token_ids=[stop_token] if stop_token is not None else [])),
        (shared, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=11, max_tokens=20)),
        (shared, SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=12, max_tokens=20)),
        (shared, SamplingParams(temperature=1.0, seed=13, max_tokens=20, logprobs=3)),
        (prompts[2], SamplingParams(temperature=0.0, max_tokens=1)),
        (prompts[3], SamplingParams(temperature=0.0, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.5)),
        (prompts[4], SamplingParams(temperature=0.7, seed=5, max_tokens=30, min_tokens=12)),
        (prompts[5], SamplingParams(temperature=0.0, max_tokens=30)),                 # ABORTED_RID
        (prompts[6], SamplingParams(temperature=0.0, max_tokens=2)),
        (prompts[7], SamplingParams(temperature=0.0, max_tokens=27, logprobs=0)),
    ]


def generate(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams]], stagger: int = 2
             ) -> dict[int, tuple[list[int], str, list[float | None]]]:
    """Run to completion: requests join `stagger` at a time per step; ABORTED_RID is aborted as soon as it has
    ABORT_AFTER_TOKENS tokens. rid -> (tokens, finish reason, logprobs)."""
    tokens: dict[int, list[int]] = {rid: [] for rid in range(len(requests))}
    logprobs: dict[int, list[float | None]] = {rid: [] for rid in range(len(requests))}
    finish: dict[int, str] = {}
    pending = list(enumerate(requests))
    while pending or engine.has_unfinished():
        for rid, (prompt, params) in pending[:stagger]:
            engine.add_request(rid, prompt, params)
        pending = pending[stagger:]
        outputs = engine.step()
        if len(tokens[ABORTED_RID]) + sum(len(o.new_token_ids) for o in outputs if o.rid == ABORTED_RID) \
                >= ABORT_AFTER_TOKENS and ABORTED_RID not in finish:
            aborted = engine.abort(ABORTED_RID)
            if aborted is not None:
                outputs.append(aborted)
        for out in outputs:
            tokens[out.rid] += out.new_token_ids
            logprobs[out.rid] += [s.logprob for s in out.new_samples]
            if out.finished:
                finish[out.rid] = out.finish_reason.api_name
    return {rid: (tokens[rid], finish[rid], logprobs[rid]) for rid in tokens}


def assert_same_outputs(got: dict, want: dict, logprob_tolerance: float) -> None:
    """Tokens and finish reasons equal; logprobs within tolerance (batch shapes change float sums' order)."""
    assert {rid: out[:2] for rid, out in got.items()} == {rid: out[:2] for rid, out in want.items()}
    for rid, (_, _, logprobs) in want.items():
        assert [lp is None for lp in got[rid][2]] == [lp is None for lp in logprobs]
        assert all(abs(a - b) <= logprob_tolerance for a, b in zip(got[rid][2], logprobs) if b is not None), rid
