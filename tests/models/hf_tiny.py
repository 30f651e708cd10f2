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


def tiny_config(name: str, **overrides: Any) -> dict[str, Any]:
    return {**TINY_CONFIGS[name], **overrides}


@torch.no_grad()
def make_hf_model(spec: dict[str, Any], seed: int = 0):
    """transformers' own class for the architecture, with every parameter random (biases and norms too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(spec)
    hf_config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").float().eval()
    generator = torch.Generator().manual_seed(seed)
    for pname, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=generator)
        param.copy_(1.0 + 0.1 * noise if "norm" in pname else 0.1 * noise)
    return model


def make_our_model(spec: dict[str, Any], hf_model, dtype: torch.dtype = torch.float32, max_model_len: int = 128):
    model_config = ModelConfig.from_hf_dict(spec)
    model = build_model(model_config, max_model_len, dtype, torch.device("cpu"))
    load_weights(model, hf_model.state_dict().items())
    return model


def make_loaded(spec: dict[str, Any], hf_model, dtype: torch.dtype = torch.float32) -> LoadedModel:
    model = make_our_model(spec, hf_model, dtype)
    return LoadedModel(model=model, model_config=model.config, eos_token_ids=[2],
                       max_model_len=128, name="tiny")


def hf_logits(hf_model, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([tokens])).logits[0].float()


class RecordingGreedySampler:
    """Stands in for minisrv.engine.sampling.Sampler: argmax, keeping every logits row it saw."""

    def __init__(self) -> None:
        self.rows: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, requests: list[Request], positions=None,
                 bitmask=None) -> list[SampleResult]:
        assert logits.dtype == torch.float32 and logits.shape[0] == len(requests)
        self.rows = list(logits.clone())
        return [SampleResult(int(t)) for t in logits.argmax(-1).tolist()]


def make_runner(loaded: LoadedModel, page_size: int,
                num_pages: int = 192) -> tuple[ModelRunner, RecordingGreedySampler]:
    sampler = RecordingGreedySampler()
    config = EngineConfig(page_size=page_size, num_pages=num_pages, max_model_len=loaded.max_model_len)
    return ModelRunner(config, loaded, sampler=sampler), sampler


def make_request(rid: int, prompt: list[int], pages: list[int]) -> Request:
    request = Request(rid=rid, prompt_ids=list(prompt), params=SamplingParams(temperature=0.0), seed=0)
    request.pages = list(pages)
    return request


# A GGUF byte-level tokenizer transformers can read: 256 byte tokens, one merge, ChatML specials.
def gguf_tokens() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_chars = bytes_to_unicode()
    return [byte_chars[b] for b in range(256)] + ["Ġt", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]


GGUF_VOCAB = 260
GGUF_EOS = 259
_GGUF_ARCH = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}
_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
            "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
            "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def llama_cpp_permute(weights, n_head: int, n_head_kv: int | None = None):
    """convert_hf_to_gguf.py's LlamaModel.permute, as llama.cpp applies it to attn_q / attn_k."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(path, spec: dict[str, Any], hf_model, quantize: bool = False) -> None:
    """Write hf_model as llama.cpp's converter would (names, q/k permutation for llama, tokenizer, template)."""
    import gguf

    arch = _GGUF_ARCH[spec["architectures"][0]]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(spec["num_hidden_layers"])
    writer.add_context_length(spec["max_position_embeddings"])
    writer.add_embedding_length(spec["hidden_size"])
    writer.add_feed_forward_length(spec["intermediate_size"])
    writer.add_head_count(spec["num_attention_heads"])
    writer.add_head_count_kv(spec["num_key_value_heads"])
    if "head_dim" in spec:
        writer.add_key_length(spec["head_dim"])
        writer.add_value_length(spec["head_dim"])
    writer.add_rope_freq_base(spec["rope_theta"])
    writer.add_layer_norm_rms_eps(spec["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(gguf_tokens())
    writer.add_token_types([1] * 257 + [3] * 3)
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(GGUF_EOS - 1)
    writer.add_eos_token_id(GGUF_EOS)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    heads, kv_heads = spec["num_attention_heads"], spec["num_key_value_heads"]
    for name, tensor in hf_model.state_dict().items():
        if name == "lm_head.weight" and spec["tie_word_embeddings"]:
            continue
        array = tensor.float().numpy()
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = llama_cpp_permute(array, heads, heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = llama_cpp_permute(array, heads, kv_heads)
        parts = name.split(".")
        if name.startswith("model.layers."):
            module, kind = ".".join(parts[3:-1]), parts[-1]
            gguf_name = f"blk.{parts[2]}.{_TO_GGUF[module]}.{kind}"
        else:
            gguf_name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                         "lm_head.weight": "output.weight"}[name]
        if quantize and array.ndim == 2:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, q8), raw_dtype=q8)
        else:
            writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
