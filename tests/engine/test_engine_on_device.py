"""The whole engine on a GPU, with the PyTorch ops and with the CUDA kernels: a preset-sized model (smollm2-135m)
in bfloat16.

transformers' Llama with the same random weights is the oracle. Greedy tokens in bfloat16 can differ from
the oracle's where two logits are within rounding of each other, so the check is teacher-forced: feed the
oracle our whole output and require every token we chose to be the oracle's top choice up to a tolerance
far below the logits' spread (std ~3). Every scheduling mode (one at a time, batched, prefix-cache hits,
chunked prefill, preemption) must pass it. MINISRV_TEST_DEVICE=cpu runs it on the CPU (float32, exact).
"""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.llm_engine import LLMEngine
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import LOGIT_STD, load_preset
from minisrv.models.loader import LoadedModel, build_model
from minisrv.models.weights import load_weights
from minisrv.sampling_params import SamplingParams
from minisrv.wire.terms import FinishReason

DEVICE = os.environ.get("MINISRV_TEST_DEVICE", "cuda")
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
# bfloat16 keeps 8 mantissa bits: logits of magnitude ~10 round by ~0.04 and 30 layers compound it.
TOLERANCE = 0.5 if DTYPE == torch.bfloat16 else 1e-3
MAX_TOKENS = 32
FP8_TOLERANCE = 1.0   # K and V rounded to e4m3 (3 mantissa bits) on top of the model dtype's rounding

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def oracle():
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = load_preset("smollm2-135m")
    hf_config = AutoConfig.for_model(spec.pop("model_type"), **{k: v for k, v in spec.items() if k != "torch_dtype"})
    hf = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                std = LOGIT_STD / math.sqrt(hf_config.hidden_size) if "embed" in name else 0.02
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return hf.to(device=DEVICE, dtype=DTYPE), load_preset("smollm2-135m")


@pytest.fixture(scope="module")
def loaded(oracle) -> LoadedModel:
    hf, spec = oracle
    model_config = ModelConfig.from_hf_dict(spec)
    model = build_model(model_config, 1024, DTYPE, torch.device(DEVICE))
    load_weights(model, ((k, v.float().cpu()) for k, v in hf.state_dict().items()))
    return LoadedModel(model=model, model_config=model_config, eos_token_ids=[2],
                       max_model_len=1024, name="smollm2-135m-random")


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(3, 49152) for _ in range(rng.randint(5, 80))] for _ in range(8)]


@pytest.fixture(params=["torch", "cuda"] if DEVICE == "cuda" else ["torch"])
def backend(request) -> str:
    return request.param


def generate(loaded: LoadedModel, prompts: list[list[int]], backend: str, **engine_args
             ) -> tuple[LLMEngine, list[list[int]]]:
    engine = LLMEngine(EngineConfig(device=DEVICE, kernel_backend=backend, **engine_args), loaded=loaded)
    return engine, run(engine, prompts)


def run(engine: LLMEngine, prompts: list[list[int]], first_rid: int = 0) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs: dict[int, list[int]] = {}
    for rid, ids in enumerate(prompts, start=first_rid):
        engine.add_request(rid, ids, params)
        outputs[rid] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.rid] += out.new_token_ids
            assert out.finish_reason in (FinishReason.NONE, FinishReason.LENGTH)
    return [outputs[rid] for rid in sorted(outputs)]


def assert_oracle_agrees(oracle, prompts: list[list[int]], outputs: list[list[int]], tolerance: float = TOLERANCE
                         ) -> None:
    hf, _ = oracle
    worst = 0.0
    with torch.inference_mode():
        for ids, out in zip(prompts, outputs):
            assert len(out) == MAX_TOKENS
            logits = hf(torch.tensor([ids + out], device=DEVICE)).logits[0, len(ids) - 1 : -1].float()
            chosen = logits.gather(1, torch.tensor(out, device=DEVICE)[:, None])[:, 0]
            deficit = (logits.max(dim=1).values - chosen).max().item()
            worst = max(worst, deficit)
    print(f"largest logit deficit of a chosen token vs the oracle's best: {worst:.4f} (tolerance {tolerance})")
    assert worst <= tolerance


