"""ModelConfig: the shape of a Llama-family model, built from a Hugging Face config.json dict."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from minisrv.layers.rope import ROPE_TYPES, RopeConfig

# What differs between the architectures we run; everything else is the shared Llama block.
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool                            # Qwen2 always; Llama/Qwen3 when attention_bias is set
    qk_norm: bool                             # Qwen3: RMSNorm over each q/k head before RoPE
    rope: RopeConfig = field(default_factory=RopeConfig)
    sliding_window: int | None = None         # only ever a cap on the context length (see context_length)
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def context_length(self) -> int:
        # A sequence no longer than the window attends exactly as with full attention, so capping the
        # context there keeps Mistral v0.1-style sliding-window models correct without a windowed kernel.
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from config.json contents; ValueError names the offending field."""
        architectures = hf.get("architectures") or []
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise ValueError(
                f"architectures: {architectures!r} is not supported; expected one of {SUPPORTED_ARCHITECTURES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if not isinstance(hf.get(name), int) or hf[name] <= 0:
                raise ValueError(f"{name}: must be a positive integer in config.json, got {hf.get(name)!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act: only 'silu' is supported, got {hf['hidden_act']!r}")
        if hf.get("mlp_bias", False):
            raise ValueError("mlp_bias: MLP biases are not supported")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"num_key_value_heads: {num_kv_heads} does not divide num_attention_heads {num_heads}")
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim: RoPE needs an even head_dim, got {head_dim}")
        rope = _rope_config(hf)
        sliding_window = hf.get("sliding_window")
        if arch.startswith("Qwen") and not hf.get("use_sliding_window", False):
            sliding_window = None   # Qwen configs carry a window size even when it is switched off
        eos = hf.get("eos_token_id")
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(hf.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            sliding_window=sliding_window,
            eos_token_ids=tuple(as_id_list(eos)),
            rope=rope,
        )


def as_id_list(value: int | list[int] | None) -> list[int]:
    """eos_token_id fields hold an int, a list of ints, or nothing."""
    if value is None:
        return []
    return [value] if isinstance(value, int) else list(value)


def _rope_config(hf: dict[str, Any]) -> RopeConfig:
    # transformers 5 writes `rope_parameters` (theta inside); published checkpoints mostly carry the
    # older top-level `rope_theta` + `rope_scaling`. Accept both.
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling: rope_type {rope_type!r} is not supported; expected one of {ROPE_TYPES}")
    fields: dict[str, Any] = {"theta": float(theta), "type": rope_type}
    if rope_type in ("linear", "llama3"):
        if "factor" not in params:
            raise ValueError(f"rope_scaling: rope_type {rope_type!r} needs a 'factor'")
        fields["factor"] = float(params["factor"])
    if rope_type == "llama3":
        try:
            fields["low_freq_factor"] = float(params["low_freq_factor"])
            fields["high_freq_factor"] = float(params["high_freq_factor"])
            fields["original_max_position"] = int(params["original_max_position_embeddings"])
        except KeyError as e:
            raise ValueError(f"rope_scaling: llama3 rope needs {e.args[0]!r}") from None
    return RopeConfig(**fields)
