"""The Llama family in one implementation: Llama 2/3, SmolLM2, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

The model takes a flat batch, forward(input_ids [T], positions [T]) -> hidden [T, hidden_size], with the
step's attention metadata in the forward context. Under tensor parallelism each rank builds its slice of every
layer (minisrv/layers/parallel.py) and the blocks end in an all-reduce. q/k/v and gate/up projections are fused into one matmul
each at load time; q/k rows are stored in the interleaved RoPE layout (see minisrv/layers/rope.py).
Forward methods call submodules' `forward` directly rather than through nn.Module.__call__: on a 2-core
CPU decode step the hook machinery is a measurable share of the time.
"""
from __future__ import annotations

import dataclasses
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from minisrv.kernels import reference
from minisrv.layers.attention import PagedAttention
from minisrv.layers.linear import Linear
from minisrv.layers.norm import RMSNorm
from minisrv.layers.parallel import TensorParallel, partition
from minisrv.layers.rope import RotaryEmbedding
from minisrv.models.config import ModelConfig


def rank_config(config: ModelConfig, tp: TensorParallel) -> ModelConfig:
    """The shapes rank `tp.rank` holds (its heads, its MLP width); the vocabulary stays whole, as the gathered
    logits are."""
    _, num_heads, _, num_kv_heads = tp.heads(config.num_heads, config.num_kv_heads)
    _, intermediate_size = partition(config.intermediate_size, tp.size, tp.rank)
    return dataclasses.replace(config, num_heads=num_heads, num_kv_heads=num_kv_heads,
                               intermediate_size=intermediate_size)


# The blocks take the rank's config (rank_config): their heads and widths are this rank's part.
class Attention(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size, self.kv_size = config.q_size, config.kv_size
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        # Qwen3's per-head q/k RMSNorm weights, one row per q head then per kv head, so the q and k heads
        # (adjacent in the qkv output) are normalized by a single call.
        self.qk_norm = (nn.Parameter(torch.empty(self.num_heads + self.num_kv_heads, self.head_dim))
                        if config.qk_norm else None)
        self.eps = config.rms_norm_eps
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, self.head_dim)
        self.tp = tp

    def forward(self, x: torch.Tensor, rope: object) -> torch.Tensor:
        qkv = self.qkv_proj.forward(x)
        return self.tp.all_reduce(self.o_proj.forward(self.attn(qkv, rope, self.qk_norm, self.eps)))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.gate_up_proj = Linear(config.hidden_size, 2 * config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)
        self.ops: ModuleType = reference
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj.forward(self.ops.silu_and_mul(self.gate_up_proj.forward(x))))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, tp)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config, tp)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope: object):
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm.forward(hidden)
        else:
            hidden, residual = self.input_layernorm.forward(hidden, residual)
        hidden = self.self_attn.forward(hidden, rope)
        hidden, residual = self.post_attention_layernorm.forward(hidden, residual)
        return self.mlp.forward(hidden), residual


class CausalLM(nn.Module):
    """LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM, per `config.architecture`.

    Parameter names follow Hugging Face's where a tensor maps one to one; minisrv/models/weights.py maps
    checkpoints onto the fused ones. Build on the meta device and materialize (see minisrv/models/loader.py).
    """

    def __init__(self, config: ModelConfig, max_positions: int, device: torch.device | str,
                 tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.config, self.tp = config, tp
        self.rank_config = rank_config(config, tp)
        self.vocab_start, vocab_rows = tp.vocab(config.vocab_size)
        self.embed_tokens = nn.Embedding(vocab_rows, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(self.rank_config, tp) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, vocab_rows)
        self.tie_weights()
        # Built with an explicit device so it is real even while the rest is constructed on "meta".
        self.rope = RotaryEmbedding(config.rope, config.head_dim, max_positions, device)
        self.ops: ModuleType = reference

    def tie_weights(self) -> None:
        """Share the embedding with the LM head when the config says so.

        Needed again after `to_empty()`: materializing from the meta device gives each module a new tensor.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def pack_linears(self, quantization: str = "none") -> None:
        """Switch every projection and the LM head to prepacked CPU weights (see minisrv/layers/linear.py), or to int8
        weights: all of them with quantization "int8", the LM head alone with "int8-lm-head"; with
        "int8-weight-only" each also gets an int8 copy for inputs of a few rows, with "int4" a 4-bit one (the LM
        head an int8 one). After this the model is for inference only: the plain weights are gone (a tied LM head's
        lives on in the embedding)."""
        for module in self.modules():
            if isinstance(module, Linear):
                if quantization == "int8" or (quantization == "int8-lm-head" and module is self.lm_head):
                    module.quantize_int8()
                else:
                    if quantization == "int8-weight-only":
                        module.quantize_int8_weight_only()
                    elif quantization == "int4" and module is self.lm_head:
                        # 8 bits, as 4-bit checkpoints keep their output layer (the embedded GGUF's is Q8_0): in 4
                        # bits it cost the embedded model 7.7% perplexity, in 8 bits 0.4% (bench/perplexity.py).
                        module.quantize_int8_weight_only()
                    elif quantization == "int4":
                        module.quantize_int4_weight_only()
                    module.pack(single_row_copy=module is self.lm_head and quantization == "none")

    def bind_kv_cache(self, kv_caches: list[torch.Tensor]) -> None:
        if len(kv_caches) != len(self.layers):
            raise ValueError(f"kv_caches: expected {len(self.layers)} layers, got {len(kv_caches)}")
        for layer, cache in zip(self.layers, kv_caches):
            layer.self_attn.attn.bind(cache)

    def use_ops(self, ops: ModuleType) -> None:
        """Run norms, activations, RoPE and attention with `ops` (a kernels module: minisrv/kernels/)."""
        self.ops = ops
        for module in self.modules():
            if isinstance(module, (RMSNorm, MLP)):
                module.ops = ops
            elif isinstance(module, Attention):
                module.attn.ops = ops

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        rope = self.ops.rope_inputs(self.rope.table, positions)
        hidden = self.embed(input_ids)
        residual = None
        for layer in self.layers:
            hidden, residual = layer.forward(hidden, residual, rope)
        hidden, _ = self.norm.forward(hidden, residual)
        return hidden

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        weight = self.embed_tokens.weight
        if self.tp.size == 1:
            return F.embedding(input_ids, weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= weight.shape[0])
        hidden = F.embedding(local.masked_fill(outside, 0), weight).masked_fill_(outside.unsqueeze(1), 0)
        return self.tp.all_reduce(hidden)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden [rows, hidden_size] -> float32 logits [rows, vocab_size] (into `out` when given)."""
        logits = self.tp.all_gather_vocab(self.lm_head.forward(hidden), self.config.vocab_size)
        return logits.float() if out is None else out.copy_(logits)
