"""Paged attention inside the model: store the step's new K/V in the page pool, then attend.

The pool's layout and the ops are defined in minisrv/kernels/reference.py (the PyTorch implementation,
used on the CPU); `attention_backend` is where a CUDA implementation with the same signatures plugs in.
Decode rows are computed for all sequences at once; extend rows (prefills, chunks continuing a cached
prefix) sequence by sequence, since their lengths differ widely and each is large enough to amortize a call.
"""
from __future__ import annotations

import contextlib
from types import ModuleType

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from minisrv.kernels import reference
from minisrv.layers.forward_context import get_forward_context


def attention_backend(device: torch.device | str) -> ModuleType:
    """The module whose store_kv / decode_attention / extend_attention run on `device`."""
    # Only the PyTorch reference exists so far; it is correct on every device.
    return reference


def sdpa_backends(device: torch.device) -> contextlib.AbstractContextManager:
    """The SDPA implementations the reference ops may use on `device`, as a context for the forward.

    On CUDA, cuDNN's attention builds an execution plan for every new shape (~1 ms each) and decode shapes
    change every step, so it is left out; flash / memory-efficient kernels need no per-shape setup.
    """
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


class PagedAttention:
    """Attention of one layer over the paged KV cache; `kv_cache` is bound by the model runner."""

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
        self.ops = attention_backend(kv_cache.device)

    def __call__(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        """q: [T, num_heads, head_dim], kv: [T, 2, num_kv_heads, head_dim] (views of the qkv projection).

        Returns [T, num_heads * head_dim].
        """
        if self.kv_cache is None:
            raise RuntimeError("PagedAttention has no KV cache: the model runner binds one before running")
        meta = get_forward_context().attn
        ops, cache = self.ops, self.kv_cache
        ops.store_kv(cache, kv, meta.slot_mapping)
        num_decodes = meta.num_decodes
        num_tokens = q.shape[0]
        if num_decodes:
            decoded = ops.decode_attention(q[:num_decodes], cache, meta.decode_page_table,
                                           meta.decode_max_seq_len, meta.decode_kv_mask)
            if not meta.extends:
                return decoded.reshape(num_tokens, self.num_heads * self.head_dim)
        out = q.new_empty(num_tokens, self.num_heads, self.head_dim)
        if num_decodes:
            out[:num_decodes] = decoded
        for seq in meta.extends:
            rows = slice(seq.query_start, seq.query_start + seq.query_len)
            out[rows] = ops.extend_attention(q[rows], kv[rows], cache, seq.pages, seq.context_len)
        return out.view(num_tokens, self.num_heads * self.head_dim)
