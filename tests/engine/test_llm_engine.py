"""The whole engine on the embedded model: greedy output token-identical to transformers' generate."""
from __future__ import annotations

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.llm import LLM
from minisrv.sampling_params import SamplingParams

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "List three primary colors:",
    "Translate to French: I like apples.",
    "The quick brown fox",
    "In 1969, the first humans landed on the Moon. The mission was called Apollo 11 and its crew "
    "consisted of three astronauts. Their names were",
    "Q: What is 12 times 12?\nA:",
]
MAX_TOKENS = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(dtype="float32", quantization="none")   # as transformers multiplies them (default: int4, maybe bfloat16)


@pytest.fixture(scope="module")
def prompt_ids(llm: LLM) -> list[list[int]]:
    return [llm.tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf(llm: LLM):
    """transformers' own Llama on the very weights our loader converted."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llm.source.path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference(hf, prompt_ids: list[list[int]]) -> list[list[int]]:
    """transformers' greedy output, one prompt at a time."""
    # Like our ignore_eos: generate past EOS without masking it (min_new_tokens would mask it).
    hf.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            y = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_TOKENS,
                            do_sample=False, pad_token_id=0)
            outs.append(y[0, len(ids):].tolist())
    return outs


def _engine(llm: LLM, **overrides) -> LLM:
    """An LLM on the already-loaded weights with other engine settings."""
    clone = object.__new__(LLM)
    clone.config = EngineConfig(**overrides)
    clone.engine = LLMEngine(clone.config, loaded=llm.engine.loaded)
    clone.tokenizer = llm.tokenizer
    clone._next_rid = 0
    return clone


def test_one_at_a_time(llm: LLM, prompt_ids: list[list[int]], reference: list[list[int]]) -> None:
    for ids, ref in zip(prompt_ids, reference):
        assert llm.generate([ids], GREEDY)[0].token_ids == ref


def test_one_batch_of_mixed_lengths(llm: LLM, prompt_ids: list[list[int]], reference: list[list[int]]) -> None:
    outs = _engine(llm).generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert all(o.finish_reason == "length" for o in outs)


