"""Map Hugging Face checkpoint tensors onto CausalLM: fuse q/k/v and gate/up, interleave the RoPE rows, and
under tensor parallelism keep only this rank's part of each (minisrv/layers/parallel.py).

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
from minisrv.layers.parallel import TensorParallel, partition
from minisrv.layers.rope import interleave_rope_rows

# Tensors some checkpoints carry that hold nothing we need (rotary tables are recomputed).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class Target:
    param: str                    # name in CausalLM.named_parameters()
    rows: slice                   # the rows of that parameter this tensor (this rank's part of it) fills
    shape: tuple[int, ...]        # the checkpoint tensor's shape
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    split: tuple[int, int, int] | None = None   # (dim, start, count): this rank's part; None: all of it

    def part(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor if self.split is None else tensor.narrow(*self.split)


def checkpoint_targets(config: ModelConfig, tp: TensorParallel = TensorParallel()) -> dict[str, Target]:
    """Every tensor name a checkpoint of this config holds -> where this rank's part of it goes."""
    hd, hidden, inter, vocab = config.head_dim, config.hidden_size, config.intermediate_size, config.vocab_size
    q_head, q_heads, kv_head, kv_heads = tp.heads(config.num_heads, config.num_kv_heads)
    q, kv = q_heads * hd, kv_heads * hd
    inter_start, inter_part = partition(inter, tp.size, tp.rank)
    vocab_start, vocab_rows = tp.vocab(vocab)
    vocab_part = max(0, min(vocab_rows, vocab - vocab_start))   # the last rank's padding rows hold nothing
    every = slice(None)

    def rope_rows(w: torch.Tensor) -> torch.Tensor:
        return interleave_rope_rows(w, hd)

    def vocab_matrix(param: str) -> Target:
        return Target(param, slice(0, vocab_part), (vocab, hidden), split=(0, vocab_start, vocab_part))

    targets = {"model.embed_tokens.weight": vocab_matrix("embed_tokens.weight"),
               "model.norm.weight": Target("norm.weight", every, (hidden,))}
    if not config.tie_word_embeddings:
        targets["lm_head.weight"] = vocab_matrix("lm_head.weight")
    q_rows, kv_rows = (0, q_head * hd, q), (0, kv_head * hd, kv)
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        for kind in ("weight", "bias") if config.qkv_bias else ("weight",):
            qkv, cols = f"{ours}self_attn.qkv_proj.{kind}", (hidden,) if kind == "weight" else ()
            targets[f"{hf}self_attn.q_proj.{kind}"] = Target(qkv, slice(0, q), (config.q_size, *cols), rope_rows,
                                                             q_rows)
            targets[f"{hf}self_attn.k_proj.{kind}"] = Target(qkv, slice(q, q + kv), (config.kv_size, *cols),
                                                             rope_rows, kv_rows)
            targets[f"{hf}self_attn.v_proj.{kind}"] = Target(qkv, slice(q + kv, q + 2 * kv), (config.kv_size, *cols),
                                                             split=kv_rows)
        if config.qk_norm:
            norm = f"{ours}self_attn.qk_norm"
            targets[f"{hf}self_attn.q_norm.weight"] = Target(norm, slice(0, q_heads), (hd,), rope_rows)
            targets[f"{hf}self_attn.k_norm.weight"] = Target(norm, slice(q_heads, None), (hd,), rope_rows)
        mlp = f"{ours}mlp.gate_up_proj.weight"
        inter_rows = (0, inter_start, inter_part)
        targets[f"{hf}mlp.gate_proj.weight"] = Target(mlp, slice(0, inter_part), (inter, hidden), split=inter_rows)
        targets[f"{hf}mlp.up_proj.weight"] = Target(mlp, slice(inter_part, 2 * inter_part), (inter, hidden),
                                                    split=inter_rows)
        targets[f"{hf}self_attn.o_proj.weight"] = Target(f"{ours}self_attn.o_proj.weight", every,
                                                         (hidden, config.q_size), split=(1, q_head * hd, q))
        targets[f"{hf}mlp.down_proj.weight"] = Target(f"{ours}mlp.down_proj.weight", every, (hidden, inter),
                                                      split=(1, inter_start, inter_part))
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            targets[hf + name] = Target(ours + name, every, (hidden,))
    return targets


@torch.no_grad()
def load_weights(model: CausalLM, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Copy checkpoint tensors into the model; ValueError on a missing, repeated, unknown or misshapen tensor."""
    config = model.config
    targets = checkpoint_targets(config, model.tp)
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
        if tuple(tensor.shape) != target.shape:
            raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {target.shape}")
        destination = params[target.param][target.rows]
        tensor = target.part(tensor)
        if target.transform is not None:
            tensor = target.transform(tensor)
        if tensor.dim() == 1 and destination.dim() == 2:
            tensor = tensor.expand(destination.shape[0], -1)   # a q/k norm weight shared by all heads
        destination.copy_(tensor)
    missing = sorted(set(targets) - seen)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"checkpoint is missing {', '.join(missing[:3])}{more}")
