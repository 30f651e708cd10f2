"""Tiny random models of every supported architecture, in transformers and in minisrv, with equal weights."""
from __future__ import annotations

from typing import Any

import torch

from minisrv.config import EngineConfig
from minisrv.engine.model_runner import ModelRunner
from minisrv.models.config import ModelConfig
from minisrv.models.loader import LoadedModel, build_model
from minisrv.models.weights import load_weights
from minisrv.sampling_params import SamplingParams
from minisrv.scheduler.request import Request, SampleResult

_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, hidden_act="silu",
             bos_token_id=1, eos_token_id=2)

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "llama": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama", rope_theta=10000.0,
                  tie_word_embeddings=False),
    "llama3-rope-tied": dict(_BASE, architectures=["LlamaForCausalLM"], model_type="llama",
                             tie_word_embeddings=True, num_key_value_heads=1,
                             rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
                             rope_theta=500000.0),
    "qwen2": dict(_BASE, architectures=["Qwen2ForCausalLM"], model_type="qwen2", tie_word_embeddings=True,
                  rope_theta=1000000.0, use_sliding_window=False, sliding_window=32),
    "qwen3": dict(_BASE, architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=24,
                  tie_word_embeddings=False, rope_theta=1000000.0, attention_bias=False),
    "mistral": dict(_BASE, architectures=["MistralForCausalLM"], model_type="mistral", num_key_value_heads=4,
                    tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None,
                    rope_scaling={"rope_type": "linear", "factor": 2.0}),
}


@torch.no_grad()
def make_hf_model(name: str, seed: int = 0):
    """transformers' own class for the architecture, with every parameter random (biases and norms too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    hf_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    generator = torch.Generator().manual_seed(seed)
    for pname, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1.0 + 0.1 * noise if "norm" in pname else 0.1 * noise)
    return model


def make_our_model(name: str, hf_model, dtype: torch.dtype = torch.float32, max_model_len: int = 128):
    model_config = ModelConfig.from_hf_dict(TINY_CONFIGS[name])
    model = build_model(model_config, max_model_len, dtype, torch.device("cpu"))
    load_weights(model, hf_model.state_dict().items())
    return model


def make_loaded(name: str, hf_model, dtype: torch.dtype = torch.float32) -> LoadedModel:
    model = make_our_model(name, hf_model, dtype)
    return LoadedModel(model=model, model_config=model.config, tokenizer=None, eos_token_ids=[2],
                       chat_template=None, max_model_len=128, name=name)


class RecordingGreedySampler:
    """Stands in for minisrv.engine.sampling.Sampler: argmax, keeping every logits row it saw."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> list[SampleResult]:
        assert logits.dtype == torch.float32 and logits.shape[0] == len(requests)
        self.rows = list(logits.clone())
        return [SampleResult(int(t)) for t in logits.argmax(-1).tolist()]


def make_runner(loaded: LoadedModel, page_size: int, num_pages: int = 192) -> tuple[ModelRunner, RecordingGreedySampler]:
    sampler = RecordingGreedySampler()
    config = EngineConfig(page_size=page_size, num_pages=num_pages, max_model_len=loaded.max_model_len)
    return ModelRunner(config, loaded, sampler=sampler), sampler


def make_request(rid: int, prompt: list[int], pages: list[int]) -> Request:
    request = Request(rid=rid, prompt_ids=list(prompt), params=SamplingParams(temperature=0.0), seed=0)
    request.pages = list(pages)
    return request
