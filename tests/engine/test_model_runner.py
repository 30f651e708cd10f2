"""ModelRunner: KV pool sizing, batch bookkeeping, and batched steps == each request computed alone."""
from __future__ import annotations

import math
import os
import random

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.kv_cache import kv_cache_bytes_per_page
from minisrv.engine.model_runner import CPU_DEFAULT_KV_GIB, ModelRunner, cpu_threads
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import init_dummy_weights
from minisrv.models.loader import LoadedModel, build_model
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import Request
from tests.models.hf_tiny import RecordingGreedySampler

TINY = dict(architectures=["Qwen2ForCausalLM"], vocab_size=101, hidden_size=48, intermediate_size=80,
            num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=False, eos_token_id=3)


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return tiny_model()


def tiny_model() -> LoadedModel:
    model_config = ModelConfig.from_hf_dict(TINY)
    model = build_model(model_config, 256, torch.float32, torch.device("cpu"))
    init_dummy_weights(model, seed=5, std=0.2)   # larger than the default so argmax ties are impossible
    return LoadedModel(model, model_config, eos_token_ids=[3],
                       max_model_len=256, name="tiny")


def new_request(rid: int, prompt: list[int], pages: list[int]) -> Request:
    request = Request(rid=rid, prompt_ids=prompt, params=SamplingParams(temperature=0.0), seed=0)
    request.pages = pages
    return request