def test_prefix_cache_hits(llm: LLM, prompt_ids: list[list[int]], reference: list[list[int]]) -> None:
    engine = _engine(llm, page_size=4)
    first = engine.generate(prompt_ids, GREEDY)
    again = engine.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in first] == reference
    assert [o.token_ids for o in again] == reference
    # Every prompt's full pages were cached by the first pass (the last token is always recomputed).
    for ids, out in zip(prompt_ids, again):
        assert out.num_cached_tokens == ((len(ids) - 1) // 4) * 4
    assert engine.engine.stats().prefix_cache_hits > 0


def test_tiny_token_budget_chunks_prefill(llm: LLM, prompt_ids: list[list[int]], reference: list[list[int]]) -> None:
    outs = _engine(llm, max_num_batched_tokens=7, page_size=4).generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == reference


def test_tiny_kv_pool_preempts(llm: LLM, prompt_ids: list[list[int]], reference: list[list[int]]) -> None:
    longest = max(len(ids) for ids in prompt_ids) + MAX_TOKENS
    engine = _engine(llm, page_size=4, num_pages=(longest + 3) // 4 + 6, enable_prefix_caching=False)
    outs = engine.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == reference
    assert engine.engine.scheduler.num_preemptions > 0


def test_priorities_preempt_the_highest_value_and_change_no_output(llm: LLM, prompt_ids: list[list[int]],
                                                                    reference: list[list[int]]) -> None:
    longest = max(len(ids) for ids in prompt_ids) + MAX_TOKENS
    engine = _engine(llm, page_size=4, num_pages=(longest + 3) // 4 + 6, enable_prefix_caching=False,
                     scheduling_policy="priority")
    preempted = []
    preempt = engine.engine.scheduler._preempt
    engine.engine.scheduler._preempt = lambda req, step: (preempted.append(req.priority), preempt(req, step))
    priorities = [len(prompt_ids) - i for i in range(len(prompt_ids))]   # the last prompt first
    outs = engine.generate(prompt_ids, GREEDY, priority=priorities)
    assert [o.token_ids for o in outs] == reference
    assert preempted and all(p > min(priorities) for p in preempted)     # the first in line is never preempted
    with pytest.raises(ValueError, match="scheduling_policy='priority'"):
        _engine(llm).generate(prompt_ids[:1], GREEDY, priority=[1])


@pytest.mark.parametrize("settings", [
    dict(),
    dict(max_num_batched_tokens=7, page_size=4),            # prefill in chunks of up to 7 tokens
    dict(page_size=4, num_pages=40, enable_prefix_caching=False),   # preemption recomputes prompts
], ids=["whole", "chunked", "preempted"])
def test_prompt_logprobs_match_transformers(llm: LLM, hf, prompt_ids: list[list[int]], settings: dict) -> None:
    top = 3
    engine = _engine(llm, **settings)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=top)
    engine.generate(prompt_ids[:2], SamplingParams(max_tokens=2))   # their pages now in the prefix cache
    outs = engine.generate(prompt_ids, params)
    with torch.inference_mode():
        for ids, out in zip(prompt_ids, outs):
            expected = torch.log_softmax(hf(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
            got = out.prompt_logprobs
            assert [s.token_id for s in got] == ids[1:]
            chosen = expected.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1)
            assert torch.allclose(torch.tensor([s.logprob for s in got]), chosen, atol=2e-3)
            ranks = (expected > chosen[:, None]).sum(dim=1) + 1
            assert [s.rank for s in got] == ranks.tolist()
            top_values, _ = expected.topk(top, dim=-1)
            assert torch.allclose(torch.tensor([s.top_logprobs for s in got]), top_values, atol=2e-3)
            for s, row in zip(got, expected):
                assert all(abs(row[t] - v) < 2e-3 for t, v in zip(s.top_ids, s.top_logprobs))
    if "num_pages" in settings:
        assert engine.engine.scheduler.num_preemptions > 0


def test_an_fp8_kv_cache_holds_more_tokens_and_keeps_the_prompts_likelihood(llm: LLM,
                                                                              prompt_ids: list[list[int]]) -> None:
    """--kv-cache-dtype fp8 on the CPU path: the same memory holds four times the pages of float32 values (twice
    those of bfloat16), and reading K/V back rounded to
    e4m3 moves the prompts' mean log-likelihood by little (measured: about 3% in perplexity), chunked and cached
    alike, while the first greedy tokens stay the same."""
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True, prompt_logprobs=0)
    results = {}
    for kv in ("auto", "fp8"):
        engine = _engine(llm, kv_cache_dtype=kv, kv_cache_memory=0.05, page_size=4, max_num_batched_tokens=16)
        engine.generate(prompt_ids[:2], SamplingParams(max_tokens=2))   # their pages now in the prefix cache
        outs = engine.generate(prompt_ids, params)
        logprobs = [s.logprob for out in outs for s in out.prompt_logprobs]
        results[kv] = (engine.engine.runner.num_pages, -sum(logprobs) / len(logprobs), [o.token_ids[0] for o in outs])
    (pages, nll, firsts), (fp8_pages, fp8_nll, fp8_firsts) = results["auto"], results["fp8"]
    print(f"fp8 KV: mean NLL {nll:.4f} -> {fp8_nll:.4f}, first tokens {firsts} -> {fp8_firsts}")
    assert fp8_pages // 4 == pages   # float32 values: four bytes each, against one
    assert abs(fp8_nll - nll) < 0.05 and sum(a == b for a, b in zip(firsts, fp8_firsts)) >= len(firsts) - 1


# 1-grams too: more drafts, right and wrong, to check
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'


@pytest.mark.parametrize("settings", [
    dict(),
    dict(max_num_batched_tokens=7, page_size=4),            # drafts squeezed by a tiny budget
    dict(page_size=4, num_pages=40, enable_prefix_caching=False),   # preemption recomputes prompts
], ids=["whole", "chunked", "preempted"])
def test_speculative_decoding_gives_transformers_tokens(llm: LLM, prompt_ids: list[list[int]],
                                                        reference: list[list[int]], settings: dict) -> None:
    engine = _engine(llm, speculative_config=NGRAM, **settings)
    outs = engine.generate(prompt_ids, GREEDY)
    assert [o.token_ids for o in outs] == reference
    scheduler = engine.engine.scheduler
    print(f"{settings}: drafted {scheduler.num_draft_tokens}, accepted {scheduler.num_accepted_tokens}")
    # the embedded model repeats itself on several of these prompts: each accepted draft is a token without a step
    assert scheduler.num_accepted_tokens > 20
    if "num_pages" in settings:
        assert scheduler.num_preemptions > 0


def test_speculative_decoding_samples_exactly_the_tokens_and_logprobs_it_would_without(
        llm: LLM, prompt_ids: list[list[int]]) -> None:
    """Each sample is drawn from the same logits with the same seed and output position as without drafts."""
    eos = llm.engine.loaded.eos_token_ids[0]
    params = [SamplingParams(temperature=0.7, top_p=0.9, seed=i, max_tokens=24, logprobs=2, min_tokens=4,
                             logit_bias={eos: 5.0} if i % 3 == 0 else {}, top_k=40 if i % 2 else -1)
              for i in range(len(prompt_ids))]
    plain = _engine(llm).generate(prompt_ids, params)
    engine = _engine(llm, speculative_config=NGRAM)
    drafted = engine.generate(prompt_ids, params)
    for a, b in zip(plain, drafted):
        assert (a.token_ids, a.finish_reason) == (b.token_ids, b.finish_reason)
        assert [s.top_ids for s in a.logprobs] == [s.top_ids for s in b.logprobs]
        assert torch.allclose(torch.tensor([s.logprob for s in a.logprobs]),
                              torch.tensor([s.logprob for s in b.logprobs]), atol=1e-3)
    assert engine.engine.scheduler.num_accepted_tokens > 0


def test_speculative_decoding_refuses_overlap_scheduling(llm: LLM) -> None:
    with pytest.raises(ValueError, match="speculative-config.*without overlap"):
        LLMEngine(EngineConfig(speculative_config=NGRAM), loaded=llm.engine.loaded, overlap=True)
