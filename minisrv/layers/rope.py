"""Rotary position embeddings (default, linear and Llama 3 frequency scaling), applied as complex products.

Hugging Face checkpoints rotate the pairs (x[i], x[i + head_dim/2]). Our model permutes the q/k projection
rows at load time (see `interleave_rope_rows`) so each pair sits side by side, (x[2i], x[2i+1]); then a
rotation is one in-place complex multiply over a complex view of the q/k columns, about 3x faster on the
CPU than the rotate-half form. Attention scores are unchanged: q and k get the same permutation of their
head dimension, and a dot product does not care about the order of its terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"                  # one of ROPE_TYPES
    factor: float = 1.0                    # linear and llama3
    low_freq_factor: float = 1.0           # llama3 only
    high_freq_factor: float = 4.0          # llama3 only
    original_max_position: int = 8192      # llama3 only


def inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """float32 [head_dim / 2], computed exactly as transformers does so fp32 logits match tightly."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scaled(inv_freq, rope)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    factor, low, high = rope.factor, rope.low_freq_factor, rope.high_freq_factor
    old_context = rope.original_max_position
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def interleave_rope_rows(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Reorder each head's rows (dim 0) from HF's half-split pairs to adjacent pairs (x[i], x[i+d/2]) -> (2i, 2i+1).

    Works for weights [heads*head_dim, in], biases [heads*head_dim] and norm weights [head_dim].
    """
    rows = weight.shape[0]
    half = head_dim // 2
    heads = weight.reshape(rows // head_dim, 2, half, *weight.shape[1:])
    return heads.transpose(1, 2).reshape(weight.shape)


class RotaryEmbedding:
    """A table of unit complex numbers e^{i * pos * freq}, [max_positions, head_dim / 2] complex64; the kernels
    apply it (minisrv/kernels/: `rope_inputs`, `rope_store_kv`).

    Not an nn.Module: the table is derived data, never a weight, and must survive the meta-device
    construction of the model (it is built with an explicit device).
    """

    def __init__(self, rope: RopeConfig, head_dim: int, max_positions: int, device: torch.device | str) -> None:
        with torch.device(device):   # overrides an enclosing torch.device("meta")
            inv_freq = inverse_frequencies(rope, head_dim)
            angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
            self.table = torch.complex(torch.cos(angles), torch.sin(angles))
        self.max_positions = max_positions
