"""PyTorch reference ops: the CPU path, and the oracle for the CUDA kernels (minisrv/kernels/cuda.py).

Both modules offer the same functions with the same signatures; the model's layers call whichever the
model runner bound (minisrv/kernels/__init__.py chooses).

KV cache layout, one tensor per layer: [num_pages, page_size, 2, num_kv_heads, head_dim], where [..., 0, :, :]
holds K and [..., 1, :, :] V. Token t of a sequence lives in page page_table[t // page_size] at offset
t % page_size; its slot is page * page_size + offset. K and V of a token sit side by side because they are
side by side in the fused qkv projection's output, so a step's new K/V go in with one indexed copy.

A qkv row is [q heads | k heads | v heads]; q and k are in the interleaved RoPE layout (pairs (2i, 2i + 1),
minisrv/layers/rope.py), so a rotation is one complex multiply.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minisrv.kernels.attention_metadata import AttentionMetadata

NAME = "torch"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual), the sum written into residual's memory."""
    residual.add_(x)
    return F.rms_norm(residual, weight.shape, weight, eps), residual


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x = [gate | up] on the last dimension -> silu(gate) * up."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope_inputs(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """What rope_store_kv needs of a step's positions, computed once per forward: the rotations [T, 1, D/2]."""
    return table.index_select(0, positions).unsqueeze(1)


def rotate_(qk: torch.Tensor, rotations: torch.Tensor) -> None:
    """Rotate q/k heads in place. qk: [T, heads, head_dim] in interleaved layout, last dim contiguous."""
    if qk.dtype == torch.float32:
        torch.view_as_complex(qk.unflatten(-1, (-1, 2))).mul_(rotations)
        return
    # There is no complex bfloat16: rotate in float32 and write back (transformers rotates in the model's
    # dtype, so bfloat16 results differ from it by bfloat16 rounding, in our favour).
    wide = qk.float()
    torch.view_as_complex(wide.unflatten(-1, (-1, 2))).mul_(rotations)
    qk.copy_(wide)


def rope_store_kv(qkv: torch.Tensor, rope: torch.Tensor, qk_norm: torch.Tensor | None, eps: float,
                  kv_cache: torch.Tensor, slot_mapping: torch.Tensor, num_heads: int, num_kv_heads: int,
                  head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3's per-head q/k RMSNorm (when qk_norm, [num_heads + num_kv_heads, head_dim], is given), RoPE on
    q and k in place, then the step's K/V into the cache. Returns q [T, H, D] and kv [T, 2, H_kv, D] (views)."""
    num_tokens = qkv.shape[0]
    q_size = num_heads * head_dim
    qk = qkv[:, : q_size + num_kv_heads * head_dim].view(num_tokens, num_heads + num_kv_heads, head_dim)
    if qk_norm is not None:
        torch.mul(F.rms_norm(qk, (head_dim,), eps=eps), qk_norm, out=qk)
    rotate_(qk, rope)
    kv = qkv[:, q_size:].view(num_tokens, 2, num_kv_heads, head_dim)
    store_kv(kv_cache, kv, slot_mapping)
    return qk[:, :num_heads], kv


def store_kv(kv_cache: torch.Tensor, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """kv: [T, 2, num_kv_heads, head_dim] (any strides) -> cache slots slot_mapping [T], rounded to an 8-bit cache's
    dtype (--kv-cache-dtype fp8)."""
    slots = kv_cache.view(-1, *kv_cache.shape[2:])
    if kv_cache.dtype == kv.dtype:
        slots.index_copy_(0, slot_mapping, kv)
    else:   # as bytes: index_copy_ has no 8-bit float kernel on the CPU
        slots.view(torch.uint8).index_copy_(0, slot_mapping, kv.to(kv_cache.dtype).view(torch.uint8))


def gather_kv(kv_cache: torch.Tensor, page_table: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of each sequence's pages, [B, length, 2, num_kv_heads, head_dim].

    page_table: [B, max_pages]. Pages are copied whole (contiguous blocks), then sliced.
    """
    batch, max_pages = page_table.shape
    page_size = kv_cache.shape[1]
    pages = kv_cache.index_select(0, page_table.reshape(-1))
    return pages.view(batch, max_pages * page_size, *kv_cache.shape[2:])[:, :length]


def paged_attention(q: torch.Tensor, kv: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata,
                    num_heads: int, head_dim: int) -> torch.Tensor:
    """A step's attention, its K/V already stored: decode rows (the first meta.num_decodes) for all sequences at
    once, extend rows (prefills, chunks continuing a cached prefix) sequence by sequence, since their lengths
    differ widely and each is large enough to amortize a call. Returns [T, num_heads * head_dim]."""
    num_decodes, num_tokens = meta.num_decodes, q.shape[0]
    if num_decodes:
        decoded = decode_attention(q[:num_decodes], kv_cache, meta.decode_page_table, meta.decode_max_seq_len,
                                   meta.decode_kv_mask)
        if not meta.extends:
            return decoded.reshape(num_tokens, num_heads * head_dim)
    out = q.new_empty(num_tokens, num_heads, head_dim)
    if num_decodes:
        out[:num_decodes] = decoded
    for seq in meta.extends:
        rows = slice(seq.query_start, seq.query_start + seq.query_len)
        out[rows] = extend_attention(q[rows], kv[rows], kv_cache, seq.pages, seq.context_len)
    return out.view(num_tokens, num_heads * head_dim)


def decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, page_table: torch.Tensor, max_seq_len: int,
                     kv_mask: torch.Tensor | None) -> torch.Tensor:
    """One new query token per sequence against its cached keys (the new token's K/V already stored).

    q: [B, num_heads, head_dim]; page_table: [B, max_pages]; kv_mask: [B, 1, 1, max_seq_len] bool (True =
    attend) or None when every sequence has max_seq_len tokens. Returns [B, num_heads, head_dim].
    """
    batch, num_heads, head_dim = q.shape
    kv = gather_kv(kv_cache, page_table, max_seq_len).to(q.dtype)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)   # [B, kv_heads, L, D]
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
        # A fresh prefill attends only to its own tokens: no need to read them back from the pages (rounded as the
        # pages hold them, in an 8-bit cache).
        if kv_cache.dtype != kv_new.dtype:
            kv_new = kv_new.to(kv_cache.dtype).to(q.dtype)
        k, v = kv_new[:, 0], kv_new[:, 1]
        mask, causal = None, True
    else:
        total = context_len + n
        kv = gather_kv(kv_cache, pages.unsqueeze(0), total)[0].to(q.dtype)
        k, v = kv[:, 0], kv[:, 1]
        # Query i sits at position context_len + i: it sees every key up to there (bottom-right causal).
        query_pos = torch.arange(context_len, total, device=q.device)
        mask = torch.arange(total, device=q.device) <= query_pos.unsqueeze(1)
        causal = False
    # As one batch of 4-D tensors: PyTorch's CPU flash kernel takes only those, and the math fallback that
    # 3-D ones get took 5-15x as long in bfloat16 and 2-4x in float32 (2 threads, per layer: 128 new tokens
    # after 300 cached 4.4 -> 0.5 ms, a 512-token prefill 17.7 -> 1.2 ms, both bfloat16).
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                         attn_mask=mask, is_causal=causal, enable_gqa=True)
    return out[0].transpose(0, 1)