def test_one_at_a_time(oracle, loaded, prompts, backend) -> None:
    outs = [generate(loaded, [ids], backend)[1][0] for ids in prompts]
    assert_oracle_agrees(oracle, prompts, outs)


def test_one_batch(oracle, loaded, prompts, backend) -> None:
    assert_oracle_agrees(oracle, prompts, generate(loaded, prompts, backend)[1])


def test_prefix_cache_hits(oracle, loaded, prompts, backend) -> None:
    shared = [random.Random(2).randrange(3, 49152) for _ in range(40)]
    with_prefix = [shared + ids for ids in prompts]  # two full 16-token pages shared by all
    engine, first = generate(loaded, with_prefix[:1], backend)
    rest = run(engine, with_prefix[1:], first_rid=1)
    assert engine.stats().prefix_cache_hits >= 32 * (len(prompts) - 1)
    assert_oracle_agrees(oracle, with_prefix, first + rest)


def test_chunked_prefill(oracle, loaded, prompts, backend) -> None:
    assert_oracle_agrees(oracle, prompts, generate(loaded, prompts, backend, max_num_batched_tokens=13, page_size=4)[1])


def test_preemption(oracle, loaded, prompts, backend) -> None:
    longest = max(len(ids) for ids in prompts) + MAX_TOKENS
    engine, outs = generate(loaded, prompts, backend, page_size=4, num_pages=(longest + 3) // 4 + 6,
                            enable_prefix_caching=False)
    assert engine.scheduler.num_preemptions > 0
    assert_oracle_agrees(oracle, prompts, outs)


@pytest.mark.skipif(DEVICE != "cuda", reason="compares the CUDA kernels with the PyTorch ops")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_kernels_match_the_torch_path_logits_and_greedy_tokens(loaded, prompts, kv_cache_dtype) -> None:
    """The same steps through both backends: float32 logits within bfloat16 tolerance, and greedy tokens equal
    where the top two logits are well separated (more than the tolerance apart); with an fp8 KV cache too."""
    from minisrv.engine.model_runner import ModelRunner
    from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
    from minisrv.scheduler.request import Request

    class Capture:
        def __init__(self) -> None:
            self.logits: list[torch.Tensor] = []

        def __call__(self, logits, requests, positions=None, bitmask=None):
            from minisrv.scheduler.request import SampleResult

            self.logits.append(logits.float().clone())
            return [SampleResult(int(t)) for t in logits.argmax(-1).tolist()]

    runs = {}
    for backend in ("torch", "cuda"):
        capture = Capture()
        runner = ModelRunner(EngineConfig(device=DEVICE, kernel_backend=backend, num_pages=256,
                                          kv_cache_dtype=kv_cache_dtype), loaded, capture)
        requests = [Request(rid=i, prompt_ids=ids, params=SamplingParams(temperature=0.0), seed=0)
                    for i, ids in enumerate(prompts)]
        next_page = 0
        for r in requests:
            r.pages = list(range(next_page, next_page + 8))
            next_page += 8
        results = runner.execute(ScheduledBatch([ScheduledSeq(r, 0, len(r.prompt_ids), True) for r in requests]))
        for _ in range(6):   # decode steps on each backend's own tokens
            for r, res in zip(requests, results):
                r.output_ids.append(res.token_id)
            results = runner.execute(ScheduledBatch([ScheduledSeq(r, r.num_tokens - 1, 1, True) for r in requests]))
        runs[backend] = (capture.logits, [r.output_ids for r in requests])
    (torch_logits, torch_tokens), (cuda_logits, cuda_tokens) = runs["torch"], runs["cuda"]
    first_torch, first_cuda = torch_logits[0], cuda_logits[0]   # the prefill: same inputs on both
    rel = ((first_cuda - first_torch).norm() / first_torch.norm()).item()
    top2 = first_torch.topk(2, dim=-1).values
    separated = (top2[:, 0] - top2[:, 1]) > TOLERANCE
    print(f"prefill logits: relative difference {rel:.2e}; {int(separated.sum())} of {len(prompts)} rows separated")
    assert rel < 2e-2
    assert (first_cuda.argmax(-1) == first_torch.argmax(-1))[separated].all()
    assert torch_tokens[0][:1] == cuda_tokens[0][:1] or not bool(separated[0])


