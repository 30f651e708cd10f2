"""PyTorch reference ops for the paged KV cache: the CPU path, and the oracle for the CUDA kernels.

KV cache layout, one tensor per layer: [num_pages, page_size, 2, num_kv_heads, head_dim], where [..., 0, :, :]
holds K and [..., 1, :, :] V. Token t of a sequence lives in page page_table[t // page_size] at offset
t % page_size; its slot is page * page_size + offset. K and V of a token sit side by side because they are
side by side in the fused qkv projection's output, so a step's new K/V go in with one indexed copy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def store_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv: [T, 2, num_kv_heads, head_dim] (any strides) -> cache slots slot_mapping [T]."""
    kv_cache.view(-1, *kv_cache.shape[2:]).index_copy_(0, slot_mapping, kv)


def gather_kv(kv_cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of each sequence's pages, [B, length, 2, num_kv_heads, head_dim].

    page_table: [B, max_pages]. Pages are copied whole (contiguous blocks), then sliced.
    """
    batch, max_pages = page_table.shape
    page_size = kv_cache.shape[1]
    pages = kv_cache.index_select(0, page_table.reshape(-1))
    return pages.view(batch, max_pages * page_size, *kv_cache.shape[2:])[:, :length]


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, page_table: torch.Tensor, max_seq_len: int,
                     kv_mask: torch.Tensor | None) -> torch.Tensor:
    """One new query token per sequence against its cached keys (the new token's K/V already stored).

    q: [B, num_heads, head_dim]; page_table: [B, max_pages]; kv_mask: [B, 1, 1, max_seq_len] bool (True =
    attend) or None when every sequence has max_seq_len tokens. Returns [B, num_heads, head_dim].
    """
    batch, num_heads, head_dim = q.shape
    k, v = gather_kv(kv_cache, page_table, max_seq_len).permute(2, 0, 3, 1, 4).unbind(0)   # [B, kv_heads, L, D]
    num_kv_heads = k.shape[1]
    # The query heads that share a KV head become SDPA's query-length axis: one decode token has no causal
    # structure, so they are just several queries against the same keys. On the CPU this is faster than
    # enable_gqa, which repeats K and V per query head.
    grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(grouped_q, k, v, attn_mask=kv_mask)
    return out.reshape(batch, num_heads, head_dim)   # a copy only where SDPA returns another layout (CUDA)


def extend_attention(q: torch.Tensor, kv_new: torch.Tensor, kv_cache: torch.Tensor, pages: torch.Tensor,
                     context_len: int) -> torch.Tensor:
    """Causal attention of one sequence's n new tokens over its context_len cached tokens plus themselves.

    q: [n, num_heads, head_dim]; kv_new: [n, 2, num_kv_heads, head_dim], the same tokens' K/V (already
    stored); pages: the sequence's page ids covering context_len + n tokens. Returns [n, num_heads, head_dim].
    """
    n = q.shape[0]
    if context_len == 0:
        # A fresh prefill attends only to its own tokens: no need to read them back from the pages.
        k, v = kv_new[:, 0], kv_new[:, 1]
        mask, causal = None, True
    else:
        total = context_len + n
        kv = gather_kv(kv_cache, pages.unsqueeze(0), total)[0]
        k, v = kv[:, 0], kv[:, 1]
        # Query i sits at position context_len + i: it sees every key up to there (bottom-right causal).
        query_pos = torch.arange(context_len, total, device=q.device)
        mask = torch.arange(total, device=q.device) <= query_pos.unsqueeze(1)
        causal = False
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out.transpose(0, 1)