def test_pool_size_from_each_setting(loaded):
    per_page = kv_cache_bytes_per_page(loaded.model_config, 8, torch.float32)
    assert ModelRunner(EngineConfig(page_size=8, num_pages=7), loaded, RecordingGreedySampler()).num_pages == 7
    runner = ModelRunner(EngineConfig(page_size=8, kv_cache_memory=0.001), loaded, RecordingGreedySampler())
    assert runner.num_pages == int(0.001 * 2**30 // per_page) and runner.bytes_per_page == per_page
    assert runner.kv_caches[0].shape == (runner.num_pages, 8, 2, 2, 8)
    # CPU default: every running request at full length, within the RAM budget.
    runner = ModelRunner(EngineConfig(page_size=8, max_running_requests=3), loaded, RecordingGreedySampler())
    assert runner.num_pages == min(3 * math.ceil(256 / 8), int(CPU_DEFAULT_KV_GIB * 2**30 // per_page))


def test_cpu_threads(loaded):
    before = torch.get_num_threads()
    try:
        ModelRunner(EngineConfig(num_pages=4, cpu_threads=1), loaded, RecordingGreedySampler())
        assert torch.get_num_threads() == 1
        assert cpu_threads(EngineConfig(cpu_threads=3)) == 3
        assert cpu_threads(EngineConfig()) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("settings, field", [
    (dict(page_size=0), "page_size"),
    (dict(cpu_threads=0), "cpu_threads"),
    (dict(kv_cache_memory=1e-9), "kv_cache_memory"),
    (dict(num_pages=0), "num_pages"),
])
def test_bad_pool_settings_name_the_field(loaded, settings, field):
    with pytest.raises(ValueError, match=field):
        ModelRunner(EngineConfig(**settings), loaded, RecordingGreedySampler())


def test_default_sampler_is_the_engine_sampler(loaded):
    runner = ModelRunner(EngineConfig(num_pages=8), loaded)
    request = new_request(0, [5, 6, 7], [1])
    [result] = runner.execute(ScheduledBatch([ScheduledSeq(request, 0, 3, True)]))
    assert 0 <= result.token_id < TINY["vocab_size"]


def test_results_follow_batch_order_and_sample_flags(loaded):
    sampler = RecordingGreedySampler()
    runner = ModelRunner(EngineConfig(page_size=4, num_pages=64), loaded, sampler)
    rng = random.Random(0)
    a, b, c = (new_request(i, [rng.randrange(101) for _ in range(n)], list(range(16 * i, 16 * i + 16)))
               for i, n in enumerate([9, 12, 5]))
    # Nothing sampled: no logits, no results.
    assert runner.execute(ScheduledBatch([ScheduledSeq(a, 0, 8, False), ScheduledSeq(b, 0, 11, False)])) == []
    batch = [ScheduledSeq(c, 0, 5, True), ScheduledSeq(a, 8, 1, True), ScheduledSeq(b, 11, 1, False)]
    results = runner.execute(ScheduledBatch(batch))
    assert len(results) == 2
    alone = RecordingGreedySampler()
    solo = ModelRunner(EngineConfig(page_size=4, num_pages=64), loaded, alone)
    for position, seq in enumerate([s for s in batch if s.sample]):
        fresh = new_request(9, seq.request.prompt_ids, list(range(16)))
        solo.execute(ScheduledBatch([ScheduledSeq(fresh, 0, seq.start + seq.num_tokens, True)]))
        torch.testing.assert_close(sampler.rows[position], alone.rows[0], atol=1e-5, rtol=1e-5)


def test_staggered_batched_generation_equals_solo(loaded):
    """Requests join at different steps with chunked prefills; every token matches running each alone."""
    rng = random.Random(1)
    prompts = [[rng.randrange(101) for _ in range(n)] for n in (7, 30, 3, 18)]
    joins = [0, 1, 1, 4]           # step at which each request is admitted
    chunk, steps = 8, 14

    def generate(indices: list[int]) -> dict[int, list[int]]:
        runner = ModelRunner(EngineConfig(page_size=4, num_pages=128), loaded, RecordingGreedySampler())
        requests = {i: new_request(i, prompts[i], list(range(32 * i, 32 * i + 32))[::-1]) for i in indices}
        for step in range(steps):
            batch = []
            for i, r in requests.items():
                if step < joins[i]:
                    continue
                if r.num_computed < r.num_prompt_tokens:
                    n = min(chunk, r.num_prompt_tokens - r.num_computed)
                    batch.append(ScheduledSeq(r, r.num_computed, n, r.num_computed + n == r.num_prompt_tokens))
                else:
                    batch.append(ScheduledSeq(r, r.num_tokens - 1, 1, True))
            results = iter(runner.execute(ScheduledBatch(batch)))
            for seq in batch:
                seq.request.num_computed = seq.start + seq.num_tokens
                if seq.sample:
                    seq.request.output_ids.append(next(results).token_id)
        return {i: r.output_ids for i, r in requests.items()}

    together = generate(list(range(len(prompts))))
    for i in range(len(prompts)):
        assert together[i] == generate([i])[i]
        assert len(together[i]) > 0


def test_inconsistent_batches_are_rejected(loaded):
    runner = ModelRunner(EngineConfig(page_size=4, num_pages=16), loaded, RecordingGreedySampler())
    request = new_request(0, list(range(10, 20)), [0, 1])
    with pytest.raises(ValueError, match="pages cannot hold"):
        runner.execute(ScheduledBatch([ScheduledSeq(request, 0, 10, True)]))
    with pytest.raises(ValueError, match="not within"):
        runner.execute(ScheduledBatch([ScheduledSeq(request, 8, 5, True)]))


@pytest.mark.parametrize("quantization", ["int8", "int8-lm-head", "int8-weight-only"])
def test_int8_weights_give_nearly_the_float32_logits(quantization):
    """A fresh model each: quantizing replaces the plain weights of the one it is given."""
    prompt = [random.Random(3).randrange(101) for _ in range(12)]
    logits = {}
    for mode in ("none", quantization):
        model_copy = tiny_model()
        sampler = RecordingGreedySampler()
        runner = ModelRunner(EngineConfig(num_pages=8, quantization=mode), model_copy, sampler)
        runner.execute(ScheduledBatch([ScheduledSeq(new_request(0, prompt, [0, 1]), 0, len(prompt), True)]))
        logits[mode] = sampler.rows[0]
        quantized = [m for m in model_copy.model.modules()
                     if getattr(m, "int8", None) is not None or getattr(m, "int8_weight", None) is not None]
        assert len(quantized) == (0 if mode == "none" else 1 if mode == "int8-lm-head" else 2 * 4 + 1)
    error = (logits[quantization] - logits["none"]).norm() / logits["none"].norm()
    assert error < 0.1, error


def test_int4_weights_give_nearly_the_float32_logits():
    """--quantization int4 on a model whose widths are whole groups of 32: every projection gets a 4-bit copy, the
    LM head an 8-bit one, and the logits stay close to float32's."""
    config = ModelConfig.from_hf_dict({**TINY, "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                                       "vocab_size": 112})
    prompt = [random.Random(4).randrange(112) for _ in range(12)]
    logits = {}
    for mode in ("none", "int4"):
        model = build_model(config, 256, torch.float32, torch.device("cpu"))
        init_dummy_weights(model, seed=5, std=0.2)
        sampler = RecordingGreedySampler()
        runner = ModelRunner(EngineConfig(num_pages=8, quantization=mode),
                             LoadedModel(model, config, eos_token_ids=[3], max_model_len=256, name="tiny"), sampler)
        runner.execute(ScheduledBatch([ScheduledSeq(new_request(0, prompt, [0, 1]), 0, len(prompt), True)]))
        logits[mode] = sampler.rows[0]
        four_bit = [m for m in model.modules() if getattr(m, "int4_weight", None) is not None]
        eight_bit = [m for m in model.modules() if getattr(m, "int8_weight", None) is not None]
        assert (len(four_bit), len(eight_bit)) == ((0, 0) if mode == "none" else (2 * 4, 1))
        assert mode == "none" or eight_bit == [model.lm_head]
    error = (logits["int4"] - logits["none"]).norm() / logits["none"].norm()
    assert error < 0.2, error


@pytest.mark.parametrize("bits, device, chosen", [(4, "cpu", "int4"), (2, "cpu", "int4"), (8, "cpu", "none"),
                                                  (None, "cpu", "none"), (4, "cuda", "none")])
def test_auto_quantization_keeps_4_bit_checkpoints_4_bit_on_the_cpu(bits, device, chosen):
    assert EngineConfig(device=device).resolved_quantization(bits) == chosen
    assert EngineConfig(device=device, quantization="int8").resolved_quantization(bits) == "int8"


@pytest.mark.parametrize("device, amx, avx512_bf16, chosen", [
    ("cpu", True, False, "bfloat16"), ("cpu", False, True, "bfloat16"), ("cpu", False, False, "float32"),
    ("cuda", False, False, "bfloat16")])
def test_auto_dtype_is_bfloat16_where_the_hardware_multiplies_it(monkeypatch, device, amx, avx512_bf16, chosen):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16, raising=False)
    assert EngineConfig(device=device).resolved_dtype() == chosen
    assert EngineConfig(device=device, dtype="float32").resolved_dtype() == "float32"
    for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"):   # a build without the probes: float32
        monkeypatch.delattr(torch.cpu, probe)
    assert EngineConfig(device="cpu").resolved_dtype() == "float32"


def test_quantization_is_refused_off_the_cpu_with_the_flag_named():
    from minisrv.config import EngineConfig as Config

    assert {"int8", "int4"} <= set(Config.__dataclass_fields__["quantization"].metadata["choices"])
    with pytest.raises(ValueError, match="quantization"):
        Config(quantization="int2")