def test_an_fp8_kv_cache_serves_every_scheduling_mode(oracle, loaded, prompts, backend) -> None:
    """--kv-cache-dtype fp8 batched, chunked and with CUDA graphs: the oracle agrees within a wider tolerance (K and V
    rounded to e4m3 move the logits), and the pool holds twice the pages of the same memory."""
    engine, outs = generate(loaded, prompts, backend, kv_cache_dtype="fp8", max_num_batched_tokens=13, page_size=4)
    assert_oracle_agrees(oracle, prompts, outs, tolerance=FP8_TOLERANCE)
    bf16 = LLMEngine(EngineConfig(device=DEVICE, kernel_backend=backend, kv_cache_memory=0.5), loaded=loaded)
    fp8 = LLMEngine(EngineConfig(device=DEVICE, kernel_backend=backend, kv_cache_memory=0.5, kv_cache_dtype="fp8"),
                    loaded=loaded)
    element = torch.empty((), dtype=DTYPE).element_size()
    assert fp8.runner.num_pages // element == bf16.runner.num_pages


@pytest.mark.skipif(DEVICE != "cuda", reason="the refusal is the GPU's")
def test_speculative_decoding_is_refused_on_the_gpu_naming_the_flag(loaded) -> None:
    """Drafted steps have several rows a sequence, which the decode graphs do not take: until they do, a GPU
    engine refuses --speculative-config rather than run slower than without."""
    with pytest.raises(ValueError, match="--speculative-config.*CPU engine only"):
        LLMEngine(EngineConfig(device=DEVICE, speculative_config='{"method": "ngram", "num_speculative_tokens": 3}'),
                  loaded=loaded)


def test_prompt_logprobs_match_the_oracle(oracle, loaded, prompts, backend) -> None:
    """Chunked prefill with CUDA graphs and overlap as served: every prompt token's logprob is the oracle's."""
    hf, _ = oracle
    engine = LLMEngine(EngineConfig(device=DEVICE, kernel_backend=backend, max_num_batched_tokens=13, page_size=4),
                       loaded=loaded)
    collected: dict[int, list] = {}
    for rid, ids in enumerate(prompts):
        engine.add_request(rid, ids, SamplingParams(temperature=0.0, max_tokens=4, prompt_logprobs=2))
        collected[rid] = []
    while engine.has_unfinished():
        for out in engine.step():
            collected[out.rid] += out.prompt_samples
    worst = 0.0
    with torch.inference_mode():
        for rid, ids in enumerate(prompts):
            expected = torch.log_softmax(hf(torch.tensor([ids], device=DEVICE)).logits[0, :-1].float(), dim=-1)
            got = collected[rid]
            assert [s.token_id for s in got] == ids[1:]
            chosen = expected.gather(1, torch.tensor(ids[1:], device=DEVICE)[:, None])[:, 0].cpu()
            worst = max(worst, (torch.tensor([s.logprob for s in got]) - chosen).abs().max().item())
            assert all(len(s.top_ids) == 2 and s.rank >= 1 for s in got)
    print(f"largest prompt logprob difference from the oracle: {worst:.4f} (tolerance {TOLERANCE})")
    assert worst <= TOLERANCE
