"""Read a GGUF checkpoint as a Hugging Face config dict plus HF-named float32 tensors.

Supported GGUF architectures: llama (also Mistral and SmolLM2 files), qwen2, qwen3. Every quantization
that the `gguf` package can dequantize works; tensors come out as float32, in Hugging Face layout:
llama.cpp's converter reorders the rows of attn_q/attn_k of llama-arch models (its RoPE pairs adjacent
elements), and `_undo_rope_permute` puts them back.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

# GGUF architecture -> (HF architecture, whether attn_q/attn_k rows were permuted by the converter)
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
    "qwen3": ("Qwen3ForCausalLM", False),
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def quantized_bits(type_name: str) -> int | None:
    """Bits per weight of a GGML type by its name (Q4_1, Q4_K, IQ4_XS: 4; Q8_0: 8), None for a float type."""
    match = re.match(r"I?Q(\d)", type_name)
    return int(match.group(1)) if match else None


class GGUFCheckpoint:
    """A memory-mapped GGUF file: `hf_config` (config.json contents) and `tensors()` (HF names, float32)."""

    def __init__(self, path: str | Path) -> None:
        import gguf

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"model: GGUF file {str(self.path)!r} does not exist")
        try:
            self._reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the gguf package raises plain ValueError/struct errors on bad files
            raise ValueError(f"model: {str(self.path)!r} is not a readable GGUF file ({e})") from e
        self.gguf_arch = str(self._field("general.architecture"))
        if self.gguf_arch not in GGUF_ARCHITECTURES:
            raise ValueError(f"model: GGUF architecture {self.gguf_arch!r} is not supported; "
                             f"expected one of {sorted(GGUF_ARCHITECTURES)}")
        self.hf_config = self._build_hf_config()

    def _field(self, key: str, default: Any = None) -> Any:
        field = self._reader.fields.get(key)
        return default if field is None else field.contents()

    def _arch_field(self, key: str, default: Any = None) -> Any:
        return self._field(f"{self.gguf_arch}.{key}", default)

    def _build_hf_config(self) -> dict[str, Any]:
        names = {t.name for t in self._reader.tensors}
        if "rope_freqs.weight" in names:
            # llama.cpp folds Llama 3.1 rope scaling into per-frequency divisors; the original parameters
            # cannot be recovered from them unambiguously.
            raise ValueError("model: GGUF files with a rope_freqs tensor (Llama 3.1+ RoPE scaling) are not "
                             "supported; use the Hugging Face checkpoint directory instead")
        architecture, _ = GGUF_ARCHITECTURES[self.gguf_arch]
        num_heads = int(self._arch_field("attention.head_count"))
        hidden = int(self._arch_field("embedding_length"))
        tokens = self._field("tokenizer.ggml.tokens", [])
        eos = [self._field(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        config: dict[str, Any] = {
            "architectures": [architecture],
            "model_type": architecture.removesuffix("ForCausalLM").lower(),
            "vocab_size": int(self._arch_field("vocab_size", len(tokens))),
            "hidden_size": hidden,
            "intermediate_size": int(self._arch_field("feed_forward_length")),
            "num_hidden_layers": int(self._arch_field("block_count")),
            "num_attention_heads": num_heads,
            "num_key_value_heads": int(self._arch_field("attention.head_count_kv", num_heads)),
            "head_dim": int(self._arch_field("attention.key_length", hidden // num_heads)),
            "rms_norm_eps": _shortest_float(self._arch_field("attention.layer_norm_rms_epsilon", 1e-6)),
            "rope_theta": _shortest_float(self._arch_field("rope.freq_base", 10000.0)),
            "max_position_embeddings": int(self._arch_field("context_length", 2048)),
            "tie_word_embeddings": "output.weight" not in names,
            "attention_bias": "blk.0.attn_q.bias" in names,
            "hidden_act": "silu",
            "bos_token_id": self._field("tokenizer.ggml.bos_token_id"),
            "eos_token_id": sorted({int(e) for e in eos if e is not None}),
            "torch_dtype": "float32",
        }
        scaling = self._arch_field("rope.scaling.type")
        if scaling == "linear":
            config["rope_scaling"] = {"rope_type": "linear", "factor": float(self._arch_field("rope.scaling.factor"))}
        elif scaling not in (None, "none"):
            raise ValueError(f"model: GGUF rope scaling {scaling!r} is not supported")
        return config

    @property
    def chat_template(self) -> str | None:
        return self._field("tokenizer.chat_template")

    @property
    def projection_bits(self) -> int | None:
        """quantized_bits of the first layer's attention query projection. Files mix types by a tensor's role
        (norms in float32, the output layer often in 8 bits); the projections set the model's precision."""
        tensor = next((t for t in self._reader.tensors if t.name == "blk.0.attn_q.weight"), None)
        return None if tensor is None else quantized_bits(tensor.tensor_type.name)

    def __len__(self) -> int:
        return len(self._reader.tensors)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) for every weight, dequantized one at a time to bound peak memory."""
        from gguf.quants import dequantize

        _, permuted = GGUF_ARCHITECTURES[self.gguf_arch]
        num_heads = self.hf_config["num_attention_heads"]
        num_kv_heads = self.hf_config["num_key_value_heads"]
        for tensor in self._reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is None:
                continue
            weight = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            # GGUF lists dims fastest-first; the dequantized array already has HF's [out, in] order.
            weight = weight.reshape([int(d) for d in reversed(tensor.shape)])
            if permuted and name.endswith("q_proj.weight"):
                weight = _undo_rope_permute(weight, num_heads)
            elif permuted and name.endswith("k_proj.weight"):
                weight = _undo_rope_permute(weight, num_kv_heads)
            # F32 tensors come back as read-only views of the mmapped file; np.require copies those.
            yield name, torch.from_numpy(np.require(weight, requirements=["C", "W"]))


def _shortest_float(value: float) -> float:
    # GGUF stores float32: 1e-5 arrives as 9.99999974e-06. The shortest float32 repr restores the
    # value the original config.json carried.
    return float(str(np.float32(value)))


def hf_tensor_name(gguf_name: str) -> str | None:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'; None for tensors we do not use."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    return None


def _undo_rope_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # Inverse of convert_hf_to_gguf.py's LlamaModel.permute, which maps each head's rows
    # (half-split pairs) to (adjacent pairs): reshape(h, 2, d/2).swapaxes(1, 2).
    rows = weight.shape[0]
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def load_gguf_tokenizer(path: str | Path):
    """transformers builds a fast tokenizer (with the chat template) from the GGUF's vocabulary and merges."""
    from transformers import AutoTokenizer

    path = Path(path)
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
