"""Paged attention inside the model: q/k norm and RoPE, the step's new K/V into the page pool, then attention.

The ops come from the kernels module the model runner binds (minisrv/kernels/): the PyTorch reference,
correct on every device, or the CUDA kernels of csrc/. The step's metadata comes from the forward context.
"""
from __future__ import annotations

import contextlib
from types import ModuleType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minisrv.kernels import reference
from minisrv.layers.forward_context import get_forward_context


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA implementations the reference ops may use on `device`, as a context for the forward.

    On CUDA, cuDNN's attention builds an execution plan for every new shape (~1 ms each) and decode shapes
    change every step, so it is left out; flash / memory-efficient kernels need no per-shape setup.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class PagedAttention:
    """Attention of one layer over the paged KV cache; the model runner binds `kv_cache` and `ops`."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.kv_cache: torch.Tensor | None = None
        self.ops: ModuleType = reference

    def bind(self, kv_cache: torch.Tensor) -> None:
        expected = (self.num_kv_heads, self.head_dim)
        if kv_cache.dim() != 5 or kv_cache.shape[2] != 2 or tuple(kv_cache.shape[3:]) != expected:
            raise ValueError(f"kv_cache: expected [pages, page_size, 2, {expected[0]}, {expected[1]}], "
                             f"got {tuple(kv_cache.shape)}")
        self.kv_cache = kv_cache

    def __call__(self, qkv: torch.Tensor, rope: object, qk_norm: torch.Tensor | None, eps: float) -> torch.Tensor:
        """qkv: [T, (num_heads + 2 num_kv_heads) * head_dim], the qkv projection's output (q and k rotated in
        place); rope: what ops.rope_inputs made of the step's positions. Returns [T, num_heads * head_dim]."""
        if self.kv_cache is None:
            raise RuntimeError("PagedAttention has no KV cache: the model runner binds one before running")
        meta = get_forward_context().attn
        q, kv = self.ops.rope_store_kv(qkv, rope, qk_norm, eps, self.kv_cache, meta.slot_mapping, self.num_heads,
                                       self.num_kv_heads, self.head_dim)
        return self.ops.paged_attention(q, kv, self.kv_cache, meta, self.num_heads, self.head_dim)
