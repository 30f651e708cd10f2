"""ModelConfig.from_hf_dict: per-architecture traits, RoPE spellings, context caps and field-naming errors."""
from __future__ import annotations

import pytest

from minisrv.models.config import ModelConfig

BASE = dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=4096)


def config(**fields) -> ModelConfig:
    return ModelConfig.from_hf_dict({"architectures": ["LlamaForCausalLM"], **BASE, **fields})


def test_architecture_traits():
    assert not config().qkv_bias and not config().qk_norm
    assert config(attention_bias=True).qkv_bias
    qwen2 = config(architectures=["Qwen2ForCausalLM"])
    assert qwen2.qkv_bias and not qwen2.qk_norm
    qwen3 = config(architectures=["Qwen3ForCausalLM"], head_dim=128)
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128 and qwen3.q_size == 1024
    assert config().head_dim == 32 and config().kv_size == 64
    assert config(num_key_value_heads=None).num_kv_heads == 8


def test_rope_spellings():
    legacy = config(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                       "high_freq_factor": 4.0,
                                                       "original_max_position_embeddings": 8192})
    modern = config(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192})
    assert legacy == modern and legacy.rope.type == "llama3" and legacy.rope.theta == 500000.0
    assert config(rope_scaling={"type": "linear", "factor": 2.0}).rope.factor == 2.0
    assert config(rope_scaling=None).rope.type == "default" and config().rope.theta == 10000.0


def test_context_length_and_eos():
    assert config(architectures=["MistralForCausalLM"], sliding_window=1024).context_length == 1024
    assert config(architectures=["MistralForCausalLM"], sliding_window=None).context_length == 4096
    # Qwen configs carry a window size even when sliding windows are off.
    qwen2 = config(architectures=["Qwen2ForCausalLM"], sliding_window=512, use_sliding_window=False)
    assert qwen2.context_length == 4096
    assert config(eos_token_id=[5, 6]).eos_token_ids == (5, 6) and config(eos_token_id=5).eos_token_ids == (5,)
    assert config().eos_token_ids == ()


@pytest.mark.parametrize("fields, message", [
    (dict(architectures=["GPT2LMHeadModel"]), "architectures"),
    (dict(architectures=None), "architectures"),
    (dict(hidden_size=None), "hidden_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(head_dim=33), "head_dim"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "factor"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "low_freq_factor"),
])
def test_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        config(**fields)
