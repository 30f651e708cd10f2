"""Dummy presets: every preset parses; the small one builds, runs offline and gives non-degenerate logits."""
from __future__ import annotations

import pytest
import torch

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.models.config import ModelConfig
from minisrv.models.dummy import BYTE_VOCAB_SPECIALS, load_preset, preset_names
from minisrv.models.loader import load_model
from minisrv.models.source import resolve_source
from minisrv.tokenizer.loading import load_tokenizer
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.batch import ScheduledBatch, ScheduledSeq
from minisrv.scheduler.request import Request, SampleResult

EXPECTED = {"smollm2-135m": ("LlamaForCausalLM", 30, 576), "qwen2.5-0.5b": ("Qwen2ForCausalLM", 24, 896),
            "qwen3-0.6b": ("Qwen3ForCausalLM", 28, 1024), "llama-3.2-1b": ("LlamaForCausalLM", 16, 2048),
            "llama-3.1-8b": ("LlamaForCausalLM", 32, 4096), "mistral-7b-v0.3": ("MistralForCausalLM", 32, 4096)}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_preset_parses(name):
    config = ModelConfig.from_hf_dict(load_preset(name))
    assert (config.architecture, config.num_layers, config.hidden_size) == EXPECTED[name]
    assert config.vocab_size > len(BYTE_VOCAB_SPECIALS) + 256   # the byte tokenizer's ids all exist
    assert set(preset_names()) == set(EXPECTED)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError, match="qwen3-0.6b"):
        load_model(EngineConfig(model="gpt-5", load_format="dummy"))


def test_smollm2_dummy_runs_offline_with_spread_logits():
    config = EngineConfig(model="smollm2-135m", load_format="dummy", seed=3, max_model_len=256)
    loaded = load_model(config)
    assert loaded.name == "smollm2-135m" and loaded.max_model_len == 256
    tokenizer = load_tokenizer(resolve_source(config))
    assert loaded.eos_token_ids == sorted(tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    captured = []

    def sampler(logits, requests, positions=None, bitmask=None):
        captured.append(logits)
        return [SampleResult(int(t)) for t in logits.argmax(-1).tolist()]

    runner = ModelRunner(EngineConfig(num_pages=8), loaded, sampler)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "héllo"}], tokenize=False,
                                           add_generation_prompt=True)
    ids = tokenizer.encode(prompt, add_special_tokens=False)
    request = Request(0, ids, SamplingParams(temperature=0.0), seed=0)
    request.pages = [4, 0, 6]
    runner.execute(ScheduledBatch([ScheduledSeq(request, 0, len(ids), True)]))
    logits = captured[0][0]
    assert logits.shape == (49152,) and torch.isfinite(logits).all()
    top = logits.softmax(-1).max()
    assert 1.5 < logits.std() < 6 and 100 / 49152 < top < 0.5      # neither flat nor one-hot
