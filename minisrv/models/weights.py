"""Map Hugging Face checkpoint tensors onto CausalLM: fuse q/k/v and gate/up, interleave the RoPE rows.

`load_weights` accepts any iterable of (HF name, tensor) - safetensors shards, a dequantized GGUF - copies
each tensor into its slice of the model's (device, dtype) parameters as it arrives, and checks at the end
that every expected tensor came exactly once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from minisrv.models.config import ModelConfig
from minisrv.models.llama import CausalLM
from minisrv.layers.rope import interleave_rope_rows

# Tensors some checkpoints carry that hold nothing we need (rotary tables are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Target:
    param: str                    # name in CausalLM.named_parameters()
    rows: slice                   # the rows of that parameter this tensor fills
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


def _targets(config: ModelConfig) -> dict[str, Target]:
    """Every tensor name a checkpoint of this config holds -> where it goes."""
    q, kv, inter, nh = config.q_size, config.kv_size, config.intermediate_size, config.num_heads
    every = slice(None)

    def rope_rows(w: torch.Tensor) -> torch.Tensor:
        return interleave_rope_rows(w, config.head_dim)

    targets = {"model.embed_tokens.weight": Target("embed_tokens.weight", every),
               "model.norm.weight": Target("norm.weight", every)}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = Target("lm_head.weight", every)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        kinds = ("weight", "bias") if config.qkv_bias else ("weight",)
        for kind in kinds:
            qkv = f"{ours}self_attn.qkv_proj.{kind}"
            targets[f"{hf}self_attn.q_proj.{kind}"] = Target(qkv, slice(0, q), rope_rows)
            targets[f"{hf}self_attn.k_proj.{kind}"] = Target(qkv, slice(q, q + kv), rope_rows)
            targets[f"{hf}self_attn.v_proj.{kind}"] = Target(qkv, slice(q + kv, q + 2 * kv))
        if config.qk_norm:
            targets[f"{hf}self_attn.q_norm.weight"] = Target(f"{ours}self_attn.qk_norm", slice(0, nh), rope_rows)
            targets[f"{hf}self_attn.k_norm.weight"] = Target(f"{ours}self_attn.qk_norm", slice(nh, None), rope_rows)
        targets[f"{hf}mlp.gate_proj.weight"] = Target(f"{ours}mlp.gate_up_proj.weight", slice(0, inter))
        targets[f"{hf}mlp.up_proj.weight"] = Target(f"{ours}mlp.gate_up_proj.weight", slice(inter, 2 * inter))
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight",
                     "input_layernorm.weight", "post_attention_layernorm.weight"):
            targets[hf + name] = Target(ours + name, every)
    return targets


@torch.no_grad()
def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; ValueError on a missing, repeated, unknown or misshapen tensor."""
    config = model.config
    targets = _targets(config)
    params = dict(model.named_parameters())
    seen: set[str] = set()
    for name, tensor in weights:
        if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue   # a tied checkpoint may still ship lm_head: it equals embed_tokens
        target = targets.get(name)
        if target is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {config.architecture} "
                             f"(qkv_bias={config.qkv_bias}, qk_norm={config.qk_norm})")
        if name in seen:
            raise ValueError(f"checkpoint tensor {name!r} appears twice")
        seen.add(name)
        destination = params[target.param][target.rows]
        if target.transform is not None:
            tensor = target.transform(tensor)
        if tensor.dim() == 1 and destination.dim() == 2:
            tensor = tensor.expand(destination.shape[0], -1)   # a q/k norm weight shared by all heads
        if tensor.shape != destination.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(destination.shape)}")
        destination.copy_(tensor)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint is missing {', '.join(missing[:3])}{more}")
